"""The one training loop. Teacher training, plain student training and distillation (§2) differ only in the
objective: the targets the student learns from and the loss that compares them with its logits.

Read top to bottom: config, objectives, then ``fit``. The training set is any transfer set
(:mod:`darkknowledge.data.transfer`): the built-in image sets stay in memory and a batch is one index_select, one
batched jitter and one forward/backward; a ``Dataset`` streams through a ``DataLoader``. Every epoch draws its
randomness from (seed, epoch) alone, so a run resumed from its last saved epoch ends exactly where an
uninterrupted one does.

Under torchrun (:mod:`darkknowledge.distributed`) the same loop is data-parallel: every rank draws the same
order of cases and the same global batches, takes its own slice of each (its shard of the data and of the
soft-target store), and DistributedDataParallel averages the gradients, weighted so the step is the one a single
process takes on the whole batch. Nothing in a checkpoint depends on the number of workers, so a run stopped with
N workers resumes with any other number. Rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint
from .augment import check_jitter, jitter_offsets, translate
from .data.transfer import as_transfer_set, batches, case_rows, input_shape, num_cases, subset
from .devices import resolve_device
from .distributed import Workers, current
from .errors import DarkKnowledgeError, TrainingDiverged
from .ensemble import Ensemble, distillation_targets
from .evaluation import Evaluation, autocast, evaluate, predict_logits, to_device
from .losses import distillation_loss

SCHEDULES = ("onecycle", "cosine", "constant", "step")
OPTIMIZERS = ("sgd", "adamw")
# Settings added after runs were saved: left out of a run's key while at their defaults, so older runs resume.
_NEWER_SETTINGS = {"optimizer": "sgd", "optimizer_options": {}, "grad_accumulation": 1, "clip_grad_norm": None,
                   "fp16": False, "step_epochs": None}


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
    optimizer: str | type = "sgd"  # sgd (with momentum), adamw, or any torch.optim.Optimizer class
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the optimizer
    grad_accumulation: int = 1  # each step's batch is split into this many micro-batches (same step, less memory)
    clip_grad_norm: float | None = None  # clip the gradient's global L2 norm to this before each step
    fp16: bool = False  # float16 autocast with a gradient scaler (CUDA only)
    # step schedule: halve every this many epochs (unset: every tenth of the run). Set, a shorter run follows a
    # longer run's rates exactly up to its end, e.g. a retrain to the epoch chosen on validation.
    step_epochs: int | None = None

    def __post_init__(self):
        checks = [("epochs", self.epochs >= 1, "an integer >= 1"),
                  ("batch_size", self.batch_size >= 1, "an integer >= 1"),
                  ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
                  ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
                  ("jitter", self.jitter >= 0, "an integer >= 0"),
                  ("patience", self.patience is None or self.patience >= 1, "an integer >= 1 or unset"),
                  ("optimizer", self.optimizer in OPTIMIZERS or (isinstance(self.optimizer, type) and issubclass(
                      self.optimizer, torch.optim.Optimizer)), f"one of {', '.join(OPTIMIZERS)} or a "
                   "torch.optim.Optimizer class"),
                  ("optimizer_options", isinstance(self.optimizer_options, dict), "a dict of keyword arguments"),
                  ("grad_accumulation", isinstance(self.grad_accumulation, int)
                   and 1 <= self.grad_accumulation <= self.batch_size,
                   "an integer in 1..batch_size (a micro-batch holds at least one case)"),
                  ("clip_grad_norm", self.clip_grad_norm is None or (math.isfinite(self.clip_grad_norm)
                                                                     and self.clip_grad_norm > 0),
                   "a positive number or unset"),
                  ("fp16", not (self.fp16 and self.bf16), "off when bf16 is on (choose one precision)"),
                  ("step_epochs", self.step_epochs is None or (isinstance(self.step_epochs, int)
                                                               and self.step_epochs >= 1), "an integer >= 1 or unset")]
        for name, ok, allowed in checks:
            if not ok:
                raise DarkKnowledgeError(f"training option {name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"

    def settings(self) -> dict[str, Any]:
        """What the run's key and sidecar record: every field but ``progress``; an optimizer class by its name;
        settings newer than the saved runs left out while at their defaults."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "progress" or (f.name in _NEWER_SETTINGS and value == _NEWER_SETTINGS[f.name]):
                continue
            out[f.name] = f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else value
        return out

    def make_optimizer(self, parameters) -> torch.optim.Optimizer:
        """The optimizer; its learning rate is set every step by :meth:`learning_rate`."""
        if self.optimizer == "sgd":
            parameters = list(parameters)
            # One fused pass over each tensor, not torch's CPU default of one per operation: the same update up to
            # rounding, a 1.8x faster step for the MNIST teacher (benchmarks/teacher_speed.py).
            fusable = not {"fused", "foreach"} & set(self.optimizer_options) and all(
                p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
            return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   **({"fused": True} if fusable else {}), **self.optimizer_options)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay, **self.optimizer_options)
        options = {"weight_decay": self.weight_decay} if self.weight_decay else {}
        try:
            return self.optimizer(parameters, lr=self.lr, **options, **self.optimizer_options)
        except TypeError as e:
            raise DarkKnowledgeError(f"optimizer {self.optimizer.__name__}: {e}; fix optimizer_options") from None

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The schedule as a pure function of the step, so resuming needs no scheduler state."""
        progress = step / max(total_steps, 1)
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":  # the long dropout-net recipes: halve the rate every tenth of the run
            if self.step_epochs is not None:
                return self.lr * 0.5 ** int(progress * self.epochs / self.step_epochs)
            return self.lr * 0.5 ** min(int(10 * progress), 9)
        if self.schedule == "onecycle":
            warmup = 0.1
            if progress < warmup:
                return self.lr * (0.04 + 0.96 * progress / warmup)
            progress = (progress - warmup) / (1 - warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))


class Batch(NamedTuple):
    inputs: Any            # model-ready inputs (float [B, H, W] for the built-in images), jittered if asked
    labels: torch.Tensor   # int64 [cases]: one per case counted (labels [B, T] flattened, ignored ones left out)
    indices: torch.Tensor  # each case's row in the training set (and its store), to look up teacher outputs
    keep: torch.Tensor | None = None  # which of the batch's flattened cases are counted (None: all)


def _on(mask: torch.Tensor | None, device) -> torch.Tensor | None:
    return mask.to(device) if mask is not None else None


def as_cases(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, ..., C]`` as one row per case ``[cases, C]``, the ignored ones (``keep`` False) left out."""
    logits = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits
    return logits[keep] if keep is not None else logits


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
    teacher_device: str | torch.device | None = None  # where an online teacher runs (default: the student's device)
    bf16: bool | str = field(default=False, init=False)
    online_reason: str | None = field(default=None, init=False)

    def prepare(self, train, config: TrainConfig, device: torch.device = torch.device("cpu")) -> None:
        if self.teacher is None and self.teacher_logits is None and self.store is None:
            raise DarkKnowledgeError("distillation needs a teacher module, precomputed teacher_logits or a "
                                     "soft-target store")
        if self.teacher_logits is not None and self.store is not None:
            raise DarkKnowledgeError("give teacher_logits or a soft-target store, not both")
        if self.teacher_logits is not None:
            self.teacher_logits = as_cases(self.teacher_logits)
        if self.teacher_logits is not None and len(self.teacher_logits) != num_cases(train):
            raise DarkKnowledgeError(f"teacher_logits has {len(self.teacher_logits)} rows but the transfer set has "
                                     f"{num_cases(train)} cases; compute them over the same transfer set")
        if self.store is not None and (len(self.store) != num_cases(train)
                                       or self.store.transfer_fingerprint != train.fingerprint()):
            raise DarkKnowledgeError(f"the soft-target store ({len(self.store)} cases) was computed over another "
                                     f"transfer set than this one ({num_cases(train)} cases, {train.name}); compute "
                                     "it over the same transfer set")
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
        self.bf16 = config.precision
        if self.teacher is not None:
            self.teacher_device = resolve_device(self.teacher_device) if self.teacher_device is not None else device
            self.teacher.to(self.teacher_device).eval()

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
            inputs = to_device(batch.inputs, self.teacher_device)
            with torch.no_grad(), autocast(self.bf16, self.teacher_device):
                if isinstance(self.teacher, Ensemble):
                    members = self.teacher.member_logits(inputs).float()  # [B, M, ..., C] -> [cases, M, C]
                    members = members.movedim(1, -2).reshape(-1, members.shape[1], members.shape[-1])
                    if batch.keep is not None:
                        members = members[_on(batch.keep, members.device)]
                    targets = distillation_targets(members, self.teacher.combine, self.temperature)
                else:
                    targets = {"teacher_logits": as_cases(self.teacher(inputs).float(),
                                                          _on(batch.keep, self.teacher_device))}
            targets = _to_device(targets, logits.device)
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
    """Targets (tensors, or a TopKTargets of tensors, from a store or a teacher elsewhere) on the student's
    device."""
    return {name: value.to(device, non_blocking=value.is_pinned()) if isinstance(value, torch.Tensor)
            else dataclasses.replace(
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
    return checkpoint.run_key(meta, train.fingerprint(), val.fingerprint() if val is not None else "",
                              json.dumps(config.settings(), sort_keys=True),
                              json.dumps(objective.describe(), sort_keys=True),
                              locations=locations)


def _legacy_keys(meta: dict, train, val, config: TrainConfig, objective) -> tuple[str, ...]:
    """The keys older versions saved the same run with, also accepted on resume (its next checkpoint stores the
    current key): the one that held locations, and the one of a whole validation size the command line wrote as
    a float (``--val-size 0`` was saved as ``0.0``, so Python's ``val_size=0`` could not continue that run)."""
    keys = [_run_key(meta, train, val, config, objective, locations=True)]
    size = meta.get("validation", {}).get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        as_float = {**meta, "validation": {**meta["validation"], "size": float(size)}}
        keys.append(_run_key(as_float, train, val, config, objective))
    return tuple(keys)


def _tensorboard(run_dir: Path | None, log: Callable[[str], None]):
    if run_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        log("metrics: metrics.jsonl only (install the tensorboard extra for TensorBoard logs: "
            "pip install 'darkknowledge[tensorboard]')")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def fit(model: nn.Module, train, val=None, config: TrainConfig | None = None, objective=None,
        run_dir: str | Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None, monitor=None, workers: Workers | None = None,
        device: str | torch.device | None = "auto",
        callbacks: Sequence[Callable[[dict[str, Any]], Any]] = ()) -> FitResult:
    """Train ``model`` on ``train``, validating on ``val`` each epoch. ``train``, ``val`` and ``monitor`` sets are
    transfer sets or anything :func:`darkknowledge.data.as_transfer_set` takes (a ``TensorDataset``, an
    ``(inputs, labels)`` pair, any map-style ``Dataset``).

    ``monitor``: extra sets evaluated after every epoch only to log their errors (a set, logged as
    ``monitor_errors`` / ``monitor_error_rate``, or a dict name -> set, logged as ``NAME_errors`` /
    ``NAME_error_rate``), e.g. for learning curves on the test set. They never choose the epoch or stop training:
    only ``val`` does.

    With ``run_dir``, saves the best model (by validation errors; the last one without ``val``) as
    model.safetensors + model.json with ``meta``, the resume state after every epoch, and metrics.jsonl (and
    TensorBoard logs when tensorboard is installed). ``resume=True`` continues from the last saved epoch. Returns
    with the best weights loaded in ``model``.

    ``device``: where the model trains (``auto``: CUDA when present; see :func:`darkknowledge.devices.
    resolve_device`); under torchrun each rank's own device. ``callbacks``: called after every epoch with that
    epoch's metrics (the line metrics.jsonl gets); one that returns ``True`` stops training after that epoch.

    ``workers``: the process group to train with (default: torchrun's, if this process joined one; see the
    module doc). Every rank calls ``fit`` with the same arguments; all return the same model.
    """
    workers = workers or current()
    with contextlib.ExitStack() as held:  # one writer per run folder: rank 0 holds its lock for every rank
        if run_dir is not None:
            workers.on_main(lambda: held.enter_context(checkpoint.open_run(run_dir)))  # a refusal stops all ranks
        return _fit(model, train, val, config, objective, run_dir, resume, meta, log, monitor, workers, device,
                    callbacks)


def _fit(model: nn.Module, train, val, config: TrainConfig | None, objective, run_dir: str | Path | None,
         resume: bool, meta: dict[str, Any] | None, log: Callable[[str], None] | None, monitor, workers: Workers,
         device: str | torch.device | None, callbacks: Sequence[Callable[[dict[str, Any]], Any]]) -> FitResult:
    config = config or TrainConfig()
    objective = objective or HardTargets()
    workers = workers or current()
    if not workers.distributed:
        workers = dataclasses.replace(workers, device=resolve_device(device))
    if config.fp16 and workers.device.type != "cuda":
        raise DarkKnowledgeError(f"fp16 training needs a CUDA device (this run is on {workers.device}); use bf16 "
                                 "on the CPU, or --device cuda")
    train = as_transfer_set(train)
    val = as_transfer_set(val) if val is not None else None
    meta = dict(meta or {})
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if not workers.is_main:
        log = _silent
    run_dir = Path(run_dir) if run_dir is not None else None
    if monitor is not None and not isinstance(monitor, dict):
        monitor = {"monitor": monitor}
    monitor = {name: as_transfer_set(data) for name, data in (monitor or {}).items()}
    if {"train", "val"} & set(monitor):
        raise DarkKnowledgeError("monitor names train and val are taken by fit's own metrics; name the sets "
                                 "otherwise (e.g. train_eval)")
    if workers.world_size > min(len(train), config.batch_size):
        raise DarkKnowledgeError(f"{workers.world_size} workers need a batch size and a training set of at least "
                                 f"{workers.world_size} cases (batch size {config.batch_size}, {len(train)} cases); "
                                 "use fewer workers or a larger batch")
    check_jitter(config.jitter, input_shape(train))
    model.to(workers.device)
    objective.prepare(train, config, workers.device)
    if isinstance(objective, Distillation) and (objective.teacher is not None or objective.store is not None):
        log(f"distillation: soft targets from the {objective.soft_source()}")

    optimizer = config.make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=config.fp16)
    constrain = getattr(model, "apply_constraints", None)
    ignore_index = getattr(train, "ignore_index", None)
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    run_key = _run_key(meta, train, val, config, objective)
    legacy_keys = _legacy_keys(meta, train, val, config, objective)

    best_state = None

    def saved_state() -> dict[str, Any] | None:
        """Where the saved run stopped (None: a new run); loads its weights, optimizer state and best model."""
        nonlocal best_state
        state = checkpoint.resume_training_state(run_dir, model, optimizer, run_key, resume,
                                                 legacy_keys=legacy_keys, epochs=config.epochs)
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
        log(f"reusing {run_dir}: already trained ({start_epoch} epochs)" if finished
            else f"resuming {run_dir} after epoch {start_epoch}")
    net = model
    if workers.distributed:
        _share_weights_and_optimizer(model, optimizer, workers)
        net = DistributedDataParallel(model, device_ids=[workers.device.index] if workers.device.type == "cuda"
                                      else None, gradient_as_bucket_view=True)  # no copy of the gradients

    writer = _tensorboard(run_dir, log) if workers.is_main else None
    stopped_early = best["stale"] >= (config.patience or math.inf)
    micro = config.grad_accumulation
    for epoch in range(start_epoch, config.epochs):
        if stopped_early:
            break
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(config.seed, epoch) + workers.rank)  # dropout masks
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
        order = torch.randperm(n, generator=generator)
        # Each step's batch, split into this rank's micro-batches (with their jitter), drawn before reading any
        # data: the same numbers as one process draws, so the data can be read ahead (a DataLoader's workers).
        steps = []
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            offsets = jitter_offsets(len(batch), config.jitter, generator)  # the whole batch's, as one process
            mine = workers.shard(len(batch))
            parts = torch.arange(len(batch))[mine].tensor_split(micro)
            steps.append((len(batch), [(batch[p], offsets[:, p] if offsets is not None else None) for p in parts]))
        reader = batches(train, [indices for _, parts in steps for indices, _ in parts])
        model.train()
        sums: dict[str, torch.Tensor] = {}
        train_errors = torch.zeros((), dtype=torch.long, device=workers.device)
        counted = torch.zeros((), dtype=torch.long, device=workers.device)
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and workers.is_main), file=sys.stderr, mininterval=0.5)
        for step, (batch_size, parts) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate(epoch * steps_per_epoch + step, total_steps)
            for part, (_, offsets) in enumerate(parts):
                inputs, labels, indices = next(reader)
                inputs = translate(to_device(inputs, workers.device), offsets, config.jitter)
                labels = labels.to(workers.device, non_blocking=labels.is_pinned())
                # The gradients are summed over the ranks only on a step's last micro-batch.
                sync = part == len(parts) - 1 or not workers.distributed
                with nullcontext() if sync else net.no_sync():
                    with autocast(config.precision, workers.device):
                        logits = net(inputs)
                    cases = _cases(logits, labels, case_rows(train, indices), ignore_index)
                    if len(indices):
                        try:
                            loss, terms = objective.loss(cases[0], Batch(inputs, *cases[1:]))
                        except DarkKnowledgeError:
                            if torch.isfinite(logits).all():
                                raise
                            raise TrainingDiverged.in_epoch(epoch + 1) from None
                    else:  # a micro-batch with no case of this rank's: it still joins the gradient sum
                        loss, terms = logits.sum() * 0.0, {}
                    # Each micro-batch's mean loss weighted by its share of the step's batch: the gradient is the
                    # whole batch's mean loss, as one process computes it (DDP averages over the ranks).
                    scaler.scale(loss * (len(indices) * workers.world_size / batch_size)).backward()
                for key, value in terms.items():  # sums stay tensors: no per-step synchronisation to Python
                    sums[key] = sums.get(key, 0) + value.detach() * len(cases[1])
                train_errors += (cases[0].detach().argmax(-1) != cases[1]).sum()
                counted += len(cases[1])
            if config.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if constrain is not None:
                constrain()

        names = sorted(sums)  # the same on every rank: each had cases in the first batch
        totals = workers.all_sum(torch.stack([*(sums[k].double() for k in names), train_errors.double(),
                                              counted.double()]))
        cases_seen = max(int(totals[-1]), 1)
        if not bool(torch.isfinite(totals).all()):  # before anything of this epoch is saved
            raise TrainingDiverged.in_epoch(epoch + 1)
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{k}": float(v) / cases_seen for k, v in zip(names, totals)},
                  "train_errors": int(totals[-2]), "train_error_rate": int(totals[-2]) / cases_seen}
        improved = True
        if val is not None:
            result = _evaluate(model, val, config.precision, workers)
            record.update(val_errors=result.errors, val_error_rate=1 - result.accuracy, val_loss=result.loss)
            improved = best["val_errors"] is None or result.errors < best["val_errors"]
        for name, data in monitor.items():  # logged only: selection above uses val alone
            watched = _evaluate(model, data, config.precision, workers)
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
        # Every rank runs the callbacks (they may stop the run, and all ranks must stop together).
        stopped_early = any([callback(dict(record)) is True for callback in callbacks]) or stopped_early

        if run_dir is not None and workers.is_main:
            if improved:
                checkpoint.save_model(run_dir, model, _sidecar(model, meta, config, objective, best, record, train))
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


def _cases(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, ignore_index: int | None):
    """(logits [cases, C], labels [cases], store rows [cases], keep): one row per case counted. The rows stay on
    the CPU, where the store and cached logits are read."""
    labels, rows = labels.reshape(-1), rows.reshape(-1)
    keep = labels != ignore_index if ignore_index is not None else None
    if keep is not None:
        labels, rows = labels[keep], rows[keep.cpu()]
    return as_cases(logits, keep), labels, rows, keep


def _silent(line: str) -> None:
    pass


def _share_weights_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, workers: Workers) -> None:
    """Rank 0's weights and optimizer state (SGD momentum, AdamW moments; fresh, or resumed from its checkpoint)
    on every rank."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # each state tensor's shape, dtype and whether it lives on the CPU (AdamW's step counter does)
    layout = workers.broadcast_json([{k: [list(v.shape), str(v.dtype).replace("torch.", ""), v.device.type == "cpu"]
                                      for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
                                     for p in params])
    buffers = []
    for p, tensors in zip(params, layout):
        state = optimizer.state[p]
        for key, (shape, dtype, on_cpu) in sorted(tensors.items()):
            state.setdefault(key, torch.zeros(shape, dtype=getattr(torch, dtype), device="cpu" if on_cpu else p.device))
            buffers.append(state[key])
    workers.broadcast_tensors([*model.state_dict().values(), *buffers])


def _evaluate(model: nn.Module, data, bf16: bool | str, workers: Workers) -> Evaluation:
    """``evaluate`` with each rank taking its shard of ``data`` and the counts summed over ranks."""
    if not workers.distributed:
        return evaluate(model, data, bf16=bf16)
    part = evaluate(model, subset(data, torch.arange(len(data))[workers.shard(len(data))]), bf16=bf16)
    totals = workers.all_sum(torch.tensor([part.errors, part.total, part.loss * part.total if part.total else 0.0,
                                           *part.per_class_errors], dtype=torch.float64))
    total = int(totals[1])
    return Evaluation(int(totals[0]), total, [int(x) for x in totals[3:]], float(totals[2]) / max(total, 1))


def _sidecar(model, meta, config, objective, best, record, train) -> dict[str, Any]:
    """model.json: what a folder written by ``fit`` alone needs for every command (the spec of a model made by
    ``build_model``, one input's shape, the classes, the data's description with its transform), then the
    caller's ``meta``, the settings, objective and metrics."""
    shape = list(input_shape(train))
    described = {**getattr(model, "darkknowledge_spec", {}), "image_shape": shape, "input_shape": shape,
                 "classes": list(train.classes), "transfer_set": train.describe()}
    return {**described, **meta, "training": config.settings(), **objective.describe(), "epoch": best["epoch"],
            "metrics": record}


def _write_metrics(path: Path, history: list[dict]) -> None:
    # Rewritten whole from the saved history, so a resumed run never holds a line twice.
    lines = "".join(json.dumps(r) + "\n" for r in history)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(lines))


def cache_teacher_logits(teacher: nn.Module, train, bf16: bool | str = False) -> torch.Tensor:
    """The teacher's logits over the transfer set, one row per case, computed once in large batches (§2: logits
    keep every T)."""
    return as_cases(predict_logits(teacher, as_transfer_set(train), bf16=bf16))


def distill(student: nn.Module, transfer_set, teacher, temperature: float, soft_weight: float = 1.0,
            hard_weight: float = 0.0, val=None, config: TrainConfig | None = None, **fit_options) -> nn.Module:
    """§2 in one call: train ``student`` on ``transfer_set`` to match ``teacher``'s soft targets at
    ``temperature`` (plus ``hard_weight`` x cross-entropy with the labels); returns the student with its best
    weights. ``teacher``: a :class:`darkknowledge.soft_targets.SoftTargets` store over the transfer set, or a
    module (an :class:`Ensemble` too), whose logits are then computed once (run on every batch with jitter).
    ``fit_options`` go to :func:`fit` (``run_dir``, ``device``, ``callbacks``, ...)."""
    config = config or TrainConfig()
    transfer_set = as_transfer_set(transfer_set)
    if isinstance(teacher, nn.Module):
        cached = cache_teacher_logits(teacher, transfer_set, config.precision) \
            if config.jitter == 0 and not isinstance(teacher, Ensemble) else None
        objective = Distillation(temperature, soft_weight, hard_weight, teacher=teacher, teacher_logits=cached)
    else:
        objective = Distillation(temperature, soft_weight, hard_weight, store=teacher)
    fit(student, transfer_set, val, config, objective, **fit_options)
    return student
