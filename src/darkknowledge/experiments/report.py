"""report.md and plots for a reproduction, written from its results.json dict (numbers are never retyped)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .. import checkpoint  # noqa: E402
from ..plots import HELD_OUT, LEGEND, plain_log_axis  # noqa: E402


def jsonable(value):
    """Tuples as lists and keys as strings, so a plan dataclass round-trips through results.json."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    """Where and when a reproduction ran, for its results.json."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def machine_line(m: dict[str, Any]) -> str:
    """The machine of a results.json, for the foot of a report."""
    threads = f"{m['threads']} thread{'s' * (m['threads'] != 1)}"
    return (f"{m['cpus']} CPUs ({m['processor']}, {m['platform']}), torch {m['torch']}, {threads}; "
            f"finished {m['finished']}.")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def plot_temperature_sweep(sweep: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for spec, found in sweep.items():
        ts = [r["temperature"] for r in found["rows"]]
        means = [r["test_errors_mean"] for r in found["rows"]]
        sds = [r["test_errors_sd"] for r in found["rows"]]
        seeds = len(found["rows"][0]["seeds"])
        ax.errorbar(ts, means, yerr=sds if seeds > 1 else None, marker="o", capsize=3,
                    label=f"{spec} ({seeds} seed{'s' * (seeds > 1)})")
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis, [1, 2, 3, 5, 10, 20])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test errors (of 10,000)")
    ax.set_title("Distilled students across temperatures")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_bias_offsets(studies: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(studies), figsize=(10, 3.4), dpi=110)
    for ax, (name, study) in zip(axes, studies.items()):
        ax.plot(study["offsets"], study["val_errors_by_offset"], label="validation", color="C0", **HELD_OUT)
        ax.plot(study["offsets"], study["test_errors_by_offset"], label="test", color="C1", ls=":", lw=1.5)
        ax.axvline(study["chosen_on_validation"]["offset"], color="k", ls="--", lw=1, label="chosen on validation")
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_xlabel(f"offset added to the bias of class {', '.join(map(str, study['classes']))}")
        ax.set_ylabel("errors")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(**LEGEND)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _leaky_validation(t1: dict[str, Any], val_size: int) -> str:
    """A caveat, when the teacher trained on the validation cases the students choose their epoch on."""
    student, small = t1["distilled"], t1["small"]
    if t1["teacher"]["val_errors"] is not None or student["val_errors"] is None:
        return ""
    total = t1["teacher"].get("test_total", 10000)

    def rates(run: dict[str, Any]) -> str:
        return (f"{pct(run['val_errors'] / val_size)} of the validation cases and "
                f"{pct(run['test_errors'] / total)} of the test cases")

    return f"""The teacher trained on the validation cases too, so a student's validation errors are optimistic: the
distilled student errs on {rates(student)} (the small net, which never met a teacher, {rates(small)}). It never
sees those cases, but the teacher's fit to them reaches it through the soft targets of their neighbours in the
transfer set. Validation chooses epochs, temperatures and offsets only; test gives the numbers.

"""


def _missed_targets(r: dict[str, Any]) -> str:
    """What the recipes were and what their curves say, for a run that misses a Table 1 target."""
    teacher, student = r["plan"]["teacher_training"], r["plan"]["student_training"]
    t1 = r["table1"]
    rates = (f"lr {teacher['lr']:g} halved every {teacher['step_epochs']} epochs" if teacher["schedule"] == "step"
             and teacher.get("step_epochs") else f"a {teacher['schedule']} schedule peaking at lr {teacher['lr']:g}")
    # The FULL recipes' provenance: the long runs and probes committed beside results/mnist (not a QUICK run's)
    teacher_probes = ("" if r["quick"] else
                      " Its epoch count was fixed before this run, by the same recipe on the 50,000/10,000 split,"
                      " whose validation errors were lowest at epoch 382 and flat from there to epoch 476"
                      " ([teacher-long](teacher-long/progress.md)): more epochs of this recipe are not expected to"
                      " close the gap.")
    student_probes = ("" if r["quick"] else
                      " Students in the probes ([probes.md](probes.md), where this recipe was chosen on validation)"
                      " stayed about 15 validation errors behind their teacher whatever their rate, hard-label"
                      " weight or length.")
    return f"""Where a target is missed: the teacher trained {teacher['epochs']} epochs of {rates}, momentum
{teacher['momentum']:g}, batch {teacher['batch_size']}.{teacher_probes} The distilled student trained
{student['epochs']} epochs at lr {student['lr']:g}; in its chosen epoch ({t1['distilled']['epoch']}) it made
{t1['distilled']['train_errors_in_chosen_epoch']} errors on its own training cases (the small net:
{t1['small']['train_errors_in_chosen_epoch']}).{student_probes}"""


def write_mnist_report(out: Path, r: dict[str, Any]) -> None:
    """report.md plus temperature.png and bias.png for ``reproduce mnist``."""
    plot_temperature_sweep(r["temperature_sweep"], out / "temperature.png")
    studies = {"no threes in the transfer set": r["no_threes"], "only 7s and 8s": r["only_7_8"]}
    plot_bias_offsets(studies, out / "bias.png")
    paper, t1 = r["paper"], r["table1"]
    temperature = r["plan"]["temperature"]
    names = {"teacher": f"teacher `{t1['teacher']['spec']}`, jitter {r['plan']['teacher_training']['jitter']} px",
             "small": f"small net `{t1['small']['spec']}`, labels only",
             "distilled": f"small net distilled at T = {temperature:g}"
                          + (f", hard-label weight {r['plan']['hard_weight']:g}" if r["plan"].get("hard_weight") else "")}
    def interval(k: str) -> str:  # the exact 95% interval of the count (older results.json files have none)
        return "{} to {}".format(*t1[k]["test_errors_95"]) if "test_errors_95" in t1[k] else "-"

    table1 = table(["model", "test errors", "95% interval", "paper", "chosen epoch"],
                    [[names[k], t1[k]["test_errors"], interval(k), paper[k], t1[k]["epoch"]]
                     for k in ("teacher", "small", "distilled")])
    errors = {k: t1[k]["test_errors"] for k in t1}
    closer = "teacher" if abs(errors["distilled"] - errors["teacher"]) < abs(errors["distilled"] - errors["small"]) \
        else "small net"
    total_min = sum(r["stage_seconds"].values()) / 60

    def target(name: str, ours: float, goal: float, unit: str) -> list[str]:
        return [f"{name} <= {goal:g}{unit}", f"{ours:g}{unit}", "yes" if ours <= goal else f"no, by {ours - goal:g}{unit}"]

    target_rows = [target("teacher test errors", errors["teacher"], paper["teacher"], ""),
                   target("distilled student test errors", errors["distilled"], paper["distilled"], ""),
                   ["distilled student closer to the teacher than to the small net", f"closer to the {closer}",
                    "yes" if closer == "teacher" else "no"]]
    if "minutes_budget" in r:
        target_rows.append(target("training time of the whole run", round(total_min), r["minutes_budget"], " min"))
    sweep_rows = []
    for spec, found in r["temperature_sweep"].items():
        for row in found["rows"]:
            sd = f" ± {row['test_errors_sd']:.1f}" if len(row["seeds"]) > 1 else ""
            sweep_rows.append([spec, f"{row['temperature']:g}", f"{row['test_errors_mean']:.1f}{sd}",
                               " ".join(map(str, row["val_errors"]))])
    chosen = ", ".join(f"{spec}: T = {f['chosen_on_validation']:g}" for spec, f in r["temperature_sweep"].items())

    def bias_rows(study: dict, as_rate: bool) -> list[list[Any]]:
        def fmt(s: dict) -> str:
            on = ", ".join(f"{n} on {c}s" for c, n in s["errors_on_classes"].items())
            return f"{pct(s['error_rate'])} ({s['errors']}; {on})" if as_rate else f"{s['errors']} ({on})"
        return [["no correction", "0", fmt(study["before"])],
                ["offset chosen on validation", f"{study['chosen_on_validation']['offset']:+g}",
                 fmt(study["chosen_on_validation"])],
                ["offset chosen on test (the paper's protocol)",
                 f"{study['chosen_on_test_paper_protocol']['offset']:+g}", fmt(study["chosen_on_test_paper_protocol"])]]

    p3, p78 = paper["no_threes"], paper["only_7_8"]
    jit = r["jittered_test"]
    jit_rows = [[names[k], jit["unjittered_errors"][k], jit["errors"][k]] for k in ("teacher", "small", "distilled")]
    stage_rows = [[k, f"{int(v // 60)}:{int(v % 60):02d}"] for k, v in r["stage_seconds"].items()]
    m = r["machine"]
    text = f"""# Reproducing §3 of Hinton, Vinyals & Dean (2015) on MNIST{' (QUICK smoke run: tiny models, a subset)' if r['quick'] else ''}

Command: `{r['command'] or 'darkknowledge reproduce mnist'}`. Every number below is computed by the evaluation
code from the saved models (`results.json` holds them all); nothing is typed in. Students and the small net
train on the training cases left after a {r['plan']['val_size']:,}-case validation split and choose their epoch
on it; the teacher trains on all of them with a fixed schedule. The test set gives final numbers only.

## Table 1

{table1}

The interval is the exact (Clopper-Pearson) 95% interval of each error count on these {t1['teacher'].get('test_total', 10000):,}
test cases (the model's error rate, as far as one test set of this size can tell it): a paper number inside
it is within the test set's sampling error of ours.

{_leaky_validation(t1, r['plan']['val_size'])}Distilled student minus teacher: {errors['distilled'] - errors['teacher']:+d} errors; minus small net:
{errors['distilled'] - errors['small']:+d}. The distilled student is closer to the {closer}.

### Targets

{table(["target", "ours", "met"], target_rows)}

{_missed_targets(r) if any(row[2] != "yes" for row in target_rows[:3]) else ""}

## Temperature

![test errors against temperature](temperature.png)

{table(["student", "T", "test errors (mean ± sd over seeds)", "validation errors per seed"], sweep_rows)}

Temperature chosen on validation: {chosen}. The paper: all temperatures above 8 give similar results for
students with 300 or more units per layer; with 30 units per layer, 2.5 to 4 work best.

## A class never seen in the transfer set

Student distilled at T = {temperature:g} on a transfer set with no 3s ({r['no_threes']['transfer_cases']} cases); then the
bias of class 3 raised. Paper: {p3['errors']} errors ({p3['errors_on_3']} on 3s), and {p3['corrected_errors']}
({p3['corrected_errors_on_3']} on 3s) with the bias raised by {p3['offset']}, chosen on test.

{table(["", "offset", "test errors"], bias_rows(r['no_threes'], as_rate=False))}

## Only 7s and 8s in the transfer set

Paper: {pct(p78['error_rate'])} test error, {pct(p78['corrected_error_rate'])} with the 7 and 8 biases lowered
by {-p78['offset']}, chosen on test. Transfer set: {r['only_7_8']['transfer_cases']} cases.

{table(["", "offset", "test error"], bias_rows(r['only_7_8'], as_rate=True))}

![errors against bias offset](bias.png)

## Translation invariance

Test images shifted at random by up to {jit['max_shift']} pixels (seeded). Only the teacher saw shifted images
in training; the distilled student saw its soft targets on un-shifted ones.

{table(["model", "test errors", f"test errors, jittered {jit['max_shift']} px"], jit_rows)}

## Time and machine

{table(["stage", "training time (m:ss)"], stage_rows)}

Total training: {total_min:.0f} minutes on {machine_line(m)}
"""
    checkpoint.atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
