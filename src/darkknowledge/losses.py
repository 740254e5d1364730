"""Distillation objectives of §2: temperature softmax, T^2-scaled soft cross-entropy, the hard term, logit matching.

Notation as in the paper: ``z`` are the student's logits, ``v`` the teacher's, ``q = softmax(z/T)``,
``p = softmax(v/T)`` (or any given soft targets, e.g. an ensemble's mean distribution), ``N`` the number of classes.

**Cases and tokens.** Logits are ``[..., C]``: ``[B, C]`` for images, ``[B, S, V]`` for a language model (one case
per token position; ``C = V`` the vocabulary). Positions whose label is ``ignore_index`` (-100, as in PyTorch and
Hugging Face) or whose ``mask`` is 0 count for nothing; every term is averaged over the *real* positions.

**Normalisation.** ``reduction="mean"`` (default): each term is its sum over real positions divided by their number
``n`` in this call, so the loss is per token and does not grow with sequence length or padding. Under gradient
accumulation over micro-batches, averaging the micro-batches' means weights each micro-batch equally, not each
token: a micro-batch with few real tokens counts as much as a full one. For the exact per-token mean of the whole
accumulated batch use ``reduction="sum"`` and divide by the total number of real tokens (``DistillationTerms.tokens``
summed over the micro-batches). ``reduction="none"`` gives the per-position losses, 0 at ignored positions.

**Memory.** The soft term is computed in chunks of positions: the teacher's dense distribution (rebuilt from
logits, probabilities or a top-k summary) exists for one chunk only, and the student's gradient is written chunk by
chunk, so a vocabulary of 32,000 over thousands of positions needs no ``[tokens, V]`` teacher tensor
(benchmarks/loss_memory.py measures it). :func:`chunk_rows_for` sizes the chunks for the device: on the CPU
:data:`CHUNK_ELEMENTS` floats of ``[positions, C]`` (a cache's worth); on CUDA a budget of working memory, a fraction
of the free memory within :data:`CUDA_CHUNK_BYTES` (each chunk costs kernel launches, so cache-sized chunks of a
few rows leave a GPU idle); ``chunk_mb`` sets the budget on any device.

**Divergences.** The soft term is the paper's forward KL unless another entry of :data:`DIVERGENCES` is named
(reverse KL, TRL's generalized JSD with its ``beta``); each is x T^2, and the one registry is what every loop, the
run keys and the command line read.

Every public function validates its arguments and raises :class:`DarkKnowledgeError` with a one-line message.
The checks run every training step, so each is a handful of whole-tensor reductions, never a Python loop.
Half-precision inputs (bf16/fp16) are computed in float32; float64 stays float64 (for gradient checks).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import constraints
from .errors import DarkKnowledgeError

# Rows of soft targets must sum to 1 within this (or the dtype's epsilon, for bf16 targets whose rounding alone
# moves a row sum by more than 1e-3).
SUM_TOLERANCE = 1e-3
IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
# Floats of [positions, C] temporaries per chunk: 2 MB in float32, whatever the vocabulary. Small enough that a
# chunk stays in cache across its passes (measured faster than 16 MB chunks at V = 4,096) and that no large
# temporary is allocated (a fresh 16 MB buffer costs page faults on every step).
CHUNK_ELEMENTS = 1 << 19
# On CUDA: the bytes a chunk's working memory may take, as (least, most); between them, CUDA_FREE_FRACTION of the
# free memory. At V = 128,256 the least is ~100 rows, the most ~600 rows: 512-row chunks ran at 1.1x the naive
# loss's time with 7% of its peak memory on an H200 (issue 30), where the CPU's 4-row chunks ran at 13x.
CUDA_CHUNK_BYTES = (256 << 20, 1536 << 20)
CUDA_FREE_FRACTION = 1 / 8
# float32 [positions, C] temporaries a chunk holds at once (teacher distribution, student softmax, their
# products, the gradient's rows): what a budget of bytes is divided by.
CHUNK_TEMPORARIES = 5


def chunk_rows_for(classes: int, device: torch.device | str = "cpu", chunk_mb: float | None = None,
                   free_bytes: int | None = None) -> int:
    """Positions per chunk of the soft term for ``classes`` classes on ``device``: ``chunk_mb`` megabytes of
    working memory when given; else on the CPU :data:`CHUNK_ELEMENTS` floats, on CUDA :data:`CUDA_FREE_FRACTION` of
    the free memory (``free_bytes``; None: asked of the device) within :data:`CUDA_CHUNK_BYTES`."""
    if chunk_mb is not None:
        budget = constraints.check("loss_chunk_mb", chunk_mb, what="loss option") * (1 << 20)
    elif torch.device(device).type == "cuda":
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
        least, most = CUDA_CHUNK_BYTES
        budget = min(max(free_bytes * CUDA_FREE_FRACTION, least), most)
    else:
        return max(1, CHUNK_ELEMENTS // classes)
    return max(1, int(budget // (CHUNK_TEMPORARIES * 4 * classes)))


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def _check_temperature(temperature) -> float:
    # A 0-d tensor (e.g. a buffer a schedule updates) is read as its number: no gradient flows to T.
    if isinstance(temperature, Tensor) and temperature.numel() == 1 and temperature.is_floating_point():
        temperature = temperature.item()
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


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise DarkKnowledgeError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_tensor(name: str, x, min_dim: int = 1) -> None:
    """A floating tensor of at least ``min_dim`` dims with no NaN/inf (one reduction)."""
    if not isinstance(x, Tensor):
        raise DarkKnowledgeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DarkKnowledgeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise DarkKnowledgeError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    # A sum is finite when every element is (one cheap pass); only a non-finite sum, which a finite overflow can
    # also give, needs the element-wise look.
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise DarkKnowledgeError(f"non-finite (NaN or inf) values in {name}")


def _check_logits(name: str, x) -> None:
    """``[..., classes]`` with at least 2 dims (``[batch, classes]``, ``[batch, seq, vocab]``), non-empty, finite."""
    if isinstance(x, Tensor) and (x.dim() < 2 or x.numel() == 0):
        raise DarkKnowledgeError(f"{name} must be 2-D [batch, classes] (or [batch, ..., classes]) and non-empty, "
                                 f"got shape {tuple(x.shape)}")
    _check_tensor(name, x, min_dim=2)


def _check_same_shape(student: Tensor, other: Tensor, other_name: str) -> None:
    if student.dim() == other.dim() == 2 and student.shape[0] != other.shape[0]:
        raise DarkKnowledgeError(f"batch sizes differ: student has {student.shape[0]} cases, "
                                 f"{other_name} {other.shape[0]}")
    if student.shape[:-1] != other.shape[:-1]:
        raise DarkKnowledgeError(f"shapes differ: student logits {tuple(student.shape)}, "
                                 f"{other_name} {tuple(other.shape)} (all but the last dimension must match)")
    if student.shape[-1] != other.shape[-1]:
        raise DarkKnowledgeError(f"class counts differ: student has {student.shape[-1]} classes, "
                                 f"{other_name} {other.shape[-1]} (for a language model: the vocabularies differ; "
                                 f"teacher and student need the same tokenizer)")


def _check_soft_target_rows(p: Tensor, first_row: int) -> None:
    """Probabilities: non-negative rows summing to 1 (checked per chunk, on real positions only)."""
    if (p < 0).any():
        raise DarkKnowledgeError(f"soft_targets must be non-negative probabilities, got a minimum of "
                                 f"{p.min().item():.4g}")
    tolerance = max(SUM_TOLERANCE, torch.finfo(p.dtype).eps)
    row_sums = p.to(_compute_dtype(p)).sum(-1)
    deviation = (row_sums - 1).abs()
    if deviation.max() > tolerance:
        worst = int(deviation.argmax())
        raise DarkKnowledgeError(f"soft_targets rows must sum to 1 (within {tolerance:g}), "
                                 f"got row {first_row + worst} summing to {row_sums[worst].item():.6g}")


def _check_labels(labels, leading: torch.Size, classes: int, ignore_index: int) -> None:
    if not isinstance(labels, Tensor):
        raise DarkKnowledgeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DarkKnowledgeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.shape != leading:
        shape = f"1-D of length {leading[0]} (the batch size)" if len(leading) == 1 else f"of shape {tuple(leading)}"
        raise DarkKnowledgeError(f"labels must be {shape}, got shape {tuple(labels.shape)}")
    out_of_range = ((labels < 0) | (labels >= classes)) & (labels != ignore_index)
    if out_of_range.any():
        position = out_of_range.nonzero()[0]
        where = int(position[0]) if len(leading) == 1 else tuple(position.tolist())
        raise DarkKnowledgeError(f"labels must be in [0, {classes}), got {int(labels[tuple(position)])} at batch "
                                 f"position {where} ({ignore_index} marks a position to ignore)")


def _check_mask(mask, leading: torch.Size) -> Tensor:
    if not isinstance(mask, Tensor) or mask.shape != leading or mask.is_floating_point():
        # name what is wrong: the type, the shape, or (shape right) the dtype
        got = type(mask).__name__ if not isinstance(mask, Tensor) else f"shape {tuple(mask.shape)}" \
            if mask.shape != leading else f"dtype {str(mask.dtype).replace('torch.', '')}; convert it with mask.bool()"
        raise DarkKnowledgeError(f"mask must be a bool or 0/1 integer tensor of shape {tuple(leading)} "
                                 f"(1 = a real position), got {got}")
    return mask.bool()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: bf16/fp16 log-probabilities lose too much precision."""
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# The soft term, chunk by chunk
# ---------------------------------------------------------------------------------------------------------------

class _Teacher:
    """Where a chunk's target distribution comes from: ``log_probs(rows)`` is ``log p`` at T, ``[rows, C]``.

    ``rows`` index the flattened positions; only this chunk's dense distribution is ever built, and for a top-k
    teacher not even that (:meth:`forward_kl`, :meth:`outcomes`).
    """

    def __init__(self, kind: str, tensors: tuple[Tensor, ...], classes: int, temperature: float):
        self.kind, self.tensors, self.classes, self.temperature = kind, tensors, classes, temperature

    def log_probs(self, rows, first_row: int, dtype: torch.dtype) -> Tensor:
        if self.kind == "logits":
            (v,) = self.tensors
            return torch.log_softmax(v[rows].to(dtype) / self.temperature, dim=-1)
        if self.kind == "probabilities":
            p = self.tensors[0][rows]
            _check_soft_target_rows(p, first_row)
            return p.to(dtype).log()
        log_p_top, log_p_tail, indices = self._topk_parts(rows, dtype)  # k = C here (see outcomes): no tail
        n, members, _ = log_p_top.shape
        dense = log_p_tail.unsqueeze(-1).expand(n, members, self.classes).clone()
        dense.scatter_(-1, indices, log_p_top)
        return dense[:, 0] if members == 1 else dense.logsumexp(1) - math.log(members)

    def _topk_parts(self, rows, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``log p`` of the k stored classes ``[n, M, k]`` and of each tail class ``[n, M]`` (the tail's mass
        spread evenly over the other classes; callers use only its total), and the stored classes' indices;
        several members are mixed arithmetically (the mean of their distributions) by the caller."""
        logits, indices, tail_lse, tail_mean = (t[rows] for t in self.tensors)  # [n, M, k], [n, M]
        n, members, k = logits.shape
        s = 1.0 / self.temperature
        top = logits.to(dtype) * s
        tail = self.classes - k
        if tail == 0:
            return (top - top.logsumexp(-1, keepdim=True), torch.full((n, members), -math.inf, dtype=dtype),
                    indices.long())
        lse = tail_logsumexp_at(TopKTargets(logits, indices, tail_lse, tail_mean), s, dtype, tail)
        log_z = torch.logaddexp(top.logsumexp(-1), lse)
        return top - log_z.unsqueeze(-1), lse - log_z - math.log(tail), indices.long()

    def outcomes(self, z: Tensor, rows, first_row: int) -> tuple[Tensor, Tensor]:
        """``(log p, log q)`` at T over the outcomes the teacher knows: every class, or for a top-k teacher with a
        tail the k stored classes and one bucket for all the others (what :meth:`forward_kl` compares too).
        Differentiable in the student's logits ``z``. A top-k teacher with a tail has one member here
        (:func:`distillation_loss` refuses several for a divergence that is not linear in p)."""
        log_q = torch.log_softmax(z * (1.0 / self.temperature), dim=-1)
        if self.kind != "topk" or self.tensors[0].shape[-1] == self.classes:
            return self.log_probs(rows, first_row, z.dtype), log_q
        log_p_top, log_p_tail, indices = self._topk_parts(rows, z.dtype)  # [n, 1, k], [n, 1]
        indices = indices[:, 0]
        log_p = torch.cat([log_p_top[:, 0], log_p_tail + math.log(self.classes - indices.shape[-1])], -1)
        log_q_tail = log_q.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)  # log Q, exactly
        return log_p, torch.cat([log_q.gather(-1, indices), log_q_tail], -1)

    def forward_kl(self, z: Tensor, rows, first_row: int, grad: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per position (T^2 x the paper's soft cross-entropy ``-sum p log q``, T^2 x KL(p || q)) of the chunk's
        student logits ``z``; §2's gradient in closed form, ``T^2 (q - p) / T``, is written into ``grad`` if given.

        A top-k teacher is never made dense. It knows the k stored classes' probabilities and the tail's total
        mass P, not how P is split among the other n classes, so the target is the coarse distribution over the k
        classes and one tail bucket: ``-sum_top p log q - P log Q`` with ``Q`` the student's own tail mass. Its
        gradient is ``q - p`` at the top k and ``q (1 - P / Q)`` in the tail: the tail's mass is matched and its
        shape left to the student (and the hard term), rather than pushed towards an even spread. Several members
        give the mean of their terms (the cross-entropy is linear in the target: their mixture, arithmetically).
        """
        t, dtype = self.temperature, z.dtype
        if self.kind != "topk":
            log_p = self.log_probs(rows, first_row, dtype)
            log_q = torch.log_softmax(z * (1.0 / t), dim=-1)
            p = log_p.exp()
            ce = -(p * log_q).sum(-1)
            # nansum: a target of exactly 0 has log p = -inf and contributes 0 * -inf = nan, which is 0 here.
            neg_entropy = (p * log_p).nansum(-1)
            if grad is not None:
                torch.exp(log_q, out=grad) if grad.dtype == dtype else grad.copy_(log_q.exp())
                grad.sub_(p).mul_(t)
            return t * t * ce, t * t * (ce + neg_entropy)
        log_p_top, log_p_tail, indices = self._topk_parts(rows, dtype)  # [n, M, k], [n, M], [n, M, k]
        n, members, k = log_p_top.shape
        flat = indices.reshape(n, members * k)
        log_q = torch.log_softmax(z * (1.0 / t), dim=-1)
        log_q_top = log_q.gather(-1, flat).reshape(n, members, k)
        p_top = log_p_top.exp()
        ce = -(p_top * log_q_top).sum(-1)  # [n, M]
        neg_entropy = (p_top * log_p_top).sum(-1)
        tail = self.classes - k
        if tail:
            p_tail = (log_p_tail + math.log(tail)).exp()  # P per member
            # Q = 1 - (the student's top-k mass), in float64 so a small tail survives the subtraction.
            q_tail = (1 - log_q_top.double().exp().sum(-1)).clamp_min(torch.finfo(dtype).tiny).to(dtype)
            ce = ce - p_tail * q_tail.log()
            neg_entropy = neg_entropy + torch.xlogy(p_tail, p_tail)
        if grad is not None:
            q = torch.exp(log_q, out=log_q)
            pulled = p_top  # what each member takes from the top-k classes' gradient
            if tail:
                ratio = p_tail / q_tail
                q.mul_(1 - ratio.mean(1, keepdim=True))
                pulled = p_top - ratio.unsqueeze(-1) * log_q_top.exp()
            q.scatter_add_(-1, flat, pulled.reshape(n, members * k).mul(-1.0 / members))
            grad.copy_(q.mul_(t))
        return t * t * ce.mean(1), t * t * (ce + neg_entropy).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# Divergences: the one menu every loop and the command line read
# ---------------------------------------------------------------------------------------------------------------

def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(q || p)`` per row: mode-seeking, the student may ignore what the teacher spreads thinly."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """TRL's (GKD, Agarwal et al. 2024) generalized Jensen-Shannon divergence per row, ``p`` the teacher:
    ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``; beta 0.5 is the plain JSD.

    It vanishes at both ends (``~ beta KL(p || q)`` as beta -> 0), so, as in TRL, beta = 0 is defined as forward
    KL ``KL(p || q)`` and beta = 1 as reverse KL ``KL(q || p)``: the limits of ``JSD / beta`` and
    ``JSD / (1 - beta)``. The value therefore jumps at the ends; between them it is continuous in beta.
    """
    if beta == 0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1:
        return reverse_kl(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


def _by_autograd(per_row: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, Tensor]]:
    """A divergence given as a formula in ``(log p, log q)`` per row, made into a chunk's terms: ``T^2`` x the
    formula, its gradient by autograd on the chunk alone (written into ``grad``); its KL column is itself.

    ``log p`` is floored at the dtype's smallest normal number so a target of exactly 0 gives a large finite loss,
    not inf.
    """
    def terms(teacher: _Teacher, z: Tensor, rows, first_row: int, grad: Tensor | None,
              **parameters) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(grad is not None)
            log_p, log_q = teacher.outcomes(z, rows, first_row)
            log_p = log_p.detach().clamp_min(math.log(torch.finfo(log_p.dtype).tiny))
            value = teacher.temperature ** 2 * per_row(log_p, log_q, **parameters)
            if grad is not None:
                grad.copy_(torch.autograd.grad(value.sum(), z)[0])
        value = value.detach()
        return value, value
    return terms


@dataclass(frozen=True)
class Divergence:
    """An entry of :data:`DIVERGENCES`: how the soft term compares the teacher's ``p`` with the student's ``q``.

    ``terms(teacher, z, rows, first_row, grad, **parameters)`` gives a chunk's per-row ``(soft term, KL)``, both
    x T^2, and writes the soft term's gradient into ``grad`` when given; a formula in ``(log p, log q)`` becomes
    one with :func:`_by_autograd`. ``parameters`` maps each parameter's name (a key of
    :data:`darkknowledge.constraints.RANGES`) to its default. ``linear``: linear in ``p``, so several members'
    top-k summaries give the term of their mixture, and targets drawn from p (a sampled store) an unbiased
    estimate; a divergence that is not refuses both.
    """

    terms: Callable[..., tuple[Tensor, Tensor]]
    summary: str
    parameters: dict[str, float] = field(default_factory=dict)
    linear: bool = False


# Adding a divergence: one function of (log p, log q) per row, and one entry here.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(_Teacher.forward_kl, "KL(p || q), the paper's: its soft cross-entropy less the "
                             "targets' entropy, with §2's closed-form gradient (the default)", linear=True),
    "reverse_kl": Divergence(_by_autograd(reverse_kl), "KL(q || p): mode-seeking"),
    "jsd": Divergence(_by_autograd(generalized_jsd), "generalized Jensen-Shannon, TRL's GKD convention: beta "
                      "weighs the teacher, 0.5 the plain JSD, 0 forward KL, 1 reverse KL", {"beta": 0.5}),
}
DEFAULT_DIVERGENCE = "forward_kl"


def divergence_parameters(name: str, **given) -> dict[str, float]:
    """The parameters ``name`` takes, defaults filled in for those ``given`` as None; each checked against its range
    (one line naming the problem). A parameter the divergence does not take is refused."""
    entry = DIVERGENCES.get(name)
    if entry is None:
        raise DarkKnowledgeError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {name!r}")
    for key, value in given.items():
        if value is not None and key not in entry.parameters:
            takers = [n for n, d in DIVERGENCES.items() if key in d.parameters]
            raise DarkKnowledgeError(f"{key} is a parameter of {' and '.join(takers)}, not of {name}; drop it or "
                                     f"choose divergence {takers[0]}")
    return {key: float(constraints.check(key, default if given.get(key) is None else given[key], what="divergence "
                                         "parameter")) for key, default in entry.parameters.items()}


def check_drawn_targets(divergence: str) -> None:
    """Refuse targets drawn from the teacher (a sampled store) for a divergence not linear in p."""
    if not DIVERGENCES[divergence].linear:
        raise DarkKnowledgeError(f"{divergence} cannot learn from drawn (sampled) targets: it is not linear in the "
                                 "teacher's distribution, so the draws would give a biased estimate (reverse KL an "
                                 "infinite one); use forward_kl, or a dense or top-k store")


def describe_divergence(name: str, **given) -> dict[str, Any]:
    """What a run's key and sidecar record of its divergence: nothing for the paper's default (so runs saved before
    the menu keep their key), else its name and every parameter."""
    parameters = divergence_parameters(name, **given)
    return {} if name == DEFAULT_DIVERGENCE else {"divergence": name, **parameters}


class _ChunkedTerms(torch.autograd.Function):
    """Per-position soft term, its KL and the hard term of the rows ``rows`` of ``z`` (``[N, C]``), one chunk of
    rows at a time.

    The soft term's gradient is taken in the forward pass by the divergence's ``terms`` (in closed form for forward
    KL, by autograd on the chunk alone otherwise) and kept in the student's dtype; the hard term keeps nothing and
    rebuilds ``softmax(z) - onehot`` in backward. So nothing of size ``[N, C]`` besides the student's logits and one gradient
    is ever held, and the hard term costs fewer passes over the logits than a separate ``F.cross_entropy``.
    Only first derivatives are defined (no double backward).
    """

    @staticmethod
    def forward(ctx, z, rows, labels, teacher, terms, chunk_rows):
        ctx.set_materialize_grads(False)  # an unused term (e.g. a hard term for logging only) costs no backward
        n = z.shape[0] if rows is None else rows.numel()
        dtype = _compute_dtype(z)
        want_grad = ctx.needs_input_grad[0]
        new = lambda: torch.empty(n, dtype=dtype, device=z.device)  # noqa: E731
        soft, kl, hard = new(), new(), None if labels is None else new()
        grad = torch.empty((n, z.shape[1]), dtype=z.dtype, device=z.device) if want_grad else None
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            index = slice(start, stop) if rows is None else rows[start:stop]
            zc = z[index].to(dtype)
            if labels is not None:
                hard[start:stop] = -torch.log_softmax(zc, dim=-1).gather(-1, labels[start:stop, None]).squeeze(-1)
            chunk_grad = None if grad is None else grad[start:stop]
            soft[start:stop], kl[start:stop] = terms(teacher, zc, index, start, chunk_grad)
        ctx.mark_non_differentiable(kl)
        ctx.save_for_backward(z, grad, rows, labels)
        ctx.chunk_rows = chunk_rows
        return (soft, kl) if labels is None else (soft, kl, hard)

    @staticmethod
    def backward(ctx, grad_soft, grad_kl, grad_hard=None):
        z, grad, rows, labels = ctx.saved_tensors
        if grad_soft is None and grad_hard is None:
            return (None,) * 6
        # Chunk by chunk, so each chunk's rows stay in cache between the passes. The saved gradient is scaled in
        # place (the step holds one [N, C] gradient, not two); a second backward through the same loss
        # (retain_graph=True) is refused by autograd's version check on the saved tensor, never silently wrong.
        for start in range(0, grad.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, grad.shape[0])
            chunk = grad[start:stop]
            if grad_soft is not None:
                chunk.mul_(grad_soft[start:stop].to(grad.dtype).unsqueeze(-1))
            if grad_hard is not None:
                index = slice(start, stop) if rows is None else rows[start:stop]
                g = grad_hard[start:stop].unsqueeze(-1)
                softmax = torch.softmax(z[index].to(g.dtype), dim=-1).mul_(g)
                chunk.copy_(softmax) if grad_soft is None else chunk.add_(softmax)
                chunk.scatter_add_(-1, labels[start:stop, None], -g.to(grad.dtype))
        if rows is None:
            return grad, None, None, None, None, None
        full = torch.zeros((z.shape[0], grad.shape[1]), dtype=grad.dtype, device=grad.device)
        full[rows] = grad
        return full, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# The §2 objective
# ---------------------------------------------------------------------------------------------------------------

def softmax_with_temperature(logits: Tensor, temperature: float) -> Tensor:
    """§2: ``q_i = exp(z_i/T) / sum_j exp(z_j/T)`` over the last dim; higher T gives a softer distribution.

    Returned in float32 for half-precision logits (soft targets made from them must sum to 1 to 1e-3).
    """
    temperature = _check_temperature(temperature)
    _check_tensor("logits", logits)
    return torch.softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)


@dataclass
class DistillationTerms:
    """The terms of one distillation step.

    ``soft`` and ``hard`` are the unweighted terms and are NOT detached (each can be backpropagated alone, e.g. to
    compare gradient sizes); keep ``parts()``, not the tensors, when logging, so no graph is held. ``kl`` is the
    soft term as a KL divergence x T^2 (for forward_kl: the cross-entropy less the targets' entropy), the number
    other libraries' ``KLDivLoss(reduction="batchmean") * T**2`` give; it is for logging and has no graph.
    ``total_kl`` is ``total`` with the soft term in that KL form: the headline ``loss`` that is logged, comparable
    across libraries (the cross-entropy form counts the teacher's entropy too: at T = 4 tens higher for the same
    gradients). ``tokens`` is the number of real positions the terms were averaged over.
    """

    total: Tensor  # soft_weight * soft + hard_weight * hard: what to backprop
    soft: Tensor  # T^2-scaled soft term, unweighted
    hard: Tensor | None  # cross-entropy with the labels at T = 1, unweighted; None when no labels were given
    kl: Tensor | None = None
    tokens: int = 0
    total_kl: Tensor | None = None  # soft_weight * kl + hard_weight * hard, no graph: the logged "loss"

    def logged(self) -> dict[str, Tensor]:
        """The terms by the names every loop logs: ``loss`` (the KL form), ``loss_ce`` (the cross-entropy form,
        what is backpropagated), ``soft``, ``soft_kl`` and ``hard`` (left out when there is no hard term)."""
        terms = {"loss": self.total if self.total_kl is None else self.total_kl, "loss_ce": self.total,
                 "soft": self.soft, "soft_kl": self.kl, "hard": self.hard}
        return {name: value for name, value in terms.items() if value is not None}

    def parts(self) -> dict[str, float]:
        """:meth:`logged` as Python floats (per real position for ``reduction="none"``)."""
        def number(t: Tensor) -> float:
            return t.item() if t.dim() == 0 else t.sum().item() / max(self.tokens, 1)
        return {name: number(value) for name, value in self.logged().items()}


def _flat_topk(targets, student_logits: Tensor) -> tuple[Tensor, ...]:
    """Validate a :class:`TopKTargets` against student logits ``[..., C]``; its tensors as ``[N, M, k]``, ``[N, M]``."""
    if not isinstance(targets, TopKTargets):
        raise DarkKnowledgeError(f"topk_targets must be a TopKTargets, got {type(targets).__name__}")
    leading, classes = student_logits.shape[:-1], student_logits.shape[-1]
    n = leading.numel()
    with_members = targets.logits.dim() == len(leading) + 2
    lead = ", ".join(map(str, leading))
    if (targets.logits.dim() not in (len(leading) + 1, len(leading) + 2) or targets.indices.shape != targets.logits.shape
            or targets.logits.shape[:len(leading)] != leading):
        raise DarkKnowledgeError(f"topk_targets logits and indices must both be [{lead}, k] or [{lead}, M, k], got "
                                 f"{tuple(targets.logits.shape)} and {tuple(targets.indices.shape)}")
    for name in ("tail_logsumexp", "tail_mean"):
        if getattr(targets, name).shape != targets.logits.shape[:-1]:
            raise DarkKnowledgeError(f"topk_targets {name} must have shape {tuple(targets.logits.shape[:-1])}, got "
                                     f"{tuple(getattr(targets, name).shape)}")
    k = targets.logits.shape[-1]
    if not 1 <= k <= classes:
        raise DarkKnowledgeError(f"topk_targets hold {k} logits per case but the student has {classes} classes")
    _check_tensor("topk_targets logits", targets.logits)
    if targets.indices.is_floating_point() or ((targets.indices < 0) | (targets.indices >= classes)).any():
        raise DarkKnowledgeError(f"topk_targets indices must be integer class indices in [0, {classes})")
    if k < classes:
        lse = targets.tail_logsumexp  # -inf is a tail without mass (sampled targets); NaN or +inf is an error
        _check_tensor("topk_targets tail_logsumexp", lse.masked_fill(torch.isneginf(lse), 0.0))
        _check_tensor("topk_targets tail_mean", targets.tail_mean)
    members = targets.logits.shape[-2] if with_members else 1
    return (targets.logits.reshape(n, members, k), targets.indices.reshape(n, members, k),
            targets.tail_logsumexp.reshape(n, members), targets.tail_mean.reshape(n, members))


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None = None, labels: Tensor | None = None, *,
                      temperature: float, soft_weight: float = 1.0, hard_weight: float = 0.0,
                      soft_targets: Tensor | None = None, topk_targets: TopKTargets | None = None,
                      mask: Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                      divergence: str = DEFAULT_DIVERGENCE, beta: float | None = None, reduction: str = "mean",
                      chunk_rows: int | None = None, chunk_mb: float | None = None) -> DistillationTerms:
    """§2: ``total = soft_weight * T^2 * CE(p, softmax(z/T)) + hard_weight * CE(labels, softmax(z))``.

    The weights are relative, as in the paper, not a convex alpha: its "0.5 on the hard targets" is
    ``soft_weight=1, hard_weight=0.5``. ``temperature`` has no default on purpose: a silent T = 1 is not distillation.
    Give exactly one of ``teacher_logits`` (turned into ``p = softmax(v/T)``, detached), ``soft_targets``
    (probabilities at temperature T, e.g. an ensemble averaged in probability space) or ``topk_targets`` (a
    teacher's k largest logits and tail summary: :func:`topk_soft_target_cross_entropy`). ``labels`` are required
    when ``hard_weight > 0``; given with ``hard_weight == 0`` the hard term is computed for logging only.

    Logits may be ``[..., C]`` (e.g. ``[B, S, V]``); targets and ``labels``/``mask`` share the leading dims.
    Positions with ``labels == ignore_index`` or ``mask == 0`` are left out of both terms, which are averaged over
    the remaining ones (module doc: normalisation, gradient accumulation, ``reduction``). ``divergence`` names an
    entry of :data:`DIVERGENCES` (forward KL, the paper's, by default; every one x T^2), ``beta`` the generalized
    JSD's parameter (None: its default, 0.5); ``chunk_rows`` overrides how many positions the soft term handles at
    once, ``chunk_mb`` the working memory they are sized by (default: :func:`chunk_rows_for` the logits' device).
    Neither changes the result, only its speed and memory.
    """
    temperature = _check_temperature(temperature)
    soft_weight, hard_weight = _check_weights(soft_weight, hard_weight)
    parameters = divergence_parameters(divergence, beta=beta)
    reduction = _check_choice("reduction", reduction, REDUCTIONS)
    _check_logits("student logits", student_logits)
    leading, classes = student_logits.shape[:-1], student_logits.shape[-1]
    sources = sum(x is not None for x in (teacher_logits, soft_targets, topk_targets))
    if sources != 1:
        given = "more than one" if sources else "none"
        raise DarkKnowledgeError(f"give exactly one of teacher_logits, soft_targets or topk_targets, got {given}")
    if topk_targets is not None:
        teacher = _Teacher("topk", _flat_topk(topk_targets, student_logits), classes, temperature)
        _check_linear(divergence, *teacher.tensors, classes)
    else:
        name, given = ("teacher logits", teacher_logits) if teacher_logits is not None else ("soft_targets",
                                                                                             soft_targets)
        _check_logits(name, given)
        _check_same_shape(student_logits, given, "teacher" if teacher_logits is not None else "soft_targets")
        kind = "logits" if teacher_logits is not None else "probabilities"
        teacher = _Teacher(kind, (given.detach().reshape(-1, classes),), classes, temperature)
    if labels is None and hard_weight > 0:
        raise DarkKnowledgeError(f"labels are required when hard_weight > 0, "
                                 f"got hard_weight={hard_weight:g} and no labels")
    real = None if mask is None else _check_mask(mask, leading).reshape(-1)
    if labels is not None:
        _check_labels(labels, leading, classes, ignore_index)
        labels = labels.reshape(-1)
        kept = labels != ignore_index
        real = kept if real is None else real & kept
        labels = torch.where(real, labels, ignore_index) if mask is not None else labels
    rows = None if real is None or bool(real.all()) else real.nonzero().squeeze(1)

    z = student_logits.reshape(-1, classes)
    tokens = z.shape[0] if rows is None else rows.numel()
    chunk = chunk_rows or chunk_rows_for(classes, z.device, chunk_mb)
    row_labels = None if labels is None else (labels if rows is None else labels[rows]).long()
    terms = partial(DIVERGENCES[divergence].terms, **parameters)
    soft_rows, kl_rows, *hard_rows = _ChunkedTerms.apply(z, rows, row_labels, teacher, terms, chunk)
    hard = _reduce(hard_rows[0], rows, leading, tokens, reduction) if hard_rows else None
    soft, kl = (_reduce(t, rows, leading, tokens, reduction) for t in (soft_rows, kl_rows))

    # Terms with weight 0 are left out rather than multiplied by 0, so the total (and its gradient) is exactly
    # the other term.
    terms = [w * t for w, t in ((soft_weight, soft), (hard_weight, hard)) if w > 0]
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    total_kl = (total - soft_weight * (soft - kl) if soft_weight > 0 else total).detach()
    return DistillationTerms(total=total, soft=soft, hard=hard, kl=kl, tokens=tokens, total_kl=total_kl)


def _check_linear(divergence: str, logits: Tensor, indices: Tensor, tail_logsumexp: Tensor, tail_mean: Tensor,
                  classes: int) -> None:
    """Top-k targets ``[N, M, k]`` a divergence not linear in p cannot use soundly (see :class:`Divergence`)."""
    members, k = logits.shape[1:]
    if DIVERGENCES[divergence].linear or k == classes:
        return
    if torch.isneginf(tail_logsumexp).any():  # a tail without mass: drawn targets
        check_drawn_targets(divergence)
    if members > 1:
        raise DarkKnowledgeError(f"{divergence} needs the teacher's one distribution, but a top-k store of "
                                 f"{members} members keeps each member's tail apart; use forward_kl, a full store, "
                                 "or top-k of one teacher")


def _reduce(per_row: Tensor, rows: Tensor | None, leading: torch.Size, tokens: int, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean() if tokens else per_row.sum()
    if reduction == "sum":
        return per_row.sum()
    if rows is None:
        return per_row.reshape(leading)
    full = per_row.new_zeros(leading.numel())
    return full.index_put((rows,), per_row).reshape(leading)


def soft_target_cross_entropy(student_logits: Tensor, soft_targets: Tensor, temperature: float, **options) -> Tensor:
    """§2 objective (a), scaled: ``T^2 * mean_batch(-sum_i p_i log q_i)`` with ``q = softmax(z/T)``.

    ``soft_targets`` are probabilities ``[B, C]`` already at temperature T (e.g. an ensemble's mean distribution).
    This is the cross-entropy of the paper, not KL: they differ by the targets' entropy, which has no gradient.
    Its gradient is ``dC/dz_i = T (q_i - p_i) / B``: the T^2 undoes the 1/T^2 fall of the unscaled gradient, so the
    balance with the hard term does not change with T. ``options``: those of :func:`distillation_loss`.
    """
    return distillation_loss(student_logits, soft_targets=soft_targets, temperature=temperature, **options).soft


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float, **options) -> Tensor:
    """§2 objective (a) with ``p = softmax(v/T)`` of teacher logits ``v``: see :func:`soft_target_cross_entropy`.

    No gradient flows to ``teacher_logits``.
    """
    return distillation_loss(student_logits, teacher_logits, temperature=temperature, **options).soft


class DistillationLoss(nn.Module):
    """The §2 objective as a module for a training loop of one's own::

        criterion = DistillationLoss(temperature=2.0, soft_weight=1.0, hard_weight=0.5)
        loss = criterion(student_logits, teacher_logits, labels)   # or soft_targets=..., topk_targets=...
        loss.backward()
        criterion.terms.parts()   # {"loss", "loss_ce", "soft", "soft_kl", "hard"} of the last call

    ``temperature`` may be a number or a 0-d tensor; it is kept as a buffer (moved by ``.to()``, saved in the
    state_dict), so a schedule can set it in place (``criterion.temperature.fill_(4.0)``); no gradient flows to it.
    ``reduction``, ``divergence``, ``beta``, ``ignore_index``, ``chunk_rows`` and ``chunk_mb`` are those of
    :func:`distillation_loss`.
    """

    def __init__(self, temperature, soft_weight: float = 1.0, hard_weight: float = 0.0, *, reduction: str = "mean",
                 divergence: str = DEFAULT_DIVERGENCE, beta: float | None = None, ignore_index: int = IGNORE_INDEX,
                 chunk_rows: int | None = None, chunk_mb: float | None = None):
        super().__init__()
        _check_temperature(temperature)
        self.soft_weight, self.hard_weight = _check_weights(soft_weight, hard_weight)
        self.reduction = _check_choice("reduction", reduction, REDUCTIONS)
        divergence_parameters(divergence, beta=beta)
        self.divergence, self.beta = divergence, beta
        self.ignore_index, self.chunk_rows, self.chunk_mb = ignore_index, chunk_rows, chunk_mb
        if chunk_mb is not None:
            constraints.check("loss_chunk_mb", chunk_mb, what="loss option")
        self.register_buffer("temperature", torch.as_tensor(temperature, dtype=torch.float64).detach().clone())
        self.terms: DistillationTerms | None = None

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None = None, labels: Tensor | None = None,
                **targets) -> Tensor:
        terms = distillation_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                                  soft_weight=self.soft_weight, hard_weight=self.hard_weight,
                                  reduction=self.reduction, divergence=self.divergence, beta=self.beta,
                                  ignore_index=self.ignore_index, chunk_rows=self.chunk_rows,
                                  chunk_mb=self.chunk_mb, **targets)
        self.terms = DistillationTerms(*(t.detach() if isinstance(t, Tensor) else t for t in
                                         (terms.total, terms.soft, terms.hard, terms.kl)), tokens=terms.tokens,
                                       total_kl=terms.total_kl)
        return terms.total

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature.item():g}, soft_weight={self.soft_weight:g}, "
                f"hard_weight={self.hard_weight:g}, reduction={self.reduction!r}, divergence={self.divergence!r}"
                + (f", beta={self.beta:g}" if self.beta is not None else ""))


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


# ---------------------------------------------------------------------------------------------------------------
# Top-k soft targets: many classes, a fraction of the storage
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TopKTargets:
    """A teacher's output kept as its k largest logits plus a two-number summary of the other ``n = C - k``.

    Shapes: ``logits`` and ``indices`` ``[B, k]`` or ``[B, M, k]`` (M members of an arithmetic ensemble, whose
    targets are the mean of the members'), ``tail_logsumexp`` and ``tail_mean`` ``[B]`` or ``[B, M]``:

    - ``tail_logsumexp`` = ``log sum_{j not in top-k} exp(v_j)``: with it the top-k probabilities and the tail's
      total mass at **T = 1 are exact** (``p_i = exp(v_i - Z)``, ``Z = logaddexp(logsumexp(top), tail_logsumexp)``);
    - ``tail_mean`` = mean of the tail logits, used only at other temperatures (below).

    Built from full logits by :func:`topk_targets`. For ``k = C`` the tail is empty (``tail_logsumexp = -inf``)
    and the loss equals the full-logit loss.
    """

    logits: Tensor
    indices: Tensor
    tail_logsumexp: Tensor
    tail_mean: Tensor

    def members_view(self) -> TopKTargets:
        """The same targets with an explicit member axis: ``[B, M, k]`` and ``[B, M]``."""
        if self.logits.dim() == 3:
            return self
        return TopKTargets(self.logits.unsqueeze(1), self.indices.unsqueeze(1), self.tail_logsumexp.unsqueeze(1),
                           self.tail_mean.unsqueeze(1))


def topk_targets(logits: Tensor, k: int) -> TopKTargets:
    """The top-k summary of full logits ``[..., C]`` (any leading dims, e.g. ``[B, C]`` or ``[B, M, C]``)."""
    num_classes = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_classes:
        raise DarkKnowledgeError(f"top_k must be an integer in [1, {num_classes}] (the number of classes), got {k!r}")
    values, indices = logits.topk(int(k), dim=-1)
    tail = num_classes - int(k)
    if tail == 0:
        tail_lse = torch.full(logits.shape[:-1], -math.inf, dtype=logits.dtype)
        tail_mean = torch.zeros(logits.shape[:-1], dtype=logits.dtype)
    else:
        tail_lse = logits.scatter(-1, indices, -math.inf).logsumexp(-1)
        # float64 sums: subtracting the top from the total must not lose the tail in rounding.
        tail_mean = ((logits.double().sum(-1) - values.double().sum(-1)) / tail).to(logits.dtype)
    return TopKTargets(values, indices, tail_lse, tail_mean)


def sampled_targets(logits: Tensor, draws: int, generator: torch.Generator | None = None,
                    head: int = 0) -> TopKTargets:
    """``draws`` tokens drawn (with replacement) from ``softmax(logits)`` per row ``[n, C]``, kept as top-k targets
    whose probabilities are the draws' frequencies ``c_i / draws`` and whose tail is empty.

    The soft cross-entropy against them, ``-sum_i (c_i / draws) log q_i``, is an unbiased estimate of the one
    against the full distribution, and so is its gradient ``q - c / draws`` (sparse logit sampling, Anshumann et
    al., 2025), where a top-k summary is biased toward the head. Only at T = 1: the frequencies estimate the
    distribution at the temperature it was drawn at. The columns are laid out by :func:`sample_targets`.

    ``head = h > 0`` keeps the h most probable tokens exact and draws only from the rest, renormalised, each
    draw weighing the rest's total mass ``P``: the estimate ``P c_j / draws`` of the tail is still unbiased, and
    the head, where pure sampling is noisiest in absolute terms, has no noise at all.
    """
    probs = torch.softmax(logits.float(), -1)
    if head:
        head_p, head_ids = probs.topk(head, -1)
        rest = probs.scatter(-1, head_ids, 0.0)
        mass = rest.sum(-1)
        # a row whose head holds all the mass: draw anywhere outside the head, the draws then weigh 0
        rest = torch.where(mass.unsqueeze(-1) > 0, rest, torch.ones_like(rest).scatter(-1, head_ids, 0.0))
    else:
        head_p, head_ids = probs[:, :0], torch.zeros_like(probs[:, :0], dtype=torch.long)
        rest, mass = probs, torch.ones_like(probs[:, 0])
    picks = torch.multinomial(rest, draws, replacement=True, generator=generator)
    return sample_targets(head_p, head_ids, picks, mass, probs.shape[-1])


def sample_targets(head_p: Tensor, head_ids: Tensor, picks: Tensor, mass: Tensor, classes: int) -> TopKTargets:
    """The top-k targets ``[n, h + K]`` of a sample: the head's tokens ``head_ids`` ``[n, h]`` at their
    probabilities ``head_p`` (most probable first), then the distinct tokens among the draws ``picks`` ``[n, K]``
    (none in the head) at ``mass * count / K`` (most often drawn first), then distinct tokens never drawn at
    probability 0 (their logit the lowest float16, as targets must be finite), so every row has ``h + K`` distinct
    ids; the tail is empty. Built from the ``h + K`` ids alone (no ``[n, C]`` row): a compact store decodes its
    rows through it (:mod:`darkknowledge.store_codec`)."""
    n, draws = picks.shape
    width = head_ids.shape[-1] + draws
    picks = picks.sort(-1).values
    first = torch.ones_like(picks, dtype=torch.bool)
    first[:, 1:] = picks[:, 1:] != picks[:, :-1]
    run = first.long().cumsum(-1) - 1  # each draw's distinct token, counted from 0
    counts = torch.zeros(n, draws, dtype=torch.float32, device=picks.device).scatter_add_(
        -1, run, torch.ones_like(picks, dtype=torch.float32))
    drawn = torch.zeros_like(picks).scatter_(-1, run, picks)  # the distinct tokens, then zeros (counts 0)
    frequencies, order = (counts / draws * mass.float().unsqueeze(-1)).sort(dim=-1, descending=True, stable=True)
    drawn, unused = drawn.gather(-1, order), counts.gather(-1, order) == 0
    # the columns left over get the smallest ids not in the row: among the first `width` unused ones
    candidates = torch.arange(min(classes, 2 * width), device=picks.device)
    ids = torch.cat([head_ids, drawn], -1)
    taken = ((candidates[None, :, None] == ids[:, None, :]) &
             ~torch.cat([torch.zeros_like(head_ids, dtype=torch.bool), unused], -1)[:, None, :]).any(-1)
    free = candidates[taken.long().argsort(dim=-1, stable=True)]  # [n, candidates], the free ones first
    slot = (unused.long().cumsum(-1) - 1).clamp_min(0)
    drawn = torch.where(unused, free.gather(-1, slot), drawn)
    probabilities = torch.cat([head_p.float(), frequencies], -1)
    logits = probabilities.log().clamp_min(torch.finfo(torch.float16).min)
    empty = torch.full((n,), -math.inf, device=picks.device)
    return TopKTargets(logits, torch.cat([head_ids, drawn], -1), empty, torch.zeros_like(empty))


def tail_logsumexp_at(t: TopKTargets, s: float, dtype: torch.dtype, tail: int) -> Tensor:
    """``log sum_tail exp(s * v_j)`` at ``s = 1/T``, from the two stored numbers.

    ``f(s) = log n + K(s)`` where K is the cumulant generating function of the tail logits: ``K(0) = 0``,
    ``K'(0) = mean``. We take the second-order expansion ``f(s) ~ log n + mean * s + c * s^2`` with ``c`` set so
    that ``f(1) = tail_logsumexp`` exactly: exact at T = 1, right to first order as T -> infinity, and between the
    Jensen bound ``log n + mean * s`` and the flat-tail chord ``log n + s (tail_logsumexp - log n)`` for T >= 1.
    It is capped by ``log n + s * v_k`` (no tail logit exceeds the k-th largest).
    """
    log_n = math.log(tail)
    lse, mean = t.tail_logsumexp.to(dtype), t.tail_mean.to(dtype)
    curvature = (lse - log_n - mean).clamp_min(0)
    estimate = log_n + mean * s + curvature * (s * s)
    estimate = torch.where(torch.isneginf(lse), lse, estimate)  # a tail without mass (sampled targets) stays empty
    return torch.minimum(estimate, log_n + s * t.logits.to(dtype).min(-1).values)


def topk_soft_target_cross_entropy(student_logits: Tensor, targets: TopKTargets, temperature: float,
                                   **options) -> Tensor:
    """§2 objective (a), x T^2, from a teacher's top-k summary (:class:`TopKTargets`).

    The summary gives at T: ``p_i = exp(v_i/T) / Z`` for the k stored classes and the tail's total mass
    ``P = exp(L(T)) / Z``, where ``L(T)`` estimates ``log sum_tail exp(v_j/T)`` (:func:`tail_logsumexp_at`); it
    does not say how P is split among the other n classes. So the loss is the cross-entropy of the coarse
    distributions, the k classes plus one tail bucket: ``-sum_top p_i log q_i - P log Q``, ``Q`` the student's
    own tail mass. Its gradient, ``T (q - p)`` on the k classes and ``T q (1 - P / Q)`` on the tail, matches the
    tail's mass and leaves its shape to the student and the hard term (an even spread, used before, pulled every
    tail class towards ``P / n`` and cost a language-model student more log-loss than it gained; results/lm).
    What is exact and what is not:

    - ``k = C``: identical to :func:`soft_cross_entropy` on the full logits (no tail).
    - T = 1: exact for the coarse distribution (tests/test_sequence_losses.py checks values and gradients against
      a reference); what the teacher knows about the tail's shape is lost.
    - T != 1: additionally the tail mass is an estimate, exact as T -> infinity to first order.

    Measured against full logits (tests/test_soft_targets.py, a small trained digits teacher, worst over
    T in 1, 2, 4, 20): cosine between the loss gradients 0.84 at k = 3 of 10 classes, 0.93 at k = 5; a student
    distilled at T = 2 from a top-5 store made 79 test errors of 449 against 88 from full logits. The error grows
    with the mass the teacher puts outside its top k, so choose k to hold most of the mass at the temperature
    used. ``targets`` with a member axis ``[B, M, k]`` give the mean of the M members' terms: the cross-entropy
    with their arithmetic mixture, as the loss is linear in the target.
    """
    return distillation_loss(student_logits, topk_targets=targets, temperature=temperature, **options).soft
