"""The one training loop. Teacher training, plain student training and distillation (§2) differ only in the
objective: the targets the student learns from and the loss that compares them with its logits.

Read top to bottom: config, objectives, then ``fit``: its setup and epochs, :class:`_Epochs` (one epoch, one
optimizer step, one micro-batch), :func:`_select` (the epoch kept, by validation errors or log-loss) and
:func:`_save` (model, resume state, metrics). The training set is any transfer set
(:mod:`darkknowledge.data.transfer`): the built-in image sets stay in memory and a batch is one index_select, one
batched jitter and one forward/backward; a ``Dataset`` streams through a ``DataLoader``; token windows
(:class:`darkknowledge.data.text.TokenWindows`) train a language model, a case being one token position. Every
epoch draws its randomness from (seed, epoch) alone, so a run resumed from its last saved epoch ends exactly where
an uninterrupted one does.

Under torchrun (:mod:`darkknowledge.distributed`) the same loop is data-parallel: every rank draws the same
order of cases and the same global batches, takes its own slice of each (its shard of the data and of the
soft-target store), and DistributedDataParallel averages the gradients, weighted so the step is the one a single
process takes on the whole batch. Nothing in a checkpoint depends on the number of workers, so a run stopped with
N workers resumes with any other number. Rank 0 alone writes checkpoints and logs. With ``strategy="fsdp"`` a
sharded copy of the model trains instead of DDP's whole one (:mod:`darkknowledge.sharding`); the checkpoints are
the same.
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

from . import checkpoint, constraints
from .augment import check_jitter, jitter_offsets, translate
from .data.transfer import as_transfer_set, case_rows, cases_per_item, input_shape, num_cases, subset
from .devices import resolve_device
from .distributed import Workers, current
from .errors import DarkKnowledgeError, TrainingDiverged
from .ensemble import Ensemble, distillation_targets
from .evaluation import Evaluation, autocast, evaluate, predict_logits, to_device
from .feeding import Feeder, map_tensors, moved
from .losses import DEFAULT_DIVERGENCE, describe_divergence, distillation_loss
from .outputs import logits_of

SCHEDULES = ("onecycle", "cosine", "constant", "step")
OPTIMIZERS = ("sgd", "adamw")
# The numeric settings TrainConfig checks against constraints.RANGES, and whether each is a whole number.
_BOUNDED = {"epochs": True, "batch_size": True, "lr": False, "momentum": False, "weight_decay": False, "jitter": True,
            "seed": True, "patience": True, "grad_accumulation": True, "clip_grad_norm": False, "step_epochs": True,
            "warmup": False}
_UNSET_ALLOWED = {"patience", "clip_grad_norm", "step_epochs"}
SELECTION_METRICS = ("errors", "log_loss")
# What weight decay shrinks: every parameter, or the weights alone (matrices and embeddings; not the biases and
# the norms' gains, whose decay only pulls them from their useful values: the usual for transformers).
DECAY = ("all", "weights")  # what chooses the epoch kept: validation errors or log-loss
# How each epoch's order of cases is seeded: fit's own, or the one the language-model loop drew before it folded
# into fit (seed * 1000 + epoch, epochs from 1), kept so the committed results/lm* runs reproduce exactly.
EPOCH_ORDERS = ("fit", "language-model")
# How torchrun's ranks share the training: DDP (a whole copy of the model each) or FSDP2 (a shard each, for a
# student too large for one device; see sharding.py). One process trains alone whatever the strategy.
STRATEGIES = ("ddp", "fsdp")
# Settings added after runs were saved: left out of a run's key while at their defaults, so older runs resume.
_NEWER_SETTINGS = {"optimizer": "sgd", "optimizer_options": {}, "grad_accumulation": 1, "clip_grad_norm": None,
                   "fp16": False, "step_epochs": None, "warmup": 0.0, "select_by": "errors", "epoch_order": "fit",
                   "decay": "all"}


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
    warmup: float = 0.0  # fraction of all steps warming the rate up linearly from lr / warm-up steps (not onecycle)
    select_by: str = "errors"  # the validation metric that chooses the epoch kept (and counts patience)
    epoch_order: str = "fit"  # how each epoch's order is seeded (see EPOCH_ORDERS)
    decay: str = "all"  # what weight_decay shrinks (see DECAY): all parameters, or the weights alone
    strategy: str = "ddp"  # under torchrun: see STRATEGIES (how the run is shared, not what it learns: no key)

    def __post_init__(self):
        # Numbers keep the ranges the command line gives them (constraints.RANGES); unset ones are left out.
        for name, integer in _BOUNDED.items():
            if not (name in _UNSET_ALLOWED and getattr(self, name) is None):
                constraints.check(name, getattr(self, name), integer, what="training option")
        checks = [("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
                  ("optimizer", self.optimizer in OPTIMIZERS or (isinstance(self.optimizer, type) and issubclass(
                      self.optimizer, torch.optim.Optimizer)), f"one of {', '.join(OPTIMIZERS)} or a "
                   "torch.optim.Optimizer class"),
                  ("optimizer_options", isinstance(self.optimizer_options, dict), "a dict of keyword arguments"),
                  ("grad_accumulation", self.grad_accumulation <= self.batch_size,
                   "at most batch_size (a micro-batch holds at least one case)"),
                  ("fp16", not (self.fp16 and self.bf16), "off when bf16 is on (choose one precision)"),
                  ("warmup", not (self.warmup and self.schedule == "onecycle"),
                   "0 with the onecycle schedule (it warms up over its first tenth already)"),
                  ("select_by", self.select_by in SELECTION_METRICS, f"one of {', '.join(SELECTION_METRICS)}"),
                  ("epoch_order", self.epoch_order in EPOCH_ORDERS, f"one of {', '.join(EPOCH_ORDERS)}"),
                  ("decay", self.decay in DECAY, f"one of {', '.join(DECAY)}"),
                  ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
                  # torch's gradient scaler looks for overflows in this rank's shards only: the ranks could disagree
                  # on skipping a step
                  ("fp16", not (self.fp16 and self.strategy == "fsdp"), "off with strategy fsdp (its gradient "
                   "scaler would decide on each rank's shard alone); use bf16")]
        for name, ok, allowed in checks:
            if not ok:
                raise DarkKnowledgeError(f"training option {name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"

    def settings(self) -> dict[str, Any]:
        """What the run's key and sidecar record: every field but ``progress`` and ``strategy`` (a run resumes
        under any); an optimizer class by its name; settings newer than the saved runs left out while at their
        defaults."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("progress", "strategy") or (f.name in _NEWER_SETTINGS and value == _NEWER_SETTINGS[f.name]):
                continue
            out[f.name] = f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else value
        return out

    def make_optimizer(self, parameters, fused: bool = True) -> torch.optim.Optimizer:
        """The optimizer; its learning rate is set every step by :meth:`learning_rate`. With ``decay="weights"``
        the parameters of fewer than two dimensions (biases, norms' gains) are in a group without weight decay.
        ``fused``: SGD's fused step where the tensors allow it (FSDP's sharded tensors have no fused kernel)."""
        flat = list(parameters)
        parameters = flat
        if self.decay == "weights" and self.weight_decay:
            groups = [{"params": [p for p in flat if p.dim() >= 2]},
                      {"params": [p for p in flat if p.dim() < 2], "weight_decay": 0.0}]
            parameters = [group for group in groups if group["params"]]
        if self.optimizer == "sgd":
            # One fused pass over each tensor, not torch's CPU default of one per operation: the same update up to
            # rounding, a 1.8x faster step for the MNIST teacher (benchmarks/teacher_speed.py).
            fusable = fused and not {"fused", "foreach"} & set(self.optimizer_options) and all(
                p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in flat)
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
        """The schedule as a pure function of the step, so resuming needs no scheduler state: the warm-up's steps
        first (if any), then the schedule over the rest."""
        warm = max(1, round(self.warmup * total_steps)) if self.warmup else 0
        if step < warm:
            return self.lr * (step + 1) / warm
        step, total_steps = step - warm, total_steps - warm
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
            return self.lr * 0.5 * (1 + math.cos(math.pi * ((progress - warmup) / (1 - warmup))))
        # cosine: pi * step / steps, the language-model loop's arithmetic (results/lm* reproduce to the bit)
        return self.lr * 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))


class Batch(NamedTuple):
    inputs: Any            # model-ready inputs (float [B, H, W] for the built-in images), jittered if asked
    labels: torch.Tensor   # int64 [cases]: one per case counted (labels [B, T] flattened, ignored ones left out)
    indices: torch.Tensor  # each case's row in the training set (and its store), to look up teacher outputs
    keep: torch.Tensor | None = None  # which of the batch's flattened cases are counted (None: all)
    targets: dict[str, Any] | None = None  # a store's targets of the counted cases, fed ahead (None: read them)


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

    ``divergence`` compares the targets with the student's softmax at T: ``forward_kl`` (the paper's, default),
    or another entry of :data:`darkknowledge.losses.DIVERGENCES` (``reverse_kl``, ``jsd`` with its ``beta``).
    """

    temperature: float
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None
    store: Any = None  # a SoftTargets over the training set
    teacher_device: str | torch.device | None = None  # where an online teacher runs (default: the student's device)
    divergence: str = DEFAULT_DIVERGENCE
    beta: float | None = None  # the generalized JSD's weight of the teacher (None: its default, 0.5)
    # The soft term's working memory per chunk (None: sized for the device, losses.chunk_rows_for); speed only,
    # the loss is the same, so no part of the run's key.
    chunk_mb: float | None = None
    precision: str = field(default="fp32", init=False)  # the run's, for an online teacher's autocast
    online_reason: str | None = field(default=None, init=False)

    def __post_init__(self):
        describe_divergence(self.divergence, beta=self.beta)  # a bad name or beta fails here, not in epoch 1
        if self.chunk_mb is not None:
            constraints.check("loss_chunk_mb", self.chunk_mb, what="distillation option")

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
        self.precision = config.precision
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
        if batch.targets is not None:
            targets = batch.targets
        elif self.store is not None:
            targets = map_tensors(self.store.targets(batch.indices, self.temperature),
                                  lambda t: moved(t, logits.device))
        elif self.teacher_logits is not None:
            targets = {"teacher_logits": self.teacher_logits[batch.indices].to(logits.device)}
        else:
            inputs = to_device(batch.inputs, self.teacher_device)
            with torch.no_grad(), autocast(self.precision, self.teacher_device):
                if isinstance(self.teacher, Ensemble):
                    members = self.teacher.member_logits(inputs).float()  # [B, M, ..., C] -> [cases, M, C]
                    members = members.movedim(1, -2).reshape(-1, members.shape[1], members.shape[-1])
                    if batch.keep is not None:
                        members = members[_on(batch.keep, members.device)]
                    targets = distillation_targets(members, self.teacher.combine, self.temperature)
                else:
                    targets = {"teacher_logits": as_cases(logits_of(self.teacher(inputs)).float(),
                                                          _on(batch.keep, self.teacher_device))}
            targets = map_tensors(targets, lambda t: moved(t, logits.device))
        out = distillation_loss(logits, labels=batch.labels, temperature=self.temperature,
                                soft_weight=self.soft_weight, hard_weight=self.hard_weight,
                                divergence=self.divergence, beta=self.beta, chunk_mb=self.chunk_mb, **targets)
        # logged "loss": the KL form, comparable with other libraries' KLDivLoss * T^2 (the same gradients as
        # the cross-entropy form backpropagated, logged as loss_ce)
        return out.total, out.logged()

    def describe(self) -> dict[str, Any]:
        described = {"objective": "distillation", "temperature": self.temperature, "soft_weight": self.soft_weight,
                     "hard_weight": self.hard_weight, **describe_divergence(self.divergence, beta=self.beta)}
        if self.store is not None:
            described["soft_targets"] = self.store.describe()
        elif isinstance(self.teacher, Ensemble):
            described["combine"] = self.teacher.combine
        return described


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_errors: int | None
    stopped_early: bool
    seconds: float


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def run_key(meta: dict, train, val, config: TrainConfig, objective, locations: bool = False) -> str:
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
    keys = [run_key(meta, train, val, config, objective, locations=True)]
    size = meta.get("validation", {}).get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        as_float = {**meta, "validation": {**meta["validation"], "size": float(size)}}
        keys.append(run_key(as_float, train, val, config, objective))
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
        callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (), *, sampler=None, validate=None, keep=None,
        score_start: bool = False, legacy_keys: Sequence[str] = ()) -> FitResult:
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

    Hooks for a loop that trains otherwise (the specialists' use them all):

    - ``sampler``: each epoch's batches instead of a shuffled pass: an object with ``steps`` (batches per epoch),
      ``seed(seed, epoch)`` (the epoch's seed, of its generator and dropout masks) and ``epoch(generator)``
      (dataset indices ``[steps, batch_size]``, one row a batch), e.g. the specialists' 50/50 batches;
    - ``validate(model, epoch)``: the validation metrics instead of evaluating ``val`` (names without ``val_``;
      at least ``errors`` and ``loss``), e.g. of a model whose outputs are corrected after training;
    - ``keep(model, epoch)``: the module whose weights are kept for an epoch (saved, and loaded at the end)
      instead of ``model`` itself, e.g. a corrected copy;
    - ``score_start``: the untrained model is validated as epoch 0 and kept unless a trained epoch beats it;
    - ``legacy_keys``: run keys an older loop saved the same run with, also accepted on resume.
    """
    workers = workers or current()
    with contextlib.ExitStack() as held:  # one writer per run folder: rank 0 holds its lock for every rank
        if run_dir is not None:
            workers.on_main(lambda: held.enter_context(checkpoint.open_run(run_dir)))  # a refusal stops all ranks
        return _fit(model, train, val, config, objective, run_dir, resume, meta, log, monitor, workers, device,
                    callbacks, _Hooks(sampler, validate, keep, score_start, tuple(legacy_keys)))


def check_precision(config: TrainConfig, device: torch.device) -> None:
    """fp16 trains on CUDA only: refused before any work (a job checks it before computing a teacher's outputs)."""
    if config.fp16 and torch.device(device).type != "cuda":
        raise DarkKnowledgeError(f"fp16 training needs a CUDA device (this run is on {device}); use bf16 "
                                 "on the CPU, or --device cuda")


class _Hooks(NamedTuple):
    """fit's hooks for a loop that trains otherwise (see :func:`fit`)."""

    sampler: Any = None
    validate: Callable[[nn.Module, int], dict[str, Any]] | None = None
    keep: Callable[[nn.Module, int], nn.Module] | None = None
    score_start: bool = False
    legacy_keys: tuple[str, ...] = ()


def _fit(model: nn.Module, train, val, config: TrainConfig | None, objective, run_dir: str | Path | None,
         resume: bool, meta: dict[str, Any] | None, log: Callable[[str], None] | None, monitor, workers: Workers,
         device: str | torch.device | None, callbacks: Sequence[Callable[[dict[str, Any]], Any]],
         hooks: _Hooks = _Hooks()) -> FitResult:
    """Check and set up, resume where a saved run stopped, then each epoch: train (:class:`_Epochs`), validate,
    keep the best (:func:`_select`), save (:func:`_save`)."""
    config = config or TrainConfig()
    objective = objective or HardTargets()
    workers = workers or current()
    if not workers.distributed:
        workers = dataclasses.replace(workers, device=resolve_device(device))
    check_precision(config, workers.device)
    train = as_transfer_set(train)
    val = as_transfer_set(val) if val is not None else None
    meta = dict(meta or {})
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if not workers.is_main:
        log = silent
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
    sharded = config.strategy == "fsdp" and workers.distributed
    if sharded and (hooks.validate is not None or hooks.keep is not None):
        raise DarkKnowledgeError("strategy fsdp trains a sharded copy of the model, which fit's validate and keep "
                                 "hooks do not see; use strategy ddp")
    if not sharded:  # a sharded model stays whole on the CPU; its shards go to the device (sharding.shard)
        model.to(workers.device)
    objective.prepare(train, config, workers.device)
    if isinstance(objective, Distillation) and (objective.teacher is not None or objective.store is not None):
        log(f"distillation: soft targets from the {objective.soft_source()}")

    epochs = _Epochs(model, train, config, objective, workers, config.make_optimizer(model.parameters()),
                     hooks.sampler)
    key = run_key(meta, train, val, config, objective)
    best_state: dict[str, torch.Tensor] | None = None

    def saved_state() -> dict[str, Any] | None:
        """Where the saved run stopped (None: a new run); loads its weights, optimizer state and best model."""
        nonlocal best_state
        state = checkpoint.resume_training_state(run_dir, model, epochs.optimizer, key, resume,
                                                 legacy_keys=(*_legacy_keys(meta, train, val, config, objective),
                                                              *hooks.legacy_keys), epochs=config.epochs)
        if state is None:
            return None
        if state["best"]["val_errors"] is not None or hooks.keep is not None:  # the kept model: the saved one
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
    epochs.share_state()
    if epochs.sharded:
        from .sharding import blocks
        log(f"strategy fsdp: {len(blocks(model))} transformer block(s) and the rest of the model sharded over "
            f"{workers.world_size} ranks")

    def validation(epoch: int) -> dict[str, Any]:
        if hooks.validate is not None:
            return {f"val_{k}": v for k, v in hooks.validate(model, epoch).items()}
        return _validation_record("val", epochs.evaluate(val), per_token=cases_per_item(val) > 1)

    def kept(epoch: int) -> nn.Module:
        return hooks.keep(model, epoch) if hooks.keep is not None else model

    if hooks.score_start and val is not None and resumed is None:
        # The untrained model is the first candidate: training must beat it on validation to replace it.
        history.append({"epoch": 0, **validation(0), "seconds": 0.0})
        _select(best, history[-1], config, has_val=True)
        keeping = kept(0)
        best_state = {k: v.detach().clone() for k, v in keeping.state_dict().items()}
        if run_dir is not None and workers.is_main:  # no resume state yet: a rerun starts again (epoch 0 is cheap)
            checkpoint.save_model(run_dir, keeping, _sidecar(model, meta, config, objective, best, history[-1], train))
    writer = _tensorboard(run_dir, log) if workers.is_main else None
    stopped_early = best["stale"] >= (config.patience or math.inf)
    for epoch in range(start_epoch, config.epochs):
        if stopped_early:
            break
        started = time.perf_counter()
        record = {"epoch": epoch + 1, **epochs.train_one(epoch)}
        epochs.gather(optimizer=run_dir is not None)
        if val is not None:
            record.update(validation(epoch + 1))
        for name, data in monitor.items():  # logged only: selection above uses val alone
            watched = epochs.evaluate(data)
            record.update({f"{name}_errors": watched.errors, f"{name}_error_rate": 1 - watched.accuracy})
        elapsed += time.perf_counter() - started
        record["seconds"] = round(elapsed, 3)
        history.append(record)
        improved = _select(best, record, config, has_val=val is not None)
        keeping = kept(epoch + 1) if improved else None
        if keeping is not None:
            best_state = {k: v.detach().clone() for k, v in keeping.state_dict().items()}
        stopped_early = best["stale"] >= (config.patience or math.inf)
        # Every rank runs the callbacks (they may stop the run, and all ranks must stop together).
        stopped_early = any([callback(dict(record)) is True for callback in callbacks]) or stopped_early
        if run_dir is not None and workers.is_main:
            sidecar = _sidecar(model, meta, config, objective, best, record, train) if improved else None
            _save(run_dir, epochs, keeping, epoch + 1, sidecar, {"run_key": key, "history": history, "best": best,
                                                                 "seconds": elapsed,
                                                                 "done": epoch + 1 == config.epochs or stopped_early},
                  writer)
        log(_epoch_line(record, config))

    if writer is not None:
        writer.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    workers.broadcast_tensors(model.state_dict().values())  # rank 0's best, which it saved, everywhere
    return FitResult(history, best["epoch"], best["val_errors"], stopped_early, elapsed)


class _Epochs:
    """The training itself: the model and its optimizer (what a checkpoint holds), the ``net`` that trains and
    its ``net_optimizer`` (under torchrun the model wrapped for DDP, or a sharded copy under FSDP; else the model
    itself), the gradient scaler, and one epoch (:meth:`train_one`) as steps (:meth:`_step`) over micro-batches
    (:meth:`_micro_step`)."""

    def __init__(self, model: nn.Module, train, config: TrainConfig, objective, workers: Workers,
                 optimizer: torch.optim.Optimizer, sampler=None):
        self.model, self.net, self.train, self.config = model, model, train, config
        self.objective, self.workers, self.optimizer, self.sampler = objective, workers, optimizer, sampler
        self.net_optimizer = optimizer
        self.sharded = config.strategy == "fsdp" and workers.distributed
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.fp16)
        self.constrain = getattr(model, "apply_constraints", None)
        self.ignore_index = getattr(train, "ignore_index", None)
        self.feeder = Feeder(train, objective, workers.device, self.ignore_index)  # on CUDA: ahead of the steps
        self.steps_per_epoch = sampler.steps if sampler is not None else math.ceil(len(train) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs

    def share_state(self) -> None:
        """Under torchrun: rank 0's weights and optimizer state everywhere, and the model wrapped for DDP or its
        sharded copy made for FSDP."""
        if not self.workers.distributed:
            return
        _share_weights_and_optimizer(self.model, self.optimizer, self.workers)
        device = self.workers.device
        if self.sharded:
            from . import sharding  # torch.distributed.fsdp, imported only where it is used
            self.net, self.net_optimizer = sharding.shard(
                self.model, self.optimizer, lambda params: self.config.make_optimizer(params, fused=False),
                self.workers)
            self.constrain = getattr(self.net, "apply_constraints", None)
            return
        self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                           gradient_as_bucket_view=True)  # no copy of the gradients

    def gather(self, optimizer: bool) -> None:
        """Under FSDP, after an epoch: the trained weights (and the ``optimizer`` state, for a checkpoint) whole
        in the model on rank 0, where they are kept and saved; every rank calls it."""
        if self.sharded:
            from . import sharding
            sharding.gather_weights(self.net, self.model, self.workers)
            if optimizer:
                sharding.gather_optimizer(self.net, self.net_optimizer, self.model, self.optimizer, self.workers)

    def evaluate(self, data) -> Evaluation:
        """The trained model on ``data``: each rank evaluates its shard of ``data``; under FSDP every rank the
        whole set, so that all run the same forward passes, which gather each block's weights together."""
        if self.sharded:
            return evaluate(self.net, data, bf16=self.config.precision)
        return _evaluate(self.model, data, self.config.precision, self.workers)

    def epoch_seed(self, epoch: int) -> int:
        """The seed of this epoch's order, jitter and dropout masks."""
        if self.sampler is not None:
            return self.sampler.seed(self.config.seed, epoch)
        return _epoch_seed(self.config.seed, epoch)

    def order(self, epoch: int) -> tuple[list[torch.Tensor], torch.Generator]:
        """This epoch's batches of items and the generator its jitter is drawn from after them: a function of the
        seed and the epoch alone (see ``epoch_order``, or the ``sampler``'s)."""
        n, seed, size = len(self.train), self.config.seed, self.config.batch_size
        if self.config.epoch_order == "language-model" and self.sampler is None:
            generator = torch.Generator().manual_seed(seed * 1000 + epoch + 1)
        else:
            generator = torch.Generator().manual_seed(self.epoch_seed(epoch))
        if self.sampler is not None:
            return list(self.sampler.epoch(generator)), generator
        return list(torch.randperm(n, generator=generator).split(size)), generator

    def plan(self, epoch: int) -> list[tuple[int, list[tuple[torch.Tensor, torch.Tensor | None]]]]:
        """Each step's batch size and this rank's micro-batches (indices, jitter offsets), drawn before reading any
        data: the same numbers as one process draws, so the data can be read ahead (a DataLoader's workers)."""
        config = self.config
        order, generator = self.order(epoch)
        steps = []
        for batch in order:
            offsets = jitter_offsets(len(batch), config.jitter, generator)  # the whole batch's, as one process
            parts = torch.arange(len(batch))[self.workers.shard(len(batch))].tensor_split(config.grad_accumulation)
            steps.append((len(batch), [(batch[p], offsets[:, p] if offsets is not None else None) for p in parts]))
        return steps

    def train_one(self, epoch: int) -> dict[str, Any]:
        """One epoch; returns its training metrics (each loss term per case, the errors), summed over ranks."""
        config, workers = self.config, self.workers
        torch.manual_seed(self.epoch_seed(epoch) + workers.rank)  # dropout masks
        steps = self.plan(epoch)
        reader = self.feeder.batches([indices for _, parts in steps for indices, _ in parts])
        self.net.train()
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(2, dtype=torch.long, device=workers.device)  # errors, cases counted
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and workers.is_main), file=sys.stderr, mininterval=0.5)
        for step, (batch_size, parts) in enumerate(bar):
            for group in self.net_optimizer.param_groups:
                group["lr"] = config.learning_rate(epoch * self.steps_per_epoch + step, self.total_steps)
            for part, (_, offsets) in enumerate(parts):
                last = part == len(parts) - 1
                self._micro_step(epoch, next(reader), offsets, batch_size, last, sums, counts)
            self._step()

        names = sorted(sums)  # the same on every rank: each had cases in the first batch
        totals = workers.all_sum(torch.stack([*(sums[k].double() for k in names), *counts.double()]))
        cases_seen = max(int(totals[-1]), 1)
        if not bool(torch.isfinite(totals).all()):  # before anything of this epoch is saved
            raise TrainingDiverged.in_epoch(epoch + 1)
        return {"lr": self.net_optimizer.param_groups[0]["lr"],
                **{f"train_{k}": float(v) / cases_seen for k, v in zip(names, totals)},
                "train_errors": int(totals[-2]), "train_error_rate": int(totals[-2]) / cases_seen}

    def _micro_step(self, epoch: int, read, offsets, batch_size: int, last: bool, sums: dict, counts) -> None:
        """Forward and backward of one micro-batch; its loss terms and errors added to the epoch's sums."""
        inputs, labels, indices, targets = read
        device, workers = self.workers.device, self.workers
        inputs = translate(to_device(inputs, device), offsets, self.config.jitter)
        labels = labels.to(device, non_blocking=labels.is_pinned())
        # DDP sums the gradients over the ranks only on a step's last micro-batch; FSDP reduces each micro-batch's
        # into the shards (a whole gradient would not fit).
        with nullcontext() if last or not workers.distributed or self.sharded else self.net.no_sync():
            with autocast(self.config.precision, device):
                logits = logits_of(self.net(inputs))
            cases = _cases(logits, labels, case_rows(self.train, indices), self.ignore_index)
            if len(indices):
                try:
                    loss, terms = self.objective.loss(cases[0], Batch(inputs, *cases[1:], targets))
                except DarkKnowledgeError:
                    if torch.isfinite(logits).all():
                        raise
                    raise TrainingDiverged.in_epoch(epoch + 1) from None
            else:  # a micro-batch with no case of this rank's: it still joins the gradient sum
                loss, terms = logits.sum() * 0.0, {}
            # Each micro-batch's mean loss weighted by its share of the step's batch: the gradient is the whole
            # batch's mean loss, as one process computes it (DDP and FSDP average over the ranks).
            self.scaler.scale(loss * (len(indices) * workers.world_size / batch_size)).backward()
        for key, value in terms.items():  # sums stay tensors: no per-step synchronisation to Python
            sums[key] = sums.get(key, 0) + value.detach() * len(cases[1])
        counts[0] += (cases[0].detach().argmax(-1) != cases[1]).sum()
        counts[1] += len(cases[1])

    def _step(self) -> None:
        """The optimizer's step on the summed gradients (clipped if asked), then the model's constraints."""
        if self.config.clip_grad_norm is not None:
            self.scaler.unscale_(self.net_optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.clip_grad_norm)
        self.scaler.step(self.net_optimizer)
        self.scaler.update()
        self.net_optimizer.zero_grad(set_to_none=True)
        if self.constrain is not None:
            self.constrain()


def _validation_record(name: str, result: Evaluation, per_token: bool) -> dict[str, Any]:
    """What an epoch's record holds of a validation: errors, error rate and mean loss; of a set of several cases
    an item (``per_token``: token windows) also the log-loss, perplexity, next-token accuracy and cases counted."""
    record = {f"{name}_errors": result.errors, f"{name}_error_rate": 1 - result.accuracy, f"{name}_loss": result.loss}
    if per_token:
        record.update({f"{name}_log_loss": result.loss, f"{name}_perplexity": result.perplexity,
                       f"{name}_accuracy": result.accuracy, f"{name}_tokens": result.total})
    return record


def _select(best: dict[str, Any], record: dict[str, Any], config: TrainConfig, has_val: bool) -> bool:
    """Whether this epoch is the best so far by ``config.select_by`` on validation (every epoch is, without a
    validation set); updates ``best`` (its epoch, validation errors and metric, epochs since: ``stale``)."""
    metric = f"val_{config.select_by}"
    value = record["val_errors" if config.select_by == "errors" else "val_loss"] if has_val else None
    if has_val and best.get(metric) is not None and not value < best[metric]:
        best["stale"] += 1
        return False
    best.clear()
    best.update({"epoch": record["epoch"], "val_errors": record.get("val_errors"), "stale": 0})
    if config.select_by != "errors":
        best[metric] = value
    return True


def _save(run_dir: Path, epochs: _Epochs, kept: nn.Module | None, epoch: int, sidecar: dict[str, Any] | None,
          state: dict[str, Any], writer) -> None:
    """After ``epoch``, rank 0: the model ``kept`` with its ``sidecar`` (when this epoch is the best), the resume
    state, the metrics."""
    if sidecar is not None:
        checkpoint.save_model(run_dir, kept, sidecar)
    checkpoint.save_training_state(run_dir, epoch, epochs.model, epochs.optimizer, state)
    _write_metrics(run_dir / "metrics.jsonl", state["history"])
    if writer is not None:
        for key, value in state["history"][-1].items():
            if isinstance(value, (int, float)) and key != "epoch":
                writer.add_scalar(key, value, epoch)


def _epoch_line(record: dict[str, Any], config: TrainConfig) -> str:
    val_text = f"  val errors {record['val_errors']}" if "val_errors" in record else ""
    # The log-loss where it is reported, or where it chooses the epoch kept.
    log_loss = record.get("val_log_loss", record.get("val_loss") if config.select_by == "log_loss" else None)
    if log_loss is not None:
        val_text += f"  val log-loss {log_loss:.4f}"
    return (f"epoch {record['epoch']}/{config.epochs}  loss {record['train_loss']:.4f}  "
            f"train errors {record['train_errors']}{val_text}  {record['seconds']:.1f}s")


def _cases(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, ignore_index: int | None):
    """(logits [cases, C], labels [cases], store rows [cases], keep): one row per case counted. The rows stay on
    the CPU, where the store and cached logits are read."""
    labels, rows = labels.reshape(-1), rows.reshape(-1)
    keep = labels != ignore_index if ignore_index is not None else None
    if keep is not None:
        labels, rows = labels[keep], rows[keep.cpu()]
    return as_cases(logits, keep), labels, rows, keep


def silent(line: str) -> None:
    """A log that says nothing."""


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
            hard_weight: float = 0.0, val=None, config: TrainConfig | None = None, *,
            divergence: str = DEFAULT_DIVERGENCE, beta: float | None = None, **fit_options) -> nn.Module:
    """§2 in one call: train ``student`` on ``transfer_set`` to match ``teacher``'s soft targets at
    ``temperature`` (plus ``hard_weight`` x cross-entropy with the labels); returns the student with its best
    weights. ``teacher``: a :class:`darkknowledge.soft_targets.SoftTargets` store over the transfer set, or a
    module (an :class:`Ensemble` too), whose logits are then computed once (run on every batch with jitter).
    ``divergence`` and ``beta``: see :class:`Distillation`. ``fit_options`` go to :func:`fit` (``run_dir``,
    ``device``, ``callbacks``, ...)."""
    config = config or TrainConfig()
    transfer_set = as_transfer_set(transfer_set)
    if isinstance(teacher, nn.Module):
        cached = cache_teacher_logits(teacher, transfer_set, config.precision) \
            if config.jitter == 0 and not isinstance(teacher, Ensemble) else None
        objective = Distillation(temperature, soft_weight, hard_weight, teacher=teacher, teacher_logits=cached,
                                 divergence=divergence, beta=beta)
    else:
        objective = Distillation(temperature, soft_weight, hard_weight, store=teacher, divergence=divergence,
                                 beta=beta)
    fit(student, transfer_set, val, config, objective, **fit_options)
    return student
