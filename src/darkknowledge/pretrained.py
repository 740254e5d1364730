"""Where a language model and its tokenizer come from: a darkknowledge language-model run folder (and, as the
issue "Distil your own language model" lands, a local Hugging Face folder). Every verb that takes ``--teacher`` or
``--student PATH`` for text reads it through :func:`load_causal_lm`, so they all accept the same things."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .data.text import TextTokenizer
from .language_model import load_language_model, load_run_tokenizer


def load_causal_lm(source: str | Path) -> tuple[nn.Module, TextTokenizer, dict[str, Any]]:
    """``(model in eval mode, its tokenizer, what it is)`` for the folder ``source``."""
    model, meta = load_language_model(source)
    return model, load_run_tokenizer(Path(source), meta), {"source": str(source), "kind": "darkknowledge",
                                                            "spec": meta["spec"], "vocab_size": meta["vocab_size"],
                                                            "context": meta["context"]}
