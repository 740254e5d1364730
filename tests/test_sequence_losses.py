"""The §2 objective on sequences: [B, S, V] logits, ignored positions, chunking, divergences, the loss module."""

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.losses import DistillationLoss, distillation_loss, topk_targets


def tokens(batch=2, seq=5, vocab=11, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, seq, vocab, generator=generator, dtype=torch.float64)


def padded_labels(batch=2, seq=5, vocab=11, seed=0):
    labels = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    labels[0, 3:] = -100  # the first sequence is padded after 3 tokens
    return labels


def grad_of(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sequence_gradient_is_t_times_q_minus_p_over_real_tokens_and_zero_at_padding(temperature):
    z, v, labels = tokens(), tokens(seed=1), padded_labels()
    real = labels != -100
    grad = grad_of(lambda s: distillation_loss(s, v, labels, temperature=temperature).total, z)
    q, p = torch.softmax(z / temperature, -1), torch.softmax(v / temperature, -1)
    expected = temperature * (q - p) / real.sum() * real.unsqueeze(-1)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_sequence_loss_equals_the_case_loss_on_the_real_positions():
    z, v, labels = tokens(), tokens(seed=1), padded_labels()
    real = labels != -100
    seq = distillation_loss(z, v, labels, temperature=2.0, hard_weight=0.5)
    flat = distillation_loss(z[real], v[real], labels[real], temperature=2.0, hard_weight=0.5)
    for name in ("total", "soft", "hard", "kl"):
        torch.testing.assert_close(getattr(seq, name), getattr(flat, name), rtol=0, atol=1e-12)
    assert seq.tokens == int(real.sum()) == 8
    # A mask says the same as -100 labels.
    masked = distillation_loss(z, v, labels.clamp_min(0), temperature=2.0, hard_weight=0.5, mask=real.long())
    torch.testing.assert_close(masked.total, seq.total, rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_values_and_gradients(divergence):
    z, v, labels = tokens(batch=3, seq=7), tokens(batch=3, seq=7, seed=1), padded_labels(batch=3, seq=7)
    loss = lambda chunk: lambda s: distillation_loss(s, v, labels, temperature=2.0, hard_weight=0.5,
                                                     divergence=divergence, chunk_rows=chunk).total
    for chunk in (1, 4):
        torch.testing.assert_close(loss(chunk)(z), loss(None)(z), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad_of(loss(chunk), z), grad_of(loss(None), z), rtol=0, atol=1e-12)


def reference_divergence(z, v, t, divergence):
    """Plain autograd formulas, no chunking: what the named divergences mean."""
    log_q, log_p = torch.log_softmax(z / t, -1), torch.log_softmax(v / t, -1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "reverse_kl":
        per = (q * (log_q - log_p)).sum(-1)
    else:
        m = (p + q) / 2
        per = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return t ** 2 * per.mean()


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_reverse_kl_and_jsd_match_their_formulas(divergence):
    z, v = tokens(), tokens(seed=1)
    ours = lambda s: distillation_loss(s, v, temperature=3.0, divergence=divergence, chunk_rows=3).total
    ref = lambda s: reference_divergence(s, v, 3.0, divergence)
    torch.testing.assert_close(ours(z), ref(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, z), grad_of(ref, z), rtol=0, atol=1e-12)
    # And against central differences of the loss value (the gradient is computed in the forward pass).
    grad, step = grad_of(ours, z), 1e-6
    for position in [(0, 0, 0), (1, 4, 10), (0, 2, 5)]:
        plus, minus = z.clone(), z.clone()
        plus[position] += step
        minus[position] -= step
        numeric = (ours(plus) - ours(minus)) / (2 * step)
        torch.testing.assert_close(grad[position], numeric, rtol=1e-6, atol=1e-9)


def test_kl_is_cross_entropy_less_entropy_and_matches_kldivloss_times_t_squared():
    z, v, t = tokens(), tokens(seed=1), 2.5
    result = distillation_loss(z, v, temperature=t)
    log_q, p = torch.log_softmax(z / t, -1).reshape(-1, 11), torch.softmax(v / t, -1).reshape(-1, 11)
    torch.testing.assert_close(result.kl, F.kl_div(log_q, p, reduction="batchmean") * t ** 2, rtol=0, atol=1e-12)
    assert result.soft > result.kl + 1  # the cross-entropy exceeds the KL by the targets' entropy


def test_topk_targets_per_token_with_k_equal_to_vocabulary_equal_full_logits():
    z, v, labels = tokens(), tokens(seed=1), padded_labels()
    full = lambda s: distillation_loss(s, v, labels, temperature=2.0).total
    topk = lambda s: distillation_loss(s, labels=labels, topk_targets=topk_targets(v, 11), temperature=2.0).total
    torch.testing.assert_close(topk(z), full(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(topk, z), grad_of(full, z), rtol=0, atol=1e-12)
    # With a member axis [B, S, M, k] the targets are the members' mean distribution.
    members = torch.stack([v, tokens(seed=2)], dim=2)
    mean_p = torch.softmax(members / 2.0, -1).mean(2)
    torch.testing.assert_close(distillation_loss(z, topk_targets=topk_targets(members, 11), temperature=2.0).soft,
                               distillation_loss(z, soft_targets=mean_p, temperature=2.0).soft, rtol=0, atol=1e-12)


def coarse_cross_entropy(z, v, k):
    """The reference at T = 1: cross-entropy between the teacher's and the student's distributions over the k
    classes the teacher ranks highest plus one bucket for all the others, per position."""
    p, q = torch.softmax(v, -1), torch.softmax(z, -1)
    top = v.topk(k, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    return -(p_top * q_top.log()).sum(-1) - torch.xlogy(p_tail, q_tail)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_targets_give_the_cross_entropy_of_the_top_k_classes_and_one_tail_bucket(k):
    z, labels = tokens(), padded_labels()
    real = labels != -100
    v = [tokens(seed=1), tokens(seed=2)]
    one = topk_targets(v[0], k)
    both = topk_targets(torch.stack(v, dim=2), k)  # two members: the mean of their terms

    def ours(s, targets):
        return distillation_loss(s, labels=labels, topk_targets=targets, temperature=1.0, chunk_rows=3).soft

    def reference(s, members):
        return torch.stack([coarse_cross_entropy(s, m, k) for m in members]).mean(0)[real].mean()

    for targets, members in ((one, v[:1]), (both, v)):
        torch.testing.assert_close(ours(z, targets), reference(z, members), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad_of(lambda s: ours(s, targets), z), grad_of(lambda s: reference(s, members), z),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_two_identical_members_give_the_one_members_loss(temperature):
    z, labels = tokens(), padded_labels()
    one = topk_targets(tokens(seed=1), 3)
    two = type(one)(*(torch.stack([x, x], dim=2) for x in (one.logits, one.indices, one.tail_logsumexp,
                                                             one.tail_mean)))
    loss = lambda targets: lambda s: distillation_loss(s, labels=labels, topk_targets=targets,  # noqa: E731
                                                       temperature=temperature, hard_weight=0.5)
    for name in ("total", "soft", "kl", "hard"):
        torch.testing.assert_close(getattr(loss(one)(z), name), getattr(loss(two)(z), name), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(lambda s: loss(one)(s).total, z), grad_of(lambda s: loss(two)(s).total, z),
                               rtol=0, atol=1e-12)


def test_soft_and_hard_terms_each_backpropagate_alone():
    # The chunked function gives both terms; either one's gradient is its own formula, whatever the other's weight.
    z, v, labels = tokens(), tokens(seed=1), padded_labels()
    real = labels != -100
    hard = grad_of(lambda s: distillation_loss(s, v, labels, temperature=2.0).hard, z)
    reference = grad_of(lambda s: F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1)), z)
    torch.testing.assert_close(hard, reference, rtol=0, atol=1e-12)
    soft = grad_of(lambda s: distillation_loss(s, v, labels, temperature=2.0, hard_weight=0.5).soft, z)
    q, p = torch.softmax(z / 2.0, -1), torch.softmax(v / 2.0, -1)
    torch.testing.assert_close(soft, 2.0 * (q - p) / real.sum() * real.unsqueeze(-1), rtol=0, atol=1e-12)


def test_reduction_sum_gives_exact_gradient_accumulation_and_none_is_per_position():
    z, v, labels = tokens(batch=4), tokens(batch=4, seed=1), padded_labels(batch=4)
    whole = grad_of(lambda s: distillation_loss(s, v, labels, temperature=2.0, hard_weight=0.5).total, z)
    total_tokens = int((labels != -100).sum())
    accumulated = torch.zeros_like(z)
    for part in (slice(0, 1), slice(1, 4)):  # micro-batches with 3 and 15 real tokens
        accumulated[part] = grad_of(lambda s: distillation_loss(
            s, v[part], labels[part], temperature=2.0, hard_weight=0.5, reduction="sum").total / total_tokens, z[part])
    torch.testing.assert_close(accumulated, whole, rtol=0, atol=1e-12)
    per = distillation_loss(z, v, labels, temperature=2.0, hard_weight=0.5, reduction="none")
    assert per.total.shape == (4, 5) and torch.all(per.total[labels == -100] == 0)
    torch.testing.assert_close(per.total.sum() / per.tokens,
                               distillation_loss(z, v, labels, temperature=2.0, hard_weight=0.5).total)


def test_all_positions_ignored_gives_zero_not_nan():
    z, v = tokens(), tokens(seed=1)
    result = distillation_loss(z, v, torch.full((2, 5), -100), temperature=2.0, hard_weight=0.5)
    assert result.tokens == 0 and result.total.item() == 0


def test_loss_module_with_tensor_temperature_reduction_and_logged_kl():
    z, v, labels = tokens(), tokens(seed=1), padded_labels()
    criterion = DistillationLoss(temperature=torch.tensor(2.0), soft_weight=1.0, hard_weight=0.5)
    loss = criterion(z.clone().requires_grad_(True), v, labels)
    expected = distillation_loss(z, v, labels, temperature=2.0, hard_weight=0.5)
    torch.testing.assert_close(loss, expected.total)
    assert criterion.terms.parts() == pytest.approx(expected.parts()) and "soft_kl" in criterion.terms.parts()
    assert not criterion.terms.total.requires_grad  # the logged terms hold no graph
    criterion.temperature.fill_(4.0)  # a schedule sets T in place
    torch.testing.assert_close(criterion(z, v, labels), distillation_loss(z, v, labels, temperature=4.0,
                                                                          hard_weight=0.5).total)
    assert criterion.state_dict()["temperature"].item() == 4.0
    summed = DistillationLoss(2.0, hard_weight=0.5, reduction="sum")(z, v, labels)
    torch.testing.assert_close(summed, expected.total * expected.tokens)


def test_a_second_backward_through_one_loss_is_refused():
    z = tokens().requires_grad_(True)
    loss = distillation_loss(z, tokens(seed=1), temperature=2.0, chunk_rows=3).total  # the chunked function
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bf16_sequence_logits_give_float32_loss_and_bf16_gradient():
    z = tokens().float().bfloat16().requires_grad_(True)
    result = distillation_loss(z, tokens(seed=1).float(), padded_labels(), temperature=2.0, hard_weight=0.5,
                               chunk_rows=3)
    assert result.total.dtype == torch.float32
    result.total.backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


INVALID = {
    "vocabularies differ": (lambda: distillation_loss(tokens(vocab=11), tokens(vocab=12), temperature=2),
                            r"class counts differ.*vocabularies differ"),
    "sequence lengths differ": (lambda: distillation_loss(tokens(seq=5), tokens(seq=4), temperature=2),
                                r"shapes differ: student logits \(2, 5, 11\), teacher \(2, 4, 11\)"),
    "label out of range": (lambda: distillation_loss(tokens(), tokens(seed=1), torch.full((2, 5), 11),
                                                     temperature=2), r"labels must be in \[0, 11\), got 11"),
    "labels of another shape": (lambda: distillation_loss(tokens(), tokens(seed=1), torch.zeros(2, 4).long(),
                                                          temperature=2), r"labels must be of shape \(2, 5\)"),
    "float mask": (lambda: distillation_loss(tokens(), tokens(seed=1), temperature=2, mask=torch.ones(2, 5)),
                   r"mask must be a bool or 0/1 integer tensor of shape \(2, 5\) "
                   r"\(1 = a real position\), got dtype float32; convert it with mask.bool\(\)"),
    "mask of another shape": (lambda: distillation_loss(tokens(), tokens(seed=1), temperature=2,
                                                        mask=torch.ones(2, 4).bool()), r"got shape \(2, 4\)$"),
    "unknown divergence": (lambda: distillation_loss(tokens(), tokens(seed=1), temperature=2, divergence="kl"),
                           r"divergence must be one of forward_kl, reverse_kl, jsd"),
    "unknown reduction": (lambda: DistillationLoss(2.0, reduction="batchmean"), r"reduction must be one of"),
    "tensor temperature 0": (lambda: DistillationLoss(torch.tensor(0.0)), r"temperature must be a finite number"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_sequence_input_raises_one_line_error(case):
    call, pattern = INVALID[case]
    with pytest.raises(DarkKnowledgeError, match=pattern) as raised:
        call()
    assert "\n" not in str(raised.value)
