"""The front page and the documentation: what they show must be true.

- every ``darkknowledge ...`` command shown in README.md and docs/ parses with the CLI's own parser;
- every Python code block in README.md and docs/ runs as written (in a temporary folder);
- every ``{{ expression }}`` of the docs pages resolves from the committed results/*/results.json;
- README's results table is the one docs/hooks.py renders from those files.

A Python block whose first line is ``# needs MNIST ...`` is skipped without the MNIST files; one whose first line
is ``# not run by the tests: REASON`` is skipped with that reason, shown to readers too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkknowledge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", ROOT.parent / "shared" / "data")).resolve()  # blocks run in a temp folder
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = "# not run by the tests:"
NEEDS_MNIST = "# needs MNIST"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(language: str) -> list[tuple[str, str]]:
    """(page:line, code) of every fenced block in that language."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                line = text.count("\n", 0, m.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", m.group(2)))
    return found


def commands() -> list[tuple[str, list[str]]]:
    """Every darkknowledge command line of the shell blocks, continuations joined, comments dropped."""
    found = []
    for where, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "darkknowledge" not in words or words[0].startswith("$"):
                continue
            at = words.index("darkknowledge")
            if at > 0 and words[at - 1] not in ("-m", "$"):
                continue  # 'pip install darkknowledge' and the like
            found.append((where, words[at + 1:]))
    return found


@pytest.mark.parametrize("where,argv", commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_every_command_shown_is_a_real_subcommand_with_real_options(where, argv, capsys):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: darkknowledge {' '.join(argv)}: {capsys.readouterr().err.strip()}")
    assert args.command is not None, f"{where}: no sub-command in 'darkknowledge {' '.join(argv)}'"


def test_the_readme_starts_with_the_two_set_up_commands_and_they_are_what_ci_runs():
    first = blocks("bash")[0]
    assert first[0].startswith("README.md:")
    assert [line.split("#")[0].strip() for line in first[1].strip().splitlines()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("where,code", blocks("python"), ids=lambda x: x if ":" in x and "\n" not in x else "")
def test_every_python_block_runs_as_written(where, code, tmp_path, monkeypatch):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith(SKIP):
        pytest.skip(f"{where}: {first[len(SKIP):].strip()}")
    if first.startswith(NEEDS_MNIST) and not (DATA / "mnist").is_dir():
        pytest.skip(f"{where}: needs the MNIST files (set DARKKNOWLEDGE_DATA)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DARKKNOWLEDGE_DATA", str(DATA))
    threads = torch.get_num_threads()
    try:
        exec(compile(code, where, "exec"), {"__name__": "__docs__"})
    finally:
        torch.set_num_threads(threads)


def test_every_results_expression_in_the_docs_resolves():
    hooks = _hooks()
    names = hooks.namespace()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        rendered = hooks.render(page.read_text(), names, str(page.relative_to(ROOT)))
        assert "{{" not in rendered and "}}" not in rendered, page


def test_the_readme_tables_are_the_ones_rendered_from_results_json():
    hooks = _hooks()
    readme = (ROOT / "README.md").read_text()
    for name, rendered in hooks.readme_blocks().items():
        block = hooks.readme_block(name).search(readme)
        assert block, f"README.md lost its <!-- {name} --> block"
        assert block.group(2).strip() == rendered.strip(), "run: python docs/hooks.py"


def test_an_expression_that_fails_names_its_page_and_itself():
    hooks = _hooks()
    with pytest.raises(ValueError, match=r"page.md: \{\{ mnist.nothing \}\} failed"):
        hooks.render("x {{ mnist.nothing }}", hooks.namespace(), "page.md")


def test_the_site_builds_strictly(tmp_path):
    """What CI's `make docs` checks, where the docs extra is installed: links, anchors, nav, API references."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
