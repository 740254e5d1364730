"""Language models' speed, side by side (``bench T S`` given language-model runs or Hugging Face folders): prompt
tokens a second (one forward over a prompt of P tokens at batch 1, the prefill) and decode tokens a second
(greedy, one token a step: a Hugging Face model through its ``generate`` with its cache, a ``gpt:`` model by
reading its window again each step, as :func:`darkknowledge.language_model.generate` does). Each is the median
of a few timed repeats after an untimed one.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint
from .bench import machine, torch_threads
from .errors import DarkKnowledgeError
from .pretrained import load_causal_lm
from .transformer import HFCausalLM


def _median_seconds(call: Callable[[], Any], repeats: int) -> float:
    call()  # untimed: lazy allocation, thread pools
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _greedy(model: torch.nn.Module, ids: torch.Tensor, tokens: int, eos: int, context: int) -> None:
    if isinstance(model, HFCausalLM):
        model.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=eos, attention_mask=torch.ones_like(ids))
        return
    out = ids
    for _ in range(tokens):
        out = torch.cat([out, model(out[:, -context:])[:, -1:].argmax(-1)], 1)


def bench_causal_lm(source: str | os.PathLike, prompt_tokens: int = 64, decode_tokens: int = 32, repeats: int = 3,
                    threads: int = 1) -> dict[str, Any]:
    if min(prompt_tokens, decode_tokens, repeats) < 1:
        raise DarkKnowledgeError("bench: prompt tokens, decode tokens and repeats must be at least 1")
    model, tokenizer, described = load_causal_lm(source)
    context = described["max_positions"] or prompt_tokens + decode_tokens
    prompt = prompt_tokens
    if prompt + decode_tokens > context:  # prompt and answer within the model's positions: half each
        prompt, decode_tokens = max(1, context // 2), max(1, context - max(1, context // 2))
    ids = torch.randint(0, tokenizer.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch_threads(threads), torch.no_grad():
        prefill = _median_seconds(lambda: model(ids), repeats)
        decode = _median_seconds(lambda: _greedy(model, ids, decode_tokens, tokenizer.end_of_document, context),
                                 repeats)
    return {"run": str(source), "kind": described["kind"],
            "model": described.get("spec") or described.get("architecture"),
            "parameters": sum(p.numel() for p in model.parameters()), "prompt_tokens": prompt,
            "prompt_tokens_per_s": prompt / prefill, "decode_tokens": decode_tokens,
            "decode_tokens_per_s": decode_tokens / decode}


def bench_causal_lms(sources: list[str | os.PathLike], threads: int = 1,
                     log: Callable[[str], None] | None = None, **options: int) -> dict[str, Any]:
    """Each model in turn (never in parallel: they would compete for the cores); one JSON-ready dict."""
    models = []
    for source in sources:
        if log:
            log(f"benchmarking {source} ...")
        models.append(bench_causal_lm(source, threads=threads, **options))
    return {"config": {"threads": threads, **options}, "machine": machine(), "provenance": checkpoint.provenance(),
            "models": models}


def format_lm_table(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`bench_causal_lms`; speeds also relative to the first model."""
    models = result["models"]
    lines = ["| model | spec | parameters | prompt tokens/s | x first | decode tokens/s | x first |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m in models:
        lines.append(f"| {m['run']} | {m['model']} | {m['parameters']:,} | {m['prompt_tokens_per_s']:,.0f} | "
                     f"{m['prompt_tokens_per_s'] / models[0]['prompt_tokens_per_s']:.2f}x | "
                     f"{m['decode_tokens_per_s']:,.0f} | "
                     f"{m['decode_tokens_per_s'] / models[0]['decode_tokens_per_s']:.2f}x |")
    title = (f"batch 1, greedy decoding, {result['config']['threads']} thread(s); {result['machine']['cpu']}, "
             f"torch {result['machine']['torch']}")
    return title + "\n\n" + "\n".join(lines)
