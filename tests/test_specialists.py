"""§5 specialists: clustering recovers planted groups, the dustbin head and its correction match hand-computed
values, the 50/50 sampler's proportions, and the KL combination against a brute-force optimizer."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from darkknowledge import checkpoint
from darkknowledge.data import load_dataset
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.models import build_model
from darkknowledge.specialists.clustering import class_profiles
from darkknowledge.specialists.jobs import score_combination
from darkknowledge.specialists import (BalancedSampler, ClassSubsets, SpecialistConfig, active_specialists,
                                       cluster_classes, combine, combine_objective, confusion_matrix, dustbin_offset,
                                       make_specialist, prediction_covariance, relabel, train_specialist)
from darkknowledge.evaluation import predict_logits
from darkknowledge.specialists.specialist import (add_to_dustbin, calibrate_dustbin, collapse_logits, output_layer,
                                                  validation_scores)
from darkknowledge.training import TrainConfig, fit

PLANTED = [(0, 4, 8), (1, 5, 9), (2, 6, 10), (3, 7, 11)]  # interleaved, so index order gives nothing away


def planted_predictions(cases=3000, seed=0):
    """A generalist that confuses each class with the other two of its planted group, and little else."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 12, (cases,), generator=g)
    logits = torch.randn(cases, 12, generator=g)
    for group in PLANTED:
        mates = torch.isin(labels, torch.tensor(group))
        logits[mates.nonzero(), torch.tensor(group)] += 3 + torch.randn(int(mates.sum()), 3, generator=g)
    logits[torch.arange(cases), labels] += 3
    return torch.softmax(logits, 1), labels


# ---------------------------------------------------------------------------------------------------------------
# Clustering
# ---------------------------------------------------------------------------------------------------------------

def test_covariance_matches_numpy():
    probs, _ = planted_predictions(200)
    assert torch.allclose(prediction_covariance(probs), torch.from_numpy(np.cov(probs.double().numpy().T)))


@pytest.mark.parametrize("matrix", ["covariance", "confusion-soft", "confusion-hard"])
def test_clustering_recovers_planted_groups(matrix):
    probs, labels = planted_predictions()
    m = {"covariance": lambda: prediction_covariance(probs),
         "confusion-soft": lambda: confusion_matrix(probs, labels),
         "confusion-hard": lambda: confusion_matrix(probs, labels, soft=False)}[matrix]()
    found = cluster_classes(m, 4, seed=1)
    assert sorted(found.subsets) == sorted(PLANTED)
    assert found.params["unassigned_classes"] == []


def bridged_predictions(cases=4000, seed=0):
    """Groups (0, 1, 2), (3, 4, 5), (6, 7, 8), and class 9 confused with both of the first two groups."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (cases,), generator=g)
    logits = torch.randn(cases, 10, generator=g)
    for group in ((0, 1, 2), (3, 4, 5), (6, 7, 8)):
        mates = torch.isin(labels, torch.tensor(group))
        logits[mates.nonzero(), torch.tensor(group)] += 3 + torch.randn(int(mates.sum()), 3, generator=g)
    logits[(labels == 9).nonzero(), torch.arange(6)] += 2.5
    logits[labels < 6, 9] += 2.5
    logits[torch.arange(cases), labels] += 3
    return torch.softmax(logits, 1), labels


@pytest.mark.parametrize("correlation", [False, True])
def test_a_class_between_two_groups_joins_one_of_them(correlation):
    probs, _ = bridged_predictions()
    groups = {(0, 1, 2), (3, 4, 5), (6, 7, 8)}
    for seed in range(4):
        found = cluster_classes(prediction_covariance(probs, correlation=correlation), 3, seed=seed)
        assert len(found) == 3 and {tuple(c for c in s if c != 9) for s in found.subsets} == groups
        assert found.subsets[0] in ((0, 1, 2, 9), (0, 1, 2)) and found.membership()[:, 9].sum() == 1


def test_profiles_drop_the_diagonal_and_have_unit_length():
    probs, _ = planted_predictions(500)
    profiles = class_profiles(prediction_covariance(probs))
    assert torch.equal(profiles.diagonal(), torch.zeros(12, dtype=torch.float64))
    assert torch.allclose(profiles.norm(dim=0), torch.ones(12, dtype=torch.float64))
    raw = cluster_classes(prediction_covariance(probs), 4, normalize=False, seed=0)  # the paper, literally
    assert sorted(raw.subsets) == sorted(PLANTED) and raw.params["normalize"] is False


def test_overlap_lets_the_bridging_class_join_both_groups():
    probs, _ = bridged_predictions()
    correlation = prediction_covariance(probs, correlation=True)
    found = cluster_classes(correlation, 3, overlap=1, overlap_ratio=1.5, seed=0)
    assert set(found.subsets) == {(0, 1, 2, 9), (3, 4, 5, 9), (6, 7, 8)}
    # No ratio: every class joins its next-nearest cluster too (a cluster that then holds every class is dropped).
    everyone = cluster_classes(correlation, 3, overlap=1, seed=0)
    assert everyone.subsets == ((0, 1, 2, 3, 4, 5, 9), (6, 7, 8))


def test_subsets_json_round_trip_and_readable(tmp_path):
    subsets = ClassSubsets(((2, 0), (3, 4)), tuple("abcde"), "covariance", {"n_clusters": 2}, {"generalist": "g"})
    assert subsets.subsets == ((0, 2), (3, 4))
    subsets.save(tmp_path / "subsets.json")
    raw = json.loads((tmp_path / "subsets.json").read_text())
    assert raw["subsets"][0] == {"index": 0, "classes": [0, 2], "names": ["a", "c"]}
    assert ClassSubsets.load(tmp_path / "subsets.json") == subsets
    (tmp_path / "bad.json").write_text('{"subsets": []}')
    with pytest.raises(DarkKnowledgeError, match="not a darkknowledge subsets file"):
        ClassSubsets.load(tmp_path / "bad.json")
    with pytest.raises(DarkKnowledgeError, match="dustbin"):
        ClassSubsets(((0, 1, 2),), ("a", "b", "c"))
    assert subsets.coverage(torch.tensor([0, 1, 4])).tolist() == [1, 0, 1]


def test_clustering_rejects_bad_arguments():
    probs, _ = planted_predictions(100)
    cov = prediction_covariance(probs)
    for kwargs in ({"n_clusters": 0}, {"n_clusters": 13}, {"n_clusters": 4, "overlap": 4},
                   {"n_clusters": 4, "min_size": 0}):
        with pytest.raises(DarkKnowledgeError):
            cluster_classes(cov, **kwargs)
    with pytest.raises(DarkKnowledgeError, match="softmax outputs"):
        prediction_covariance(torch.randn(10, 4))


# ---------------------------------------------------------------------------------------------------------------
# The specialist model
# ---------------------------------------------------------------------------------------------------------------

def tiny_generalist(classes=5, spec="mlp:4"):
    torch.manual_seed(0)
    model = build_model(spec, (2, 2), classes)
    _, head = output_layer(model)
    with torch.no_grad():
        head.weight.copy_(torch.arange(classes * head.in_features, dtype=torch.float32).view(classes, -1))
        head.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0][:classes]))
    return model


def test_dustbin_head_hand_computed():
    generalist = tiny_generalist()
    specialist = make_specialist(generalist, [3, 1])
    _, head = output_layer(specialist)
    w = torch.arange(20, dtype=torch.float32).view(5, 4)
    assert torch.equal(head.weight[:2], w[[1, 3]])
    assert torch.equal(head.bias[:2], torch.tensor([1.0, 3.0]))
    assert torch.allclose(head.weight[2], (w[0] + w[2] + w[4]) / 3)
    assert head.bias[2].item() == pytest.approx((0 + 2 + 4) / 3 + math.log(3))
    body = {k: v for k, v in generalist.state_dict().items() if not k.startswith("net.3")}
    assert all(torch.equal(v, specialist.state_dict()[k]) for k, v in body.items())
    assert output_layer(generalist)[1].out_features == 5  # the generalist is untouched


def test_dustbin_is_exact_when_the_rest_agree():
    """With equal rows for the other classes, the specialist's distribution is the generalist's, collapsed."""
    generalist = build_model("cnn:tiny", (8, 8), 6)
    _, head = output_layer(generalist)
    with torch.no_grad():
        head.weight[[0, 2, 5]] = head.weight[0].clone()
        head.bias[[0, 2, 5]] = 0.3
    specialist = make_specialist(generalist, [1, 3, 4])
    x = torch.rand(7, 8, 8)
    expected = torch.softmax(collapse_logits(generalist(x), [1, 3, 4]), 1)
    assert torch.allclose(torch.softmax(specialist(x), 1), expected, atol=1e-6)


def test_dustbin_offset_hand_computed():
    assert dustbin_offset(0.2) == pytest.approx(math.log(4))
    assert dustbin_offset(0.03) == pytest.approx(math.log(97 / 3))
    assert dustbin_offset(0.5) == pytest.approx(0.0)
    assert dustbin_offset(0.1, subset_fraction=0.25) == pytest.approx(math.log(3))
    model = add_to_dustbin(tiny_generalist(), 1.5)
    assert output_layer(model)[1].bias.tolist() == [0.0, 1.0, 2.0, 3.0, 5.5]
    with pytest.raises(DarkKnowledgeError):
        dustbin_offset(0.0)


def test_offset_restores_the_natural_prior():
    """A specialist that learnt the 50/50 prior exactly, corrected, gives the natural-frequency posterior."""
    natural = torch.tensor([0.1, 0.1, 0.8])  # two subset classes, dustbin 80% of the data
    likelihood = torch.tensor([0.5, 0.3, 0.2])  # p(x | class) of one input
    trained_prior = torch.tensor([0.25, 0.25, 0.5])
    trained_logits = (likelihood * trained_prior).log()
    corrected = trained_logits.clone()
    corrected[-1] += dustbin_offset(0.2)
    assert torch.allclose(torch.softmax(corrected, 0), likelihood * natural / (likelihood * natural).sum())


def test_relabel_and_collapse():
    assert relabel(torch.tensor([0, 1, 2, 3, 4]), [3, 1], 5).tolist() == [2, 0, 2, 1, 2]
    logits = torch.randn(3, 5)
    collapsed = collapse_logits(logits, [1, 3])
    p = torch.softmax(logits, 1)
    assert torch.allclose(torch.softmax(collapsed, 1), torch.stack([p[:, 1], p[:, 3], p[:, [0, 2, 4]].sum(1)], 1))


# ---------------------------------------------------------------------------------------------------------------
# The 50/50 sampler
# ---------------------------------------------------------------------------------------------------------------

def test_sampler_proportions():
    inside, outside = torch.arange(0, 70), torch.arange(100, 1000)
    sampler = BalancedSampler(inside, outside, batch_size=32, subset_fraction=0.5)
    batches = sampler.epoch(torch.Generator().manual_seed(0))
    assert batches.shape == (5, 32)  # ceil(70 / 16) batches
    assert ((batches < 100).sum(1) == 16).all() and ((batches >= 100).sum(1) == 16).all()
    assert set(batches[:, :16].flatten().tolist()) == set(inside.tolist())  # every subset case each epoch
    assert len(set(batches[:, 16:].flatten().tolist())) == 80  # outside drawn without replacement
    again = sampler.epoch(torch.Generator().manual_seed(0))
    assert torch.equal(batches, again)
    quarter = BalancedSampler(inside, outside, batch_size=40, subset_fraction=0.25).epoch(torch.Generator())
    assert ((quarter < 100).sum(1) == 10).all()


def test_sampler_recycles_a_small_outside_set():
    batches = BalancedSampler(torch.arange(50), torch.arange(50, 55), 10).epoch(torch.Generator().manual_seed(1))
    outside = batches[:, 5:].flatten()
    assert torch.bincount(outside - 50).tolist() == [10] * 5  # 50 draws: each used equally often


# ---------------------------------------------------------------------------------------------------------------
# Training on digits
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_generalist():
    splits = load_dataset("digits")
    train, val = splits.train.subset(torch.arange(1000)), splits.train.subset(torch.arange(1000, 1348))
    torch.manual_seed(0)  # initial weights: the same generalist every run
    model = build_model("mlp:32", train.image_shape, 10)
    fit(model, train, val, TrainConfig(epochs=4, batch_size=32, progress=False), log=lambda _: None)
    return model.eval(), train, val, splits.test


def test_calibrated_dustbin_reproduces_the_generalist(digits_generalist):
    generalist, train, _, test = digits_generalist
    subset = [3, 5, 8]
    target = torch.softmax(collapse_logits(predict_logits(generalist, test.images), subset), 1)

    def divergence(model):  # KL(collapsed generalist || specialist) on test images
        log_q = torch.log_softmax(predict_logits(model, test.images), 1)
        return (target * (target.clamp_min(1e-30).log() - log_q)).sum(1).mean().item()

    start = make_specialist(generalist, subset)
    before = divergence(start)
    calibrated = calibrate_dustbin(start, generalist, subset, train.images)
    after = divergence(calibrated)
    assert after < before / 5 and after < 0.1  # 0.84 -> 0.06 nats on digits
    _, head = output_layer(calibrated)
    assert torch.equal(head.weight[:3], output_layer(generalist)[1].weight[subset])  # only the dustbin row moved


def test_train_specialist_saves_a_corrected_loadable_model(digits_generalist, tmp_path):
    generalist, train, val, _ = digits_generalist
    config = SpecialistConfig(TrainConfig(epochs=2, batch_size=32, lr=0.02, progress=False))
    meta = {"spec": "mlp:32", "image_shape": [8, 8]}
    model, result = train_specialist(generalist, [3, 5, 8], train, val, config, run_dir=tmp_path / "s",
                                     meta=meta, log=lambda _: None)
    natural = float(torch.isin(train.labels, torch.tensor([3, 5, 8])).double().mean())
    assert result.natural_fraction == pytest.approx(natural)
    assert result.dustbin_offset == pytest.approx(math.log((1 - natural) / natural))
    loaded, saved_meta = checkpoint.load_model(tmp_path / "s")
    assert saved_meta["classes"] == ["3", "5", "8", "dustbin"] and saved_meta["specialist"]["subset"] == [3, 5, 8]
    x = torch.rand(4, 8, 8)
    assert torch.allclose(loaded(x), model(x))
    # The saved weights carry the correction: scored with no further offset they give the logged numbers.
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    assert validation_scores(loaded, val, [3, 5, 8])["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    # A finished run is reused, not retrained; a second start without resume is refused.
    again, _ = train_specialist(generalist, [3, 5, 8], train, val, config, run_dir=tmp_path / "s", meta=meta,
                                resume=True, log=lambda _: None)
    assert torch.equal(again(x), model(x))
    with pytest.raises(DarkKnowledgeError, match="--resume"):
        train_specialist(generalist, [3, 5, 8], train, val, config, run_dir=tmp_path / "s", meta=meta)


def test_a_specialist_trains_through_fit_with_its_50_50_batches(digits_generalist, monkeypatch):
    from darkknowledge.specialists import specialist
    generalist, train, val, _ = digits_generalist
    seen = {}

    def spy(*args, **options):  # fit itself, with a callback that sees every trained epoch
        seen.update(sampler=options["sampler"], epochs=[])
        return fit(*args, callbacks=[lambda record: seen["epochs"].append(record["epoch"])], **options)

    monkeypatch.setattr(specialist, "fit", spy)
    config = SpecialistConfig(TrainConfig(epochs=2, batch_size=32, lr=0.02, progress=False))
    _, result = train_specialist(generalist, [3, 5, 8], train, val, config, log=lambda _: None)
    assert isinstance(seen["sampler"], BalancedSampler) and seen["epochs"] == [1, 2]
    assert [r["epoch"] for r in result.history] == [0, 1, 2]  # the untrained start scored as epoch 0


def test_a_run_saved_by_the_specialists_own_loop_still_resumes(digits_generalist, tmp_path):
    generalist, train, val, _ = digits_generalist
    config = SpecialistConfig(TrainConfig(epochs=2, batch_size=32, lr=0.02, progress=False))
    meta = {"spec": "mlp:32", "image_shape": [8, 8]}
    model, result = train_specialist(generalist, [3, 5, 8], train, val, config, run_dir=tmp_path, meta=meta,
                                     log=lambda _: None)
    # What the loop before fit saved: its own key and best epoch by "val_loss".
    saved = checkpoint.read_model_meta(tmp_path)
    old_meta = {**meta, "classes": saved["classes"], "specialist": saved["specialist"]}
    old_key = checkpoint.run_key(old_meta, train.fingerprint(), val.fingerprint(), json.dumps([3, 5, 8]),
                                 json.dumps(config.describe(), sort_keys=True))
    state = json.loads((tmp_path / checkpoint.STATE_META).read_text())
    best = next(r for r in state["history"] if r["epoch"] == result.best_epoch)
    checkpoint.write_json(tmp_path / checkpoint.STATE_META, {
        **state, "run_key": old_key, "best": {"epoch": result.best_epoch, "val_loss": best["val_loss"], "stale": 0}})
    lines = []
    again, _ = train_specialist(generalist, [3, 5, 8], train, val, config, run_dir=tmp_path, meta=meta,
                                resume=True, log=lines.append)
    x = torch.rand(4, 8, 8)
    assert torch.equal(again(x), model(x)) and not [line for line in lines if "epoch 1/" in line]


def test_soft_target_specialist_trains(digits_generalist):
    generalist, train, val, _ = digits_generalist
    config = SpecialistConfig(TrainConfig(epochs=1, batch_size=32, lr=0.02, progress=False), temperature=2.0)
    model, result = train_specialist(generalist, [1, 7], train, val, config, log=lambda _: None)
    assert "train_soft" in result.history[-1] and output_layer(model)[1].out_features == 3


# ---------------------------------------------------------------------------------------------------------------
# Combination
# ---------------------------------------------------------------------------------------------------------------

def brute_force(pg, specialists, subsets, active):
    """Minimise the objective written out directly, with scipy and finite-difference gradients."""
    c = len(pg)

    def objective(z):
        q = np.exp(z - z.max())
        q /= q.sum()
        total = np.sum(pg * (np.log(pg) - np.log(q)))
        for pm, subset, on in zip(specialists, subsets, active):
            if on:
                rest = [j for j in range(c) if j not in subset]
                qm = np.append(q[list(subset)], q[rest].sum())
                total += np.sum(pm * (np.log(pm) - np.log(qm)))
        return total

    found = minimize(objective, np.log(pg), method="BFGS", options={"gtol": 1e-10, "maxiter": 10000})
    q = np.exp(found.x - found.x.max())
    return q / q.sum(), found.fun


@pytest.mark.parametrize("seed", range(4))
def test_combination_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    subsets = [(0, 1, 2), (2, 3), (4, 5, 6), (1, 5)]  # overlapping
    cases = 6
    gl = torch.randn(cases, 7, generator=g, dtype=torch.float64) * 2
    sl = [torch.randn(cases, len(s) + 1, generator=g, dtype=torch.float64) * 2 for s in subsets]
    active = torch.rand(cases, 4, generator=g) < 0.6
    active[0] = True
    result = combine(gl, sl, subsets, active=active, tol=1e-10)
    assert result.gradient_norm.max() <= 1e-10
    ours = combine_objective(result.log_probs, gl, sl, subsets, active)
    for b in range(cases):
        pm = [torch.softmax(s[b], 0).numpy() for s in sl]
        q, value = brute_force(torch.softmax(gl[b], 0).numpy(), pm, subsets, active[b].tolist())
        assert ours[b].item() <= value + 1e-9
        assert np.allclose(result.probs[b].numpy(), q, atol=1e-5)


def test_no_active_specialist_keeps_the_generalist_exactly():
    gl = torch.randn(50, 10)
    subsets = [(0, 1), (2, 3)]
    sl = [torch.randn(50, 3), torch.randn(50, 3)]
    result = combine(gl, sl, subsets)
    expected = torch.log_softmax(gl.double(), 1)
    untouched = ~result.any_active
    top = gl.argmax(1)
    assert torch.equal(untouched, top >= 4)
    assert untouched.any() and torch.equal(result.log_probs[untouched], expected[untouched])
    none = combine(gl, sl, subsets, active=torch.zeros(50, 2, dtype=torch.bool))
    assert torch.equal(none.log_probs, expected) and none.iterations == 0


def test_specialist_agreeing_with_the_generalist_changes_nothing():
    gl = torch.randn(20, 8, dtype=torch.float64)
    subsets = [(1, 4, 6)]
    result = combine(gl, [collapse_logits(gl, subsets[0])], subsets, active=torch.ones(20, 1, dtype=torch.bool))
    assert torch.allclose(result.log_probs, torch.log_softmax(gl, 1), atol=1e-10)


def test_one_specialist_closed_form():
    """One active specialist: its subset gets (p^g + p^m) / 2 and the rest keeps the generalist's ratios."""
    gl = torch.randn(30, 6, dtype=torch.float64)
    sl = torch.randn(30, 3, dtype=torch.float64)
    result = combine(gl, [sl], [(0, 3)], active=torch.ones(30, 1, dtype=torch.bool), tol=1e-12)
    pg, pm, q = torch.softmax(gl, 1), torch.softmax(sl, 1), result.probs
    assert torch.allclose(q[:, [0, 3]], (pg[:, [0, 3]] + pm[:, :2]) / 2, atol=1e-10)
    rest = [1, 2, 4, 5]
    assert torch.allclose(q[:, rest] / q[:, rest].sum(1, keepdim=True), pg[:, rest] / pg[:, rest].sum(1, keepdim=True))
    assert torch.allclose(q.sum(1), torch.ones(30, dtype=torch.float64))


def test_active_specialists_by_top_n():
    gl = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]])
    subsets = [(0,), (1, 2), (3,)]
    assert active_specialists(gl, subsets, 1).tolist() == [[True, False, False], [False, False, True]]
    assert active_specialists(gl, subsets, 2).tolist() == [[True, True, False], [False, True, True]]
    with pytest.raises(DarkKnowledgeError, match="logits must be"):
        combine(gl, [torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)], subsets)


def test_digits_end_to_end_specialists_combine(digits_generalist):
    generalist, train, val, test = digits_generalist
    subsets = ClassSubsets(((3, 5, 8), (1, 7, 9)), train.classes)
    config = SpecialistConfig(TrainConfig(epochs=2, batch_size=32, lr=0.02, progress=False))
    models = [train_specialist(generalist, s, train, val, config, log=lambda _: None)[0] for s in subsets.subsets]
    gl = predict_logits(generalist, test.images)  # on the generalist's device (CUDA where trained there)
    sl = [predict_logits(m, test.images) for m in models]
    result = combine(gl, sl, subsets)
    assert torch.allclose(result.probs.sum(1), torch.ones(len(test), dtype=torch.float64))
    assert result.gradient_norm.max() <= 1e-6


def test_table3_and_table4_scores_by_hand():
    # 4 cases, classes 0..2. The generalist gets cases 0, 1 and 3 right; the combination 0, 2 and 3.
    labels = torch.tensor([0, 1, 2, 2])
    generalist = torch.tensor([[5.0, 0, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5]])
    combined = torch.tensor([[5.0, 0, 0], [5, 0, 0], [0, 0, 5], [0, 0, 5]]).log_softmax(1)
    active = torch.tensor([[True], [True], [True], [False]])
    coverage = torch.tensor([1, 1, 2, 2])
    s = score_combination(generalist, combined, labels, active, coverage)
    assert s["overall"]["delta_correct"] == 0 and s["overall"]["relative_gain"] == 0
    assert s["conditional"]["cases"] == 3 and s["active_specialists_per_case"] == 0.75
    one, two = s["by_coverage"]["1"], s["by_coverage"]["2"]
    assert (one["delta_correct"], one["relative_gain"], two["delta_correct"], two["relative_gain"]) == (-1, -0.5, 1, 1)
    # Per-case changes (0, -1) and (+1, 0): population sd 0.5, times sqrt(2 cases).
    assert one["delta_correct_se"] == pytest.approx(0.5 * 2 ** 0.5) == two["delta_correct_se"]
    assert s["overall"]["delta_correct_se"] == pytest.approx((0.5 ** 0.5) * 2)
