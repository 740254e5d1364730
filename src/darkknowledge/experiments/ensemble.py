"""``darkknowledge reproduce ensemble``: §4 on Fashion-MNIST. Does one model distilled from an ensemble keep most
of the ensemble's gain over a single model?

Stages (each a folder under ``OUT/runs``, reused when finished, resumed when interrupted):
  baseline     one model trained on the labels (the training split; the validation split picks its epoch)
  ensemble     ``members`` models of the same spec and recipe differing only in seed (``train --members``)
  students     one model of the same spec distilled from the ensemble for each combine rule and each T
               (soft 1 + hard 0.5, as the paper's speech run), all from ONE soft-target store of the members'
               logits over the training split (computed once, on disk, under ``OUT/runs/soft-targets``)
The rule and T of "the distilled model" are chosen on the validation split; the test set gives final numbers.
Share of the gain transferred = (distilled - baseline) / (ensemble - baseline), test accuracy, with the ensemble
combined by the same rule as the student's targets. One baseline is one draw of a seed, so the share is also
given against the members' mean accuracy (ten draws of the same recipe) in place of the baseline. A gain of some
tens of test cases is itself uncertain, so the chosen student's share comes with a 95% bootstrap interval over the
test cases (resampled together for the three models, which are scored on the same cases).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import checkpoint
from ..ensemble import COMBINE_RULES, Ensemble
from ..errors import TrainingDiverged
from ..evaluation import evaluate, predict_logits
from ..html_report import ensemble_figure
from ..jobs import DataChoice, distill_run, evaluate_run, member_dir, train_ensemble, train_run
from ..soft_targets import SoftTargets
from ..training import TrainConfig
from .folder import experiment_folder
from .plans import Named, choose, name_of
from .report import jsonable, machine, machine_line, pct, table

PAPER = {"baseline": 0.589, "ensemble": 0.611, "distilled": 0.608, "share_transferred": 0.86, "target_share": 0.80,
         "temperatures": [1, 2, 5, 10], "best_temperature": 2, "hard_weight": 0.5, "members": 10,
         "measure": "test frame accuracy (speech)"}


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules; ``FULL`` is the experiment, ``QUICK`` a seconds-long smoke test.

    Why ``cnn:small``: the first FULL plan used ``mlp:1200x2,dropout=0.5,max_norm=3.5`` members (40 epochs). They
    underfit alike, so the ensemble beat one model by 0.2 points and the share transferred was noise; seed alone
    did not make MLP members differ (four without dropout: 945-966 validation errors each, 946 combined).
    ``cnn:small`` members do differ: three (15 epochs, lr 0.05, bf16) make 748, 768 and 776 validation errors and
    712 together. Why 30 student epochs: a student distilled from those three (T = 1, hard weight 0.5) makes 730
    validation errors after 15 epochs and 710 after 30, where it still improves as the training errors fall.
    The baseline keeps the members' recipe (it is one of them with another seed); a 30-epoch baseline is measured
    as a control in the README. Probe commands:
    darkknowledge train --dataset fashion-mnist --model cnn:small --members 3 --epochs 15 --lr 0.05 --bf16
    darkknowledge distill --ensemble DIR --student cnn:small -T 1 --hard-weight 0.5 --epochs 30 --lr 0.05 --bf16
    """

    dataset: str = "fashion-mnist"
    # Our choice (the paper's speech nets are not images): a small convnet, whose seeds give members that differ,
    # for members, baseline and students alike ("a single model of the same size").
    spec: str = "cnn:small"
    training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.05, bf16=True))
    members: int = 10
    baseline_seed: int = 1000  # not one of the members' seeds (seed .. seed + members - 1)
    # Twice the members' epochs, chosen on validation (see above): soft targets keep a student improving longer.
    student_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05, bf16=True))
    temperatures: tuple[float, ...] = (1, 2, 5, 10)
    rules: tuple[str, ...] = COMBINE_RULES
    soft_weight: float = 1.0
    hard_weight: float = 0.5
    subset: int | None = None  # training cases used before the validation split (None: all 60,000)
    val_size: int = 10000


FULL = Plan()
QUICK = Plan(spec="mlp:32x2,dropout=0.2", training=TrainConfig(epochs=3, batch_size=64, lr=0.1), members=4,
             student_training=TrainConfig(epochs=3, batch_size=64, lr=0.05, bf16=True), subset=3000, val_size=1000)
# FULL's recipe on 15,000 training cases (10,000 to train on, 5,000 to validate): on all of Fashion-MNIST the ensemble
# beats one model by only ~80 test cases; models trained on less data are weaker and differ more, so the gain and
# the precision of the share should be larger. Chosen before seeing any result; the test set is the full 10,000.
SMALL = replace(FULL, subset=15000, val_size=5000)
PLANS = {  # the line each shows in 'reproduce --help'
    "full": Named(FULL, "results/ensemble: 10 cnn:small members on all of Fashion-MNIST"),
    "quick": Named(QUICK, "tiny models on a subset: a smoke test of every stage; numbers mean nothing"),
    "small": Named(SMALL, "results/ensemble-small: full's recipe on 15,000 training cases (5,000 validate)"),
}


@experiment_folder("ensemble")
def reproduce_ensemble(out: str | Path, quick: bool = False, data_dir: str | None = None, progress: bool = True,
                       command: str = "", log: Callable[[str], None] = print,
                       plan: str | Plan | None = None) -> dict[str, Any]:
    """Run (or reuse) every stage, then write ``results.json``, ``report.md`` and ``ensemble.png`` into ``out``.
    ``plan``: a name of ``PLANS`` or a Plan (default: "quick" when ``quick``, else "full")."""
    if isinstance(plan, Plan):
        plan_name = name_of(PLANS, plan)
    else:
        plan_name, plan = choose(PLANS, plan, quick, "ensemble")
    quick = plan_name == "quick"
    out = Path(out)
    runs = out / "runs"
    data = DataChoice(plan.dataset, data_dir, val_size=plan.val_size, subset=plan.subset)
    seconds: dict[str, float] = {}

    def config(base: TrainConfig, **kw) -> TrainConfig:
        return replace(base, progress=progress, **kw)

    log("[baseline]")
    _, fitted = train_run(plan.spec, data, config(plan.training, seed=plan.baseline_seed), runs / "baseline",
                          resume=True, log=log)
    seconds["baseline"] = round(fitted.seconds, 1)

    log(f"[ensemble of {plan.members}]")
    folder = runs / "ensemble"
    train_ensemble(plan.spec, data, config(plan.training), folder, plan.members, resume=True, log=log)
    seconds["ensemble"] = round(sum(
        checkpoint.read_training_state(folder / member_dir(i))["seconds"]
        for i in range(plan.members)), 1)

    train, val, test = data.load()
    store_dir = runs / "soft-targets"
    # The one store, reused below: made with the students' precision, which is part of its key.
    store = SoftTargets.compute(Ensemble.from_dir(folder), train, store_dir, bf16=plan.student_training.bf16, log=log)

    ensemble_rows = {}
    for rule in plan.rules:
        teacher = Ensemble.from_dir(folder, rule)
        ensemble_rows[rule] = {"test": evaluate(teacher, test).to_dict(), "val": evaluate(teacher, val).to_dict()}
    members = [_scores(folder / member_dir(i)) for i in range(plan.members)]
    members_mean = sum(m["test_accuracy"] for m in members) / len(members)
    baseline = _scores(runs / "baseline")

    students: list[dict[str, Any]] = []
    diverged: list[dict[str, Any]] = []
    seconds["students"] = 0.0
    for rule in plan.rules:
        for t in plan.temperatures:
            name = student_name(rule, t)
            log(f"[{name}]")
            try:
                fitted = distill_student(plan, data, runs, rule, t, progress, log)
            except TrainingDiverged as e:  # reported, never chosen
                log(str(e))
                diverged.append({"run": name, "combine": rule, "temperature": t, "diverged": str(e)})
                continue
            seconds["students"] = round(seconds["students"] + fitted.seconds, 1)
            meta = checkpoint.read_model_meta(runs / name)
            row = {"run": name, "combine": rule, "temperature": t, **_scores(runs / name),
                   "store_key": meta["soft_targets"]["key"]}
            row["share_transferred"] = _share(row["test_accuracy"], baseline["test_accuracy"],
                                              ensemble_rows[rule]["test"]["accuracy"])
            students.append(row)

    chosen = min(students, key=lambda r: (r["val_errors"], plan.rules.index(r["combine"]), r["temperature"]))
    interval = _share_interval(_correct(checkpoint.load_model(runs / chosen["run"])[0], test),
                               _correct(checkpoint.load_model(runs / "baseline")[0], test),
                               _correct(Ensemble.from_dir(folder, chosen["combine"]), test))
    by_rule = {rule: min((r for r in students if r["combine"] == rule), key=lambda r: (r["val_errors"],
                                                                                        r["temperature"]))["run"]
               for rule in plan.rules if any(r["combine"] == rule for r in students)}
    by_rule_and_t = {(r["combine"], r["temperature"]): r for r in students}
    same = [(a, by_rule_and_t[("logits", t)]) for (rule, t), a in by_rule_and_t.items()
            if rule == "geometric" and ("logits", t) in by_rule_and_t]
    results = {
        "command": command, "quick": quick, "plan_name": plan_name, "plan": jsonable(asdict(plan)), "paper": PAPER,
        "store": {"key": store.key, "bytes": store.nbytes, "cases": len(store), "members": store.num_members,
                  "students_using_it": sum(r["store_key"] == store.key for r in students)},
        "baseline": baseline, "members": members,
        "members_mean_test_accuracy": members_mean,
        "ensemble": ensemble_rows, "students": students, "diverged": diverged,
        "chosen_on_validation": {"run": chosen["run"], "combine": chosen["combine"],
                                 "temperature": chosen["temperature"], "test_accuracy": chosen["test_accuracy"],
                                 "ensemble_test_accuracy": ensemble_rows[chosen["combine"]]["test"]["accuracy"],
                                 "baseline_test_accuracy": baseline["test_accuracy"],
                                 "share_transferred": chosen["share_transferred"],
                                 "share_interval_95": interval, "bootstrap_draws": BOOTSTRAP_DRAWS,
                                 "share_over_members_mean": _share(
                                     chosen["test_accuracy"], members_mean,
                                     ensemble_rows[chosen["combine"]]["test"]["accuracy"])},
        "chosen_per_rule": by_rule,
        "geometric_vs_logits": {"max_test_error_difference": max(abs(a["test_errors"] - b["test_errors"])
                                                                 for a, b in same) if same else None},
        "stage_seconds": seconds, "machine": machine()}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "results.json", results)
    write_report(out, results)
    return results


def student_name(rule: str, temperature: float) -> str:
    return f"student-{rule}-T{temperature:g}"


def distill_student(plan: Plan, data: DataChoice, runs: Path, rule: str, temperature: float, progress: bool,
                    log: Callable[[str], None]):
    """One student of the plan, from the shared store in ``runs/soft-targets``, into ``runs/student-RULE-TT``
    (resumed or reused when there). Also the entry point for training students side by side in other processes:
    the same call gives the same run key, so the reproduction reuses what they trained."""
    _, fitted = distill_run(runs / "ensemble", plan.spec, data, replace(plan.student_training, progress=progress),
                            temperature, plan.soft_weight, plan.hard_weight, out=runs / student_name(rule, temperature),
                            resume=True, log=log, combine=rule, store_dir=runs / "soft-targets")
    return fitted


def _scores(run: Path) -> dict[str, Any]:
    """Test and validation errors of a saved run, from the evaluation code."""
    test, val = evaluate_run(run), evaluate_run(run, split="val")
    meta = checkpoint.read_model_meta(run)
    return {"test_errors": test["errors"], "test_accuracy": test["accuracy"], "val_errors": val["errors"],
            "val_accuracy": val["accuracy"], "epoch": meta["epoch"], "spec": meta["spec"],
            "parameters": test["parameters"]}


def _share(distilled: float, baseline: float, ensemble: float) -> float | None:
    """(distilled - baseline) / (ensemble - baseline); None when the ensemble is no better than the baseline."""
    gain = ensemble - baseline
    return (distilled - baseline) / gain if gain > 0 else None


def _correct(model: torch.nn.Module, data) -> torch.Tensor:
    """Which cases of ``data`` the model gets right (the evaluation code's predictions)."""
    return predict_logits(model, data.images).argmax(1) == data.labels


BOOTSTRAP_DRAWS = 2000


def _share_interval(student: torch.Tensor, baseline: torch.Tensor, ensemble: torch.Tensor,
                    draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the share transferred over ``draws`` bootstrap resamples of the test cases, from
    the three models' per-case correctness. Resamples where the ensemble is no better than the baseline have no
    share and are left out; None when too few remain to speak of an interval."""
    generator = torch.Generator().manual_seed(seed)
    shares = []
    for start in range(0, draws, 250):  # 250 resamples of n cases at a time: bounded memory
        rows = torch.randint(len(student), (min(250, draws - start), len(student)), generator=generator)
        s, b, e = (correct[rows].sum(1).double() for correct in (student, baseline, ensemble))
        shares.append(((s - b) / (e - b))[e > b])
    shares = torch.cat(shares)
    if len(shares) < 0.9 * draws:
        return None
    return [float(q) for q in torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=torch.float64))]


def _fmt_share(share: float | None) -> str:
    return "n/a (ensemble no better)" if share is None else pct(share)


def _fmt_interval(interval: list[float] | None) -> str:
    return "" if interval is None else f" (95% interval {pct(interval[0])} to {pct(interval[1])})"


def plot_students(r: dict[str, Any], path: Path) -> None:
    """ensemble.png: the figure the ``report`` page shows, as a file beside report.md."""
    png = ensemble_figure(r)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))


def write_report(out: Path, r: dict[str, Any]) -> None:
    """report.md and ensemble.png from the results dict (numbers are never retyped)."""
    plot_students(r, out / "ensemble.png")
    paper, plan, chosen = r["paper"], r["plan"], r["chosen_on_validation"]
    base = r["baseline"]
    headline = table(
        ["system", "test accuracy", "test errors", "paper (speech frame accuracy)"],
        [["baseline (one model)", pct(base["test_accuracy"]), base["test_errors"], pct(paper["baseline"])],
         [f"{len(r['members'])}x ensemble ({chosen['combine']})", pct(chosen["ensemble_test_accuracy"]),
          r["ensemble"][chosen["combine"]]["test"]["errors"], pct(paper["ensemble"])],
         [f"distilled single model ({chosen['combine']}, T = {chosen['temperature']:g})",
          pct(chosen["test_accuracy"]), next(s["test_errors"] for s in r["students"] if s["run"] == chosen["run"]),
          pct(paper["distilled"])],
         ["share of the ensemble's gain transferred", _fmt_share(chosen["share_transferred"]) + _fmt_interval(
             chosen["share_interval_95"]), "",
          f"{pct(paper['share_transferred'])} (target >= {pct(paper['target_share'])})"],
         ["the same, over the members' mean in place of the baseline",
          _fmt_share(chosen["share_over_members_mean"]), "", ""]])
    ensemble_rows = [[rule, pct(e["test"]["accuracy"]), e["test"]["errors"], e["val"]["errors"]]
                     for rule, e in r["ensemble"].items()]
    student_rows = [[s["combine"], f"{s['temperature']:g}", s["val_errors"], s["test_errors"],
                     pct(s["test_accuracy"]), _fmt_share(s["share_transferred"]), s["epoch"],
                     "chosen" if s["run"] == chosen["run"] else ("best T for the rule" if s["run"] in
                                                                 r["chosen_per_rule"].values() else "")]
                    for s in r["students"]]
    member_rows = [[member_dir(i), m["test_errors"], pct(m["test_accuracy"]), m["epoch"]]
                   for i, m in enumerate(r["members"])]
    diff = r["geometric_vs_logits"]["max_test_error_difference"]
    stage_rows = [[k, f"{int(v // 60)}:{int(v % 60):02d}"] for k, v in r["stage_seconds"].items()]
    m = r["machine"]
    cases = "" if plan["subset"] is None else \
        f" ({plan['subset'] - plan['val_size']:,} cases: {plan['subset']:,} of the training set, less validation)"
    named = f" (plan `{r['plan_name']}`)" if r.get("plan_name") else ""  # results.json written before plans had none
    text = f"""# Reproducing §4 of Hinton, Vinyals & Dean (2015): distilling an ensemble, on {plan['dataset']}{' (QUICK smoke run: tiny models, a subset, fewer members)' if r['quick'] else ''}

Command: `{r['command'] or 'darkknowledge reproduce ensemble'}`{named}. Every number below is computed by the evaluation
code from the saved models (`results.json` holds them all). The paper's numbers are frame accuracies of a speech
model (its data is not public); this is the same experiment on image data. Baseline, members and students are
all `{base['spec']}` (baseline and members {plan['training']['epochs']} epochs, students
{plan['student_training']['epochs']}), trained on the training split{cases} and choosing their epoch on the
{plan['val_size']:,}-case validation split; the combine rule and temperature of "the distilled model" are chosen
on validation too. The test set gives final numbers only.

## The result

{headline}

Share transferred = (distilled - baseline) / (ensemble - baseline), test accuracy, the ensemble combined by the
student's rule. The mean test accuracy of the {len(r['members'])} members alone: {pct(r['members_mean_test_accuracy'])}.
The 95% interval: percentiles of the share over {chosen['bootstrap_draws']:,} bootstrap resamples of the test
cases (the three models resampled together): how precisely this one test set pins the share down. Values inside
it are not told apart from the measured share by this test set.

![test accuracy against temperature](ensemble.png)

## Every student

Soft weight {plan['soft_weight']:g}, hard weight {plan['hard_weight']:g} (the paper's speech run: 0.5 on the hard
targets). All {len(r['students'])} students read one soft-target store of the members' logits
({r['store']['members']} members x {r['store']['cases']:,} cases, {r['store']['bytes'] / 1e6:.1f} MB, key
`{r['store']['key'][:16]}`; {r['store']['students_using_it']} of {len(r['students'])} students used it).

{table(["combine", "T", "val errors", "test errors", "test accuracy", "share transferred", "epoch", ""],
        student_rows)}
{"".join(f"{chr(10)}Diverged at the plan's learning rate, so not a candidate: {d['combine']}, T = "
         f"{d['temperature']:g}: {d['diverged']}{chr(10)}" for d in r.get("diverged", []))}
**geometric and logits give identical soft targets at every temperature** (the normalized geometric mean of
softmax(v_m/T) is softmax(mean v_m / T): the per-member normalizers are a per-case constant). Their students
differ only by floating-point rounding of the targets; largest difference in test errors between the two at the
same T: {diff}. Both are reported as asked.

## The ensemble, by combine rule

{table(["combine", "test accuracy", "test errors", "val errors"], ensemble_rows)}

## The members

{table(["member", "test errors", "test accuracy", "epoch"], member_rows)}

## Time and machine

{table(["stage", "training time (m:ss)"], stage_rows)}

{machine_line(m)}
"""
    checkpoint.atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
