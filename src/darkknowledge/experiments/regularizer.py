"""``darkknowledge reproduce regularizer``: §6, soft targets as a regularizer, on MNIST and Fashion-MNIST.

Per dataset (each stage a folder under ``OUT/runs/DATASET``, reused when finished, resumed when interrupted):
  full         the model trained on all of the training split (100%); it is also the teacher below
  hard-3pct    the same model trained on 3% of the training split (a seeded choice) with hard targets
  soft-3pct-T  the same model trained on the same 3% with soft targets only: the full model's outputs at
               temperature T over those cases (a soft-target store), for each T in the plan
Every model uses the same validation split (cut from the whole training set) to choose its epoch, and T is chosen
on it too. Train accuracy (on the model's own training cases) and test accuracy are logged after every epoch (fit's
``monitor``: logged only, never used to choose), for the learning curves; the table's numbers at the chosen epoch
come from ``evaluate_run`` on the saved models. Paper (speech, 3% of the data): hard targets 44.5% test accuracy,
early stopped, falling after; soft targets 57.0%, converged without early stopping; 100% of the data 58.9%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint
from ..errors import TrainingDiverged
from ..html_report import regularizer_figure
from ..jobs import DataChoice, distill_run, evaluate_run, train_run
from ..training import TrainConfig
from .folder import experiment_folder
from .report import jsonable, machine, machine_line, pct, table

PAPER = {"full": {"train_accuracy": 0.634, "test_accuracy": 0.589},
         "hard_3pct": {"train_accuracy": 0.673, "test_accuracy": 0.445, "note": "early stopped; falls after"},
         "soft_3pct": {"train_accuracy": 0.654, "test_accuracy": 0.570, "note": "converged; no early stopping"},
         "fraction": 0.03, "measure": "frame accuracy (speech)"}


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules; ``FULL`` is the experiment (not yet run), ``QUICK`` a seconds-long smoke test."""

    datasets: tuple[str, ...] = ("mnist", "fashion-mnist")
    # Our choices (the paper is silent): an unregularized net, so nothing but the targets regularizes it, and a
    # constant learning rate, so a curve that levels off has converged rather than been annealed.
    spec: str = "mlp:800x2"
    full_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05,
                                                                           schedule="constant"))
    # 3% of 50,000 = 1,500 cases: 12 steps an epoch, so many more epochs for a comparable number of steps.
    small_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=300, lr=0.05,
                                                                            schedule="constant"))
    fraction: float = 0.03
    temperatures: tuple[float, ...] = (2, 5, 10)
    subset: int | None = None  # training cases used before the validation split (None: all 60,000)
    val_size: int = 10000


FULL = Plan()
QUICK = Plan(spec="mlp:64x2", full_training=TrainConfig(epochs=3, batch_size=64, lr=0.05, schedule="constant"),
             small_training=TrainConfig(epochs=25, batch_size=32, lr=0.05, schedule="constant"),
             temperatures=(2, 5), subset=6000, val_size=1000)


def _curves(tr, va, te) -> dict:
    return {"test": te, "train_eval": tr}


@experiment_folder("regularizer")
def reproduce_regularizer(out: str | Path, quick: bool = False, data_dir: str | None = None, progress: bool = True,
                          command: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every stage, then write ``results.json``, ``report.md`` and ``curves.png`` into ``out``."""
    plan = QUICK if quick else FULL
    out = Path(out)
    results = {"command": command, "quick": quick, "plan": jsonable(asdict(plan)), "paper": PAPER,
               "datasets": {}, "stage_seconds": {}}
    for dataset in plan.datasets:
        found, seconds = _run_dataset(plan, dataset, out / "runs" / dataset, data_dir, progress, log)
        results["datasets"][dataset] = found
        results["stage_seconds"].update({f"{dataset} {k}": v for k, v in seconds.items()})
    results["machine"] = machine()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "results.json", results)
    write_report(out, results)
    return results


def _run_dataset(plan: Plan, dataset: str, runs: Path, data_dir: str | None, progress: bool,
                 log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, float]]:
    full_data = DataChoice(dataset, data_dir, val_size=plan.val_size, subset=plan.subset)
    cases = len(full_data.load()[0])
    small = round(plan.fraction * cases)
    small_data = replace(full_data, train_subset=small)
    seconds: dict[str, float] = {}

    def config(base: TrainConfig) -> TrainConfig:
        return replace(base, progress=progress)

    log(f"[{dataset} full]")
    _, fitted = train_run(plan.spec, full_data, config(plan.full_training), runs / "full", resume=True, log=log,
                          monitor=_curves)
    seconds["full"] = round(fitted.seconds, 1)
    log(f"[{dataset} hard-3pct]")
    _, fitted = train_run(plan.spec, small_data, config(plan.small_training), runs / "hard-3pct", resume=True,
                          log=log, monitor=_curves)
    seconds["hard-3pct"] = round(fitted.seconds, 1)
    soft = []
    seconds["soft-3pct"] = 0.0
    for t in plan.temperatures:
        name = f"soft-3pct-T{t:g}"
        log(f"[{dataset} {name}]")
        try:
            _, fitted = distill_run(runs / "full", plan.spec, small_data, config(plan.small_training), t, 1.0, 0.0,
                                    out=runs / name, resume=True, log=log, store_dir=runs / "soft-targets",
                                    monitor=_curves)
        except TrainingDiverged as e:  # a candidate T that cannot be trained at this rate is not chosen
            log(str(e))
            soft.append({"temperature": t, "run": name, "diverged": str(e)})
            continue
        seconds["soft-3pct"] = round(seconds["soft-3pct"] + fitted.seconds, 1)
        soft.append({"temperature": t, **_system(runs / name)})
    chosen = min((s for s in soft if "diverged" not in s), key=lambda s: (s["val_errors"], s["temperature"]))
    return {"training_cases": {"full": cases, "small": small},
            "full": _system(runs / "full"), "hard_3pct": _system(runs / "hard-3pct"),
            "soft_3pct": chosen, "soft_3pct_by_temperature": soft}, seconds


def _system(run: Path) -> dict[str, Any]:
    """Chosen-epoch numbers from the evaluation code on the saved model, plus the per-epoch curves fit logged."""
    meta = checkpoint.read_model_meta(run)
    history = checkpoint.read_training_state(run)["history"]
    test, train, val = evaluate_run(run), evaluate_run(run, split="train"), evaluate_run(run, split="val")
    curves = {"epoch": [h["epoch"] for h in history],
              "train_accuracy": [1 - h["train_eval_error_rate"] for h in history],
              "test_accuracy": [1 - h["test_error_rate"] for h in history],
              "val_accuracy": [1 - h["val_error_rate"] for h in history]}
    peak = max(range(len(history)), key=lambda i: (curves["test_accuracy"][i], -i))
    return {"run": run.name, "spec": meta["spec"], "epoch": meta["epoch"], "epochs": len(history),
            "train_accuracy": train["accuracy"], "test_accuracy": test["accuracy"], "test_errors": test["errors"],
            "val_errors": val["errors"], "val_accuracy": val["accuracy"],
            "last_epoch_test_accuracy": curves["test_accuracy"][-1],
            "last_epoch_train_accuracy": curves["train_accuracy"][-1],
            "peak_test_accuracy": curves["test_accuracy"][peak], "peak_epoch": peak + 1,
            "drop_after_peak": curves["test_accuracy"][peak] - curves["test_accuracy"][-1],
            "curves": curves}


def plot_curves(r: dict[str, Any], path: Path) -> None:
    """curves.png: the figure the ``report`` page shows, as a file beside report.md."""
    png = regularizer_figure(r)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))


def write_report(out: Path, r: dict[str, Any]) -> None:
    """report.md and curves.png from the results dict (numbers are never retyped)."""
    plot_curves(r, out / "curves.png")
    paper = r["paper"]
    sections = []
    for dataset, d in r["datasets"].items():
        rows = []
        for key, label in (("full", "baseline, 100% of the training split"),
                           ("hard_3pct", "3%, hard targets"),
                           ("soft_3pct", f"3%, soft targets (T = {d['soft_3pct']['temperature']:g}, chosen on "
                                         "validation)")):
            s = d[key]
            rows.append([label, pct(s["train_accuracy"]), pct(s["test_accuracy"]),
                         f"{s['epoch']} of {s['epochs']}", pct(s["last_epoch_test_accuracy"]),
                         f"{pct(s['peak_test_accuracy'])} (epoch {s['peak_epoch']})",
                         f"{100 * s['drop_after_peak']:.1f} points",
                         f"{pct(paper[key]['train_accuracy'])} / {pct(paper[key]['test_accuracy'])}"])
        t_rows = [[f"{s['temperature']:g}", s["val_errors"], pct(s["test_accuracy"]), s["epoch"],
                   pct(s["last_epoch_test_accuracy"])] if "diverged" not in s
                  else [f"{s['temperature']:g}", "diverged", "-", "-", "-"] for s in d["soft_3pct_by_temperature"]]
        diverged = [s["diverged"] for s in d["soft_3pct_by_temperature"] if "diverged" in s]
        hard, soft_, full = d["hard_3pct"], d["soft_3pct"], d["full"]
        gap = full["test_accuracy"] - hard["test_accuracy"]
        recovered = (soft_["test_accuracy"] - hard["test_accuracy"]) / gap if gap > 0 else None
        sections.append(f"""## {dataset}

{d['training_cases']['small']:,} training cases (3%) against {d['training_cases']['full']:,} (100%).

{table(["system", "train accuracy", "test accuracy (epoch chosen on validation)", "chosen epoch",
         "test accuracy, last epoch (no early stopping)", "peak test accuracy", "drop from peak to last epoch",
         "paper: train / test"], rows)}

Soft targets recover {'n/a' if recovered is None else pct(recovered)} of the test-accuracy gap between hard
targets on 3% and the full data (paper: {pct((paper['soft_3pct']['test_accuracy'] - paper['hard_3pct']['test_accuracy'])
/ (paper['full']['test_accuracy'] - paper['hard_3pct']['test_accuracy']))}). Without early stopping, hard targets
on 3% end {100 * hard['drop_after_peak']:.1f} points below their peak test accuracy, soft targets
{100 * soft_['drop_after_peak']:.1f} points.

Soft targets at each temperature:

{table(["T", "val errors", "test accuracy", "chosen epoch", "test accuracy, last epoch"], t_rows)}
{"".join(f"{chr(10)}Diverged, so not a candidate: {text}{chr(10)}" for text in diverged)}""")
    stage_rows = [[k, f"{int(v // 60)}:{int(v % 60):02d}"] for k, v in r["stage_seconds"].items()]
    m = r["machine"]
    text = f"""# Reproducing §6 of Hinton, Vinyals & Dean (2015): soft targets as a regularizer\
{' (QUICK smoke run: tiny models, a subset)' if r['quick'] else ''}

Command: `{r['command'] or 'darkknowledge reproduce regularizer'}`. One model, `{r['plan']['spec']}`, trained three
ways: on the whole training split with hard targets (it is also the teacher), on 3% of it with hard targets, and
on the same 3% with only the soft targets the full model gives those cases. All three choose their epoch on the
same {r['plan']['val_size']:,}-case validation split. The table's train and test accuracies are computed by the
evaluation code from the saved models at that epoch; the curves (and "last epoch", "peak") come from the
accuracies fit logged after every epoch on the model's own training cases and on the test set (logged only,
never used to choose anything). The paper's numbers are speech frame accuracies.

![train and test accuracy per epoch](curves.png)

{chr(10).join(sections)}
## Time and machine

{table(["stage", "training time (m:ss)"], stage_rows)}

{machine_line(m)}
"""
    checkpoint.atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
