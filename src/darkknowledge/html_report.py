"""``darkknowledge report``: one self-contained HTML page (and its Markdown twin) from reproduce output folders.

Each folder holds ``results.json`` written by ``darkknowledge reproduce``; the experiment is recognised from its
keys (``table1``: MNIST §3, ``students``: ensembles §4, ``datasets`` with ``variants``: specialists §5, with
``hard_3pct``: the regularizer §6; ``share_transferred`` with ``deployment`` and ``top_k``: language models,
``reproduce lm``). For a kind not known here the folder's ``report.md``
is rendered as it is. Beside the tables of ``results.json`` (with the paper's numbers), the saved models in
``RUN_DIR/runs`` are evaluated again on their test set for confusion matrices and reliability (calibration)
diagrams, and each run's ``metrics.jsonl`` gives its training curves.

The page is built once as a list of blocks (headings, paragraphs, tables, figures, preformatted text) and
written twice: HTML with every figure as a base64 PNG data URI and inline CSS (no external file or address),
and Markdown with the figures as PNG files beside it. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import checkpoint, reading, schemas  # noqa: E402
from .errors import DarkKnowledgeError  # noqa: E402
from .language_model import no_gain_note  # noqa: E402
from .plots import HELD_OUT, LEGEND, TRAIN, plain_log_axis  # noqa: E402

RELIABILITY_BINS = 10


# ---------------------------------------------------------------------------------------------------------------
# Blocks: what a page is made of
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # plain text; `code` spans are kept as code


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file-name stem for the Markdown twin
    png: bytes
    alt: str


@dataclass
class Pre:
    text: str


@dataclass
class Markdown:
    """A Markdown text from elsewhere (an unknown experiment's report.md), rendered as it is; ``folder`` resolves
    its relative image paths (embedded in the HTML when the file exists)."""
    text: str
    folder: Path
    prefix: str = "md"  # file-name stem of its images copied beside the Markdown twin


@dataclass
class Page:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(blocks)


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def temperature_figure(sweep: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for spec, found in sweep.items():
        ts = [r["temperature"] for r in found["rows"]]
        means = [r["test_errors_mean"] for r in found["rows"]]
        sds = [r["test_errors_sd"] for r in found["rows"]]
        seeds = len(found["rows"][0]["seeds"])
        ax.errorbar(ts, means, yerr=sds if seeds > 1 else None, marker="o", capsize=3,
                    label=f"{spec} ({seeds} seed{'s' * (seeds > 1)})")
        chosen = found.get("chosen_on_validation")
        if chosen is not None:
            ax.axvline(chosen, ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis, [1, 2, 3, 5, 10, 20])
    ax.set_xlabel("temperature T (dotted: chosen on validation)")
    ax.set_ylabel("test errors")
    ax.set_title("Distilled students across temperatures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def bias_figure(studies: dict[str, Any]) -> bytes:
    fig, axes = plt.subplots(1, len(studies), figsize=(10, 3.4), dpi=100, squeeze=False)
    for ax, (name, study) in zip(axes[0], studies.items()):
        ax.plot(study["offsets"], study["val_errors_by_offset"], label="validation", color="C0", **HELD_OUT)
        ax.plot(study["offsets"], study["test_errors_by_offset"], label="test", color="C1", ls=":", lw=1.5)
        ax.axvline(study["chosen_on_validation"]["offset"], color="k", ls="--", lw=1, label="chosen on validation")
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_xlabel(f"offset added to the bias of class {', '.join(map(str, study['classes']))}")
        ax.set_ylabel("errors")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def per_class_figure(per_class: dict[str, dict[str, int]], classes: list[str]) -> bytes:
    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(classes) * len(per_class)), 3.4), dpi=100)
    width = 0.8 / max(len(per_class), 1)
    x = np.arange(len(classes))
    for i, (name, errors) in enumerate(per_class.items()):
        ax.bar(x + (i - (len(per_class) - 1) / 2) * width, [errors.get(c, 0) for c in classes], width, label=name)
    ax.set_xticks(x, labels=classes)
    ax.set_xlabel("true class")
    ax.set_ylabel("test errors")
    ax.set_title("Errors per class")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def confusion_figure(evaluations: dict[str, "ModelEvaluation"]) -> bytes:
    n = len(evaluations)
    classes = len(next(iter(evaluations.values())).classes)
    size = 3.6 if classes <= 12 else 4.6
    fig, axes = plt.subplots(1, n, figsize=(size * n + 0.4, size + 0.4), dpi=100, squeeze=False)
    for ax, (name, ev) in zip(axes[0], evaluations.items()):
        matrix = ev.confusion
        rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        if classes <= 12:
            for i in range(classes):
                for j in range(classes):
                    if matrix[i, j]:
                        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if rates[i, j] > 0.5 else "black")
            ax.set_xticks(range(classes), labels=ev.classes, fontsize=7,
                          rotation=90 if max(map(len, ev.classes)) > 2 else 0)
            ax.set_yticks(range(classes), labels=ev.classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: {ev.errors} errors", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def reliability_figure(evaluations: dict[str, "ModelEvaluation"]) -> bytes:
    n = len(evaluations)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.4, 3.6), dpi=100, squeeze=False)
    edges = np.linspace(0, 1, RELIABILITY_BINS + 1)
    for ax, (name, ev) in zip(axes[0], evaluations.items()):
        centers = (edges[:-1] + edges[1:]) / 2
        acc = np.array([a if a is not None else np.nan for a in ev.bin_accuracy])
        ax.bar(centers, np.nan_to_num(acc), width=1 / RELIABILITY_BINS, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {100 * ev.ece:.2f}%", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def training_figure(histories: dict[str, list[dict[str, Any]]]) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        line, = axes[0].plot(epochs, [r.get("train_error_rate", np.nan) for r in rows], label=f"{name} train",
                             **TRAIN)
        val = [r.get("val_error_rate") for r in rows]
        if any(v is not None for v in val):
            axes[0].plot(epochs, [np.nan if v is None else v for v in val], color=line.get_color(),
                         label=f"{name} validation", **HELD_OUT)
            axes[1].plot(epochs, [r.get("val_loss", np.nan) for r in rows], color=line.get_color(), label=name,
                         **HELD_OUT)
    axes[0].set_yscale("log")
    plain_log_axis(axes[0].yaxis, percent=True)
    axes[0].set_title("error rate (thin dashed: training, thick solid: validation)", fontsize=9)
    axes[1].set_title("validation cross-entropy", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(**LEGEND)
    fig.tight_layout()
    return _png(fig)


def ensemble_figure(r: dict[str, Any]) -> bytes:
    """§4: each combine rule's distilled students across temperatures, beside the baseline and the ensemble."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    temperatures = r["plan"]["temperatures"]
    for rule, style in zip(r["plan"]["rules"], ("o-", "s--", "x:")):
        rows = [s for s in r["students"] if s["combine"] == rule]
        ax.plot([s["temperature"] for s in rows], [100 * s["test_accuracy"] for s in rows], style,
                label=f"distilled, {rule}")
    ax.axhline(100 * r["baseline"]["test_accuracy"], color="gray", lw=1, label="baseline")
    ax.axhline(100 * r["ensemble"]["arithmetic"]["test"]["accuracy"], color="k", lw=1, ls="--",
               label="ensemble (arithmetic)")
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis, temperatures)
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Distilling a {len(r['members'])}-member ensemble")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def regularizer_figure(r: dict[str, Any]) -> bytes:
    """§6: train and test accuracy per epoch of the 100%, 3% hard and 3% soft runs, per dataset."""
    datasets = r["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), dpi=110, squeeze=False)
    for ax, (dataset, d) in zip(axes[0], datasets.items()):
        for key, label, color in (("hard_3pct", "3%, hard targets", "C3"),
                                  ("soft_3pct", f"3%, soft targets (T = {d['soft_3pct']['temperature']:g})", "C0"),
                                  ("full", "100%, hard targets", "k")):
            c = d[key]["curves"]
            ax.plot(c["epoch"], [100 * a for a in c["test_accuracy"]], color=color, label=f"{label}: test",
                    **HELD_OUT)
            ax.plot(c["epoch"], [100 * a for a in c["train_accuracy"]], color=color, label=f"{label}: train",
                    **TRAIN)
            ax.axvline(d[key]["epoch"], color=color, lw=0.8, ls=":")
        ax.set_xscale("log")  # 30 epochs of the full run beside 300 of the small ones
        plain_log_axis(ax.xaxis)
        ax.set_xlabel("epoch (dotted: the one chosen on validation)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset}: {d['training_cases']['small']:,} vs {d['training_cases']['full']:,} cases")
        ax.grid(alpha=0.3)
        ax.legend(**LEGEND)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------------
# Evaluating saved runs again: confusion matrices and calibration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ModelEvaluation:
    classes: list[str]
    errors: int
    total: int
    confusion: np.ndarray  # [true, predicted] counts
    nll: float
    ece: float  # expected calibration error of the top probability, RELIABILITY_BINS equal-width bins
    bin_accuracy: list[float | None]
    bin_confidence: list[float | None]
    bin_counts: list[int]


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = RELIABILITY_BINS):
    """(ECE, accuracy per bin, mean confidence per bin, cases per bin) of the top-class probability."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    accs, confs, counts, ece = [], [], [], 0.0
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        counts.append(count)
        if count:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].double().mean())
            ece += count / len(labels) * abs(acc - conf)
            accs.append(acc)
            confs.append(conf)
        else:
            accs.append(None)
            confs.append(None)
    return ece, accs, confs, counts


class _Datasets:
    """Test sets loaded once per dataset name."""

    def __init__(self, data_dir: str | None):
        self.data_dir = data_dir
        self.loaded: dict[str, Any] = {}

    def test(self, meta: dict[str, Any]):
        from .jobs import DataChoice
        name = meta["dataset"]
        if name not in self.loaded:
            classes = meta.get("train_classes")
            choice = DataChoice(name, self.data_dir, val_size=meta["validation"]["size"],
                                val_seed=meta["validation"]["seed"], subset=meta.get("subset"),
                                train_classes=tuple(classes) if classes else None)
            self.loaded[name] = choice.load()[2]
        return self.loaded[name]


def evaluate_saved(run: Path, datasets: _Datasets) -> ModelEvaluation:
    """Test-set confusion matrix and calibration of a saved run, from its weights (as ``jobs.evaluate_run``)."""
    from .evaluation import predict_logits
    from .jobs import check_compatible
    model, meta = checkpoint.load_model(run)
    test = datasets.test(meta)
    check_compatible(meta, test, run)
    logits = predict_logits(model, test.images)
    labels = test.labels.long()
    k = len(meta["classes"])
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k).numpy()
    probs = torch.softmax(logits.double(), 1)
    ece, accs, confs, counts = calibration(probs, labels)
    nll = float(torch.nn.functional.cross_entropy(logits.double(), labels))
    return ModelEvaluation([str(c) for c in meta["classes"]], int((predicted != labels).sum()), len(labels),
                           confusion, nll, ece, accs, confs, counts)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The epochs of a run's metrics.jsonl, each checked against its schema (a line that does not fit is a
    one-line error naming the file and the line); a line cut by a crash is left out."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    text = reading.read_bytes(path, "metrics", reading.JSON_LIMIT).decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        rows.append(schemas.check(schemas.MetricsRow, row, f"{path} line {number}", "retrain or restore the run"))
    return rows


def model_sections(page: Page, prefix: str, runs: dict[str, Path], datasets: _Datasets,
                   log: Callable[[str], None]) -> None:
    """Confusion matrices, reliability diagrams and training curves of the named runs (those that exist)."""
    evaluations: dict[str, ModelEvaluation] = {}
    problems = []
    for name, run in runs.items():
        if not (run / checkpoint.MODEL_META).exists():
            problems.append(f"{name}: no saved model in {run}")
            continue
        try:
            evaluations[name] = evaluate_saved(run, datasets)
        except DarkKnowledgeError as e:
            problems.append(f"{name}: {e}")
    for problem in problems:
        log(f"report: {problem}")
    if evaluations:
        page.add(Heading(3, "Confusion matrices (test set)"),
                 Para("Rows: true class, columns: predicted class; shade: fraction of the row. Computed again from "
                      "the saved weights."),
                 Figure(f"{prefix}-confusion", confusion_figure(evaluations), "confusion matrices"),
                 Heading(3, "Calibration (test set)"),
                 Para(f"Reliability diagrams: test cases grouped into {RELIABILITY_BINS} bins of the top "
                      "probability (at T = 1); the bar is the accuracy within the bin. ECE: expected calibration "
                      "error, the case-weighted mean |accuracy - confidence| over bins."),
                 Figure(f"{prefix}-reliability", reliability_figure(evaluations), "reliability diagrams"),
                 Table(["model", "test errors", "test cases", "cross-entropy (nats)", "ECE"],
                       [[name, ev.errors, ev.total, f"{ev.nll:.4f}", f"{100 * ev.ece:.2f}%"]
                        for name, ev in evaluations.items()]))
    if problems:
        page.add(Para("Not evaluated: " + "; ".join(problems)))
    histories = {}
    for name, run in runs.items():
        try:
            if rows := read_metrics(run):
                histories[name] = rows
        except DarkKnowledgeError as e:
            log(f"report: {name}: {e}")
    if histories:
        page.add(Heading(3, "Training curves"),
                 Para("From each run's metrics.jsonl, one point per epoch."),
                 Figure(f"{prefix}-training", training_figure(histories), "training curves"))


# ---------------------------------------------------------------------------------------------------------------
# Sections per experiment kind
# ---------------------------------------------------------------------------------------------------------------

def detect_kind(results: dict[str, Any]) -> str:
    # lm first: it shares temperature_sweep with mnist and chosen_on_validation with ensemble
    if {"share_transferred", "deployment", "top_k"} <= set(results) and isinstance(results.get("models"), dict):
        return "lm"
    if "table1" in results and "temperature_sweep" in results:
        return "mnist"
    if isinstance(results.get("datasets"), dict) and all(
            isinstance(d, dict) and "variants" in d for d in results["datasets"].values()):
        return "specialists"
    if "students" in results and "chosen_on_validation" in results and "ensemble" in results:
        return "ensemble"
    if isinstance(results.get("datasets"), dict) and all(
            isinstance(d, dict) and {"full", "hard_3pct", "soft_3pct"} <= set(d) for d in results["datasets"].values()):
        return "regularizer"
    return "unknown"


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def dense_share_text(row: dict[str, Any], metric: str) -> str:
    """A store row's share of the dense store's gain, with the 95% interval of runs that measured one (the
    HTML report and reproduce lm's report.md both write it so)."""
    interval = row.get(f"interval_of_dense_gain_{metric}")
    share = _pct(row[f"share_of_dense_gain_{metric}"], 0)
    return share if interval is None else f"{share} (95%: {_pct(interval[0], 0)} to {_pct(interval[1], 0)})"


def mnist_section(page: Page, folder: Path, r: dict[str, Any], prefix: str, datasets: _Datasets,
                  log: Callable[[str], None]) -> None:
    paper, t1 = r["paper"], r["table1"]
    page.add(Heading(2, f"MNIST (§3){' — QUICK smoke run' if r.get('quick') else ''}: {folder}"),
             Para(f"Command: `{r.get('command') or 'darkknowledge reproduce mnist'}`. Numbers from results.json; "
                  "the paper's beside them."))
    names = [k for k in ("teacher", "small", "distilled") if k in t1]
    page.add(Heading(3, "Table 1: test errors"),
             Table(["model", "spec", "parameters", "test errors", "paper", "validation errors", "epoch kept"],
                   [[k, t1[k]["spec"], f"{t1[k]['parameters']:,}", t1[k]["test_errors"], paper.get(k, "-"),
                     "-" if t1[k].get("val_errors") is None else t1[k]["val_errors"], t1[k]["epoch"]]
                    for k in names]))
    if "jittered_test" in r:
        jit = r["jittered_test"]
        page.add(Table(["model", "test errors", f"test errors, images shifted up to {jit['max_shift']} px"],
                       [[k, jit["unjittered_errors"][k], jit["errors"][k]] for k in names if k in jit["errors"]],
                       caption="Translation invariance"))

    sweep = r.get("temperature_sweep") or {}
    if sweep:
        rows = []
        for spec, found in sweep.items():
            for row in found["rows"]:
                sd = f" ± {row['test_errors_sd']:.1f}" if len(row["seeds"]) > 1 else ""
                rows.append([spec, f"{row['temperature']:g}", f"{row['test_errors_mean']:.1f}{sd}",
                             " ".join(map(str, row["val_errors"])),
                             "chosen" if row["temperature"] == found.get("chosen_on_validation") else ""])
        page.add(Heading(3, "Temperature"),
                 Figure(f"{prefix}-temperature", temperature_figure(sweep), "test errors against temperature"),
                 Para("The paper: temperatures above 8 give similar results with 300 or more units per layer; with "
                      "30 units per layer, 2.5 to 4 work best."),
                 Table(["student", "T", "test errors (mean ± sd over seeds)", "validation errors per seed",
                        "on validation"], rows))

    per_class = {k: t1[k]["per_class_test_errors"] for k in names if "per_class_test_errors" in t1[k]}
    if per_class:
        classes = list(next(iter(per_class.values())))
        page.add(Heading(3, "Per-class test errors"),
                 Figure(f"{prefix}-per-class", per_class_figure(per_class, classes), "errors per class"),
                 Table(["model", *classes, "total"],
                       [[k, *[v.get(c, 0) for c in classes], sum(v.values())] for k, v in per_class.items()]))

    studies = {title: r[key] for key, title in (("no_threes", "no 3s in the transfer set"),
                                                 ("only_7_8", "only 7s and 8s in the transfer set")) if key in r}
    if studies:
        page.add(Heading(3, "Classes missing from the transfer set"))
        p3, p78 = paper.get("no_threes", {}), paper.get("only_7_8", {})
        for key, title in (("no_threes", "no 3s in the transfer set"), ("only_7_8", "only 7s and 8s")):
            if key not in r:
                continue
            s = r[key]

            def fmt(x: dict) -> str:
                on = ", ".join(f"{n} on {c}s" for c, n in x["errors_on_classes"].items())
                return f"{x['errors']} ({_pct(x['error_rate'], 1)}; {on})"
            if key == "no_threes":
                paper_before = f"{p3.get('errors', '-')} ({p3.get('errors_on_3', '-')} on 3s)"
                paper_after = f"{p3.get('corrected_errors', '-')} ({p3.get('corrected_errors_on_3', '-')} on 3s), " \
                              f"offset {p3.get('offset', '-')}"
            else:
                paper_before = _pct(p78.get("error_rate"), 1)
                paper_after = f"{_pct(p78.get('corrected_error_rate'), 1)}, offset {p78.get('offset', '-')}"
            page.add(Table(["", "offset", "test errors", "paper"],
                           [["no correction", "0", fmt(s["before"]), paper_before],
                            ["offset chosen on validation", f"{s['chosen_on_validation']['offset']:+g}",
                             fmt(s["chosen_on_validation"]), ""],
                            ["offset chosen on test (the paper's protocol)",
                             f"{s['chosen_on_test_paper_protocol']['offset']:+g}",
                             fmt(s["chosen_on_test_paper_protocol"]), paper_after]],
                           caption=f"{title} ({s.get('transfer_cases')} transfer cases)"))
        page.add(Figure(f"{prefix}-bias", bias_figure(studies), "errors against bias offset"))

    runs = folder / "runs"
    model_sections(page, prefix, {k: runs / k for k in ("teacher", "small", "distilled")}, datasets, log)
    if r.get("stage_seconds"):
        page.add(Table(["stage", "training seconds"], [[k, v] for k, v in r["stage_seconds"].items()],
                       caption="Time"))
    _machine(page, r)


def specialists_section(page: Page, folder: Path, r: dict[str, Any], prefix: str, datasets: _Datasets,
                        log: Callable[[str], None]) -> None:
    paper = r.get("paper", {})
    p3, p4 = paper.get("table3", {}), paper.get("table4", {})
    page.add(Heading(2, f"Specialists (§5){' — QUICK smoke run' if r.get('quick') else ''}: {folder}"),
             Para(f"Command: `{r.get('command') or 'darkknowledge reproduce specialists'}`. The paper's numbers are "
                  "for JFT (15,000 classes, 61 specialists): shown for the shape of the result."))
    for name, d in r["datasets"].items():
        g = d.get("generalist", {})
        page.add(Heading(3, f"{name}"),
                 Para(f"Generalist `{g.get('spec')}`: {g.get('test_errors')} test errors "
                      f"({_pct(g.get('test_accuracy'))} accuracy)."))
        rows = []
        variants = d["variants"]
        if variants:
            first = next(iter(variants.values()))["test"]
            rows.append(["generalist", _pct(first["conditional"]["generalist_accuracy"]),
                         _pct(first["overall"]["generalist_accuracy"]), "",
                         f"{_pct(p3.get('baseline', {}).get('conditional_accuracy'), 1)} / "
                         f"{_pct(p3.get('baseline', {}).get('accuracy'), 1)}"])
        for variant, v in variants.items():
            t = v["test"]
            ps = p3.get("specialists", {})
            rows.append([f"+ specialists ({variant} targets)", _pct(t["conditional"]["combined_accuracy"]),
                         _pct(t["overall"]["combined_accuracy"]), f"{100 * t['overall']['relative_gain']:+.1f}%",
                         f"{_pct(ps.get('conditional_accuracy'), 1)} / {_pct(ps.get('accuracy'), 1)}"
                         if variant == "hard" else ""])
        page.add(Table(["system", "conditional test accuracy", "test accuracy", "relative gain",
                        "paper: conditional / overall"], rows, caption="Table 3"))
        for variant, v in variants.items():
            cover = v["test"].get("by_coverage", {})
            page.add(Table(["specialists covering the correct class", "test cases", "change in correct",
                            "relative gain", "paper"],
                           [[k, c["cases"], c["delta_correct"], f"{100 * c['relative_gain']:+.1f}%"
                             if c.get("relative_gain") is not None else "-",
                             f"{100 * p4[k]:+.1f}%" if k in p4 else (f"{100 * p4['10+']:+.1f}%"
                                                                      if "10+" in p4 and k.isdigit() and int(k) >= 10
                                                                      else "-")]
                            for k, c in cover.items()], caption=f"Table 4, {variant} targets"))
        model_sections(page, f"{prefix}-{_slug(name)}", {"generalist": folder / "runs" / name / "generalist"},
                       datasets, log)
    _machine(page, r)


def ensemble_section(page: Page, folder: Path, r: dict[str, Any], prefix: str, datasets: _Datasets,
                     log: Callable[[str], None]) -> None:
    paper, chosen = r.get("paper", {}), r["chosen_on_validation"]
    student = next(s for s in r["students"] if s["run"] == chosen["run"])
    page.add(Heading(2, f"Ensemble distillation (§4){' — QUICK smoke run' if r.get('quick') else ''}: {folder}"),
             Para(f"Command: `{r.get('command') or 'darkknowledge reproduce ensemble'}`. Numbers from results.json; "
                  f"the paper's are {paper.get('measure', 'speech frame accuracies')}, shown for the shape of the "
                  "result. The combine rule and temperature of the distilled model are chosen on validation."))
    rows = [["baseline (one model)", _pct(r["baseline"]["test_accuracy"]), r["baseline"]["test_errors"],
             r["baseline"]["val_errors"], _pct(paper.get("baseline"), 1)]]
    for rule, e in r["ensemble"].items():
        rows.append([f"{len(r['members'])}-member ensemble ({rule})", _pct(e["test"]["accuracy"]), e["test"]["errors"],
                     e["val"]["errors"], _pct(paper.get("ensemble"), 1) if rule == "arithmetic" else ""])
    rows.append([f"distilled ({student['combine']}, T = {student['temperature']:g})",
                 _pct(student["test_accuracy"]), student["test_errors"], student["val_errors"],
                 _pct(paper.get("distilled"), 1)])
    interval = chosen.get("share_interval_95")
    share = "-" if chosen["share_transferred"] is None else _pct(chosen["share_transferred"], 1)
    if interval:
        share += f" (95% interval {_pct(interval[0], 0)} to {_pct(interval[1], 0)})"
    rows.append(["share of the ensemble's gain transferred", share, "", "", _pct(paper.get("share_transferred"), 0)])
    page.add(Table(["system", "test accuracy", "test errors", "validation errors", "paper"], rows,
                   caption="The result"),
             Figure(f"{prefix}-students", ensemble_figure(r), "test accuracy against temperature"),
             Table(["student", "combine", "T", "test errors", "validation errors", "share (test)"],
                   [[s["run"], s["combine"], f"{s['temperature']:g}", s["test_errors"], s["val_errors"],
                     "-" if s.get("share_transferred") is None else _pct(s["share_transferred"], 1)]
                    for s in r["students"]], caption="Every student"))
    runs = folder / "runs"
    model_sections(page, prefix, {"baseline": runs / "baseline", "distilled": runs / chosen["run"]}, datasets, log)
    _machine(page, r)


def regularizer_section(page: Page, folder: Path, r: dict[str, Any], prefix: str, datasets: _Datasets,
                        log: Callable[[str], None]) -> None:
    paper = r.get("paper", {})
    page.add(Heading(2, f"Soft targets as a regularizer (§6){' — QUICK smoke run' if r.get('quick') else ''}: "
                        f"{folder}"),
             Para(f"Command: `{r.get('command') or 'darkknowledge reproduce regularizer'}`. Test accuracy at the "
                  "epoch chosen on validation; the paper's are "
                  f"{paper.get('measure', 'speech frame accuracies')}."))
    systems = (("full", "100%, hard targets"), ("hard_3pct", "small share, hard targets"),
               ("soft_3pct", "small share, soft targets"))
    for name, d in r["datasets"].items():
        rows = []
        for key, label in systems:
            s = d[key]
            t = f" (T = {s['temperature']:g})" if "temperature" in s else ""
            rows.append([label + t, _pct(s["test_accuracy"]), s["epoch"], _pct(s["peak_test_accuracy"]),
                         f"{100 * s['drop_after_peak']:.2f} points", _pct(paper.get(key, {}).get("test_accuracy"), 1)])
        page.add(Table(["system", "test accuracy", "epoch kept", "peak test accuracy", "drop from peak to last epoch",
                        "paper"], rows, caption=f"{name}: {d['training_cases']['small']:,} of "
                                                f"{d['training_cases']['full']:,} training cases"))
    page.add(Figure(f"{prefix}-curves", regularizer_figure(r), "train and test accuracy per epoch"))
    for name in r["datasets"]:
        runs = folder / "runs" / name
        model_sections(page, f"{prefix}-{_slug(name)}", {"100%": runs / "full", "small, hard": runs / "hard-3pct",
                                                          "small, soft": runs / r["datasets"][name]["soft_3pct"]["run"]},
                       datasets, log)
    _machine(page, r)


def lm_section(page: Page, folder: Path, r: dict[str, Any], prefix: str, log: Callable[[str], None]) -> None:
    """§4 on text (``reproduce lm``): baseline, ensemble and distilled language models beside the paper's speech row,
    the share of the ensemble's gain kept, the half-width deployment, the top-k store sweep and samples."""
    paper, models, chosen = r.get("paper", {}), r["models"], r["chosen_on_validation"]
    data = r.get("data", {})
    tokenizer = data.get("tokenizer", {})
    page.add(Heading(2, f"Language models (§4 on text){' — QUICK smoke run' if r.get('quick') else ''}: {folder}"),
             Para(f"Command: `{r.get('command') or 'darkknowledge reproduce lm'}`. Numbers from results.json: "
                  "next-token accuracy is the paper's frame accuracy, log-loss in nats per token; the paper's are "
                  f"{paper.get('measure', 'test frame accuracy (speech)')}, shown for the shape of the result. "
                  f"Data: {tokenizer.get('kind', '-')} tokenizer of {tokenizer.get('vocab_size', '-')} tokens; "
                  "tokens per split: " + ", ".join(f"{k} {v:,}" for k, v in data.get("tokens", {}).items()) + "."))

    def quality(m: dict[str, Any]) -> list[str]:
        return [_pct(m["test_accuracy"]), f"{m['test_log_loss']:.4f}", f"{m['test_perplexity']:.1f}",
                f"{m['val_log_loss']:.4f}"]

    by_t = r.get("share_by_temperature", {})
    members = r.get("plan", {}).get("members")
    rows = [["baseline (one model)", *quality(models["baseline"]), "", _pct(paper.get("baseline"), 1)],
            [f"{members}-member ensemble" if members else "ensemble", *quality(models["ensemble"]), "",
             _pct(paper.get("ensemble"), 1)]]
    for s in r["temperature_sweep"]:
        share = by_t.get(s["run"], {})
        mark = " (chosen on validation)" if s["run"] == chosen["run"] else ""
        rows.append([f"distilled, T = {s['temperature']:g}{mark}", *quality(models[s["run"]]),
                     f"{_pct(share.get('accuracy'), 0)} / {_pct(share.get('log_loss'), 0)}",
                     _pct(paper.get("distilled"), 1) if mark else ""])
    page.add(Table(["model", "test next-token accuracy", "test log-loss", "test perplexity", "val log-loss",
                    "share of the gain (accuracy / log-loss)", "paper"], rows, caption="The result (test)"),
             Para(f"T = {chosen['temperature']:g} (`{chosen['run']}`) is chosen on validation log-loss; test gives "
                  "the numbers."))

    share_rows = []
    for metric, s in r["share_transferred"].items():
        share_rows.append([metric.replace("_", "-"), _pct(s["share"], 1),
                           f"{_pct(s['low'], 0)} to {_pct(s['high'], 0)}", f"{s['gain_per_token']:+.4f}",
                           _pct(paper.get("share_transferred"), 0) if metric == "accuracy" else ""])
    page.add(Table(["metric", "share transferred", "95% interval", "ensemble gain per token", "paper"], share_rows,
                   caption="Share of the ensemble's gain kept by the distilled model (test; 95% block bootstrap "
                           f"over test windows; the paper's target: {_pct(paper.get('target_share'), 0)})"))
    for metric, s in r["share_transferred"].items():
        if note := no_gain_note(metric, s):
            page.add(Para(f"**{note}**"))

    d = r["deployment"]
    page.add(Table(["student", "spec", "test next-token accuracy", "test log-loss", "test perplexity", "val log-loss"],
                   [[label, d.get("spec", "-"), *quality(d[key])]
                    for key, label in (("half_width_distilled", "half width, distilled"),
                                       ("half_width_labels_only", "half width, labels only"))],
                   caption="Deployment: a smaller student distilled from the ensemble against the same model on "
                           "labels only"))

    dense = next((row["bytes_per_token"] for row in r["top_k"] if row["store"] == "dense"), None)
    page.add(Table(["store", "bytes per token", "of the dense bytes", "test next-token accuracy", "test log-loss",
                    "share of the dense store's gain (accuracy)", "share of the dense store's gain (log-loss)"],
                   [[row["store"], f"{row['bytes_per_token']:,.0f}",
                     f"1/{dense / row['bytes_per_token']:.0f}" if dense else "-", _pct(row["test_accuracy"]),
                     f"{row['test_log_loss']:.4f}", dense_share_text(row, "accuracy"), dense_share_text(row, "log_loss")]
                    for row in r["top_k"]],
                   caption=f"The token store at top-k (students at T = {chosen['temperature']:g}) and sampled (at "
                           "T = 1): quality against bytes per token; the share is of the gain over the baseline of "
                           "the dense-store student at the same T, with its 95% block-bootstrap interval"))

    figure = folder / "lm.png"
    if figure.is_file() and (png := figure.read_bytes())[:8] == b"\x89PNG\r\n\x1a\n":
        page.add(Figure(f"{prefix}-lm", png, "test next-token accuracy against temperature and store bytes"))
    elif figure.exists():
        log(f"report: {figure} is not a PNG file; left out")

    if r.get("samples"):
        page.add(Heading(3, "Samples"), Para("Each model's continuation of the same prompt, as results.json holds it."))
        for name, text in r["samples"].items():
            page.add(Para(f"**{name}**"), Pre(text.strip("\n")))
    if r.get("stage_seconds"):
        total = f" (total {r['total_seconds']:,.0f} s)" if r.get("total_seconds") is not None else ""
        page.add(Table(["stage", "seconds"], [[k, v] for k, v in r["stage_seconds"].items()], caption=f"Time{total}"))
    _machine(page, r)


def unknown_section(page: Page, folder: Path, r: dict[str, Any] | None, prefix: str) -> None:
    page.add(Heading(2, f"{folder}"))
    report = folder / "report.md"
    if report.exists():
        page.add(Para("An experiment this report does not know; its report.md as written:"),
                 Markdown(reading.read_bytes(report, "report", reading.TEXT_LIMIT).decode(errors="replace"),
                          folder, prefix))
    elif r is not None:
        page.add(Para("An experiment this report does not know, with no report.md; its results.json:"),
                 Pre(json.dumps(r, indent=2)[:20000]))


def _machine(page: Page, r: dict[str, Any]) -> None:
    m = r.get("machine")
    if isinstance(m, dict):
        page.add(Para(f"Machine: {m.get('cpus')} CPUs ({m.get('processor')}, {m.get('platform')}), torch "
                      f"{m.get('torch')}, {m.get('threads')} threads; finished {m.get('finished')}."))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def build_page(folders: list[str | Path], data_dir: str | None = None,
               log: Callable[[str], None] = lambda _: None) -> Page:
    page = Page("darkknowledge: reproduction report")
    page.add(Heading(1, page.title),
             Para("Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network. "
                  f"{len(folders)} result folder(s): " + ", ".join(str(f) for f in folders) + "."))
    datasets = _Datasets(data_dir)
    used: set[str] = set()
    for i, folder in enumerate(map(Path, folders)):
        if not folder.is_dir():
            raise DarkKnowledgeError(f"report: {folder} is not a folder; give folders written by "
                                     "'darkknowledge reproduce'")
        path = folder / "results.json"
        has_results = path.exists() or path.is_symlink()
        r = checkpoint.read_json(path, "results") if has_results else None
        if has_results and not isinstance(r, dict):
            raise DarkKnowledgeError(f"report: {path} is not a JSON object; rerun the reproduction or restore "
                                     "the file")
        if r is None and not (folder / "report.md").exists():
            raise DarkKnowledgeError(f"report: {folder} holds neither results.json nor report.md; give folders "
                                     "written by 'darkknowledge reproduce'")
        kind = detect_kind(r) if r is not None else "unknown"
        if kind in schemas.RESULTS:  # every field a section reads is there, of its type
            schemas.check(schemas.RESULTS[kind], r, path, f"rerun 'darkknowledge reproduce {kind}' or restore the file")
        prefix = f"{i + 1}-{_slug(folder.resolve().name)}"
        while prefix in used:
            prefix += "x"
        used.add(prefix)
        log(f"report: {folder}: {kind}")
        if kind == "mnist":
            mnist_section(page, folder, r, prefix, datasets, log)
        elif kind == "specialists":
            specialists_section(page, folder, r, prefix, datasets, log)
        elif kind == "ensemble":
            ensemble_section(page, folder, r, prefix, datasets, log)
        elif kind == "regularizer":
            regularizer_section(page, folder, r, prefix, datasets, log)
        elif kind == "lm":
            lm_section(page, folder, r, prefix, log)
        else:
            unknown_section(page, folder, r, prefix)
    return page


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #446; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
th, td { border: 1px solid #bbb; padding: .25em .6em; text-align: right; }
th { background: #eef; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #f8f8fb; }
img { max-width: 100%; height: auto; display: block; margin: .6em 0; }
code { background: #f2f2f2; padding: 0 .2em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
"""


def _inline_html(text: str) -> str:
    """Escape, then `code` and **bold**: the markers survive escaping unchanged."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table_html(header: list[str], rows: list[list[Any]], caption: str = "") -> str:
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{_inline_html(caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(parts) + "\n</table>"


def markdown_to_html(text: str, folder: Path | None = None) -> str:
    """A small Markdown subset (headings, paragraphs, lists, tables, fenced code, images) to escaped HTML.
    Images are embedded when the PNG exists in ``folder``; links become their text."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline_html(' '.join(para))}</p>")
            para.clear()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre>{html.escape(chr(10).join(block))}</pre>")
        elif m := re.match(r"^(#{1,6})\s+(.*)", stripped):
            flush()
            level = min(len(m.group(1)) + 2, 6)  # below the page's h1 and the folder's h2
            out.append(f"<h{level}>{_inline_html(m.group(2))}</h{level}>")
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                if not re.match(r"^\|?\s*:?-+", lines[i].strip()):
                    rows.append(cells(lines[i]))
                i += 1
            out.append(_table_html(rows[0], rows[1:]) if rows else "")
            continue
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)\s]+)\)", stripped):
            flush()
            target = (folder / m.group(2)) if folder is not None else None
            if target is not None and "://" not in m.group(2) and target.suffix.lower() == ".png" \
                    and target.is_file():
                out.append(f'<img alt="{html.escape(m.group(1))}" src="{_data_uri(target.read_bytes())}">')
            else:
                out.append(f"<p>[image: {_inline_html(m.group(1))}]</p>")
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline_html(_plain_links(t))}</li>" for t in items) + "</ul>")
            continue
        elif not stripped:
            flush()
        else:
            para.append(_plain_links(stripped))
        i += 1
    flush()
    return "\n".join(out)


def _plain_links(text: str) -> str:
    """[text](address) -> text: the page links to nothing outside itself."""
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1", text)


def to_html(page: Page) -> str:
    body = []
    for block in page.blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            body.append(_table_html(block.header, block.rows, block.caption))
        elif isinstance(block, Figure):
            body.append(f'<img alt="{html.escape(block.alt)}" src="{_data_uri(block.png)}">')
        elif isinstance(block, Pre):
            body.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Markdown):
            body.append(markdown_to_html(block.text, block.folder))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(page.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _relink_images(block: Markdown, image_name: Callable[[Figure], str]) -> str:
    """A report.md's images that exist as PNG files in its folder are copied beside the twin and relinked."""
    def relink(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        path = block.folder / target
        if "://" in target or path.suffix.lower() != ".png" or not path.is_file():
            return m.group(0)
        return f"![{alt}]({image_name(Figure(f'{block.prefix}-{_slug(path.stem)}', path.read_bytes(), alt))})"
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", relink, block.text)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(page: Page, image_name: Callable[[Figure], str]) -> str:
    parts = []
    for block in page.blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Para):
            parts.append(block.text)
        elif isinstance(block, Table):
            lines = [f"**{_md_cell(block.caption)}**", ""] if block.caption else []
            lines += ["| " + " | ".join(map(_md_cell, block.header)) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        elif isinstance(block, Figure):
            parts.append(f"![{block.alt}]({image_name(block)})")
        elif isinstance(block, Pre):
            parts.append("```\n" + block.text + "\n```")
        elif isinstance(block, Markdown):
            parts.append(_relink_images(block, image_name).strip())
    return "\n\n".join(parts) + "\n"


def _write(path: Path, data: bytes) -> None:
    """Atomically, readable by others (a report is meant to be shared; temp files are created 0600)."""
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
        os.chmod(tmp, 0o644)
    checkpoint.atomic_write(path, write)


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]


def write_report(folders: list[str | Path], out: str | Path, data_dir: str | None = None,
                 log: Callable[[str], None] = lambda _: None) -> ReportFiles:
    """Write ``out`` (.html, self-contained), ``out`` with .md (its twin) and the twin's PNG files beside it."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise DarkKnowledgeError(f"report: --out must name an .html file, got {out}")
    page = build_page(folders, data_dir, log)
    markdown_path = out.with_suffix(".md")
    images: list[Path] = []

    def image_name(figure: Figure) -> str:
        name = f"{out.stem}-{figure.name}.png"
        images.append(out.parent / name)
        _write(out.parent / name, figure.png)
        return name

    markdown = to_markdown(page, image_name)
    _write(markdown_path, markdown.encode("utf-8"))
    _write(out, to_html(page).encode("utf-8"))
    return ReportFiles(out, markdown_path, images)


# ---------------------------------------------------------------------------------------------------------------
# CLI (the parser is in cli.py)
# ---------------------------------------------------------------------------------------------------------------

def run_report(args) -> int:
    import sys
    if args.out is None:
        raise DarkKnowledgeError("report needs --out FILE.html")
    files = write_report(args.folders, args.out, args.data_dir, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {files.html} and {files.markdown} ({len(files.images)} images beside it)")
    return 0
