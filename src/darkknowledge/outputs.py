"""What a model's forward returns, read as logits: a tensor, or a Hugging Face output (``.logits``), or a dict
with ``"logits"``. Every place that runs a model (the loop, the store, evaluation, ensembles) reads it here, so a
``transformers`` model works wherever a plain module does."""

from __future__ import annotations

from typing import Any

from torch import Tensor

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
