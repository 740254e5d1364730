"""§5 inference: combine the generalist with the specialists that are active for each case.

Per case: take the generalist's ``top_n`` most probable classes (the paper: n = 1); the active specialists A are
those whose subset holds one of them. Then find the full distribution q = softmax(z) that minimises

    L(q) = KL(p^g || q) + sum_{m in A} KL(p^m || q^m),

where q^m is q collapsed onto specialist m's classes plus its dustbin (the dustbin gets the summed probability
of every class outside the subset). Cases with no active specialist keep the generalist's distribution exactly.

How it is solved. Setting the gradient with respect to z to zero gives, with n = 1 + |A|,

    dL/dz_j = n q_j - p^g_j - sum_{m in A} t^m_j = n (q_j - F(q)_j),
    t^m_j = p^m_j               for j in specialist m's subset,
    t^m_j = p^m_dustbin * q_j / (sum of q over the classes outside m's subset)    otherwise,

so the optimum is a fixed point of F(q) = (p^g + sum_m t^m(q)) / n: the generalist's distribution averaged with
each specialist's, whose dustbin mass is shared out over the classes outside its subset in proportion to q.
Iterating q <- F(q) is the EM algorithm for this problem (the dustbin is a coarsened observation); it keeps q a
distribution, never increases L, and converges to the minimum, which is unique because L is strictly convex
in q when p^g > 0. It starts from the generalist's distribution (warm start from its logits), runs batched over
all cases at once in torch (a few [cases, classes] x [classes, specialists] products per step), drops cases from
the batch as they converge, and is accelerated with SQUAREM where overlapping subsets make plain EM slow.

Convergence tolerance: iteration stops once every case has ``||dL/dz||_1 = n ||q - F(q)||_1 <= tol``
(default 1e-6, float64), or after ``max_iter`` iterations; the result reports the iterations run and each case's
final gradient norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DarkKnowledgeError
from .clustering import ClassSubsets

DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 1000
_TINY = 1e-300  # floor on a rest mass in float64, so a dustbin share never divides by zero


@dataclass
class CombineResult:
    log_probs: Tensor     # [cases, classes] log q; the generalist's log-softmax where no specialist is active
    active: Tensor        # [cases, specialists] bool
    iterations: int       # evaluations of the fixed-point map F (on the cases still unsolved)
    gradient_norm: Tensor  # [cases] final ||dL/dz||_1 (0 where no specialist is active)

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    @property
    def any_active(self) -> Tensor:
        return self.active.any(1)


def _membership(subsets, num_classes: int) -> Tensor:
    if isinstance(subsets, ClassSubsets):
        if subsets.num_classes != num_classes:
            raise DarkKnowledgeError(f"the subsets are over {subsets.num_classes} classes but the generalist "
                                     f"predicts {num_classes}")
        return subsets.membership()
    if isinstance(subsets, Tensor) and subsets.dtype == torch.bool:
        if subsets.dim() != 2 or subsets.shape[1] != num_classes:
            raise DarkKnowledgeError(f"a membership matrix must be [specialists, {num_classes}] booleans")
        return subsets
    return ClassSubsets(tuple(tuple(s) for s in subsets), tuple(map(str, range(num_classes)))).membership()


def active_specialists(generalist_logits: Tensor, subsets, top_n: int = 1) -> Tensor:
    """Boolean ``[cases, specialists]``: the specialists whose subset holds one of the case's ``top_n`` most
    probable classes under the generalist (§5, step 1 and 2)."""
    member = _membership(subsets, generalist_logits.shape[1])
    if not isinstance(top_n, int) or not 1 <= top_n <= generalist_logits.shape[1]:
        raise DarkKnowledgeError(f"top_n must be an integer in 1..{generalist_logits.shape[1]}, got {top_n!r}")
    top = torch.zeros(generalist_logits.shape, dtype=torch.bool)
    top.scatter_(1, generalist_logits.topk(top_n, dim=1).indices, True)
    return (top.to(torch.float32) @ member.T.to(torch.float32)) > 0


def combine(generalist_logits: Tensor, specialist_logits: Sequence[Tensor], subsets, *, top_n: int = 1,
            active: Tensor | None = None, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
            dtype: torch.dtype = torch.float64) -> CombineResult:
    """The combined distribution for every case (see the module docstring).

    ``generalist_logits`` ``[cases, classes]``; ``specialist_logits[m]`` ``[cases, len(subset m) + 1]`` with the
    dustbin last and already corrected for oversampling (as saved specialists are); ``subsets`` a
    :class:`ClassSubsets`, a list of class-index lists (sorted order = the specialist's output order) or a
    boolean membership matrix. ``active`` overrides the top-n choice of active specialists.
    """
    if generalist_logits.dim() != 2:
        raise DarkKnowledgeError(f"generalist logits must be [cases, classes], got {list(generalist_logits.shape)}")
    cases, num_classes = generalist_logits.shape
    member = _membership(subsets, num_classes)
    if len(specialist_logits) != len(member):
        raise DarkKnowledgeError(f"{len(specialist_logits)} specialists' logits for {len(member)} subsets")
    sizes = member.sum(1).tolist()
    for m, (logits, size) in enumerate(zip(specialist_logits, sizes)):
        if tuple(logits.shape) != (cases, size + 1):
            raise DarkKnowledgeError(f"specialist {m} covers {size} classes, so its logits must be "
                                     f"[{cases}, {size + 1}] (dustbin last), got {list(logits.shape)}")
    if not (tol > 0 and max_iter >= 1):
        raise DarkKnowledgeError(f"tol must be > 0 and max_iter >= 1, got {tol!r} and {max_iter!r}")
    if active is None:
        active = active_specialists(generalist_logits, member, top_n)
    elif active.shape != (cases, len(member)) or active.dtype != torch.bool:
        raise DarkKnowledgeError(f"active must be a [{cases}, {len(member)}] boolean tensor")

    log_q = torch.log_softmax(generalist_logits.detach().to(dtype), 1)
    gradient_norm = torch.zeros(cases, dtype=dtype)
    rows = torch.nonzero(active.any(1)).flatten()
    if len(rows) == 0:
        return CombineResult(log_q, active, 0, gradient_norm)

    # Everything below is for the cases with an active specialist only.
    on = active[rows].to(dtype)                        # [B, M]
    outside = (~member).to(dtype)                      # [M, C]: 1 where a class is in specialist m's dustbin
    p_g = log_q[rows].exp()
    fixed = p_g.clone()                                # p^g + sum_m p^m over the subsets: constant across iterations
    dustbin = torch.empty_like(on)                     # [B, M]: p^m_dustbin of active specialists, else 0
    for m, logits in enumerate(specialist_logits):
        p_m = torch.softmax(logits.detach()[rows].to(dtype), 1)
        fixed[:, member[m]] += p_m[:, :-1] * on[:, m:m + 1]
        dustbin[:, m] = p_m[:, -1] * on[:, m]
    n = 1 + on.sum(1, keepdim=True)

    q, norms, iterations = _solve(p_g, fixed, dustbin, outside, n, tol, max_iter)
    gradient_norm[rows] = norms
    log_q[rows] = q.log()
    return CombineResult(log_q, active, iterations, gradient_norm)


def combine_objective(log_q: Tensor, generalist_logits: Tensor, specialist_logits: Sequence[Tensor], subsets,
                      active: Tensor) -> Tensor:
    """L(q) per case: KL(p^g || q) + sum over active m of KL(p^m || q collapsed onto m's subset + dustbin)."""
    dtype = log_q.dtype
    member = _membership(subsets, log_q.shape[1])
    log_pg = torch.log_softmax(generalist_logits.to(dtype), 1)
    total = (log_pg.exp() * (log_pg - log_q)).sum(1)
    for m, logits in enumerate(specialist_logits):
        log_pm = torch.log_softmax(logits.to(dtype), 1)
        log_qm = torch.cat([log_q[:, member[m]], torch.logsumexp(log_q[:, ~member[m]], 1, keepdim=True)], 1)
        total = total + active[:, m].to(dtype) * (log_pm.exp() * (log_pm - log_qm)).sum(1)
    return total


def _solve(q: Tensor, fixed: Tensor, dustbin: Tensor, outside: Tensor, n: Tensor, tol: float,
           max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Fixed-point iterations q <- F(q) from ``q``, accelerated with SQUAREM (Varadhan & Roland 2008) and a
    monotone safeguard: each round takes two EM steps, extrapolates along them, and keeps the extrapolated point
    only where it lowers L below the two plain steps. Cases leave the working set as soon as they meet ``tol``.
    Returns q, each case's ||dL/dz||_1 at it, and the number of evaluations of F on the working set.

    Most cases converge in one or two steps (one active specialist: the fixed point is reached almost at once);
    EM alone is slow only where overlapping dustbins leave much of q undetermined, which SQUAREM speeds up.
    """
    def step(q: Tensor, fixed: Tensor, dustbin: Tensor, n: Tensor) -> Tensor:
        rest = (q @ outside.T).clamp_min(_TINY)      # [B, M]: q's mass in each specialist's dustbin
        return (fixed + q * ((dustbin / rest) @ outside)) / n

    def loss(q: Tensor, fixed: Tensor, dustbin: Tensor) -> Tensor:  # L(q) up to a per-case constant
        rest = (q @ outside.T).clamp_min(_TINY)
        return -(fixed * q.clamp_min(_TINY).log()).sum(1) - (dustbin * rest.log()).sum(1)

    result, gradient_norm = q.clone(), torch.zeros(len(q), dtype=q.dtype)
    work = torch.arange(len(q))                       # rows of ``result`` still being solved
    iterations = 0
    while len(work):
        f, d, nn_ = fixed[work], dustbin[work], n[work]
        q1 = step(q, f, d, nn_)
        norm = (q1 - q).abs().sum(1) * nn_.squeeze(1)
        iterations += 1
        done = norm <= tol
        if iterations >= max_iter:
            done = torch.ones_like(done)
        if done.any():
            result[work[done]] = q[done]
            gradient_norm[work[done]] = norm[done]
            keep = ~done
            work, q, q1, f, d, nn_ = work[keep], q[keep], q1[keep], f[keep], d[keep], nn_[keep]
            if not len(work):
                break
        q2 = step(q1, f, d, nn_)
        iterations += 2  # q2 and the stabilising step below
        r, v = q1 - q, q2 - 2 * q1 + q
        alpha = -(r.norm(dim=1) / v.norm(dim=1).clamp_min(_TINY)).clamp_min(1.0).unsqueeze(1)
        jump = q - 2 * alpha * r + alpha * alpha * v
        ok = (jump > 0).all(1) & torch.isfinite(jump).all(1)
        jump = step(torch.where(ok.unsqueeze(1), jump, q2), f, d, nn_)
        jump = jump / jump.sum(1, keepdim=True)       # stays on the simplex despite rounding
        better = ok & (loss(jump, f, d) < loss(q2, f, d))
        q = torch.where(better.unsqueeze(1), jump, q2)
    return result, gradient_norm, iterations
