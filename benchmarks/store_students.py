"""Each store's student beside the dense store's, on a finished ``reproduce lm`` experiment (issue 31, item 3).

Given the experiment's folder and one or more folder stores over its training windows (ours, or another codec's
rows rebuilt as one of our top-k stores, e.g. ``store_codecs.distillkit_store``), each store's student is trained
with exactly the plan's student recipe at T = 1: the plan's spec and ``student_training``, its soft and hard
weights, the same objective and the same training and validation windows as the experiment's ``student-T1-<store>``
runs (``experiments.lm.student_objective``). Each is evaluated on validation and test, and reported with its bytes
a token, test log-loss and accuracy, and its share of the dense store's test gain over the labels-only baseline,
``(student - baseline) / (dense - baseline)``, with the 95% block bootstrap reproduce lm uses
(``block_bootstrap_share``, whole test windows resampled), against the experiment's own ``baseline`` and
``student-T1`` runs. Nothing is written into the experiment::

    python benchmarks/store_students.py --experiment RUNS/lm-compact [--plan compact] \\
        --store 'distillkit budget=RUNS/codecs-distillkit/fd8a42218d503d65' \\
        --codecs results/store-codecs/codecs.json --out results/store-students [--runs DIR] [--jobs 2]

The plan comes from the experiment's results.json; ``--plan NAME`` names it while the experiment has none yet
(data.json is then checked against it). A store is ``PATH`` (named by its folder) or ``NAME=PATH``; with
``--codecs`` (a codecs.json of store_codecs.py) a store named like one of its codecs also gets that codec's own
bytes a token (a DistillKit store's top-k arrays hold more bytes than DistillKit's encoding of the same rows).
Students go to ``--runs`` (default ``OUT/runs``) as ``student-T1-<name>``, reused by key when finished and resumed
when stopped; ``--jobs N`` trains N stores at a time, each in a spawned process of one thread.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from darkknowledge import checkpoint
from darkknowledge.destinations import refuse_foreign_destination
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.experiments.lm import (PLANS, Plan, experiment_splits, model_row, plan_from_json,
                                          student_objective)
from darkknowledge.experiments.plans import choose
from darkknowledge.language_model import (block_bootstrap_share, ensemble_is_better, evaluate_language_model,
                                          load_language_model, train_language_model)
from darkknowledge.soft_targets import DENSE, SoftTargets

METRICS = ("log_loss", "accuracy")


def experiment_plan(experiment: Path, plan_name: str | None) -> tuple[str | None, Plan]:
    """The plan an experiment ran: its results.json's, or ``plan_name`` while it has none."""
    if not experiment.is_dir():
        raise DarkKnowledgeError(f"--experiment {experiment} is not a folder; give a reproduce lm folder")
    results = experiment / "results.json"
    if results.is_file():
        recorded = checkpoint.read_json(results, "results")
        if plan_name is not None and plan_name != recorded.get("plan_name"):
            raise DarkKnowledgeError(f"--plan {plan_name}: {results} records plan {recorded.get('plan_name')!r}; "
                                     "leave --plan out")
        return recorded.get("plan_name"), plan_from_json(recorded["plan"])
    if plan_name is None:
        raise DarkKnowledgeError(f"--experiment {experiment} holds no results.json yet; give --plan NAME, the plan "
                                 "it is run with")
    return choose(PLANS, plan_name, False, "lm")


def parse_store(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named by its folder) as (name, path)."""
    name, _, path = text.rpartition("=") if "=" in text else ("", "", text)
    path = Path(path)
    name = name or path.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise DarkKnowledgeError(f"--store {text}: {name!r} cannot name a run folder; give NAME=PATH with a plain "
                                 "name")
    return name, path


def run_name(store: str) -> str:
    """The folder of a store's student: ``student-T1-<name>``, spaces as hyphens."""
    return "student-T1-" + "-".join(store.split())


def codec_bytes(codecs: str | None) -> dict[str, float]:
    """Each codec's bytes a token from a store_codecs.py codecs.json, by name."""
    if codecs is None:
        return {}
    return {row["name"]: row["bytes_per_token"] for row in checkpoint.read_json(Path(codecs), "codecs")["codecs"]}


_worker: dict[str, Any] = {}  # a worker process's splits, read once for all its stores


def train_student(plan: Plan, experiment: Path, data_dir: str | None, runs: Path, store: tuple[str, Path],
                  splits=None) -> str:
    """The store's student at T = 1 with the plan's student recipe, into ``runs/student-T1-<name>`` (reused by
    key when finished). Without ``splits`` (a worker process): one thread, the experiment's splits read once."""
    name, path = store
    if splits is None:
        torch.set_num_threads(1)
        _worker.setdefault("splits", experiment_splits(plan, experiment, data_dir))
        splits = _worker["splits"]
    run = run_name(name)
    train_language_model(plan.spec, splits.tokenizer, splits.windows["train"], splits.windows["validation"],
                         plan.student_training, student_objective(plan, splits, path, 1.0), runs / run,
                         log=lambda line: print(f"[{run}] {line}", file=sys.stderr, flush=True))
    return run


def experiment_model(experiment: Path, run: str, plan: Plan):
    """The experiment's finished run ``run``, checked to be of the plan's spec."""
    model, meta = load_language_model(experiment / "runs" / run)
    if meta.get("spec") != plan.spec:
        raise DarkKnowledgeError(f"{experiment / 'runs' / run} is a {meta.get('spec')} model, the plan's is "
                                 f"{plan.spec}; give the experiment's own folder and plan")
    return model


def scores(model, splits) -> dict[str, Any]:
    return {"val": evaluate_language_model(model, splits.windows["validation"]),
            "test": evaluate_language_model(model, splits.windows["test"])}


def store_students(experiment: str, stores: list[str], out: str, runs: str | None = None, plan_name: str | None = None,
                   data_dir: str | None = None, codecs: str | None = None, jobs: int = 1,
                   command: str = "") -> dict[str, Any]:
    """Train, evaluate and compare each store's student (see the module doc); writes ``OUT/store_students.json``
    and ``OUT/store_students.md`` and returns what the JSON holds."""
    started = time.perf_counter()
    experiment, out = Path(experiment), Path(out)
    runs = Path(runs) if runs is not None else out / "runs"
    name, plan = experiment_plan(experiment, plan_name)
    if 1 not in plan.temperatures:
        raise DarkKnowledgeError(f"--experiment {experiment}: its plan has no student at T = 1 to compare with")
    named = [parse_store(text) for text in stores]
    if len({run_name(n) for n, _ in named}) < len(named):
        raise DarkKnowledgeError("two --store share a name; name them apart with NAME=PATH")
    refuse_foreign_destination(out, "--out")
    for store, _ in named:
        refuse_foreign_destination(runs / run_name(store), "--runs", makes="run")
    splits = experiment_splits(plan, experiment, data_dir)
    train = splits.windows["train"]
    opened = {store: SoftTargets.open(path, windows=train, tokenizer_sha256=splits.tokenizer.sha256,
                                      vocab_size=splits.tokenizer.vocab_size) for store, path in named}
    codec_size = codec_bytes(codecs)

    if jobs > 1 and len(named) > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(named))) as pool:
            for run in pool.imap_unordered(functools.partial(train_student, plan, experiment, data_dir, runs), named):
                print(f"[{run} done]", file=sys.stderr, flush=True)
            pool.close()  # and joined, rather than terminated on leaving: no worker is killed mid-exit
            pool.join()
    students = {store: train_student(plan, experiment, data_dir, runs, (store, path), splits) for store, path in named}

    baseline, dense = (scores(experiment_model(experiment, run, plan), splits) for run in ("baseline", "student-T1"))
    rows = [{"store": "none (labels only)", "run": str(experiment / "runs" / "baseline"), "bytes_per_token": 0,
             **model_row(baseline)},
            {"store": "dense", "run": str(experiment / "runs" / "student-T1"),
             "bytes_per_token": _dense_bytes(experiment, train, splits), **model_row(dense)}]
    for store, path in named:
        evaluated = scores(load_language_model(runs / students[store])[0], splits)
        row = {"store": store, "path": str(path.resolve()), "key": opened[store].key, "layout": opened[store].layout,
               "run": str(runs / students[store]), "bytes_per_token": opened[store].bytes_per_case,
               "codec_bytes_per_token": codec_size.get(store), **model_row(evaluated)}
        for metric in METRICS:  # the same block bootstrap as reproduce lm's, the dense store's student as the top
            share = block_bootstrap_share(baseline["test"], dense["test"], evaluated["test"], metric)
            row[f"share_of_dense_gain_{metric}"] = share["share"]
            row[f"interval_of_dense_gain_{metric}"] = [share["low"], share["high"]]
        rows.append(row)
    result = {"command": command, "experiment": str(experiment.resolve()), "plan_name": name,
              "student": {"spec": plan.spec, "training": asdict(plan.student_training), "temperature": 1,
                          "soft_weight": plan.soft_weight, "hard_weight": plan.hard_weight},
              "windows_fingerprint": train.fingerprint(), "rows": rows,
              "dense_gain_per_token": {m: rows[1][f"test_{m}"] - rows[0][f"test_{m}"] for m in METRICS},
              "seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "store_students.json", result)
    checkpoint.atomic_write(out / "store_students.md", lambda p: Path(p).write_text(table(result)))
    if (experiment / "results.json").is_file():
        plot(result, checkpoint.read_json(experiment / "results.json", "results"), out / "shares.png")
    return result


def plot(result: dict[str, Any], experiment_results: dict[str, Any], path: Path) -> None:
    """Every store's student as a share of the dense store's log-loss gain (95% interval) against its bytes a
    token: the experiment's own stores, then these (at their codec's own size where one is known)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours = [r for r in experiment_results["top_k"] if r["store"] != "dense"]
    theirs = [r for r in result["rows"] if "share_of_dense_gain_log_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    for rows, label, size in ((ours, "darkknowledge", "bytes_per_token"),
                              (theirs, "another codec's rows (at its own size)", "codec_bytes_per_token")):
        x = [r.get(size) or r["bytes_per_token"] for r in rows]
        y = [100 * r["share_of_dense_gain_log_loss"] for r in rows]
        low, high = zip(*[[100 * v for v in r["interval_of_dense_gain_log_loss"]] for r in rows]) if rows else ((), ())
        ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]], fmt="o",
                    label=label)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["store"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for target in (90, 95):
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xscale="log", xlabel="bytes a token", ylabel="share of the dense store's log-loss gain (%)",
           title="Store size against the student's share (test, 95% block bootstrap)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _dense_bytes(experiment: Path, train, splits) -> int | None:
    """Bytes a token of the experiment's dense store (the one over these windows), None when it is gone."""
    for header in sorted((experiment / "runs" / "token-targets").glob("*/targets.json")):
        try:
            store = SoftTargets.open(header.parent, windows=train, tokenizer_sha256=splits.tokenizer.sha256,
                                     verify=False)
        except DarkKnowledgeError:
            continue
        if store.layout in DENSE:
            return store.bytes_per_case
    return None


def table(result: dict[str, Any]) -> str:
    def share(row, metric):
        if f"share_of_dense_gain_{metric}" not in row:
            return "–" if row["store"] != "dense" else "100%"
        low, high = row[f"interval_of_dense_gain_{metric}"]
        return f"{100 * row[f'share_of_dense_gain_{metric}']:.0f}% ({100 * low:.0f} to {100 * high:.0f})"

    def size(row):
        codec = row.get("codec_bytes_per_token")
        stored = "–" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:g}"
        return stored if codec is None else f"{codec:g} (stored {stored})"

    lines = ["| store | bytes/token | test log-loss | test accuracy | share of dense gain, log-loss (95%) "
             "| share, accuracy (95%) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['store']} | {size(r)} | {r['test_log_loss']:.4f} | {r['test_accuracy']:.4f} | "
              f"{share(r, 'log_loss')} | {share(r, 'accuracy')} |" for r in result["rows"]]
    lines += [f"\nOn test the dense store's student is no better than the baseline in {metric} (gain per token "
              f"{gain:+.4f}): there is no gain to share, and these shares mean nothing."
              for metric, gain in result["dense_gain_per_token"].items() if not ensemble_is_better(metric, gain)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--experiment", required=True, help="a finished reproduce lm folder: its plan, windows, "
                                                             "baseline and student-T1 runs (nothing is written there)")
    parser.add_argument("--store", required=True, nargs="+", metavar="[NAME=]PATH",
                        help="folder stores over the experiment's training windows (others are refused)")
    parser.add_argument("--plan", help="the experiment's plan name, while it has no results.json yet")
    parser.add_argument("--out", default="results/store-students",
                        help="folder for store_students.json and store_students.md (default results/store-students)")
    parser.add_argument("--runs", help="folder of the students' runs (default OUT/runs)")
    parser.add_argument("--codecs", help="a codecs.json of store_codecs.py: each codec's own bytes a token, for "
                                         "the stores named like it")
    parser.add_argument("--jobs", type=int, default=1, help="stores trained at a time, one thread each (default 1)")
    parser.add_argument("--data-dir", help="where the corpus is (default $DARKKNOWLEDGE_DATA)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise DarkKnowledgeError(f"--jobs {args.jobs}: give 1 or more")
    result = store_students(args.experiment, args.store, args.out, args.runs, args.plan, args.data_dir, args.codecs,
                            args.jobs, "python benchmarks/store_students.py "
                            + shlex.join(sys.argv[1:] if argv is None else argv))
    print(table(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except DarkKnowledgeError as error:
        sys.exit(f"error: {error}")
