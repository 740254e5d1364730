"""§3's bias correction: shifting some classes' logits and choosing the offset on held-out data."""

import pytest
import torch

from darkknowledge.bias import search_bias_offset, shift_biases
from darkknowledge.errors import DarkKnowledgeError


def test_shift_biases_moves_only_the_named_columns():
    logits = torch.zeros(2, 4)
    shifted = shift_biases(logits, [1, 3], 2.5)
    assert shifted.tolist() == [[0, 2.5, 0, 2.5], [0, 2.5, 0, 2.5]]
    assert logits.abs().sum() == 0  # the input is not modified


def test_search_finds_the_offset_that_recovers_an_underconfident_class():
    # Class 2 is right behind the winner by 1.0 on the cases where it is the truth: +1.5 fixes all of them,
    # +4 fixes them but breaks the others.
    logits = torch.tensor([[3.0, 0.0, 2.0], [0.0, 3.0, 2.0], [0.0, 0.0, -2.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([2, 2, 0, 0])
    search = search_bias_offset(logits, labels, [2], [0.0, 1.5, 4.0])
    assert search.errors == [2, 0, 2]
    assert search.best_offset == 1.5 and search.best_errors == 0


def test_ties_go_to_the_smallest_change():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    assert search_bias_offset(logits, labels, [1], [-1.0, 0.5, 0.0, 1.0]).best_offset == 0.0


def test_bad_classes_or_no_offsets_are_refused():
    with pytest.raises(DarkKnowledgeError, match="bias classes"):
        shift_biases(torch.zeros(1, 3), [3], 1.0)
    with pytest.raises(DarkKnowledgeError, match="at least one"):
        search_bias_offset(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), [0], [])
