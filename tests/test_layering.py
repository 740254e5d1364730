"""The layering docs/architecture.md promises, read from the source's imports (every import, also those inside
functions): the library never imports the command line or the experiments, no module imports another's private
names, and the deployment modules import each other one way only."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "darkknowledge"
CLI = {"darkknowledge.cli", "darkknowledge.specialists.cli"}
# What may import the command line: the command line itself and `python -m darkknowledge`.
MAY_IMPORT_CLI = CLI | {"darkknowledge.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, names taken from it) for every import of the file at ``path``, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            names = [alias.name for alias in node.names]
            # `from . import checkpoint` imports the module darkknowledge.checkpoint
            submodules = [f"{target}.{n}" for n in names if (PACKAGE.parent / f"{target}.{n}".replace(".", "/")
                                                            ).with_suffix(".py").exists()]
            if len(submodules) < len(names):
                yield target, [n for n in names if f"{target}.{n}" not in submodules]
            for submodule in submodules:
                yield submodule, []


GRAPH = {module_name(p): list(imports(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_walk_sees_the_package():
    assert {"darkknowledge.losses", "darkknowledge.cli", "darkknowledge.experiments.report",
            "darkknowledge.specialists.cli"} <= set(GRAPH)
    assert ("darkknowledge.checkpoint", []) in GRAPH["darkknowledge.jobs"]  # `from . import checkpoint`


def test_the_library_never_imports_the_command_line_or_the_experiments():
    wrong = [(module, target) for module, found in GRAPH.items() for target, _ in found
             if (target in CLI and module not in MAY_IMPORT_CLI)
             or (target.startswith("darkknowledge.experiments") and not module.startswith("darkknowledge.experiments")
                 and module != "darkknowledge.cli")]
    assert wrong == []


def test_no_module_imports_another_modules_private_names():
    wrong = [(module, target, name) for module, found in GRAPH.items() for target, names in found
             if target.startswith("darkknowledge") and target != module
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert sorted(set(wrong)) == []


@pytest.mark.parametrize("start", ["darkknowledge.export", "darkknowledge.bench", "darkknowledge.model_card"])
def test_export_bench_and_model_card_import_each_other_one_way_only(start):
    reached, frontier = set(), [start]
    while frontier:  # everything the module imports, directly or through any other module of the package
        for target, _ in GRAPH.get(frontier.pop(), []):
            if target in GRAPH and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert start not in reached  # no path leads back
