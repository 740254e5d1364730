"""``darkknowledge reproduce lm``: §4 on text. Does one language model distilled from an ensemble of ten keep
most of the ensemble's gain, measured as the paper measures its speech models (next-token accuracy, the frame
accuracy of §4, and log-loss)?

Stages (each a folder under ``OUT/runs``, reused when finished, resumed at the last epoch or chunk when stopped):
  data         the corpus split by whole documents (seeded, recorded), a tokenizer trained on the training split
               (``OUT/tokenizer.json``, checked by SHA-256 on every rerun), token windows of ``context`` tokens
  baseline     one model trained on the labels
  members      ``members`` models of the same spec and recipe differing only in seed
  stores       the members' mean distribution per training token: dense float16 (the T sweep; the members run
               once), top-k for each K of the K sweep summarised from the dense rows, chunk by chunk, and
               sampled stores (K draws a position from the dense rows) and compact ones (the same draws packed
               into bytes, :mod:`darkknowledge.store_codec`) when the plan asks for them
  students     the same spec distilled from the dense store at every T (soft 1 + hard 0.5, the paper's speech
               recipe); T chosen on validation log-loss
  deployment   a half-width student distilled at the chosen T against the same half-width model on labels only;
               students from the top-k stores at the chosen T and from the sampled and compact stores at T = 1 (quality
               against bytes per token)
Test windows give the final numbers; the share of the gain, (student - baseline) / (ensemble - baseline), comes
with a 95% bootstrap interval that resamples whole test windows (blocks of ``context`` tokens).
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import checkpoint, schemas
from ..data.datasets import resolve_data_dir
from ..data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
from ..errors import DarkKnowledgeError
from ..html_report import dense_share_text
from ..language_model import (EnsembleLM, LMConfig, Objective, block_bootstrap_share, evaluate_language_model,
                              generate, load_language_model, no_gain_note, train_language_model)
from ..soft_targets import SoftTargets
from .folder import experiment_folder
from .plans import Named, choose, name_of
from .report import jsonable, machine, machine_line, table, plt

PAPER = {"baseline": 0.589, "ensemble": 0.611, "distilled": 0.608, "share_transferred": 0.86, "target_share": 0.80,
         "temperatures": [1, 2, 5, 10], "hard_weight": 0.5, "members": 10, "measure": "test frame accuracy (speech)"}
SAMPLE_PROMPT = "KING.\n"


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules; ``FULL`` is the experiment behind results/lm, ``QUICK`` a seconds-long smoke test.

    FULL is sized from throughputs measured on this 2-core machine with one core busy (one thread, V = 4,096,
    context 128): ``gpt:layers=2,dim=96,heads=4`` trains 2 epochs of 400,000 tokens in about 2 minutes on labels
    and 4.5 distilling; with the 4 stores and the evaluations about 1.5 hours of one core (results/lm/README.md).
    ``SIX_EPOCHS`` is the next size; ``PLANS`` names every plan that made a committed results/ folder.
    """

    corpus: str = "shakespeare"  # a folder under the data dir, or a path to a folder of .txt files
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    context: int = 128
    split_seed: int = 0
    validation_fraction: float = 0.1  # of the works, chosen by split_seed; the rest is the training split
    test_fraction: float = 0.1
    spec: str = "gpt:layers=2,dim=96,heads=4,context=128"
    half_spec: str = "gpt:layers=2,dim=48,heads=4,context=128"
    training: LMConfig = field(default_factory=lambda: LMConfig(epochs=2, batch_size=16, lr=2e-3))
    student_training: LMConfig = field(default_factory=lambda: LMConfig(epochs=2, batch_size=16, lr=2e-3))
    members: int = 10
    baseline_seed: int = 1000  # not one of the members' seeds (0 .. members - 1)
    temperatures: tuple[float, ...] = (1, 2, 5, 10)
    soft_weight: float = 1.0
    hard_weight: float = 0.5
    top_ks: tuple[int, ...] = (128, 32, 8)  # beside the dense store
    sampled: tuple[int, ...] = ()  # sampled stores, K draws a position; their students distil at T = 1
    # sampled stores with a head, (h, K): the h most probable tokens exact and K draws from the rest; at T = 1
    sampled_tails: tuple[tuple[int, int], ...] = ()
    # compact stores, (h, K, quant): a sampled store's rows packed (ids in ceil(log2 V) bits, the head in 8); T = 1
    compact: tuple[tuple[int, int, str], ...] = ()
    max_train_tokens: int | None = 400_000
    max_eval_tokens: int | None = None
    sample_tokens: int = 200


FULL = Plan()
QUICK = Plan(tokenizer="char", context=32, spec="gpt:layers=1,dim=16,heads=2,context=32",
             half_spec="gpt:layers=1,dim=8,heads=2,context=32",
             training=LMConfig(epochs=1, batch_size=16, lr=1e-2), student_training=LMConfig(epochs=1, batch_size=16,
                                                                                         lr=1e-2),
             members=3, temperatures=(1, 2), top_ks=(8,), sampled=(8,), sampled_tails=((4, 4),),
             compact=((4, 4, "log8"),), max_train_tokens=4096, max_eval_tokens=1024,
             sample_tokens=40)
# Every model 6 epochs instead of 2 (results/lm/sizing: two members trained 6 epochs gain three times as much
# log-loss from being ensembled) and half the works (21 of 42, 818,000 tokens) as the test split instead of a
# tenth, so the share's 95% interval can be narrow enough to settle the 80% target; and 32 pure draws a position.
SIX_EPOCHS = replace(FULL, test_fraction=0.5, sampled=(32,), training=replace(FULL.training, epochs=6),
                     student_training=replace(FULL.student_training, epochs=6))
# Top-k's missing share: SIX_EPOCHS at T = 1 only (the T it chose on validation) with stores whose h most probable
# tokens are exact and whose other columns are draws from the rest; beside them top-64. Training is deterministic,
# so its baseline, members and dense store are SIX_EPOCHS's.
STORES = replace(SIX_EPOCHS, temperatures=(1,), top_ks=(64,), sampled=(),
                 sampled_tails=((8, 24), (16, 16), (24, 8), (32, 32)))
# The smallest store that keeps the gain (issue 31): STORES's recipe with 3 members (10 members' 6-epoch training
# did not fit the session that ran it beside other work), top-32 and the sampled 16 + 16 (136 B) as today's rows,
# and compact stores at two budgets at V = 4,096 (12-bit ids): at most 64 bytes a token, (16, 14) 63 B and
# (12, 21) 64 B (more draws kept more of the gain in results/lm-stores: 8 + 24 draws 95%, 24 + 8 85%); at most 32,
# (6, 10) and (4, 13), 32 B.
COMPACT = replace(STORES, members=3, top_ks=(32,), sampled_tails=((16, 16),),
                  compact=((16, 14, "log8"), (12, 21, "log8"), (6, 10, "log8"), (4, 13, "log8")))
# FULL's models and recipe on fewer tokens: a first measurement of the pipeline at about half an hour of one core.
SMALL = replace(FULL, max_train_tokens=100_000, max_eval_tokens=65_536, training=replace(FULL.training, epochs=1),
                student_training=replace(FULL.student_training, epochs=1))
# A sizing probe (results/lm/sizing): does a store of 32 draws a position keep more of the dense store's gain than
# top-32? Small one-layer models on 100,000 training tokens, T = 1 only.
SAMPLED_SIZING = replace(FULL, spec="gpt:layers=1,dim=64,heads=4,context=128",
                         half_spec="gpt:layers=1,dim=32,heads=4,context=128", members=3, temperatures=(1,),
                         top_ks=(32,), sampled=(32,), max_train_tokens=100_000, sample_tokens=20)
PLANS = {  # the line each shows in 'reproduce --help'
    "full": Named(FULL, "results/lm: 10 members, 2 epochs of 400,000 tokens; about 1.5 hours of one core"),
    "quick": Named(QUICK, "tiny models, a few thousand tokens: a smoke test of every stage; numbers mean nothing"),
    "6epochs": Named(SIX_EPOCHS, "results/lm-6epochs: full with every model 6 epochs, half the works as test"),
    "stores": Named(STORES, "results/lm-stores: 6epochs at T = 1 with top-h + sampled stores and top-64"),
    "compact": Named(COMPACT, "issue 31: stores with 3 members and compact stores of <= 64 and <= 32 bytes a "
                              "token, beside top-32 and top-16 + 16 draws"),
    "small": Named(SMALL, "results/lm-small: full's models on 100,000 training tokens, 1 epoch; about 30 min"),
    "sampled-sizing": Named(SAMPLED_SIZING, "results/lm/sizing: 3 one-layer members, 100,000 tokens, T = 1; "
                                            "sampled-32 against top-32"),
}


def _corpus_folder(plan: Plan, data_dir: str | None) -> Path:
    path = Path(plan.corpus).expanduser()
    # A bare name is a folder of the data dir (the embedded default); anything with a separator is a path.
    return path if path.is_dir() or len(path.parts) > 1 else resolve_data_dir(data_dir) / plan.corpus


def _read_data_record(path: Path, log: Callable[[str], None]) -> dict | None:
    """data.json checked against its schema; None (so the data is prepared again, the same from the same corpus)
    when it is damaged."""
    try:
        return schemas.check(schemas.DataRecord, checkpoint.read_json(path, "data"), path, "preparing the data again")
    except DarkKnowledgeError as e:
        log(str(e))
        return None


def prepare_data(plan: Plan, out: Path, data_dir: str | None, log: Callable[[str], None]):
    """The corpus split and tokenised; the tokenizer is trained once and reloaded (checked) on reruns. One that
    is damaged or missing is trained again (the same: the runs' keys hold its SHA-256, so they stay reusable)."""
    corpus = load_corpus(_corpus_folder(plan, data_dir))
    documents = split_documents(corpus.documents, plan.validation_fraction, plan.test_fraction, plan.split_seed)
    path = out / "tokenizer.json"
    data_record = out / "data.json"
    recorded = _read_data_record(data_record, log) if data_record.exists() else None
    if recorded and (recorded["corpus_sha256"] != corpus.fingerprint() or recorded["documents"] != documents):
        raise DarkKnowledgeError(f"{out} was made from another corpus or split; use another --out")
    try:
        tokenizer = TextTokenizer.load(path, sha256=recorded["tokenizer"]["sha256"]) if recorded else None
    except DarkKnowledgeError as error:
        log(f"{error}; training it again")
        tokenizer = None
    if tokenizer is None:
        started = time.perf_counter()
        tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], plan.tokenizer,
                                        plan.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(path, tokenizer.save)
        log(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} tokens ({time.perf_counter() - started:.0f} s)")
    splits = _windows(plan, corpus, documents, tokenizer)
    record = {**splits.describe(), "tokens": {n: w.num_tokens for n, w in splits.windows.items()}}
    checkpoint.write_json(data_record, record)
    if corpus.skipped_empty:
        log(f"skipped {corpus.skipped_empty} empty document(s)")
    return splits


def experiment_splits(plan: Plan, out: str | Path, data_dir: str | None):
    """The splits of a prepared experiment folder ``out`` (its data.json and tokenizer.json), exactly as
    :func:`reproduce_lm` trained on them, without writing there: for work beside a finished experiment."""
    out = Path(out)
    if not (out / "data.json").is_file() or not (out / "tokenizer.json").is_file():
        raise DarkKnowledgeError(f"{out} holds no data.json and tokenizer.json; give a reproduce lm folder")
    recorded = schemas.check(schemas.DataRecord, checkpoint.read_json(out / "data.json", "data"), out / "data.json",
                             "run reproduce lm there again")
    corpus = load_corpus(_corpus_folder(plan, data_dir))
    if recorded["corpus_sha256"] != corpus.fingerprint() or recorded["documents"] != split_documents(
            corpus.documents, plan.validation_fraction, plan.test_fraction, plan.split_seed):
        raise DarkKnowledgeError(f"{out} was made from another corpus or split than this plan's; give the plan "
                                 "that made it")
    tokenizer = TextTokenizer.load(out / "tokenizer.json", sha256=recorded["tokenizer"]["sha256"])
    return _windows(plan, corpus, recorded["documents"], tokenizer)


def _windows(plan: Plan, corpus, documents: dict, tokenizer: TextTokenizer):
    """The corpus tokenised into the plan's windows, each split cut to the plan's token limits."""
    splits = tokenise_corpus(corpus, documents, tokenizer, plan.context)
    for name, limit in (("train", plan.max_train_tokens), ("validation", plan.max_eval_tokens),
                        ("test", plan.max_eval_tokens)):
        if limit is not None:
            windows = splits.windows[name]
            splits.windows[name] = type(windows)(windows.ids.numpy()[:limit + 1], plan.context, name,
                                                 windows.vocab_size)
    return splits


def plan_from_json(recorded: dict[str, Any]) -> Plan:
    """The Plan a results.json records (``plan``, as :func:`jsonable` wrote it: lists for tuples)."""
    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    try:
        return Plan(**{name: LMConfig(**value) if name in ("training", "student_training") else tuples(value)
                       for name, value in recorded.items()})
    except TypeError as error:
        raise DarkKnowledgeError(f"results.json records a plan this version cannot read ({error})") from None


# One run of the experiment: its name, spec and recipe, and the store (None: labels only) and temperature it is
# distilled from. The same list feeds the worker processes of ``reproduce_lm(jobs=N)`` and the sequential pipeline.
Task = tuple[str, str, LMConfig, Path | None, float]
_worker_data: dict[str, Any] = {}  # a worker process's splits, prepared once for all its tasks


def _train_task(plan: Plan, out: Path, data_dir: str | None, task: Task) -> str:
    """One run trained in a worker process (one thread), into the folder the sequential pipeline then reuses."""
    name, spec, config, store, temperature = task
    torch.set_num_threads(1)
    if "splits" not in _worker_data:
        _worker_data["splits"] = prepare_data(plan, out, data_dir, log=lambda _: None)
    splits = _worker_data["splits"]
    train_language_model(spec, splits.tokenizer, splits.windows["train"], splits.windows["validation"], config,
                         student_objective(plan, splits, store, temperature), out / "runs" / name,
                         log=lambda line: print(f"[{name}] {line}", flush=True))
    return name


def student_objective(plan: Plan, splits, store: Path | None, temperature: float) -> Objective:
    """A task's objective: labels only, or the plan's soft and hard weights on the store at ``store``."""
    if store is None:
        return Objective()
    # verify=False: the caller checked the store a moment ago (reproduce_lm when it built or reused it)
    targets = SoftTargets.open(store, windows=splits.windows["train"], tokenizer_sha256=splits.tokenizer.sha256,
                               vocab_size=splits.tokenizer.vocab_size, verify=False)
    return Objective(targets, temperature, plan.soft_weight, plan.hard_weight)


def _train_in_parallel(plan: Plan, out: Path, data_dir: str | None, tasks: list[Task], jobs: int,
                       log: Callable[[str], None]) -> None:
    """Train independent runs in ``jobs`` processes of one thread each. Nothing is returned: the sequential code
    that follows finds each run finished and reuses it (same key), so results do not depend on ``jobs``."""
    if jobs <= 1 or not tasks:
        return
    log(f"[{len(tasks)} runs in {jobs} processes: {', '.join(t[0] for t in tasks)}]")
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        for name in pool.imap_unordered(functools.partial(_train_task, plan, out, data_dir), tasks):
            log(f"[{name} done]")


@experiment_folder("lm")
def reproduce_lm(out: str | Path, quick: bool = False, data_dir: str | None = None, progress: bool = True,
                 command: str = "", log: Callable[[str], None] = print, plan: str | Plan | None = None,
                 jobs: int = 1, corpus: str | None = None) -> dict[str, Any]:
    """Run (or reuse) every stage, then write ``results.json``, ``report.md`` and ``lm.png`` into ``out``.
    ``plan``: a name of ``PLANS`` or a Plan (default: "quick" when ``quick``, else "full"); ``corpus`` replaces
    the plan's. ``jobs``: independent runs (the members, each phase's students) are trained that many at a time,
    each in a process of one thread; the numbers are the same as with one."""
    if isinstance(plan, Plan):
        plan_name = name_of(PLANS, plan)
    else:
        plan_name, plan = choose(PLANS, plan, quick, "lm")
    quick = plan_name == "quick"
    if corpus is not None:
        plan = replace(plan, corpus=corpus)
    if (plan.sampled or plan.sampled_tails or plan.compact) and 1 not in plan.temperatures:
        raise DarkKnowledgeError("a plan with sampled stores must sweep T = 1: their students are compared with "
                                 "the dense store's student at T = 1")
    out = Path(out)
    runs = out / "runs"
    started = time.perf_counter()
    splits = prepare_data(plan, out, data_dir, log)
    tokenizer, train, val, test = (splits.tokenizer, splits.windows["train"], splits.windows["validation"],
                                   splits.windows["test"])
    # Each stage's training (or store-building) seconds as its run recorded them, so a stage reused from an earlier
    # invocation keeps its time and the total is the experiment's, however many stops it took.
    seconds: dict[str, float] = {}

    def fit(task: Task):
        name, spec, config, store, temperature = task
        log(f"[{name}]")
        model, meta = train_language_model(spec, tokenizer, train, val, config,
                                           student_objective(plan, splits, store, temperature), runs / name, log=log)
        # milliseconds: a --quick stage can take less than the 0.05 s a coarser rounding would make 0
        seconds[name] = round(sum(epoch["seconds"] for epoch in meta["history"]), 3)
        return model

    def train_all(tasks: list[Task]) -> dict[str, Any]:
        """The tasks' models: trained ``jobs`` at a time first when asked, then each fitted (reused) in order."""
        _train_in_parallel(plan, out, data_dir, tasks, jobs, log)
        return {task[0]: fit(task) for task in tasks}

    def scores(model) -> dict[str, Any]:
        return {"val": evaluate_language_model(model, val), "test": evaluate_language_model(model, test)}

    labelled = train_all([("baseline", plan.spec, replace(plan.training, seed=plan.baseline_seed), None, 1.0),
                          *[(f"member-{i}", plan.spec, replace(plan.training, seed=i), None, 1.0)
                            for i in range(plan.members)],
                          ("half-labels", plan.half_spec, plan.student_training, None, 1.0)])
    baseline = labelled["baseline"]
    members = [labelled[f"member-{i}"] for i in range(plan.members)]
    ensemble = EnsembleLM(members)

    stores: dict[str, SoftTargets] = {}
    for k in (None, *plan.top_ks):
        name = "dense" if k is None else f"top{k}"
        log(f"[store {name}]")
        # The members run once, for the dense store; each top-k store summarises its rows.
        stores[name] = SoftTargets.build(members if k is None else stores["dense"], train, runs / "token-targets",
                                         tokenizer_sha256=tokenizer.sha256, top_k=k, log=log)
        seconds[f"store-{name}"] = round(stores[name].header.get("build_seconds", 0.0), 3)
    # the stores of draws, distilled at T = 1: sampled (quant None) and compact
    sampled = {_sampled_name(h, k, q): (h, k, q) for h, k, q in
               [(0, k, None) for k in plan.sampled] + [(h, k, None) for h, k in plan.sampled_tails]
               + list(plan.compact)}
    for name, (h, k, quant) in sampled.items():
        log(f"[store {name}]")
        stores[name] = SoftTargets.build(stores["dense"], train, runs / "token-targets",
                                         tokenizer_sha256=tokenizer.sha256, samples=k, head=h, compact=quant,
                                         log=log)
        seconds[f"store-{name}"] = round(stores[name].header.get("build_seconds", 0.0), 3)
    dense = stores["dense"].path

    evaluated = {"baseline": scores(baseline), "ensemble": scores(ensemble)}
    students = train_all([(f"student-T{t:g}", plan.spec, plan.student_training, dense, t) for t in plan.temperatures])
    sweep = []
    for t in plan.temperatures:
        name = f"student-T{t:g}"
        evaluated[name] = scores(students[name])
        sweep.append({"run": name, "temperature": t, **model_row(evaluated[name])})
    chosen = min(sweep, key=lambda r: (r["val_log_loss"], r["temperature"]))
    t_chosen = chosen["temperature"]

    half_distilled = f"half-student-T{t_chosen:g}"
    deployed = train_all([(half_distilled, plan.half_spec, plan.student_training, dense, t_chosen),
                          *[(f"student-T{t_chosen:g}-top{k}", plan.spec, plan.student_training,
                             stores[f"top{k}"].path, t_chosen) for k in plan.top_ks],
                          *[(f"student-T1-{name}", plan.spec, plan.student_training, stores[name].path, 1.0)
                            for name in sampled]])
    evaluated[half_distilled] = scores(deployed[half_distilled])
    evaluated["half-labels"] = scores(labelled["half-labels"])
    # Each sparse store's student, and the dense store's student at the same T it is measured against.
    top_k_rows = [{"store": "dense", "run": chosen["run"], "dense_run": chosen["run"],
                   "bytes_per_token": stores["dense"].bytes_per_case, **model_row(evaluated[chosen["run"]])}]
    for store, name, dense_run in ([(f"top{k}", f"student-T{t_chosen:g}-top{k}", chosen["run"]) for k in plan.top_ks]
                                   + [(name, f"student-T1-{name}", "student-T1") for name in sampled]):
        evaluated[name] = scores(deployed[name])
        top_k_rows.append({"store": store, "run": name, "dense_run": dense_run,
                           "bytes_per_token": stores[store].bytes_per_case, **model_row(evaluated[name])})
    for row in top_k_rows:  # each store's student against the labels-only baseline, as a share of dense's gain
        for metric in ("accuracy", "log_loss"):
            row[f"share_of_dense_gain_{metric}"] = _share(row[f"test_{metric}"], evaluated["baseline"]["test"][metric],
                                                          evaluated[row["dense_run"]]["test"][metric])
            if row["store"] != "dense":  # the same block bootstrap as the ensemble's share, dense in its place
                share = block_bootstrap_share(evaluated["baseline"]["test"], evaluated[row["dense_run"]]["test"],
                                              evaluated[row["run"]]["test"], metric)
                row[f"interval_of_dense_gain_{metric}"] = [share["low"], share["high"]]

    test_of = {name: e["test"] for name, e in evaluated.items()}
    shares = {metric: block_bootstrap_share(test_of["baseline"], test_of["ensemble"], test_of[chosen["run"]], metric)
              for metric in ("accuracy", "log_loss")}
    per_t_shares = {r["run"]: {metric: _share(r[f"test_{metric}"], test_of["baseline"][metric],
                                              test_of["ensemble"][metric]) for metric in ("accuracy", "log_loss")}
                    for r in sweep}
    samples = {name: generate(model, tokenizer, SAMPLE_PROMPT, plan.sample_tokens, seed=0)
               for name, model in (("ensemble", ensemble), ("baseline", baseline),
                                   (chosen["run"], _load(runs / chosen["run"])))}
    results = {
        "command": command, "quick": quick, "plan_name": plan_name, "plan": jsonable(asdict(plan)), "paper": PAPER,
        "data": checkpoint.read_json(out / "data.json", "data"),
        "models": {name: model_row(e) for name, e in evaluated.items()},
        "temperature_sweep": sweep, "chosen_on_validation": {"run": chosen["run"], "temperature": t_chosen},
        "share_transferred": shares, "share_by_temperature": per_t_shares,
        "deployment": {"half_width_distilled": model_row(evaluated[half_distilled]),
                       "half_width_labels_only": model_row(evaluated["half-labels"]), "spec": plan.half_spec},
        "top_k": top_k_rows, "stores": {name: s.describe() for name, s in stores.items()},
        "samples": samples, "stage_seconds": seconds, "training_seconds": round(sum(seconds.values()), 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": machine()}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "results.json", results)
    write_report(out, results)
    return results


def _sampled_name(head: int, draws: int, quant: str | None = None) -> str:
    """``top16+sampled16`` (a sampled store), ``top16+16-log8`` (compact)."""
    if quant is not None:
        return f"top{head}+{draws}-{quant}" if head else f"sampled{draws}-{quant}"
    return f"top{head}+sampled{draws}" if head else f"sampled{draws}"


def _load(run: Path):
    return load_language_model(run)[0]


def model_row(evaluation: dict[str, Any]) -> dict[str, Any]:
    """A model's row of results.json: log-loss, perplexity and accuracy on validation and test."""
    return {f"{split}_{k}": evaluation[split][k] for split in ("val", "test")
            for k in ("log_loss", "perplexity", "accuracy")}


def _share(student: float, baseline: float, ensemble: float) -> float | None:
    return None if ensemble == baseline else (student - baseline) / (ensemble - baseline)


def _fmt_share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def write_report(out: Path, r: dict[str, Any]) -> None:
    models = r["models"]
    chosen = r["chosen_on_validation"]["run"]
    rows = [[name, f"{100 * m['test_accuracy']:.2f}%", f"{m['test_log_loss']:.4f}", f"{m['test_perplexity']:.1f}",
             f"{100 * m['val_accuracy']:.2f}%", f"{m['val_log_loss']:.4f}"]
            for name, m in models.items()]
    share_rows = [[metric, _fmt_share(s["share"]), f"{_fmt_share(s['low'])} to {_fmt_share(s['high'])}",
                   f"{s['gain_per_token']:+.4f}"] for metric, s in r["share_transferred"].items()]
    sweep = [[f"{row['temperature']:g}", f"{row['val_log_loss']:.4f}", f"{100 * row['val_accuracy']:.2f}%",
              f"{row['test_log_loss']:.4f}", f"{100 * row['test_accuracy']:.2f}%",
              _fmt_share(r["share_by_temperature"][row["run"]]["accuracy"]),
              _fmt_share(r["share_by_temperature"][row["run"]]["log_loss"])] for row in r["temperature_sweep"]]
    top_k = [[row["store"], f"{row['bytes_per_token']:.0f}", f"{100 * row['test_accuracy']:.2f}%",
              f"{row['test_log_loss']:.4f}", dense_share_text(row, "accuracy"), dense_share_text(row, "log_loss")]
             for row in r["top_k"]]
    d = r["deployment"]
    paper = r["paper"]
    lines = [
        f"# §4 on text: a {paper['members']}-member ensemble of language models distilled into one"
        + (" (QUICK smoke test: tiny models, numbers mean nothing)" if r["quick"] else ""), "",
        f"Command: `{r['command']}`" + (f" (plan `{r['plan_name']}`)" if r.get("plan_name") else ""), "",
        f"Data: {r['data']['tokenizer']['kind']} tokenizer, {r['data']['tokenizer']['vocab_size']} tokens; "
        f"tokens per split {r['data']['tokens']}; test windows are the bootstrap's blocks.", "",
        "## Baseline, ensemble and distilled model (test; validation beside)", "",
        table(["model", "next-token accuracy", "log-loss (nats)", "perplexity", "val accuracy", "val log-loss"],
               rows), "",
        f"The distilled model is `{chosen}` (T chosen on validation log-loss). Paper §4 (speech, frame accuracy): "
        f"baseline {100 * paper['baseline']:.1f}%, ensemble {100 * paper['ensemble']:.1f}%, distilled "
        f"{100 * paper['distilled']:.1f}% (share {100 * paper['share_transferred']:.0f}%; target "
        f">= {100 * paper['target_share']:.0f}%).", "",
        "## Share of the ensemble's gain transferred (test, 95% block bootstrap over windows)", "",
        table(["metric", "share", "95% interval", "ensemble gain per token"], share_rows), "",
        *[f"**{note}**\n" for metric, s in r["share_transferred"].items() if (note := no_gain_note(metric, s))],
        "## Temperature sweep (dense store, soft 1 + hard 0.5)", "",
        table(["T", "val log-loss", "val accuracy", "test log-loss", "test accuracy", "share (acc)",
                "share (log-loss)"], sweep), "",
        "## Deployment: half width", "",
        table(["student", "test accuracy", "test log-loss"],
               [[f"{d['spec']} distilled", f"{100 * d['half_width_distilled']['test_accuracy']:.2f}%",
                 f"{d['half_width_distilled']['test_log_loss']:.4f}"],
                [f"{d['spec']} labels only", f"{100 * d['half_width_labels_only']['test_accuracy']:.2f}%",
                 f"{d['half_width_labels_only']['test_log_loss']:.4f}"]]), "",
        "## Store size against student quality (top-k at the chosen T, sampled at T = 1; each share is of the "
        "gain of the dense store's student at the same T over the baseline, with its 95% block-bootstrap interval)",
        "",
        table(["store", "bytes/token", "test accuracy", "test log-loss", "share of dense gain (acc)",
                "share of dense gain (log-loss)"], top_k), "",
        "## Samples (prompt `KING.`)", ""]
    for name, text in r["samples"].items():
        lines += [f"**{name}**", "", "```text", text.strip(), "```", ""]
    lines += [f"Training and store-building seconds per stage, as each run recorded them: {r['stage_seconds']}; "
              f"{r.get('training_seconds', sum(r['stage_seconds'].values())):.0f} s in all. This invocation: "
              f"{r['total_seconds']:.0f} s (evaluations included, reused stages not).", "",
              machine_line(r["machine"]), ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot(out / "lm.png", r)


def _plot(path: Path, r: dict[str, Any]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    sweep = r["temperature_sweep"]
    left.plot([s["temperature"] for s in sweep], [100 * s["test_accuracy"] for s in sweep], marker="o",
              label="distilled")
    for name, style in (("baseline", "--"), ("ensemble", ":")):
        left.axhline(100 * r["models"][name]["test_accuracy"], linestyle=style, color="grey", label=name)
    left.set(xscale="log", xlabel="temperature T", ylabel="test next-token accuracy (%)")
    left.legend(fontsize=8)
    # each store's student as a share of the dense store's student's log-loss gain, with its 95% interval
    rows = [row for row in r["top_k"] if row["share_of_dense_gain_log_loss"] is not None]
    share = [100 * row["share_of_dense_gain_log_loss"] for row in rows]
    interval = [[100 * v for v in row.get("interval_of_dense_gain_log_loss",
                                          [row["share_of_dense_gain_log_loss"]] * 2)] for row in rows]
    right.errorbar([row["bytes_per_token"] for row in rows], share, fmt="o",
                   yerr=[[s - low for s, (low, _) in zip(share, interval)],
                         [high - s for s, (_, high) in zip(share, interval)]])
    for row, y in zip(rows, share):
        right.annotate(row["store"], (row["bytes_per_token"], y), fontsize=7)
    right.set(xscale="log", xlabel="store bytes per token", ylabel="share of the dense gain, log-loss (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
