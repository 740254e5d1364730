"""A language-model run written as a Hugging Face folder (``export RUN --format hf --out DIR``): the student's
``save_pretrained`` (config.json, model.safetensors) and its tokenizer in the Hugging Face format, so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it. The folder is
loaded back and must give the run's logits (the largest difference is reported) before it is moved into place:
a folder at ``--out`` is always a checked one.

Only ``hf:`` students have a Hugging Face architecture; a ``gpt:`` one is refused in one line naming
``--student hf:...``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import DarkKnowledgeError
from .language_model import save_tokenizer
from .pretrained import is_hf_folder, load_causal_lm
from .transformer import HFCausalLM

HF_FORMAT = "hf"
DEFAULT_HF_ATOL = 1e-4  # float32 logits of the same weights, loaded twice


def export_hf(run: str | os.PathLike, out: str | os.PathLike, atol: float = DEFAULT_HF_ATOL,
              check_tokens: int = 64, seed: int = 0) -> dict[str, Any]:
    """Write ``run``'s model as a Hugging Face folder ``out`` (which must not exist, or be empty), after checking
    that transformers loads it to the same logits on ``check_tokens`` random tokens; returns what was checked."""
    out = Path(out)
    if is_hf_folder(run):
        raise DarkKnowledgeError(f"{run} is already a Hugging Face folder; copy it instead of exporting it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DarkKnowledgeError(f"--out {out} exists and is not an empty folder; give a new folder")
    model, tokenizer, described = load_causal_lm(run)
    if not isinstance(model, HFCausalLM):
        raise DarkKnowledgeError(f"{run} holds a {described['spec']} model, which has no Hugging Face architecture; "
                                 "train the student as --student hf:gpt2,n_layer=...,n_embd=...,n_head=... to "
                                 "export it as a Hugging Face folder")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise DarkKnowledgeError("--format hf needs transformers: pip install 'darkknowledge[hf]'") from None
    inner = model.model
    for key in ("bos_token_id", "eos_token_id"):  # the run's end-of-document token, not the architecture's default
        setattr(inner.config, key, tokenizer.end_of_document)
        setattr(inner.generation_config, key, tokenizer.end_of_document)
    positions = min(check_tokens, described["max_positions"])
    ids = torch.randint(0, tokenizer.vocab_size, (2, positions), generator=torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        inner.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(staging, tokenizer)
        loaded = AutoModelForCausalLM.from_pretrained(staging, local_files_only=True, use_safetensors=True,
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            difference = float((loaded(input_ids=ids).logits - model(ids).float()).abs().max())
        if not difference <= atol:
            raise DarkKnowledgeError(f"the Hugging Face folder does not reproduce the run: max |logit difference| "
                                     f"{difference:.3g} > {atol:g}; nothing written")
        for path in [staging, *staging.iterdir()]:  # a folder to ship: readable by whoever loads it
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": str(out), "format": HF_FORMAT, "architecture": type(inner).__name__,
            "max_abs_difference": difference, "atol": atol, "checked_tokens": int(ids.numel()),
            "tokenizer": tokenizer.describe()}
