"""Models whose forward returns a Hugging Face output (``.logits``) work wherever a tensor-returning one does."""

import pytest
import torch
from torch import nn

from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import predict_logits
from darkknowledge.outputs import logits_of
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.training import Distillation, TrainConfig, fit


class WithLogits(nn.Module):
    """A classifier that answers as ``transformers`` models do: an object with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        return type("Output", (), {"logits": self.net(x)})()


def test_logits_are_read_from_tensors_outputs_and_dicts():
    t = torch.ones(2, 3)
    assert logits_of(t) is t and logits_of({"logits": t}) is t and logits_of(WithLogits().eval()(torch.ones(1, 4))).shape == (1, 3)
    with pytest.raises(DarkKnowledgeError, match="returned tuple, not logits"):
        logits_of((t,))


def test_a_model_with_logits_outputs_trains_evaluates_and_fills_a_store(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    teacher = WithLogits()
    fit(teacher, (x, y), config=TrainConfig(epochs=1, batch_size=16, lr=0.01))
    assert predict_logits(teacher, (x, y)).shape == (64, 3)
    store = SoftTargets.compute(teacher, (x, y), tmp_path, log=lambda _: None)
    assert torch.allclose(store.member_logits(range(64))[:, 0], predict_logits(teacher.net, x), atol=1e-5)
    student = WithLogits()
    result = fit(student, (x, y), config=TrainConfig(epochs=1, batch_size=16, lr=0.01),
                 objective=Distillation(teacher=teacher, temperature=2.0))
    assert result is not None
