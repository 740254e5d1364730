"""MkDocs hooks: the result pages take their numbers from the committed ``results/*/results.json``.

A page writes ``{{ EXPRESSION }}`` where a number goes; the expression is Python, evaluated with each results
folder's ``results.json`` as a name (``mnist``, ``ensemble``, ``ensemble_small``, ``regularizer``,
``specialists``; keys read as attributes or items) and the formatting helpers below. So a table row reads

    | teacher | {{ mnist.table1.teacher.test_errors }} | {{ mnist.paper.teacher }} |

and a rerun of ``darkknowledge reproduce`` changes the site without retyping. The plots and full reports under
``results/`` are added to the site as they are, so pages link to ``results/mnist/temperature.png``.

``python docs/hooks.py`` rewrites the results table of README.md (between its ``results-table`` markers) from
the same files; ``tests/test_docs.py`` checks that it is current and that every page's expressions resolve.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
EXPRESSION = re.compile(r"\{\{(.+?)\}\}", re.S)
README_BLOCKS = ("results-table", "lm-table", "lm-stores-table")  # README.md's generated blocks, <!-- NAME --> ... <!-- /NAME -->
LM_HEADLINE = "lm_6epochs"  # the §4-on-text run the front page quotes: every model 6 epochs, half the works as test
LM_STORES = ("lm-6epochs", "lm-stores", "lm-compact")  # the runs whose stores the front page's store table lists
# students from other tools' stores over lm-compact's windows (benchmarks/store_students.py), in the same table
STORE_STUDENTS = "store-students"


def readme_block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name} -->\n)(.*?)(<!-- /{name} -->)", re.S)


class Results(dict):
    """A results.json object whose keys also read as attributes (``mnist.table1.teacher``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no key {name!r} (keys: {', '.join(self)})") from None


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Results({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def load_results(root: Path = RESULTS) -> dict[str, Results]:
    """Every ``results/NAME/results.json`` as ``NAME`` (dashes as underscores)."""
    return {p.parent.name.replace("-", "_"): _wrap(json.loads(p.read_text()))
            for p in sorted(root.glob("*/results.json"))}


# ---------------------------------------------------------------------------------------------------------------
# Formatting helpers, usable in expressions
# ---------------------------------------------------------------------------------------------------------------

def pct(rate: float | None, digits: int = 1) -> str:
    """0.9274 -> '92.7%'."""
    return "-" if rate is None else f"{100 * rate:.{digits}f}%"


def gain(rate: float | None, digits: int = 1) -> str:
    """A relative change with its sign: 0.0126 -> '+1.3%'."""
    return "-" if rate is None else f"{100 * rate:+.{digits}f}%"


def num(value: float, digits: int = 0) -> str:
    """Thousands separated: 4220.3 -> '4,220'."""
    return f"{value:,.{digits}f}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                           for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Tables too long to write cell by cell
# ---------------------------------------------------------------------------------------------------------------

def temperature_sweep_table(r: Results) -> str:
    rows = []
    for spec, found in r.temperature_sweep.items():
        for row in found.rows:
            sd = f" ± {row.test_errors_sd:.1f}" if len(row.seeds) > 1 else ""
            rows.append([f"`{spec}`", f"{row.temperature:g}", f"{row.test_errors_mean:.1f}{sd}",
                         " ".join(map(str, row.val_errors)),
                         "chosen" if row.temperature == found.chosen_on_validation else ""])
    return table(["student", "T", "test errors (mean ± sd over seeds)", "validation errors per seed",
                  "on validation"], rows)


def chosen(r: Results) -> Results:
    """The §4 student chosen on validation, with all its numbers."""
    return next(s for s in r.students if s.run == r.chosen_on_validation.run)


def ensemble_students_table(r: Results) -> str:
    chosen = r.chosen_on_validation.run
    return table(["student", "combine", "T", "test errors", "validation errors", "share of the gain (test)", ""],
                 [[s.run, s.combine, f"{s.temperature:g}", s.test_errors, s.val_errors, pct(s.share_transferred),
                   "chosen on validation" if s.run == chosen else ""] for s in r.students])


def coverage_table(r: Results, dataset: str, variant: str = "hard") -> str:
    """Table 4: the gain by the number of specialists covering the correct class, beside the paper's."""
    v = r.datasets[dataset].variants[variant]
    paper = r.paper.table4
    rows = []
    for k, c in v.test.by_coverage.items():
        val = v.val.by_coverage.get(k, {})
        rows.append([k, c.cases, f"{c.delta_correct:+d} ± {1.96 * c.delta_correct_se:.0f}", gain(c.relative_gain),
                     gain(val.get("relative_gain")), gain(paper[k]) if k in paper else "-"])
    return table(["specialists covering the correct class", "test cases", "change in correct (95%)",
                  "relative gain", "validation: relative gain", "paper"], rows)


def regularizer_table(r: Results) -> str:
    rows = []
    for name, d in r.datasets.items():
        full, hard, soft = d.full.test_accuracy, d.hard_3pct.test_accuracy, d.soft_3pct.test_accuracy
        rows.append([name, pct(full), pct(hard), f"{pct(soft)} (T = {d.soft_3pct.temperature:g})",
                     pct((soft - hard) / (full - hard)), f"{100 * d.hard_3pct.drop_after_peak:.1f} points"])
    p = r.paper
    rows.append([f"paper ({p.measure})", pct(p.full.test_accuracy), pct(p.hard_3pct.test_accuracy),
                 pct(p.soft_3pct.test_accuracy),
                 pct((p.soft_3pct.test_accuracy - p.hard_3pct.test_accuracy)
                     / (p.full.test_accuracy - p.hard_3pct.test_accuracy)), p.hard_3pct.note])
    small = next(iter(r.datasets.values())).training_cases.small
    return table(["dataset", "100%, hard", f"{pct(r.paper.fraction, 0)} ({small:,} cases), hard",
                  f"{pct(r.paper.fraction, 0)}, soft (T on validation)", "share of the gap recovered",
                  "hard: drop from peak to last epoch"], rows)


def specialists_table(r: Results) -> str:
    rows = []
    for name, d in r.datasets.items():
        hard, soft = d.variants.hard.test.overall, d.variants.soft.test.overall
        rows.append([f"{name} (`{d.generalist.spec}`, {len(d.clusters.subsets)} specialists)",
                     pct(hard.generalist_accuracy, 2), f"{pct(hard.combined_accuracy, 2)} ({gain(hard.relative_gain)})",
                     f"{pct(soft.combined_accuracy, 2)} ({gain(soft.relative_gain)})"])
    p = r.paper.table3
    rows.append([f"paper (JFT, {p.classes:,} classes, {p.specialists_count} specialists)", pct(p.baseline.accuracy),
                 f"{pct(p.specialists.accuracy)} ({gain(p.specialists.relative_gain)})", "-"])
    return table(["dataset", "generalist test accuracy", "+ specialists, hard targets",
                  "+ specialists, soft targets (§6.1)"], rows)


def summary_table(results: dict[str, Results], link: str = "results") -> str:
    """The front page's one table: each section's headline number beside the paper's, linking to its report."""
    m, e, s, g, lm = (results[k] for k in ("mnist", "ensemble", "specialists", "regularizer", LM_HEADLINE))
    t1, sp = m.table1, s.datasets["mnist-100"].variants.hard.test.overall
    mn = g.datasets.mnist
    shares = lambda d: (d.soft_3pct.test_accuracy - d.hard_3pct.test_accuracy) / (  # noqa: E731
        d.full.test_accuracy - d.hard_3pct.test_accuracy)
    p = g.paper
    paper_share = (p.soft_3pct.test_accuracy - p.hard_3pct.test_accuracy) / (p.full.test_accuracy
                                                                            - p.hard_3pct.test_accuracy)
    interval = e.chosen_on_validation.share_interval_95
    rows = [
        ["§3 MNIST: teacher / small net / distilled at T = 20 (test errors)",
         f"{t1.teacher.test_errors} / {t1.small.test_errors} / {t1.distilled.test_errors}",
         f"{m.paper.teacher} / {m.paper.small} / {m.paper.distilled}", f"[report]({link}/mnist/report.md)"],
        ["§3 MNIST, no 3s in the transfer set: test errors, before / after raising the 3 bias",
         f"{m.no_threes.before.errors} / {m.no_threes.chosen_on_validation.errors} (offset on validation)",
         f"{m.paper.no_threes.errors} / {m.paper.no_threes.corrected_errors} (offset on test)",
         f"[report]({link}/mnist/report.md)"],
        ["§4 ensemble distilled into one model: share of the ensemble's gain kept (test)",
         f"{pct(e.chosen_on_validation.share_transferred)} (95%: {pct(interval[0], 0)} to {pct(interval[1], 0)}),"
         f" Fashion-MNIST", f"{pct(e.paper.share_transferred, 0)} (speech)", f"[report]({link}/ensemble/report.md)"],
        ["§4 on text: share of the ensemble's next-token accuracy gain kept (test)",
         f"{pct(lm.share_transferred.accuracy.share, 0)} (95%: {pct(lm.share_transferred.accuracy.low, 0)} to "
         f"{pct(lm.share_transferred.accuracy.high, 0)}), 10 Shakespeare LMs",
         f"{pct(lm.paper.share_transferred, 0)} (speech)", f"[report]({link}/{LM_HEADLINE.replace('_', '-')}/report.md)"],
        ["§5 specialists: test accuracy, generalist -> with specialists",
         f"{pct(sp.generalist_accuracy)} -> {pct(sp.combined_accuracy)} ({gain(sp.relative_gain)}), MNIST-100",
         f"{pct(s.paper.table3.baseline.accuracy)} -> {pct(s.paper.table3.specialists.accuracy)} "
         f"({gain(s.paper.table3.specialists.relative_gain)}), JFT", f"[report]({link}/specialists/report.md)"],
        [f"§6 {pct(p.fraction, 0)} of the data, soft targets: share of the accuracy gap recovered",
         f"{pct(shares(mn))} (MNIST)", f"{pct(paper_share)} (speech)", f"[report]({link}/regularizer/report.md)"],
    ]
    return table(["result", "ours", "paper", ""], rows)


def share_of_dense(row: Results, metric: str) -> str:
    """A store row's share of the dense-store student's gain, with its interval where the run measured one."""
    interval = row.get(f"interval_of_dense_gain_{metric}")
    share = pct(row[f"share_of_dense_gain_{metric}"], 0)
    return share if interval is None else f"{share} (95%: {pct(interval[0], 0)} to {pct(interval[1], 0)})"


def lm_table(r: Results) -> str:
    """README's language-model table: §4 on text beside the paper's speech row, then the half-width students."""
    m, p, chosen_run = r.models, r.paper, r.chosen_on_validation.run
    share = lambda metric: (f"{pct(r.share_transferred[metric].share, 0)} (95%: "  # noqa: E731
                            f"{pct(r.share_transferred[metric].low, 0)} to {pct(r.share_transferred[metric].high, 0)})")
    rows = [
        ["baseline (labels only)", pct(m.baseline.test_accuracy, 2), num(m.baseline.test_log_loss, 4),
         pct(p.baseline)],
        [f"ensemble of {p.members} (seeds differ)", pct(m.ensemble.test_accuracy, 2), num(m.ensemble.test_log_loss, 4),
         pct(p.ensemble)],
        [f"distilled from the ensemble's store, T = {r.chosen_on_validation.temperature:g} (on validation)",
         pct(m[chosen_run].test_accuracy, 2), num(m[chosen_run].test_log_loss, 4), pct(p.distilled)],
        ["share of the ensemble's gain kept", share("accuracy"), share("log_loss"), pct(p.share_transferred, 0)],
        ["half width: distilled / labels only", f"{pct(r.deployment.half_width_distilled.test_accuracy, 2)} / "
         f"{pct(r.deployment.half_width_labels_only.test_accuracy, 2)}",
         f"{num(r.deployment.half_width_distilled.test_log_loss, 4)} / "
         f"{num(r.deployment.half_width_labels_only.test_log_loss, 4)}", "-"],
    ]
    return table(["test", "next-token accuracy", "log-loss (nats)", "paper §4 (speech frame accuracy)"], rows)


def store_name(store: str) -> str:
    """``top16+sampled16`` as "top-16 + 16 drawn from the rest", ``sampled32`` as "sampled-32", the compact
    ``top16+14-log8`` as "compact top-16 + 14 drawn (log8)"."""
    packed = re.fullmatch(r"top(\d+)\+(\d+)-(\w+)", store)
    if packed:
        return f"compact top-{packed[1]} + {packed[2]} drawn ({packed[3]})"
    head, _, drawn = store.partition("+sampled")
    if drawn:
        return f"{store_name(head)} + {drawn} drawn from the rest"
    return re.sub(r"^(top|sampled)(\d+)$", r"\1-\2", store)


def store_table(runs: dict[str, Results], others: Results | None = None) -> str:
    """README's store table: each run's sparse stores (``runs``: folder name to results), each as a share of the
    gain of its own run's dense-store student over its baseline, with the run it comes from; then ``others``
    (a store_students.json: students from other tools' stores, at the size that tool's own encoding takes)."""
    rows = []
    for folder, r in runs.items():
        dense = r.top_k[0].bytes_per_token
        rows += [[store_name(row.store), num(row.bytes_per_token), f"1/{dense / row.bytes_per_token:.0f}",
                  pct(row.test_accuracy, 2), num(row.test_log_loss, 4), share_of_dense(row, "accuracy"),
                  share_of_dense(row, "log_loss"), f"[{folder}](results/{folder}/README.md)"] for row in r.top_k[1:]]
    if others is not None:
        dense = next(row.bytes_per_token for row in others.rows if row.store == "dense")
        rows += [[row.store.replace("distillkit", "DistillKit"), num(row.codec_bytes_per_token),
                  f"1/{dense / row.codec_bytes_per_token:.0f}", pct(row.test_accuracy, 2), num(row.test_log_loss, 4),
                  share_of_dense(row, "accuracy"), share_of_dense(row, "log_loss"),
                  f"[{STORE_STUDENTS}](results/{STORE_STUDENTS}/README.md)"]
                 for row in others.rows if row.get("codec_bytes_per_token")]
    return table(["store", "bytes/token", "of dense", "test accuracy", "test log-loss", "share of the dense gain "
                  "(accuracy)", "share (log-loss)", "run"], rows)


def load_json(path: str) -> Results:
    """Any committed JSON file, by its path from the repository root (e.g. a benchmark's --json output)."""
    return _wrap(json.loads((ROOT / path).read_text()))


def bench_table(path: str) -> str:
    """A committed ``darkknowledge bench --json`` file as the command printed it."""
    sys.path.insert(0, str(ROOT / "src"))
    from darkknowledge.bench import format_table
    return format_table(json.loads((ROOT / path).read_text()))


BENCH = "results/mnist-student/bench.json"  # the MNIST runs benched side by side


def namespace(results: dict[str, Results] | None = None) -> dict[str, Any]:
    results = load_results() if results is None else results
    helpers = {f.__name__: f for f in (pct, gain, num, minutes, table, temperature_sweep_table,
                                       ensemble_students_table, chosen, coverage_table, regularizer_table,
                                       specialists_table, load_json, bench_table)}
    return {**results, **helpers, "bench": load_json(BENCH), "len": len, "min": min, "max": max, "sum": sum, "abs": abs, "round": round,
            "summary_table": lambda link="results": summary_table(results, link)}


def render(markdown: str, names: dict[str, Any], where: str = "page") -> str:
    """Every ``{{ EXPRESSION }}`` replaced by its value; an expression that fails names the page and itself."""
    def value(match: re.Match) -> str:
        expression = match.group(1).strip()
        try:
            result = eval(expression, {"__builtins__": {}, **names})  # our own pages, as a template engine would
        except Exception as e:
            raise ValueError(f"{where}: {{{{ {expression} }}}} failed: {type(e).__name__}: {e}") from None
        return f"{result:g}" if isinstance(result, float) else str(result)
    return EXPRESSION.sub(value, markdown)


# ---------------------------------------------------------------------------------------------------------------
# MkDocs events
# ---------------------------------------------------------------------------------------------------------------

_names: dict[str, Any] = {}


def on_config(config, **_):
    _names.clear()
    _names.update(namespace())
    return config


def on_files(files, config, **_):
    """The committed results folders (reports, plots) become part of the site under results/."""
    from mkdocs.structure.files import File
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix in (".md", ".png") and path.is_file():
            files.append(File.generated(config, f"results/{path.relative_to(RESULTS).as_posix()}",
                                        abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, **_):
    if page.file.src_uri.startswith("results/"):
        return markdown  # the reports as reproduce wrote them
    from mkdocs.exceptions import PluginError
    try:
        return render(markdown, _names, page.file.src_uri)
    except ValueError as e:
        raise PluginError(str(e)) from None


def readme_blocks() -> dict[str, str]:
    """What each of README's generated blocks holds, rendered from the committed results."""
    results = load_results()
    return {"results-table": summary_table(results, link="results"), "lm-table": lm_table(results[LM_HEADLINE]),
            "lm-stores-table": store_table({name: results[name.replace("-", "_")] for name in LM_STORES},
                                           load_json(f"results/{STORE_STUDENTS}/store_students.json"))}


def main() -> int:
    readme = ROOT / "README.md"
    text = new = readme.read_text()
    for name, block in readme_blocks().items():
        new, count = readme_block(name).subn(lambda m: m.group(1) + block + "\n" + m.group(3), new)
        if count != 1:
            print(f"README.md has no <!-- {name} --> ... <!-- /{name} --> block", file=sys.stderr)
            return 1
    readme.write_text(new)
    print("README.md: generated tables " + ("rewritten" if new != text else "already current"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
