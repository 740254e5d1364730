"""Refuse a model that cannot fit in memory before allocating it, with its size in the message.

The model is first built on PyTorch's ``meta`` device (shapes only, no storage) to count its parameters.
"""

from __future__ import annotations

import os

import torch

from .errors import DarkKnowledgeError
from .models import FACTORY, build_model, parse_spec
from .transformer import count_parameters

# Float32 copies of the parameters training holds at once: weights, gradients, SGD momentum, the best epoch's
# weights and the copy written to a checkpoint.
TRAINING_COPIES = 5


def available_bytes() -> int:
    """Memory the kernel says a new allocation can use (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(spec, input_shape: tuple[int, ...], num_classes: int, options: dict | None = None,
               copies: int = TRAINING_COPIES) -> None:
    """Raise a one-line error if ``copies`` float32 copies of the ``spec`` model's parameters exceed the memory
    available now. A user's factory (``package.module:factory``) and a Hugging Face classifier are not checked:
    their code may not run on ``meta``."""
    kind = parse_spec(spec, options).kind
    if kind in (FACTORY, "hf-classifier"):  # a classifier's folder is read from disk, not built on meta
        return
    if kind in ("gpt", "hf"):  # language models: input_shape is (context,), num_classes the vocabulary
        parameters = count_parameters(str(spec), num_classes, input_shape[-1] if input_shape else None)
    else:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in build_model(spec, tuple(input_shape), num_classes,
                                                            options).parameters())
    needed, available = parameters * 4 * copies, available_bytes()
    if needed > available:
        raise DarkKnowledgeError(f"model {spec} has {parameters:,} parameters ({parameters * 4 / 1e9:.3g} GB as "
                                 f"float32; about {needed / 1e9:.3g} GB to train or load with its copies) but "
                                 f"{available / 1e9:.3g} GB of memory is available; choose a smaller model")
