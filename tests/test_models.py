import pytest
import torch

from darkknowledge.augment import jitter, jitter_offsets, translate
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.models import MLP, build_model, count_parameters, parse_spec


def test_mlp_spec_builds_the_papers_teacher():
    model = build_model("mlp:1200x2,dropout=0.5,input_dropout=0.2,max_norm=3.5", (28, 28), 10)
    assert isinstance(model, MLP)
    # 784-1200-1200-10 with biases
    assert count_parameters(model) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.5, 0.5]
    assert model(torch.rand(4, 28, 28)).shape == (4, 10)


def test_spec_sizes_forms_and_canonical_string():
    assert parse_spec("mlp:500-300").sizes == (500, 300)
    assert parse_spec("mlp:30x2").sizes == (30, 30)
    spec = parse_spec("mlp:800x2,max_norm=3.5")
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("spec", ["mlp", "mlp:", "mlp:axb", "mlp:0x2", "rnn:10", "mlp:10,dropout=1.5",
                                  "mlp:10,colour=red", "cnn:huge", "mlp:10,max_norm=-1"])
def test_bad_specs_raise_one_line_errors(spec):
    with pytest.raises(DarkKnowledgeError) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value) and spec in str(info.value)


def test_cnn_handles_each_image_size():
    for shape, classes in [((8, 8), 10), ((28, 28), 10), ((28, 56), 100)]:
        assert build_model("cnn:small", shape, classes)(torch.rand(2, *shape)).shape == (2, classes)


def test_max_norm_bounds_each_hidden_units_incoming_weights_only():
    model = build_model("mlp:20x2,max_norm=1.0", (4, 4), 3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer in linears:
            layer.weight.mul_(100)
    before_output = linears[-1].weight.clone()
    model.apply_constraints()
    for layer in linears[:-1]:
        assert torch.allclose(layer.weight.norm(dim=1), torch.ones(layer.out_features), atol=1e-5)
    assert torch.equal(linears[-1].weight, before_output)  # the output layer is not a hidden unit


def test_jitter_translates_each_image_within_bounds_and_zero_fills():
    images = torch.zeros(500, 9, 9, dtype=torch.uint8)
    images[:, 4, 4] = 255  # one bright pixel in the centre: its new place gives the shift
    shifted = jitter(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert (shifted.flatten(1).sum(1) == 255).all()  # pixel moved, not lost or duplicated
    rows, cols = (shifted == 255).nonzero()[:, 1], (shifted == 255).nonzero()[:, 2]
    assert rows.min() == 2 and rows.max() == 6 and cols.min() == 2 and cols.max() == 6
    # shifts differ per image, and every one of the 25 offsets occurs
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 25


@pytest.mark.parametrize("shape", [(16, 7, 9), (16, 3, 7, 9)])
def test_translate_moves_each_image_by_its_own_offsets(shape):
    images = torch.rand(shape)
    offsets = jitter_offsets(len(images), 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    expected = torch.stack([padded[i, ..., dy:dy + shape[-2], dx:dx + shape[-1]]
                            for i, (dy, dx) in enumerate(offsets[:, :, 0].t().tolist())])
    assert torch.equal(translate(images, offsets, 2), expected)


def test_jitter_zero_is_identity_and_seeded():
    images = torch.randint(0, 255, (8, 6, 6), dtype=torch.uint8)
    assert jitter(images, 0) is images
    a = jitter(images, 1, torch.Generator().manual_seed(3))
    b = jitter(images, 1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
