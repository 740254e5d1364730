"""Distillation objectives of §2: temperature softmax, T^2-scaled soft cross-entropy, the hard term, logit matching.

Notation as in the paper: ``z`` are the student's logits, ``v`` the teacher's, ``q = softmax(z/T)``,
``p = softmax(v/T)`` (or any given soft targets, e.g. an ensemble's mean distribution), ``N`` the number of classes.

Every public function validates its arguments and raises :class:`DarkKnowledgeError` with a one-line message.
The checks run every training step, so each is a handful of whole-tensor reductions, never a Python loop.
Half-precision inputs (bf16/fp16) are computed in float32; float64 stays float64 (for gradient checks).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DarkKnowledgeError

# Rows of soft targets must sum to 1 within this (or the dtype's epsilon, for bf16 targets whose rounding alone
# moves a row sum by more than 1e-3).
SUM_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def _check_temperature(temperature) -> float:
    # bool is an int subclass: temperature=True would silently mean T=1.
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature <= 0):
        raise DarkKnowledgeError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_weights(soft_weight, hard_weight) -> tuple[float, float]:
    for name, weight in (("soft_weight", soft_weight), ("hard_weight", hard_weight)):
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight) or weight < 0):
            raise DarkKnowledgeError(f"{name} must be a finite number >= 0, got {weight!r}")
    if soft_weight == 0 and hard_weight == 0:
        raise DarkKnowledgeError("soft_weight and hard_weight are both 0; at least one must be > 0 "
                                 "(the paper's '0.5 on the hard targets' is soft_weight=1, hard_weight=0.5)")
    return float(soft_weight), float(hard_weight)


def _check_tensor(name: str, x, min_dim: int = 1) -> None:
    """A floating tensor of at least ``min_dim`` dims with no NaN/inf (one reduction)."""
    if not isinstance(x, Tensor):
        raise DarkKnowledgeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DarkKnowledgeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise DarkKnowledgeError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DarkKnowledgeError(f"non-finite (NaN or inf) values in {name}")


def _check_logits(name: str, x) -> None:
    """2-D ``[batch, classes]``, non-empty (a mean over an empty batch is a silent NaN), finite."""
    if isinstance(x, Tensor) and (x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0):
        raise DarkKnowledgeError(f"{name} must be 2-D [batch, classes] and non-empty, got shape {tuple(x.shape)}")
    _check_tensor(name, x, min_dim=2)


def _check_same_shape(student: Tensor, other: Tensor, other_name: str) -> None:
    if student.shape[0] != other.shape[0]:
        raise DarkKnowledgeError(f"batch sizes differ: student has {student.shape[0]} cases, "
                                 f"{other_name} {other.shape[0]}")
    if student.shape[1] != other.shape[1]:
        raise DarkKnowledgeError(f"class counts differ: student has {student.shape[1]} classes, "
                                 f"{other_name} {other.shape[1]}")


def _check_soft_targets(soft_targets, student: Tensor) -> None:
    _check_logits("soft_targets", soft_targets)
    _check_same_shape(student, soft_targets, "soft_targets")
    if (soft_targets < 0).any():
        raise DarkKnowledgeError(f"soft_targets must be non-negative probabilities, got a minimum of "
                                 f"{soft_targets.min().item():.4g}")
    tolerance = max(SUM_TOLERANCE, torch.finfo(soft_targets.dtype).eps)
    row_sums = soft_targets.to(_compute_dtype(soft_targets)).sum(-1)
    deviation = (row_sums - 1).abs()
    if deviation.max() > tolerance:
        worst = int(deviation.argmax())
        raise DarkKnowledgeError(f"soft_targets rows must sum to 1 (within {tolerance:g}), "
                                 f"got row {worst} summing to {row_sums[worst].item():.6g}")


def _check_labels(labels, batch: int, classes: int) -> None:
    if not isinstance(labels, Tensor):
        raise DarkKnowledgeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DarkKnowledgeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise DarkKnowledgeError(f"labels must be 1-D of length {batch} (the batch size), "
                                 f"got shape {tuple(labels.shape)}")
    out_of_range = (labels < 0) | (labels >= classes)
    if out_of_range.any():
        position = int(out_of_range.nonzero()[0, 0])
        raise DarkKnowledgeError(f"labels must be in [0, {classes}), "
                                 f"got {int(labels[position])} at batch position {position}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: bf16/fp16 log-probabilities lose too much precision."""
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Losses (unchecked cores, then the validating public functions)
# ---------------------------------------------------------------------------------------------------------------

def _soft_ce(student_logits: Tensor, soft_targets: Tensor, temperature: float) -> Tensor:
    dtype = _compute_dtype(student_logits, soft_targets)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return -(soft_targets.to(dtype) * log_q).sum(-1).mean() * temperature ** 2


def _teacher_probabilities(teacher_logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    # The teacher is a fixed target: detach so no gradient (and no graph) reaches it.
    return torch.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)


def softmax_with_temperature(logits: Tensor, temperature: float) -> Tensor:
    """§2: ``q_i = exp(z_i/T) / sum_j exp(z_j/T)`` over the last dim; higher T gives a softer distribution.

    Returned in float32 for half-precision logits (soft targets made from them must sum to 1 to 1e-3).
    """
    temperature = _check_temperature(temperature)
    _check_tensor("logits", logits)
    return torch.softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)


def soft_target_cross_entropy(student_logits: Tensor, soft_targets: Tensor, temperature: float) -> Tensor:
    """§2 objective (a), scaled: ``T^2 * mean_batch(-sum_i p_i log q_i)`` with ``q = softmax(z/T)``.

    ``soft_targets`` are probabilities ``[B, C]`` already at temperature T (e.g. an ensemble's mean distribution).
    This is the cross-entropy of the paper, not KL: they differ by the targets' entropy, which has no gradient.
    Its gradient is ``dC/dz_i = T (q_i - p_i) / B``: the T^2 undoes the 1/T^2 fall of the unscaled gradient, so the
    balance with the hard term does not change with T.
    """
    temperature = _check_temperature(temperature)
    _check_logits("student logits", student_logits)
    _check_soft_targets(soft_targets, student_logits)
    return _soft_ce(student_logits, soft_targets, temperature)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """§2 objective (a) with ``p = softmax(v/T)`` of teacher logits ``v``: see :func:`soft_target_cross_entropy`.

    No gradient flows to ``teacher_logits``.
    """
    temperature = _check_temperature(temperature)
    _check_logits("student logits", student_logits)
    _check_logits("teacher logits", teacher_logits)
    _check_same_shape(student_logits, teacher_logits, "teacher")
    p = _teacher_probabilities(teacher_logits, temperature, _compute_dtype(student_logits, teacher_logits))
    return _soft_ce(student_logits, p, temperature)


@dataclass
class DistillationLoss:
    """The terms of one distillation step.

    ``soft`` and ``hard`` are the unweighted terms and are NOT detached (each can be backpropagated alone, e.g. to
    compare gradient sizes); keep ``parts()``, not the tensors, when logging, so no graph is held.
    """

    total: Tensor  # soft_weight * soft + hard_weight * hard: what to backprop
    soft: Tensor  # T^2-scaled soft cross-entropy, unweighted
    hard: Tensor | None  # cross-entropy with the labels at T = 1, unweighted; None when no labels were given

    def parts(self) -> dict[str, float]:
        """``{"loss", "soft", "hard"}`` as Python floats; "hard" is left out when there is no hard term."""
        parts = {"loss": self.total.item(), "soft": self.soft.item()}
        if self.hard is not None:
            parts["hard"] = self.hard.item()
        return parts


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None = None, labels: Tensor | None = None, *,
                      temperature: float, soft_weight: float = 1.0, hard_weight: float = 0.0,
                      soft_targets: Tensor | None = None) -> DistillationLoss:
    """§2: ``total = soft_weight * T^2 * CE(p, softmax(z/T)) + hard_weight * CE(labels, softmax(z))``.

    The weights are relative, as in the paper, not a convex alpha: its "0.5 on the hard targets" is
    ``soft_weight=1, hard_weight=0.5``. ``temperature`` has no default on purpose: a silent T = 1 is not distillation.
    Give exactly one of ``teacher_logits`` (turned into ``p = softmax(v/T)``, detached) or ``soft_targets``
    (probabilities at temperature T, e.g. an ensemble averaged in probability space). ``labels`` are required when
    ``hard_weight > 0``; given with ``hard_weight == 0`` the hard term is computed for logging only.
    """
    temperature = _check_temperature(temperature)
    soft_weight, hard_weight = _check_weights(soft_weight, hard_weight)
    _check_logits("student logits", student_logits)
    if (teacher_logits is None) == (soft_targets is None):
        given = "both" if teacher_logits is not None else "neither"
        raise DarkKnowledgeError(f"give exactly one of teacher_logits or soft_targets, got {given}")
    if teacher_logits is not None:
        _check_logits("teacher logits", teacher_logits)
        _check_same_shape(student_logits, teacher_logits, "teacher")
        soft_targets = _teacher_probabilities(teacher_logits, temperature,
                                              _compute_dtype(student_logits, teacher_logits))
    else:
        _check_soft_targets(soft_targets, student_logits)
    if labels is None and hard_weight > 0:
        raise DarkKnowledgeError(f"labels are required when hard_weight > 0, "
                                 f"got hard_weight={hard_weight:g} and no labels")

    soft = _soft_ce(student_logits, soft_targets, temperature)
    hard = None
    if labels is not None:
        _check_labels(labels, *student_logits.shape)
        hard = F.cross_entropy(student_logits.to(_compute_dtype(student_logits)), labels)

    # Terms with weight 0 are left out rather than multiplied by 0, so the total (and its gradient) is exactly
    # the other term.
    terms = [w * t for w, t in ((soft_weight, soft), (hard_weight, hard)) if w > 0]
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return DistillationLoss(total=total, soft=soft, hard=hard)


def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Caruana's logit matching, the high-temperature limit of the T^2-scaled soft loss (§2).

    Both logits are made zero-mean per case; loss = mean over the batch of ``(1/(2N)) sum_i (z_i - v_i)^2``.
    Derivation: for large T, ``q_i ~ (1 + z_i/T) / N`` and ``p_i ~ (1 + v_i/T) / N`` (zero-mean logits), so the
    unscaled gradient ``(1/T)(q_i - p_i) -> (1/(N T^2))(z_i - v_i)``; times T^2 it is ``(1/N)(z_i - v_i)``, the
    gradient of this loss per case. No gradient flows to ``teacher_logits``.
    """
    _check_logits("student logits", student_logits)
    _check_logits("teacher logits", teacher_logits)
    _check_same_shape(student_logits, teacher_logits, "teacher")
    dtype = _compute_dtype(student_logits, teacher_logits)
    z = student_logits.to(dtype)
    v = teacher_logits.detach().to(dtype)
    difference = (z - z.mean(-1, keepdim=True)) - (v - v.mean(-1, keepdim=True))
    return difference.pow(2).sum(-1).mean() / (2 * z.shape[-1])
