"""One table of the bounds every numeric setting keeps, read by the command line, ``--config`` TOML files
(:mod:`darkknowledge.options`) and the library (``TrainConfig``, ``Distillation``, the divergences' parameters),
so a value the command line refuses is refused from Python too, with the same range in the message.
"""

from __future__ import annotations

import math
import numbers

from .errors import DarkKnowledgeError

SEED_MAX = 2**63 - 1  # seeds and their offsets (member i's seed + i, epoch seeds) stay within torch's 64 bits

# Ranges, by setting name: (low, high, low included, high included). An integer or number option not named here
# is bounded to what 64 bits hold.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 1_000_000, True, True),
    "batch_size": (1, 10_000_000, True, True),
    "lr": (0, 100, False, True),
    "momentum": (0, 1, True, False),
    "weight_decay": (0, 1, True, True),
    "jitter": (0, 64, True, True),
    "seed": (0, SEED_MAX, True, True),
    "val_seed": (0, SEED_MAX, True, True),
    "val_size": (0, 1_000_000_000, True, True),
    "patience": (1, 1_000_000, True, True),
    "step_epochs": (1, 1_000_000, True, True),
    "grad_accumulation": (1, 1_000_000, True, True),
    "clip_grad_norm": (0, 1e300, False, True),
    "warmup": (0, 1, True, False),  # a fraction of all steps
    "members": (1, 1000, True, True),
    "temperature": (0, 10_000, False, True),
    "soft_weight": (0, 1000, True, True),
    "hard_weight": (0, 1000, True, True),
    "beta": (0, 1, True, True),  # the generalized JSD's weight of the teacher (losses.DIVERGENCES)
    "top_k": (1, 1_000_000, True, True),
    "loss_chunk_mb": (0, 1_000_000, False, True),  # the soft term's working memory per chunk (losses.chunk_rows_for)
    "max_length": (2, 1_000_000, True, True),  # tokens per text of a text table
    "context": (1, 1_000_000, True, True),  # tokens a window of a text corpus
    "split_seed": (0, SEED_MAX, True, True),
    "vocab_size": (2, 10_000_000, True, True),
    "head": (0, 1_000_000, True, True),  # a sampled store's exact tokens
    "samples": (1, 1_000_000, True, True),  # a sampled store's draws
    "atol": (0, 1000, False, True),
    "threads": (1, 1024, True, True),
    "jobs": (1, 1024, True, True),
    "calls": (1, 10_000_000, True, True),
    "clusters": (1, 100_000, True, True),
    "overlap": (0, 100_000, True, True),
    "overlap_ratio": (0, 1, True, True),
    "min_size": (1, 100_000, True, True),
    "subset_fraction": (0, 1, False, False),
    "top_n": (1, 100_000, True, True),
    "tol": (0, 1, True, True),
}
ANY_INT = (-(2**63), 2**63 - 1, True, True)
ANY_NUMBER = (-1e300, 1e300, True, True)


def problem(name: str, value, integer: bool = False) -> str | None:
    """What is wrong with ``value`` for the setting ``name`` (a whole number if ``integer``), or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return "must be a whole number" if integer else "must be a number"
    if not math.isfinite(value):
        return "must be a finite number"
    low, high, low_in, high_in = RANGES.get(name, ANY_INT if integer else ANY_NUMBER)
    if (low <= value if low_in else low < value) and (value <= high if high_in else value < high):
        return None

    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"
    return f"must be in {'[' if low_in else '('}{show(low)}, {show(high)}{']' if high_in else ')'}"


def check(name: str, value, integer: bool = False, what: str = "setting"):
    """``value`` if it keeps its range; else a one-line :class:`DarkKnowledgeError` naming ``what name``."""
    found = problem(name, value, integer)
    if found:
        raise DarkKnowledgeError(f"{what} {name} {found}, got {value!r}")
    return value
