"""§5: specialist models for confusable subsets of classes, each with a dustbin class, and their combination.

- :mod:`.clustering`  class subsets from the covariance of the generalist's predictions (no labels needed) or
  from a confusion matrix, clustered with online k-means; saved as readable JSON.
- :mod:`.specialist`  a specialist: the generalist's body and a head for its subset plus one dustbin class,
  trained on batches half from its subset and half from the rest, then the dustbin logit corrected.
- :mod:`.combine`     inference: the generalist's top classes pick the active specialists, and the distribution
  q minimizing KL(p^g, q) + sum_m KL(p^m, q) is found for many cases at once.
- :mod:`.jobs`        whole jobs on a saved generalist run: cluster, train one or all specialists, evaluate.

The library never imports :mod:`.cli` (the ``darkknowledge specialists`` command).
"""

from .clustering import ClassSubsets, cluster_classes, confusion_matrix, prediction_covariance
from .combine import CombineResult, active_specialists, combine, combine_objective
from .specialist import (BalancedSampler, SpecialistConfig, dustbin_offset, make_specialist, relabel,
                         train_specialist)

__all__ = ["BalancedSampler", "ClassSubsets", "CombineResult", "SpecialistConfig", "active_specialists",
           "cluster_classes", "combine", "combine_objective", "confusion_matrix", "dustbin_offset",
           "make_specialist", "prediction_covariance", "relabel", "train_specialist"]
