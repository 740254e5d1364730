"""§3's bias correction: a student that never (or rarely) saw some classes in its transfer set can still have
learned them from the soft targets, but their output biases are off. Shifting those classes' logits by one
offset (the same as adding it to their output biases) recovers them; the offset is chosen on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import DarkKnowledgeError


def shift_biases(logits: torch.Tensor, classes: Sequence[int], offset: float) -> torch.Tensor:
    """``logits`` with ``offset`` added to the given classes' columns (a raised or lowered output bias)."""
    classes = list(classes)
    if not classes or min(classes) < 0 or max(classes) >= logits.shape[1]:
        raise DarkKnowledgeError(f"bias classes {classes} must be non-empty and lie in 0..{logits.shape[1] - 1}")
    shifted = logits.clone()
    shifted[:, classes] += offset
    return shifted


@dataclass
class BiasSearch:
    """Errors of every offset tried on one set of logits, and the offset with the fewest."""

    offsets: list[float]
    errors: list[int]

    @property
    def best_offset(self) -> float:
        # Ties go to the smallest |offset|: the least change that does as well.
        return min(zip(self.errors, (abs(o) for o in self.offsets), self.offsets))[2]

    @property
    def best_errors(self) -> int:
        return self.errors[self.offsets.index(self.best_offset)]


def search_bias_offset(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                       offsets: Sequence[float]) -> BiasSearch:
    """Count errors after shifting ``classes``' logits by each of ``offsets``. Choose on validation data."""
    if len(offsets) == 0:
        raise DarkKnowledgeError("give at least one bias offset to try")
    errors = [int((shift_biases(logits, classes, o).argmax(1) != labels).sum()) for o in offsets]
    return BiasSearch([float(o) for o in offsets], errors)
