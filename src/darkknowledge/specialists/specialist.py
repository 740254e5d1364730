"""§5: a specialist model for a subset of classes plus one dustbin class, and how it is trained.

- Initialised from the generalist: a copy of its body, and a new output layer whose rows for the subset's
  classes are the generalist's rows for them. The dustbin row is the mean of the other classes' rows, with
  ``log(number of other classes)`` added to its bias: its logit is then ``mean(z_rest) + log(n_rest)``, which is
  exactly ``logsumexp(z_rest)`` (the generalist's summed probability of the other classes) when those logits are
  equal and a lower bound otherwise (Jensen). Before training, :func:`calibrate_dustbin` then fits that row
  to the generalist on training images, so the untrained specialist gives nearly the generalist's distribution
  collapsed onto subset + dustbin.
- Trained on batches half from its subset and half drawn at random from the other classes
  (:class:`BalancedSampler`).
- Oversampling shifts its prior: its subset odds are (s / (1 - s)) in training against (f / (1 - f)) in the
  data, s the subset's share of a batch and f its share of the data. After training the dustbin logit is raised
  by the log of that proportion, :func:`dustbin_offset`, which restores the data's prior (§5).
- Optionally trained on soft targets from the generalist (the paper's §6.1 proposal) instead of hard labels:
  the generalist's logits collapsed onto subset + dustbin (the dustbin logit is the log-sum-exp of the other
  classes' logits), with the same prior shift applied so that targets and batches agree, softened at T.

Training is the library's one loop, :func:`darkknowledge.training.fit`, given the 50/50 batches, the dustbin
correction and the untrained start through its hooks; a run killed between epochs resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint
from ..augment import check_jitter
from ..data import LabeledImages
from ..data.transfer import subset as subset_of
from ..distributed import SINGLE
from ..errors import DarkKnowledgeError
from ..evaluation import labels_of, predict_logits
from ..losses import distillation_loss
from ..training import Batch, HardTargets, TrainConfig, fit

DUSTBIN = "dustbin"


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------

def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's output layer: its last ``nn.Linear`` (the last layer of every model in models.py)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DarkKnowledgeError(f"{type(model).__name__} has no nn.Linear output layer to turn into a specialist "
                                 "head; a specialist needs a model whose last layer is nn.Linear")
    return linears[-1]


def _check_subset(subset, num_classes: int) -> tuple[int, ...]:
    subset = tuple(sorted({int(c) for c in subset}))
    if not subset or subset[0] < 0 or subset[-1] >= num_classes:
        raise DarkKnowledgeError(f"a specialist's subset must be non-empty class indices in 0..{num_classes - 1}, "
                                 f"got {list(subset)}")
    if len(subset) == num_classes:
        raise DarkKnowledgeError("a specialist's subset must leave out at least one class for its dustbin")
    return subset


def make_specialist(generalist: nn.Module, subset) -> nn.Module:
    """A copy of ``generalist`` whose output covers ``subset`` (sorted) plus a last, dustbin class.

    Head rows for the subset are copied from the generalist's; the dustbin row is the mean of the remaining rows,
    its bias the mean of the remaining biases plus ``log(n_rest)`` (see the module docstring).
    """
    name, head = output_layer(generalist)
    subset = _check_subset(subset, head.out_features)
    rest = [c for c in range(head.out_features) if c not in set(subset)]
    specialist = copy.deepcopy(generalist)
    new = nn.Linear(head.in_features, len(subset) + 1, bias=True,
                    device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features, dtype=head.weight.dtype)
        new.weight[:-1] = head.weight[list(subset)]
        new.bias[:-1] = bias[list(subset)]
        new.weight[-1] = head.weight[rest].mean(0)
        new.bias[-1] = bias[rest].mean() + math.log(len(rest))
    parent_name, _, attr = name.rpartition(".")
    setattr(specialist.get_submodule(parent_name) if parent_name else specialist, attr, new)
    return specialist


def relabel(labels: Tensor, subset, num_classes: int) -> Tensor:
    """Labels in the specialist's numbering: position in the (sorted) subset, or ``len(subset)`` for the dustbin."""
    subset = _check_subset(subset, num_classes)
    table = torch.full((num_classes,), len(subset), dtype=torch.int64)
    table[list(subset)] = torch.arange(len(subset))
    return table[labels.long()]


def collapse_logits(logits: Tensor, subset) -> Tensor:
    """Full-softmax logits ``[N, C]`` -> logits ``[N, k + 1]`` over subset + dustbin with the same probabilities:
    the subset's logits, and the log-sum-exp of the others' (softmax of the result sums the rest's probabilities)."""
    subset = _check_subset(subset, logits.shape[1])
    rest = [c for c in range(logits.shape[1]) if c not in set(subset)]
    return torch.cat([logits[:, list(subset)], torch.logsumexp(logits[:, rest], 1, keepdim=True)], 1)


def dustbin_offset(natural_fraction: float, subset_fraction: float = 0.5) -> float:
    """What to add to the dustbin logit after training: log of the proportion by which the subset was oversampled.

    ``natural_fraction``: the subset's share of the data (f); ``subset_fraction``: its share of each training batch
    (s, §5: 0.5). The offset is ``log[(s / (1 - s)) / (f / (1 - f))]``, the log of the odds ratio; with s = 0.5 it
    is ``log((1 - f) / f)``. Adding it to the dustbin logit divides every subset class's odds against the dustbin
    by the oversampling ratio (probabilities within the subset keep their ratios).
    """
    for name, value in (("natural_fraction", natural_fraction), ("subset_fraction", subset_fraction)):
        if not 0 < value < 1:
            raise DarkKnowledgeError(f"{name} must be in (0, 1), got {value!r}")
    return math.log(subset_fraction / (1 - subset_fraction)) - math.log(natural_fraction / (1 - natural_fraction))


def add_to_dustbin(model: nn.Module, offset: float) -> nn.Module:
    """Raise the dustbin logit (the output layer's last bias) by ``offset``, in place."""
    _, head = output_layer(model)
    with torch.no_grad():
        head.bias[-1] += offset
    return model


def calibrate_dustbin(specialist: nn.Module, generalist: nn.Module, subset, images, max_cases: int = 10000,
                      seed: int = 0, max_iter: int = 100) -> nn.Module:
    """Fit the dustbin row of a fresh specialist (in place) so that it reproduces the generalist's summed
    probability of the other classes on ``images`` (uint8 images, or a transfer set) as well as one linear row
    can.

    The mean-row start of :func:`make_specialist` is exact only when the other classes' logits agree; for an
    MLP they spread widely, and its dustbin logit falls far below their log-sum-exp (on MNIST-100 the start
    called most images of other classes subset classes). Here the dustbin weights and bias minimise the
    cross-entropy between the generalist's distribution collapsed onto subset + dustbin and the specialist's,
    with every other parameter fixed: a convex problem, solved with L-BFGS on the output layer's inputs for at
    most ``max_cases`` images (seeded choice). The specialist then starts where the generalist is.
    """
    name, head = output_layer(specialist)
    _, generalist_head = output_layer(generalist)
    subset = _check_subset(subset, generalist_head.out_features)
    if len(images) > max_cases:
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_cases]
        images = images[chosen] if isinstance(images, Tensor) else subset_of(images, chosen)
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    try:
        predict_logits(specialist, images)
    finally:
        hook.remove()
    features = torch.cat(captured)
    with torch.no_grad():
        generalist_logits = features @ generalist_head.weight.float().T
        if generalist_head.bias is not None:
            generalist_logits += generalist_head.bias.float()
        target = torch.softmax(collapse_logits(generalist_logits, subset), 1)
        fixed = features @ head.weight[:-1].float().T + head.bias[:-1].float()
    row = torch.cat([head.weight[-1].detach().float(), head.bias[-1:].detach().float()]).requires_grad_(True)
    optimizer = torch.optim.LBFGS([row], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        optimizer.zero_grad()
        dustbin = features @ row[:-1] + row[-1]
        loss = -(target * torch.log_softmax(torch.cat([fixed, dustbin.unsqueeze(1)], 1), 1)).sum(1).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        head.weight[-1] = row[:-1].to(head.weight.dtype)
        head.bias[-1] = row[-1].to(head.bias.dtype)
    return specialist


# ---------------------------------------------------------------------------------------------------------------
# Batches: half from the subset, half from the rest
# ---------------------------------------------------------------------------------------------------------------

class BalancedSampler:
    """Batches with exactly ``round(batch_size * subset_fraction)`` cases from ``inside`` (the subset's cases) and
    the rest of the batch from ``outside``.

    An epoch is one pass over the subset's cases in a random order (the last batch wraps around to fill up);
    the outside cases are drawn at random without replacement, a fresh permutation whenever they run out.
    """

    def __init__(self, inside: Tensor, outside: Tensor, batch_size: int, subset_fraction: float = 0.5):
        if not 0 < subset_fraction < 1:
            raise DarkKnowledgeError(f"subset_fraction must be in (0, 1), got {subset_fraction!r}")
        self.per_batch_inside = min(max(1, round(batch_size * subset_fraction)), batch_size - 1)
        self.per_batch_outside = batch_size - self.per_batch_inside
        if batch_size < 2:
            raise DarkKnowledgeError(f"a specialist's batch needs room for both halves: batch_size >= 2, "
                                     f"got {batch_size}")
        if len(inside) == 0 or len(outside) == 0:
            raise DarkKnowledgeError(f"a specialist needs training cases inside its subset and outside it; got "
                                     f"{len(inside)} inside and {len(outside)} outside")
        self.inside, self.outside = inside.long(), outside.long()
        self.steps = math.ceil(len(self.inside) / self.per_batch_inside)

    def seed(self, seed: int, epoch: int) -> int:
        """The seed of an epoch's batches, jitter and dropout masks (the specialists' own, from before they
        trained through ``fit``: earlier runs reproduce exactly)."""
        return (seed * 1_000_003 + epoch + 7_919) % (2**63)

    def epoch(self, generator: torch.Generator) -> Tensor:
        """Dataset indices ``[steps, batch_size]``: each row one batch, inside cases first."""
        need_in = self.steps * self.per_batch_inside
        order = self.inside[torch.randperm(len(self.inside), generator=generator)]
        inside = order.repeat(math.ceil(need_in / len(order)))[:need_in]
        need_out = self.steps * self.per_batch_outside
        draws = [self.outside[torch.randperm(len(self.outside), generator=generator)]
                 for _ in range(math.ceil(need_out / len(self.outside)))]
        outside = torch.cat(draws)[:need_out]
        return torch.cat([inside.view(self.steps, -1), outside.view(self.steps, -1)], 1)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SpecialistConfig:
    """How to train a specialist. ``temperature`` set: soft targets from the generalist (§6.1) with
    ``soft_weight`` (x T^2) and ``hard_weight`` (relative, as in §2); unset: hard labels only."""

    training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.02, schedule="cosine"))
    subset_fraction: float = 0.5  # share of each batch from the subset (§5: half)
    calibrate_dustbin: bool = True  # fit the dustbin row to the generalist before training (calibrate_dustbin)
    temperature: float | None = None
    soft_weight: float = 1.0
    hard_weight: float = 0.0

    def __post_init__(self):
        if not 0 < self.subset_fraction < 1:
            raise DarkKnowledgeError(f"subset_fraction must be in (0, 1), got {self.subset_fraction!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DarkKnowledgeError(f"temperature must be a positive number or unset, got {self.temperature!r}")
        if self.soft_weight < 0 or self.hard_weight < 0 or (self.temperature is not None and
                                                            self.soft_weight == self.hard_weight == 0):
            raise DarkKnowledgeError("soft_weight and hard_weight must be >= 0 and not both 0")

    @property
    def targets(self) -> str:
        return "hard" if self.temperature is None else "soft"

    def describe(self) -> dict[str, Any]:
        out = {"targets": self.targets, "subset_fraction": self.subset_fraction,
               "calibrate_dustbin": self.calibrate_dustbin,
               "training": {k: v for k, v in asdict(self.training).items() if k != "progress"}}
        if self.temperature is not None:
            out.update(temperature=self.temperature, soft_weight=self.soft_weight, hard_weight=self.hard_weight)
        return out


@dataclass
class SpecialistResult:
    subset: tuple[int, ...]
    dustbin_offset: float
    natural_fraction: float
    history: list[dict[str, Any]]
    best_epoch: int
    seconds: float


def validation_scores(model: nn.Module, val: LabeledImages, subset, offset: float = 0.0,
                      bf16: bool = False) -> dict[str, Any]:
    """Cross-entropy and errors of a specialist on natural-frequency data, its dustbin raised by ``offset``
    (0 for a saved specialist, whose weights already carry it); errors also on the subset's cases alone."""
    logits = predict_logits(model, val, bf16=bf16)
    logits[:, -1] += offset
    labels = relabel(labels_of(val), subset, len(val.classes))
    wrong = logits.argmax(1) != labels
    inside = labels < len(tuple(subset))
    return {"loss": F.cross_entropy(logits, labels).item(), "errors": int(wrong.sum()),
            "subset_errors": int(wrong[inside].sum()), "subset_cases": int(inside.sum()), "cases": len(labels)}


class GeneralistTargets:
    """The objective of a specialist trained on soft targets (§6.1): the generalist's logits collapsed onto
    subset + dustbin, one row per training case. They are computed once on the un-jittered images, a fixed
    target per case as the hard labels are, so (unlike :class:`darkknowledge.training.Distillation`) they serve
    jittered batches too."""

    def __init__(self, teacher: Tensor, temperature: float, soft_weight: float, hard_weight: float):
        self.teacher, self.temperature = teacher, temperature
        self.soft_weight, self.hard_weight = soft_weight, hard_weight

    def prepare(self, train, config: TrainConfig, device: torch.device = torch.device("cpu")) -> None:
        pass

    def loss(self, logits: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        out = distillation_loss(logits.float(), self.teacher[batch.indices].to(logits.device), batch.labels,
                                temperature=self.temperature, soft_weight=self.soft_weight,
                                hard_weight=self.hard_weight)
        return out.total, out.logged()

    def describe(self) -> dict[str, Any]:
        return {"objective": "generalist soft targets", "temperature": self.temperature,
                "soft_weight": self.soft_weight, "hard_weight": self.hard_weight}


def _older_keys(meta, train: LabeledImages, val, subset, config: SpecialistConfig) -> tuple[str, ...]:
    """The keys the specialists' own loop saved runs with before they trained through ``fit`` (the newer one
    without, the older one with where the generalist's files are), so those runs still resume."""
    return tuple(checkpoint.run_key(meta, train.fingerprint(), val.fingerprint() if val is not None else "",
                                    json.dumps(list(subset)), json.dumps(config.describe(), sort_keys=True),
                                    locations=locations) for locations in (False, True))


def _upgrade_state(run_dir: Path) -> None:
    """A run saved by the specialists' own loop kept its best epoch as ``{epoch, val_loss, stale}``; ``fit``
    keeps ``{epoch, val_errors, stale, val_log_loss}``: rewritten so (the same numbers, from its history)."""
    if not (run_dir / checkpoint.STATE_META).exists():
        return
    state = checkpoint.read_training_state(run_dir)
    best = state["best"]
    if "val_errors" in best or "val_loss" not in best:
        return
    record = next((r for r in state["history"] if r["epoch"] == best["epoch"]), {})
    state["best"] = {"epoch": best["epoch"], "val_errors": record.get("val_errors"), "stale": best["stale"],
                     "val_log_loss": best["val_loss"]}
    checkpoint.write_json(run_dir / checkpoint.STATE_META, state)


def train_specialist(generalist: nn.Module, subset, train: LabeledImages, val: LabeledImages | None = None,
                     config: SpecialistConfig | None = None, *, generalist_logits: Tensor | None = None,
                     run_dir: str | Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
                     log: Callable[[str], None] | None = None,
                     device: str | torch.device | None = None) -> tuple[nn.Module, SpecialistResult]:
    """Train the specialist for ``subset`` from ``generalist`` on ``train`` (labels in the generalist's numbering).

    The epoch kept is the one with the lowest validation cross-entropy on ``val`` (natural class frequencies,
    dustbin corrected), the untrained start (epoch 0) included; without ``val``, the last. The returned model
    (eval mode) and the saved one carry the dustbin correction in their weights. ``generalist_logits``: the
    generalist's logits over ``train``, for soft targets (computed here when needed and not given). With
    ``run_dir``: ``model.safetensors`` + ``model.json`` (``meta`` must hold the generalist's ``spec`` and
    ``image_shape`` so the file loads with :func:`darkknowledge.checkpoint.load_model`), resume state every
    epoch, and ``resume=True`` continues.

    The training is :func:`darkknowledge.training.fit`'s, on ``device`` (default: ``auto``), through its hooks: the 50/50 batches
    (``sampler``), the untrained start scored (``score_start``), the dustbin correction applied to what is
    validated and kept (``validate``, ``keep``).
    """
    config = config or SpecialistConfig()
    cfg = config.training
    log = log or (lambda line: print(line, file=sys.stderr))
    _, head = output_layer(generalist)
    num_classes = head.out_features
    if num_classes != len(train.classes):
        raise DarkKnowledgeError(f"the generalist predicts {num_classes} classes but {train.name} has "
                                 f"{len(train.classes)}")
    subset = _check_subset(subset, num_classes)
    check_jitter(cfg.jitter, train.image_shape)
    in_subset = torch.zeros(num_classes, dtype=torch.bool)
    in_subset[list(subset)] = True
    inside = torch.nonzero(in_subset[labels_of(train)]).flatten()
    outside = torch.nonzero(~in_subset[labels_of(train)]).flatten()
    sampler = BalancedSampler(inside, outside, cfg.batch_size, config.subset_fraction)
    natural = len(inside) / len(train)
    offset = dustbin_offset(natural, config.subset_fraction)
    objective = HardTargets()
    if config.temperature is not None:
        if generalist_logits is None:
            generalist_logits = predict_logits(generalist, train, bf16=cfg.bf16)
        if generalist_logits.shape != (len(train), num_classes):
            raise DarkKnowledgeError(f"generalist_logits must be [{len(train)}, {num_classes}], got "
                                     f"{list(generalist_logits.shape)}")
        teacher = collapse_logits(generalist_logits.float(), subset)
        teacher[:, -1] -= offset  # the generalist's posterior under the batches' prior, as the hard labels have it
        objective = GeneralistTargets(teacher, config.temperature, config.soft_weight, config.hard_weight)

    model = make_specialist(generalist, subset)
    if config.calibrate_dustbin:
        calibrate_dustbin(model, generalist, subset, train, seed=cfg.seed)
    names = [train.classes[c] for c in subset] + [DUSTBIN]
    meta = {**(meta or {}), "classes": names,
            "specialist": {"subset": list(subset), "subset_names": names[:-1], "dustbin_offset": offset,
                           "natural_fraction": natural, **config.describe()}}
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and resume:
        _upgrade_state(run_dir)

    def validate(trained: nn.Module, epoch: int) -> dict[str, Any]:
        # The untrained specialist already has the generalist's prior: it is scored without the offset.
        scores = validation_scores(trained, val, subset, offset if epoch else 0.0, cfg.bf16)
        return {k: v for k, v in scores.items() if k not in ("cases", "subset_cases")}

    def keep(trained: nn.Module, epoch: int) -> nn.Module:
        return add_to_dustbin(copy.deepcopy(trained), offset) if epoch else trained

    # The batches' labels in the specialist's numbering. The optimizer is the unfused SGD step the specialists'
    # own loop took and the epoch kept the lowest validation log-loss, so earlier runs reproduce to the bit.
    relabeled = LabeledImages(train.images, relabel(labels_of(train), subset, num_classes), tuple(names), train.name)
    unfused = {"foreach": False} if cfg.optimizer == "sgd" else {}
    fit_config = replace(cfg, select_by="log_loss", optimizer_options={**unfused, **cfg.optimizer_options})
    result = fit(model, relabeled, val, fit_config, objective, run_dir, resume, meta,
                 lambda line: log(f"specialist {list(subset)} {line}"), workers=SINGLE, device=device,
                 sampler=sampler, validate=validate, keep=keep, score_start=True,
                 legacy_keys=_older_keys(meta, train, val, subset, config))
    return model.eval(), SpecialistResult(subset, offset, natural, result.history, result.best_epoch, result.seconds)
