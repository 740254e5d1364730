"""Tests of the §2 distillation losses: values, gradients (float64 autograd), the T^2 scaling, validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.losses import (
    DistillationTerms,
    distillation_loss,
    logit_matching_loss,
    soft_cross_entropy,
    soft_target_cross_entropy,
    softmax_with_temperature,
)

TEMPERATURES = [1.0, 2.5, 20.0]


def logits(batch=4, classes=10, seed=0, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(batch, classes, generator=generator, dtype=torch.float64)).to(dtype)


def zero_mean(x):
    return x - x.mean(-1, keepdim=True)


def student_grad(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


def entropy(p):
    return -(p * p.log()).sum(-1)


# 1. softmax with temperature ---------------------------------------------------------------------------------------

def test_softmax_at_t1_is_softmax():
    z = logits()
    torch.testing.assert_close(softmax_with_temperature(z, 1.0), torch.softmax(z, -1), rtol=0, atol=1e-15)


def test_higher_temperature_is_flatter():
    z = logits()
    entropies = [entropy(softmax_with_temperature(z, t)) for t in (0.5, 1.0, 2.0, 5.0, 20.0)]
    for lower, higher in zip(entropies, entropies[1:]):
        assert (higher > lower).all()
    assert torch.allclose(entropies[-1], torch.full_like(entropies[-1], math.log(10)), atol=0.2)


def test_softmax_invariant_to_constant_shift():
    z = logits()
    shift = torch.tensor([[100.0], [-7.0], [0.5], [1e3]], dtype=torch.float64)
    for t in TEMPERATURES:
        torch.testing.assert_close(softmax_with_temperature(z + shift, t), softmax_with_temperature(z, t))


def test_softmax_of_half_precision_is_float32():
    p = softmax_with_temperature(logits(dtype=torch.bfloat16), 2.0)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(4))


# 2. gradient of the soft cross-entropy -----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_gradient_is_q_minus_p_over_t(temperature):
    z, v = logits(batch=1, seed=1), logits(batch=1, seed=2)
    q, p = torch.softmax(z / temperature, -1), torch.softmax(v / temperature, -1)
    unscaled = student_grad(lambda s: soft_cross_entropy(s, v, temperature) / temperature ** 2, z)
    scaled = student_grad(lambda s: soft_cross_entropy(s, v, temperature), z)
    torch.testing.assert_close(unscaled, (q - p) / temperature, rtol=0, atol=1e-10)
    torch.testing.assert_close(scaled, temperature * (q - p), rtol=0, atol=1e-10)


def test_soft_loss_is_scaled_cross_entropy_not_kl():
    z, v, t = logits(seed=1), logits(seed=2), 2.5
    p = torch.softmax(v / t, -1)
    expected = t ** 2 * -(p * torch.log_softmax(z / t, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(z, v, t), expected, rtol=0, atol=1e-12)
    # CE exceeds KL by the targets' entropy, so a KL implementation would fail the line above.
    assert soft_cross_entropy(z, v, t) > t ** 2 * F.kl_div(torch.log_softmax(z / t, -1), p, reduction="batchmean") + 1


# 3. high-temperature limit: logit matching -------------------------------------------------------------------------

def test_high_temperature_gradient_approaches_logit_difference():
    z, v = zero_mean(logits(batch=1, seed=3)), zero_mean(logits(batch=1, seed=4))
    classes = z.shape[1]
    errors = []
    for t in (10.0, 1e2, 1e3, 1e4):
        grad = student_grad(lambda s: soft_cross_entropy(s, v, t) / t ** 2, z)
        limit = (z - v) / (classes * t ** 2)
        errors.append(((grad - limit).norm() / limit.norm()).item())
    assert all(later < earlier / 5 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


def test_logit_matching_gradient_is_logit_difference_over_n():
    z, v = zero_mean(logits(batch=1, seed=5)), zero_mean(logits(batch=1, seed=6))
    grad = student_grad(lambda s: logit_matching_loss(s, v), z)
    torch.testing.assert_close(grad, (z - v) / z.shape[1], rtol=0, atol=1e-12)


def test_logit_matching_value_and_centering():
    z, v = logits(seed=7), logits(seed=8)
    expected = ((zero_mean(z) - zero_mean(v)) ** 2).sum(-1).mean() / (2 * z.shape[1])
    torch.testing.assert_close(logit_matching_loss(z, v), expected, rtol=0, atol=1e-12)
    # Adding a constant per case to either side changes nothing: only logit differences within a case matter.
    torch.testing.assert_close(logit_matching_loss(z + 5.0, v - 3.0), expected, rtol=0, atol=1e-12)


def test_scaled_soft_gradient_approaches_logit_matching_gradient():
    z, v = zero_mean(logits(seed=9)), zero_mean(logits(seed=10))
    target = student_grad(lambda s: logit_matching_loss(s, v), z)
    errors = []
    for t in (10.0, 1e2, 1e3, 1e4):
        grad = student_grad(lambda s: soft_cross_entropy(s, v, t), z)
        errors.append(((grad - target).norm() / target.norm()).item())
    assert all(later < earlier / 5 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


# 4. weighting ------------------------------------------------------------------------------------------------------

def test_hard_only_equals_cross_entropy():
    # The hard term is our own fused log-sum-exp (not F.cross_entropy): equal to float64 rounding, and the total is
    # exactly that term, with no zero-weighted soft term added in.
    z, v = logits(seed=11), logits(seed=12)
    labels = torch.tensor([0, 3, 9, 5])
    result = distillation_loss(z, v, labels, temperature=4.0, soft_weight=0.0, hard_weight=1.0)
    assert torch.equal(result.total, result.hard)
    assert torch.allclose(result.total, F.cross_entropy(z, labels), rtol=0, atol=1e-13)
    grad = student_grad(lambda s: distillation_loss(s, v, labels, temperature=4.0, soft_weight=0.0,
                                                    hard_weight=1.0).total, z)
    assert torch.allclose(grad, student_grad(lambda s: F.cross_entropy(s, labels), z), rtol=0, atol=1e-13)


def test_soft_only_equals_soft_cross_entropy():
    z, v = logits(seed=13), logits(seed=14)
    result = distillation_loss(z, v, temperature=3.0)
    assert result.hard is None
    assert torch.equal(result.total, soft_cross_entropy(z, v, 3.0))
    assert torch.equal(result.soft, result.total)
    assert set(result.parts()) == {"loss", "loss_ce", "soft", "soft_kl"}


@pytest.mark.parametrize("soft_weight, hard_weight", [(1.0, 0.5), (0.3, 2.0)])
def test_total_is_weighted_sum(soft_weight, hard_weight):
    z, v = logits(seed=15), logits(seed=16)
    labels = torch.tensor([1, 2, 3, 4])
    result = distillation_loss(z, v, labels, temperature=2.0, soft_weight=soft_weight, hard_weight=hard_weight)
    torch.testing.assert_close(result.soft, soft_cross_entropy(z, v, 2.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.hard, F.cross_entropy(z, labels), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.total, soft_weight * result.soft + hard_weight * result.hard, rtol=0, atol=1e-12)
    parts = result.parts()
    assert all(type(value) is float for value in parts.values())
    # the headline loss is the KL form (comparable with KLDivLoss * T^2); the cross-entropy form is loss_ce
    kl = F.kl_div(F.log_softmax(z / 2.0, -1), F.softmax(v / 2.0, -1), reduction="batchmean") * 4
    assert parts == pytest.approx({"loss": soft_weight * kl.item() + hard_weight * result.hard.item(),
                                   "loss_ce": result.total.item(), "soft": result.soft.item(),
                                   "hard": result.hard.item(), "soft_kl": kl.item()})


def test_labels_with_zero_hard_weight_are_logged_not_trained_on():
    z, v = logits(seed=17), logits(seed=18)
    labels = torch.tensor([1, 2, 3, 4])
    result = distillation_loss(z, v, labels, temperature=2.0)
    torch.testing.assert_close(result.hard, F.cross_entropy(z, labels), rtol=0, atol=1e-12)
    assert torch.equal(result.total, result.soft)


def test_temperature_is_required_keyword():
    with pytest.raises(TypeError):
        distillation_loss(logits(), logits(seed=1))
    assert isinstance(distillation_loss(logits(), logits(seed=1), temperature=1.0), DistillationTerms)


# 5. the T^2 scaling ------------------------------------------------------------------------------------------------

def test_t_squared_keeps_soft_gradient_magnitude_constant():
    z, v = logits(seed=19), logits(seed=20)
    scaled = {t: student_grad(lambda s: soft_cross_entropy(s, v, t), z).norm().item() for t in (5.0, 20.0)}
    unscaled = {t: student_grad(lambda s: soft_cross_entropy(s, v, t) / t ** 2, z).norm().item() for t in (5.0, 20.0)}
    assert 0.5 < scaled[5.0] / scaled[20.0] < 2.0, scaled
    # Unscaled, 4x the temperature gives ~16x less gradient.
    assert 8.0 < unscaled[5.0] / unscaled[20.0] < 32.0, unscaled


# 6. soft targets given as probabilities ----------------------------------------------------------------------------

def test_soft_targets_path_equals_teacher_logits_path():
    z, v, labels = logits(seed=21), logits(seed=22), torch.tensor([0, 1, 2, 3])
    from_logits = distillation_loss(z, v, labels, temperature=2.5, hard_weight=0.5)
    from_targets = distillation_loss(z, None, labels, temperature=2.5, hard_weight=0.5,
                                     soft_targets=softmax_with_temperature(v, 2.5))
    torch.testing.assert_close(from_targets.total, from_logits.total, rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_target_cross_entropy(z, softmax_with_temperature(v, 2.5), 2.5),
                               soft_cross_entropy(z, v, 2.5), rtol=0, atol=1e-12)


def test_ensemble_mean_of_probabilities_as_soft_targets():
    z, members = logits(seed=23), [logits(seed=s) for s in (24, 25, 26)]
    p = torch.stack([softmax_with_temperature(m, 2.0) for m in members]).mean(0)
    expected = 4.0 * -(p * torch.log_softmax(z / 2.0, -1)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(z, soft_targets=p, temperature=2.0).total, expected,
                               rtol=0, atol=1e-12)


# 7. validation -----------------------------------------------------------------------------------------------------

def nan_at(x, value=float("nan")):
    x = x.clone()
    x[1, 2] = value
    return x


Z, V, LABELS = logits(), logits(seed=1), torch.tensor([0, 1, 2, 3])

INVALID = {
    "T=0": (lambda: distillation_loss(Z, V, temperature=0), r"temperature .*got 0"),
    "T=-1": (lambda: distillation_loss(Z, V, temperature=-1.0), r"temperature .*got -1"),
    "T=nan": (lambda: distillation_loss(Z, V, temperature=float("nan")), r"temperature .*got nan"),
    "T=inf": (lambda: soft_cross_entropy(Z, V, float("inf")), r"temperature .*got inf"),
    "T=True": (lambda: softmax_with_temperature(Z, True), r"temperature .*got True"),
    "negative weight": (lambda: distillation_loss(Z, V, LABELS, temperature=2, hard_weight=-0.5),
                        r"hard_weight .*>= 0.*got -0.5"),
    "nan weight": (lambda: distillation_loss(Z, V, temperature=2, soft_weight=float("nan")), r"soft_weight .*got nan"),
    "both weights zero": (lambda: distillation_loss(Z, V, LABELS, temperature=2, soft_weight=0, hard_weight=0),
                          r"soft_weight and hard_weight are both 0"),
    "class mismatch": (lambda: distillation_loss(logits(classes=10), logits(classes=12), temperature=2),
                       r"student has 10 classes, teacher 12"),
    "batch mismatch": (lambda: soft_cross_entropy(logits(batch=4), logits(batch=3), 2),
                       r"student has 4 cases, teacher 3"),
    "1-D student": (lambda: distillation_loss(Z[0], V[0], temperature=2), r"student logits must be 2-D"),
    "empty batch": (lambda: distillation_loss(Z[:0], V[:0], temperature=2), r"student logits must be 2-D .*non-empty"),
    "label out of range": (lambda: distillation_loss(Z, V, torch.tensor([0, 10, 2, 3]), temperature=2, hard_weight=1),
                           r"labels must be in \[0, 10\), got 10 at batch position 1"),
    "negative label": (lambda: distillation_loss(Z, V, torch.tensor([0, 1, -1, 3]), temperature=2, hard_weight=1),
                       r"labels must be in \[0, 10\), got -1"),
    "labels wrong length": (lambda: distillation_loss(Z, V, LABELS[:3], temperature=2, hard_weight=1),
                            r"labels must be 1-D of length 4"),
    "float labels": (lambda: distillation_loss(Z, V, LABELS.double(), temperature=2, hard_weight=1),
                     r"labels must be an integer tensor"),
    "labels missing": (lambda: distillation_loss(Z, V, temperature=2, hard_weight=0.5),
                       r"labels are required when hard_weight > 0"),
    "nan in student": (lambda: distillation_loss(nan_at(Z), V, temperature=2),
                       r"non-finite \(NaN or inf\) values in student logits"),
    "inf in teacher": (lambda: distillation_loss(Z, nan_at(V, float("inf")), temperature=2),
                       r"non-finite \(NaN or inf\) values in teacher logits"),
    "inf in logit matching": (lambda: logit_matching_loss(Z, nan_at(V, -float("inf"))),
                              r"non-finite \(NaN or inf\) values in teacher logits"),
    "nan in softmax input": (lambda: softmax_with_temperature(nan_at(Z), 2),
                             r"non-finite \(NaN or inf\) values in logits"),
    "soft targets not summing to 1": (
        lambda: distillation_loss(Z, soft_targets=torch.full((4, 10), 0.11, dtype=torch.float64), temperature=2),
        r"soft_targets rows must sum to 1 .*got row 0 summing to 1.1"),
    "negative soft targets": (
        lambda: soft_target_cross_entropy(Z, softmax_with_temperature(V, 2) - nan_at(torch.zeros_like(V), 0.5), 2),
        r"soft_targets must be non-negative"),
    "teacher and soft targets": (lambda: distillation_loss(Z, V, temperature=2, soft_targets=torch.softmax(V, -1)),
                                 r"exactly one of teacher_logits, soft_targets or topk_targets, got more than one"),
    "neither teacher nor soft targets": (lambda: distillation_loss(Z, temperature=2),
                                         r"exactly one of teacher_logits, soft_targets or topk_targets, got none"),
    "integer logits": (lambda: distillation_loss(Z.long(), V, temperature=2), r"student logits must be a floating"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_input_raises_one_line_error(case):
    call, pattern = INVALID[case]
    with pytest.raises(DarkKnowledgeError, match=pattern) as raised:
        call()
    assert "\n" not in str(raised.value)


def test_soft_targets_within_tolerance_are_accepted():
    p = softmax_with_temperature(V, 2.0)
    p[:, 0] += 5e-4
    distillation_loss(Z, soft_targets=p, temperature=2.0)
    # bf16 rounding alone moves row sums by more than 1e-3; such targets must not be rejected.
    distillation_loss(Z, soft_targets=softmax_with_temperature(V, 2.0).bfloat16(), temperature=2.0)


# 8. the teacher gets no gradient -----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn", [
    lambda z, v: distillation_loss(z, v, torch.tensor([0, 1, 2, 3]), temperature=2.0, hard_weight=0.5).total,
    lambda z, v: soft_cross_entropy(z, v, 2.0),
    lambda z, v: logit_matching_loss(z, v),
], ids=["distillation_loss", "soft_cross_entropy", "logit_matching_loss"])
def test_no_gradient_to_teacher(loss_fn):
    z, v = logits().requires_grad_(True), logits(seed=1).requires_grad_(True)
    loss_fn(z, v).backward()
    assert v.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


# 9. bf16 -----------------------------------------------------------------------------------------------------------

def test_bf16_student_gives_float32_loss_close_to_float32():
    z32, v32 = logits(dtype=torch.float32), logits(seed=1, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3])
    z16 = z32.bfloat16().requires_grad_(True)
    result = distillation_loss(z16, v32, labels, temperature=4.0, hard_weight=0.5)
    assert result.total.dtype == result.soft.dtype == result.hard.dtype == torch.float32
    # Same (bf16-rounded) logits in float32: only the rounding of the inputs may differ, nothing in the computation.
    exact = distillation_loss(z16.detach().float(), v32, labels, temperature=4.0, hard_weight=0.5)
    torch.testing.assert_close(result.total, exact.total, rtol=1e-6, atol=1e-6)
    # Against the unrounded float32 logits: within bf16 input precision.
    reference = distillation_loss(z32, v32, labels, temperature=4.0, hard_weight=0.5)
    torch.testing.assert_close(result.total, reference.total, rtol=1e-2, atol=1e-2)
    result.total.backward()
    assert z16.grad.dtype == torch.bfloat16 and torch.isfinite(z16.grad.float()).all()
