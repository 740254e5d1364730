"""The divergence menu (losses.DIVERGENCES): each one's values and gradients against a plain formula, on dense,
top-k and sampled targets, its refusals, and its reach (Distillation, the run key, the command line)."""

import json
import types

import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.language_model import Objective
from darkknowledge.losses import (DIVERGENCES, DistillationLoss, distillation_loss, sampled_targets,
                                  topk_targets)
from darkknowledge.training import Distillation

T = 2.5


def logits(rows=6, classes=9, seed=0, scale=3.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grad_of(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


def naive(p, q, divergence, beta=0.5):
    """What each divergence means, written directly from probabilities (no logs of mixtures, no chunks)."""
    def kl(a, b):
        return (a * (a / b).log()).sum(-1)
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def test_forward_kl_is_the_default_and_its_gradient_is_the_papers_closed_form():
    z, v = logits(), logits(seed=1)
    default = lambda s: distillation_loss(s, v, temperature=T).soft  # noqa: E731
    named = lambda s: distillation_loss(s, v, temperature=T, divergence="forward_kl").soft  # noqa: E731
    torch.testing.assert_close(default(z), named(z), rtol=0, atol=0)
    q, p = torch.softmax(z / T, -1), torch.softmax(v / T, -1)
    # §2: dC/dz_i = (1/T)(q_i - p_i) per case before the T^2 factor, so T (q - p) after it, averaged over the batch.
    torch.testing.assert_close(grad_of(named, z), T * (q - p) / len(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", None), ("jsd", None), ("jsd", 0.1), ("jsd", 0.9)])
def test_dense_values_and_gradients_match_autograd_of_the_plain_formula(divergence, beta):
    z, v = logits(), logits(seed=1)
    ours = lambda s: distillation_loss(s, v, temperature=T, divergence=divergence, beta=beta,  # noqa: E731
                                       chunk_rows=4).soft
    reference = lambda s: T ** 2 * naive(torch.softmax(v / T, -1), torch.softmax(s / T, -1), divergence,  # noqa: E731
                                         0.5 if beta is None else beta).mean()
    torch.testing.assert_close(ours(z), reference(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, z), grad_of(reference, z), rtol=0, atol=1e-12)


def test_jsd_edges_are_forward_and_reverse_kl_and_its_limits_agree():
    z, v = logits(), logits(seed=1)

    def loss(divergence, beta=None):
        return lambda s: distillation_loss(s, v, temperature=T, divergence=divergence, beta=beta)

    # beta 0 is forward KL (its KL column: the cross-entropy less the targets' entropy, the same gradient) ...
    torch.testing.assert_close(loss("jsd", 0.0)(z).soft, loss("forward_kl")(z).kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(lambda s: loss("jsd", 0.0)(s).soft, z),
                               grad_of(lambda s: loss("forward_kl")(s).soft, z), rtol=0, atol=1e-12)
    # ... and beta 1 reverse KL, exactly.
    torch.testing.assert_close(loss("jsd", 1.0)(z).soft, loss("reverse_kl")(z).soft, rtol=0, atol=0)
    # They are the limits of JSD / beta and JSD / (1 - beta) (TRL's convention): the ends are not where JSD -> 0.
    small = 1e-5
    torch.testing.assert_close(loss("jsd", small)(z).soft / small, loss("forward_kl")(z).kl, rtol=1e-3, atol=0)
    torch.testing.assert_close(loss("jsd", 1 - small)(z).soft / small, loss("reverse_kl")(z).soft, rtol=1e-3, atol=0)


def coarse(probs, top):
    """A distribution over the k classes ``top`` and one bucket for the rest (none when k = C)."""
    kept = probs.gather(-1, top)
    return kept if top.shape[-1] == probs.shape[-1] else torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_top_k_targets_compare_the_k_classes_and_one_tail_bucket(divergence, k):
    # At T = 1 a top-k summary knows the k probabilities and the tail's mass exactly: the divergence is the one
    # between the coarse distributions (k = C: the dense one).
    z, v = logits(), logits(seed=1)
    targets = topk_targets(v, k)
    top = v.topk(k, -1).indices
    ours = lambda s: distillation_loss(s, topk_targets=targets, temperature=1.0, divergence=divergence,  # noqa: E731
                                       chunk_rows=4).soft
    reference = lambda s: naive(coarse(torch.softmax(v, -1), top), coarse(torch.softmax(s, -1), top),  # noqa: E731
                                divergence).mean()
    torch.testing.assert_close(ours(z), reference(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, z), grad_of(reference, z), rtol=0, atol=1e-12)


def test_a_divergence_not_linear_in_the_targets_refuses_drawn_and_several_members_top_k_targets():
    z, v = logits(), logits(seed=1)
    drawn = sampled_targets(v, 4, torch.Generator().manual_seed(0))
    members = topk_targets(torch.stack([v, logits(seed=2)], 1), 3)
    distillation_loss(z, topk_targets=drawn, temperature=1.0)  # forward KL: an unbiased estimate
    distillation_loss(z, topk_targets=members, temperature=1.0)  # forward KL: the mixture's term
    for divergence in ("reverse_kl", "jsd"):
        with pytest.raises(DarkKnowledgeError, match="cannot learn from drawn"):
            distillation_loss(z, topk_targets=drawn, temperature=1.0, divergence=divergence)
        with pytest.raises(DarkKnowledgeError, match="top-k store of 2 members"):
            distillation_loss(z, topk_targets=members, temperature=1.0, divergence=divergence)
        with pytest.raises(DarkKnowledgeError, match="cannot learn from drawn"):  # before a language model trains
            Objective(types.SimpleNamespace(layout="sampled"), divergence=divergence)
    # Several members without a tail (k = C) are one exact mixture: fine.
    distillation_loss(z, topk_targets=topk_targets(torch.stack([v, v], 1), 9), temperature=1.0, divergence="jsd")


@pytest.mark.parametrize("make, message", [
    (lambda: distillation_loss(logits(), logits(seed=1), temperature=T, beta=0.3), "beta is a parameter of jsd"),
    (lambda: distillation_loss(logits(), logits(seed=1), temperature=T, divergence="jsd", beta=1.5),
     r"beta must be in \[0, 1\], got 1.5"),
    (lambda: DistillationLoss(T, divergence="kl"), "divergence must be one of forward_kl, reverse_kl, jsd"),
    (lambda: Distillation(T, divergence="jsd", beta=-0.1), r"beta must be in \[0, 1\]"),
    (lambda: Objective(divergence="jsd", beta=float("nan")), "beta must be a finite number"),
])
def test_bad_divergence_settings_are_one_line_errors(make, message):
    with pytest.raises(DarkKnowledgeError, match=message):
        make()


def test_the_run_key_tells_divergences_apart_and_a_default_run_keeps_its_old_key():
    described = {name: Distillation(4.0, divergence=name).describe() for name in DIVERGENCES}
    # What a distillation recorded before the menu existed: its runs must still resume.
    assert json.dumps(described["forward_kl"], sort_keys=True) == \
        '{"hard_weight": 0.0, "objective": "distillation", "soft_weight": 1.0, "temperature": 4.0}'
    assert len({json.dumps(d, sort_keys=True) for d in described.values()}) == len(DIVERGENCES)
    assert described["jsd"] == {**described["forward_kl"], "divergence": "jsd", "beta": 0.5}
    assert Distillation(4.0, divergence="jsd", beta=0.5).describe() == described["jsd"]
    assert Distillation(4.0, divergence="jsd", beta=0.2).describe() != described["jsd"]
    # The language-model objective records its divergence the same way.
    store = types.SimpleNamespace(key="k", header={"key": "k"}, layout="dense", top_k=None, check_temperature=lambda t: None)
    assert "divergence" not in Objective(store).describe()
    assert Objective(store, divergence="reverse_kl").describe()["divergence"] == "reverse_kl"


FAST = ["--epochs", "1", "--batch-size", "128", "--no-progress"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["train", "--model", "mlp:32", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("divergence, extra, recorded", [
    ("forward_kl", [], {}), ("reverse_kl", [], {"divergence": "reverse_kl"}),
    ("jsd", ["--beta", "0.25"], {"divergence": "jsd", "beta": 0.25})])
def test_distill_reaches_each_divergence_from_the_command_line(teacher_run, tmp_path, capsys, divergence, extra,
                                                               recorded):
    out = tmp_path / divergence
    code = main(["distill", "--teacher", str(teacher_run), "--student", "mlp:16", "-T", "3", "--out", str(out),
                 "--divergence", divergence, *extra, *FAST])
    assert code == 0, capsys.readouterr().err
    meta = checkpoint.read_model_meta(out)
    assert {k: meta[k] for k in ("divergence", "beta") if k in meta} == recorded
    assert meta["metrics"]["train_soft"] > 0


def test_distill_refuses_beta_without_jsd_in_one_line(teacher_run, tmp_path, capsys):
    code = main(["distill", "--teacher", str(teacher_run), "-T", "3", "--out", str(tmp_path / "s"), "--beta", "0.5",
                 *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert err == "darkknowledge: error: beta is a parameter of jsd, not of forward_kl; drop it or choose " \
                  "divergence jsd"
    assert not (tmp_path / "s").exists()  # refused before the teacher is loaded or a folder made


def test_a_model_card_names_a_divergence_other_than_the_papers():
    from darkknowledge.model_card import _teacher_lines
    meta = {"objective": "distillation", "teacher": "t", **Distillation(4.0).describe()}
    assert not any("Soft term" in line for line in _teacher_lines(meta))
    jsd = {**meta, **Distillation(4.0, divergence="jsd", beta=0.3).describe()}
    assert "- Soft term: jsd, beta 0.3 instead of the paper's forward KL" in _teacher_lines(jsd)
