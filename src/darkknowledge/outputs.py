"""What a model's forward returns, read as logits: a tensor, or a Hugging Face output (``.logits``), or a dict
with ``"logits"``. Every place that runs a model (the loop, the store, evaluation, ensembles) reads it here, so a
``transformers`` model works wherever a plain module does."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .errors import DarkKnowledgeError


def logits_of(output: Any) -> Tensor:
    """The logits in ``output``; one line naming what came back when there are none."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise DarkKnowledgeError(f"the model returned {type(output).__name__}, not logits: return a tensor "
                             "[batch, ..., classes] or an output with .logits")


@torch.no_grad()
def logits_width(model: nn.Module) -> int:
    """How many logits a language model gives a token: one forward of one token (id 0), where the model is."""
    device = next(model.parameters(), torch.empty(0)).device
    return logits_of(model(torch.zeros(1, 1, dtype=torch.int64, device=device))).shape[-1]


@contextmanager
def first_logits(model: nn.Module, count: int) -> Iterator[nn.Module]:
    """While inside: ``model``'s forward gives its first ``count`` logits only (a language model's real tokens, its
    padding rows left out of every softmax). A forward hook, not a wrapper: the model being trained keeps its own
    parameter names, so its checkpoints and what is saved are the plain model, padding rows included."""
    handle = model.register_forward_hook(lambda module, inputs, output: logits_of(output)[..., :count])
    try:
        yield model
    finally:
        handle.remove()
