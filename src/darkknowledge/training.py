"""The one training loop. Teacher training, plain student training and distillation (§2) differ only in the
objective: the targets the student learns from and the loss that compares them with its logits.

Read top to bottom: config, objectives, then ``fit``. Data stays in memory as uint8 tensors; a batch is one
index_select, one batched jitter and one forward/backward. Every epoch draws its randomness from
(seed, epoch) alone, so a run resumed from its last saved epoch ends exactly where an uninterrupted one does.

Under torchrun (:mod:`darkknowledge.distributed`) the same loop is data-parallel: every rank draws the same
order of cases and the same global batches, takes its own slice of each (its shard of the data and of the
soft-target store), and DistributedDataParallel averages the gradients, weighted so the step is the one a single
process takes on the whole batch. Nothing in a checkpoint depends on the number of workers, so a run stopped with
N workers resumes with any other number. Rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint
from .augment import jitter_offsets, translate
from .distributed import Workers, current
from .errors import DarkKnowledgeError, TrainingDiverged
from .ensemble import Ensemble, distillation_targets
from .evaluation import Evaluation, as_inputs, autocast, evaluate, predict_logits
from .losses import distillation_loss

SCHEDULES = ("onecycle", "cosine", "constant", "step")


@dataclass
class TrainConfig:
    """How to train. Defaults suit the MLPs on MNIST-sized data."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"  # onecycle: 10% linear warm-up, then cosine to zero; step: halved every tenth
    jitter: int = 0  # random translations of up to this many pixels (§3 teacher: 2)
    bf16: bool = False  # bfloat16 autocast on CPU: ~2.5x faster matmuls; weights and loss stay float32
    seed: int = 0
    patience: int | None = None  # stop after this many epochs without a better validation error
    progress: bool = True

    def __post_init__(self):
        checks = [("epochs", self.epochs >= 1, "an integer >= 1"),
                  ("batch_size", self.batch_size >= 1, "an integer >= 1"),
                  ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
                  ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
                  ("jitter", self.jitter >= 0, "an integer >= 0"),
                  ("patience", self.patience is None or self.patience >= 1, "an integer >= 1 or unset")]
        for name, ok, allowed in checks:
            if not ok:
                raise DarkKnowledgeError(f"training option {name} must be {allowed}, got {getattr(self, name)!r}")

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The schedule as a pure function of the step, so resuming needs no scheduler state."""
        progress = step / max(total_steps, 1)
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":  # the long dropout-net recipes: halve the rate every tenth of the run
            return self.lr * 0.5 ** min(int(10 * progress), 9)
        if self.schedule == "onecycle":
            warmup = 0.1
            if progress < warmup:
                return self.lr * (0.04 + 0.96 * progress / warmup)
            progress = (progress - warmup) / (1 - warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))


class Batch(NamedTuple):
    inputs: torch.Tensor   # float [B, H, W], jittered if the config says so
    labels: torch.Tensor   # int64 [B]
    indices: torch.Tensor  # positions in the training set, to look up cached teacher outputs


class HardTargets:
    """Plain cross-entropy with the true labels: how teachers and the small baseline net are trained."""

    def prepare(self, train, config: TrainConfig, device: torch.device = torch.device("cpu")) -> None:
        pass

    def loss(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.cross_entropy(logits.float(), batch.labels)
        return loss, {"loss": loss}

    def describe(self) -> dict[str, Any]:
        return {"objective": "hard"}


@dataclass
class Distillation:
    """§2: match the teacher's soft targets at ``temperature`` (x T^2), plus ``hard_weight`` x cross-entropy
    with the labels. Weights are relative, as in the paper: soft 1, hard 0.5 is the speech run's setting.

    The teacher's outputs come from ``teacher_logits`` (computed once over the training set: fast), from
    ``store`` (a :class:`darkknowledge.soft_targets.SoftTargets` over the training set: computed once, on disk,
    any temperature, ensembles combined exactly, top-k for many classes) or from ``teacher`` run on every batch
    (needed when the inputs are jittered, since the teacher must see what the student sees; cached logits or a
    store are then set aside and the loop says so). A ``teacher`` that is an
    :class:`darkknowledge.ensemble.Ensemble` run online gives its combine rule's targets at the temperature.
    """

    temperature: float
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None
    store: Any = None  # a SoftTargets over the training set
    bf16: bool = field(default=False, init=False)
    online_reason: str | None = field(default=None, init=False)

    def prepare(self, train, config: TrainConfig, device: torch.device = torch.device("cpu")) -> None:
        if self.teacher is None and self.teacher_logits is None and self.store is None:
            raise DarkKnowledgeError("distillation needs a teacher module, precomputed teacher_logits or a "
                                     "soft-target store")
        if self.teacher_logits is not None and self.store is not None:
            raise DarkKnowledgeError("give teacher_logits or a soft-target store, not both")
        if self.teacher_logits is not None and len(self.teacher_logits) != len(train):
            raise DarkKnowledgeError(f"teacher_logits has {len(self.teacher_logits)} rows but the transfer set has "
                                     f"{len(train)} cases; compute them over the same transfer set")
        if self.store is not None and (len(self.store) != len(train)
                                       or self.store.transfer_fingerprint != train.fingerprint()):
            raise DarkKnowledgeError(f"the soft-target store ({len(self.store)} cases) was computed over another "
                                     f"transfer set than this one ({len(train)} cases, {train.name}); compute it "
                                     "over the same transfer set")
        if config.jitter > 0 and self.teacher is None:
            raise DarkKnowledgeError("cached teacher logits were computed on un-jittered inputs; pass the teacher "
                                     "module so it runs on the jittered batches, or set jitter to 0")
        if config.jitter > 0:
            # Jittered inputs: the teacher must run online.
            if self.teacher_logits is not None or self.store is not None:
                self.online_reason = (f"jitter {config.jitter}: the teacher must see the jittered inputs, so the "
                                      "cached outputs are not used")
            self.teacher_logits = None
            self.store = None
        self.bf16 = config.bf16
        if self.teacher is not None:
            self.teacher.to(device).eval()

    def soft_source(self) -> str:
        if self.store is not None:
            return f"soft-target store {self.store.path or '(in memory)'}"
        if self.teacher_logits is not None:
            return "cached logits"
        return "teacher run on every batch" + (f" ({self.online_reason})" if self.online_reason else "")

    def loss(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.store is not None:
            targets = _to_device(self.store.targets(batch.indices, self.temperature), logits.device)
        elif self.teacher_logits is not None:
            targets = {"teacher_logits": self.teacher_logits[batch.indices].to(logits.device)}
        else:
            with torch.no_grad(), autocast(self.bf16, logits.device):
                if isinstance(self.teacher, Ensemble):
                    targets = distillation_targets(self.teacher.member_logits(batch.inputs).float(),
                                                   self.teacher.combine, self.temperature)
                else:
                    targets = {"teacher_logits": self.teacher(batch.inputs).float()}
        out = distillation_loss(logits, labels=batch.labels, temperature=self.temperature,
                                soft_weight=self.soft_weight, hard_weight=self.hard_weight, **targets)
        # soft_kl: the soft term less the targets' entropy, comparable with other libraries' KLDivLoss * T^2.
        parts = {"loss": out.total, "soft": out.soft, "soft_kl": out.kl}
        if out.hard is not None:
            parts["hard"] = out.hard
        return out.total, parts

    def describe(self) -> dict[str, Any]:
        described = {"objective": "distillation", "temperature": self.temperature, "soft_weight": self.soft_weight,
                     "hard_weight": self.hard_weight}
        if self.store is not None:
            described["soft_targets"] = self.store.describe()
        elif isinstance(self.teacher, Ensemble):
            described["combine"] = self.teacher.combine
        return described


def _to_device(targets: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Targets read from a store (tensors, or a TopKTargets of tensors) on the student's device."""
    if device.type == "cpu":
        return targets
    return {name: value.to(device) if isinstance(value, torch.Tensor) else dataclasses.replace(
        value, **{f.name: getattr(value, f.name).to(device) for f in dataclasses.fields(value)})
        for name, value in targets.items()}


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_errors: int | None
    stopped_early: bool
    seconds: float


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _run_key(meta: dict, train, val, config: TrainConfig, objective, locations: bool = False) -> str:
    """What must match for --resume to continue the same run rather than a different one: what the model, data,
    settings and teacher are, not where the teacher's files are (``locations=True``: the older key that held them)."""
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    return checkpoint.run_key(meta, train.fingerprint(), val.fingerprint() if val is not None else "",
                              json.dumps(settings, sort_keys=True), json.dumps(objective.describe(), sort_keys=True),
                              locations=locations)


def _tensorboard(run_dir: Path | None):
    if run_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def fit(model: nn.Module, train, val=None, config: TrainConfig | None = None, objective=None,
        run_dir: str | Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None, monitor=None, workers: Workers | None = None) -> FitResult:
    """Train ``model`` on ``train`` (LabeledImages), validating on ``val`` each epoch.

    ``monitor``: extra sets evaluated after every epoch only to log their errors (a LabeledImages, logged as
    ``monitor_errors`` / ``monitor_error_rate``, or a dict name -> LabeledImages, logged as ``NAME_errors`` /
    ``NAME_error_rate``), e.g. for learning curves on the test set. They never choose the epoch or stop training:
    only ``val`` does.

    With ``run_dir``, saves the best model (by validation errors; the last one without ``val``) as
    model.safetensors + model.json with ``meta``, the resume state after every epoch, and metrics.jsonl.
    ``resume=True`` continues from the last saved epoch. Returns with the best weights loaded in ``model``.

    ``workers``: the process group to train with (default: torchrun's, if this process joined one; see the
    module doc). Every rank calls ``fit`` with the same arguments; all return the same model.
    """
    config = config or TrainConfig()
    objective = objective or HardTargets()
    workers = workers or current()
    meta = dict(meta or {})
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if not workers.is_main:
        log = _silent
    run_dir = Path(run_dir) if run_dir is not None else None
    if monitor is not None and not isinstance(monitor, dict):
        monitor = {"monitor": monitor}
    if monitor and {"train", "val"} & set(monitor):
        raise DarkKnowledgeError("monitor names train and val are taken by fit's own metrics; name the sets "
                                 "otherwise (e.g. train_eval)")
    if workers.world_size > min(len(train), config.batch_size):
        raise DarkKnowledgeError(f"{workers.world_size} workers need a batch size and a training set of at least "
                                 f"{workers.world_size} cases (batch size {config.batch_size}, {len(train)} cases); "
                                 "use fewer workers or a larger batch")
    model.to(workers.device)
    objective.prepare(train, config, workers.device)
    if isinstance(objective, Distillation) and (objective.teacher is not None or objective.store is not None):
        log(f"distillation: soft targets from the {objective.soft_source()}")

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    constrain = getattr(model, "apply_constraints", None)
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    run_key = _run_key(meta, train, val, config, objective)
    legacy_key = _run_key(meta, train, val, config, objective, locations=True)

    best_state = None

    def saved_state() -> dict[str, Any] | None:
        """Where the saved run stopped (None: a new run); loads its weights, momentum and best model."""
        nonlocal best_state
        state = checkpoint.resume_training_state(run_dir, model, optimizer, run_key, resume,
                                                 legacy_key=legacy_key)
        if state is None:
            return None
        if state["best"]["val_errors"] is not None:
            best_state = checkpoint.load_model(run_dir)[0].state_dict()
        return {k: state[k] for k in ("epoch", "history", "best", "seconds")}

    # Rank 0 reads the saved state (the others may not see run_dir) and tells everyone where to start.
    resumed = workers.on_main(saved_state)
    start_epoch, history, elapsed = 0, [], 0.0
    best = {"epoch": 0, "val_errors": None, "stale": 0}
    if resumed is not None:
        start_epoch, history, best, elapsed = (resumed[k] for k in ("epoch", "history", "best", "seconds"))
        finished = start_epoch >= config.epochs or best["stale"] >= (config.patience or math.inf)
        log(f"{run_dir}: already trained ({start_epoch} epochs), reused" if finished
            else f"resuming {run_dir} after epoch {start_epoch}")
    net = model
    if workers.distributed:
        _share_weights_and_momentum(model, optimizer, workers)
        net = DistributedDataParallel(model, device_ids=[workers.device.index] if workers.device.type == "cuda"
                                      else None, gradient_as_bucket_view=True)  # no copy of the gradients

    writer = _tensorboard(run_dir) if workers.is_main else None
    stopped_early = best["stale"] >= (config.patience or math.inf)
    for epoch in range(start_epoch, config.epochs):
        if stopped_early:
            break
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(config.seed, epoch) + workers.rank)  # dropout masks
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
        order = torch.randperm(n, generator=generator)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        train_errors = torch.zeros((), dtype=torch.long, device=workers.device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and workers.is_main), file=sys.stderr, mininterval=0.5)
        for step in bar:
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            offsets = jitter_offsets(len(batch), config.jitter, generator)  # the whole batch's, as one process
            mine = workers.shard(len(batch))
            indices = batch[mine]
            inputs = as_inputs(translate(train.images[indices], offsets[:, mine] if offsets is not None else None,
                                         config.jitter).to(workers.device))
            labels = train.labels[indices].to(workers.device)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate(epoch * steps_per_epoch + step, total_steps)
            with autocast(config.bf16, workers.device):
                logits = net(inputs)
            if len(indices):
                try:
                    loss, parts = objective.loss(logits, Batch(inputs, labels, indices))
                except DarkKnowledgeError:
                    if torch.isfinite(logits).all():
                        raise
                    raise TrainingDiverged(
                        f"training diverged in epoch {epoch + 1}: the model's outputs became NaN or inf; use a "
                        "lower --lr (distilling at temperature T scales the soft-target gradient by up to T)") from None
            else:  # a last batch smaller than the number of workers: this rank still joins the gradient sum
                loss, parts = logits.sum() * 0.0, {}
            if workers.distributed:
                # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the batch
                # makes that average the gradient of the whole batch's mean loss, as one process computes it.
                loss = loss * (len(indices) * workers.world_size / len(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if constrain is not None:
                constrain()
            for key, value in parts.items():  # sums stay tensors: no per-step synchronisation to Python
                sums[key] = sums.get(key, 0) + value.detach() * len(indices)
            train_errors += (logits.detach().argmax(1) != labels).sum()

        names = sorted(sums)  # the same on every rank: each had cases in the first batch
        totals = workers.all_sum(torch.stack([*(sums[k].double() for k in names), train_errors.double()]))
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{k}": float(v) / n for k, v in zip(names, totals)},
                  "train_errors": int(totals[-1]), "train_error_rate": int(totals[-1]) / n}
        improved = True
        if val is not None:
            result = _evaluate(model, val, config.bf16, workers)
            record.update(val_errors=result.errors, val_error_rate=1 - result.accuracy, val_loss=result.loss)
            improved = best["val_errors"] is None or result.errors < best["val_errors"]
        for name, data in (monitor or {}).items():  # logged only: selection above uses val alone
            watched = _evaluate(model, data, config.bf16, workers)
            record.update({f"{name}_errors": watched.errors, f"{name}_error_rate": 1 - watched.accuracy})
        elapsed += time.perf_counter() - started
        record["seconds"] = round(elapsed, 3)
        history.append(record)
        if improved:
            best = {"epoch": epoch + 1, "val_errors": record.get("val_errors"), "stale": 0}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best["stale"] += 1
        stopped_early = best["stale"] >= (config.patience or math.inf)

        if run_dir is not None and workers.is_main:
            if improved:
                checkpoint.save_model(run_dir, model, _sidecar(meta, config, objective, best, record))
            checkpoint.save_training_state(run_dir, epoch + 1, model, optimizer, {
                "run_key": run_key, "history": history, "best": best, "seconds": elapsed,
                "done": epoch + 1 == config.epochs or stopped_early})
            _write_metrics(run_dir / "metrics.jsonl", history)
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
        val_text = f"  val errors {record['val_errors']}" if val is not None else ""
        log(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  "
            f"train errors {record['train_errors']}{val_text}  {elapsed:.1f}s")

    if writer is not None:
        writer.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    workers.broadcast_tensors(model.state_dict().values())  # rank 0's best, which it saved, everywhere
    return FitResult(history, best["epoch"], best["val_errors"], stopped_early, elapsed)


def _silent(line: str) -> None:
    pass


def _share_weights_and_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, workers: Workers) -> None:
    """Rank 0's weights and SGD momentum (fresh, or resumed from its checkpoint) on every rank."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    has_momentum = workers.broadcast_json([optimizer.state.get(p, {}).get("momentum_buffer") is not None
                                           for p in params])
    buffers = []
    for p, has in zip(params, has_momentum):
        if has:
            state = optimizer.state[p]
            state.setdefault("momentum_buffer", torch.zeros_like(p))
            buffers.append(state["momentum_buffer"])
    workers.broadcast_tensors([*model.state_dict().values(), *buffers])


def _evaluate(model: nn.Module, data, bf16: bool, workers: Workers) -> Evaluation:
    """``evaluate`` with each rank taking its shard of ``data`` and the counts summed over ranks."""
    if not workers.distributed:
        return evaluate(model, data, bf16=bf16)
    part = evaluate(model, data.subset(torch.arange(len(data))[workers.shard(len(data))]), bf16=bf16)
    totals = workers.all_sum(torch.tensor([part.errors, part.total, part.loss * part.total if part.total else 0.0,
                                           *part.per_class_errors], dtype=torch.float64))
    total = int(totals[1])
    return Evaluation(int(totals[0]), total, [int(x) for x in totals[3:]], float(totals[2]) / max(total, 1))


def _sidecar(meta, config, objective, best, record) -> dict[str, Any]:
    return {**meta, "training": {k: v for k, v in asdict(config).items() if k != "progress"},
            **objective.describe(), "epoch": best["epoch"], "metrics": record}


def _write_metrics(path: Path, history: list[dict]) -> None:
    # Rewritten whole from the saved history, so a resumed run never holds a line twice.
    lines = "".join(json.dumps(r) + "\n" for r in history)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(lines))


def cache_teacher_logits(teacher: nn.Module, train, bf16: bool = False) -> torch.Tensor:
    """The teacher's logits over the transfer set, computed once in large batches (§2: logits keep every T)."""
    return predict_logits(teacher, train.images, bf16=bf16)
