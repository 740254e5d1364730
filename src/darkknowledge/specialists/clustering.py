"""§5: which classes a specialist covers, found by clustering the classes the generalist confuses.

The paper clusters the columns of the covariance matrix of the generalist's predictions with online k-means;
no true labels are needed. Two classes the generalist confuses rise and fall together across cases (both get
probability on the same images), so their columns of the covariance matrix are close. The paper's conclusion
speaks of the confusion matrix instead; :func:`confusion_matrix` gives that variant (it needs labels).

Subsets may overlap: with ``overlap=k`` every class also joins the ``k`` clusters whose centres are nearest
after its own. A :class:`ClassSubsets` is saved as readable JSON (class indices and names per subset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import checkpoint, schemas
from ..errors import DarkKnowledgeError

SUBSETS_FORMAT = "darkknowledge-subsets/1"


def _check_probabilities(probs: Tensor, name: str = "probabilities") -> Tensor:
    if not isinstance(probs, Tensor) or probs.dim() != 2 or probs.shape[0] < 2 or probs.shape[1] < 2:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise DarkKnowledgeError(f"{name} must be a [cases, classes] tensor with at least 2 of each, got {shape}")
    probs = probs.detach().to(torch.float64)
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise DarkKnowledgeError(f"{name} must be finite and >= 0 (softmax outputs, not logits)")
    if (probs.sum(1) - 1).abs().max() > 1e-3:
        raise DarkKnowledgeError(f"rows of {name} must sum to 1 (softmax outputs, not logits)")
    return probs


def prediction_covariance(probs: Tensor, correlation: bool = False) -> Tensor:
    """Covariance ``[C, C]`` (float64) of the generalist's predicted probabilities ``[N, C]`` over N cases.

    Entry (i, j) is the covariance across cases of p_i and p_j; labels play no part (§5). ``correlation=True``
    divides it by the standard deviations (unit diagonal), so that classes whose probabilities vary much more
    than others' (frequent or hard classes) do not dominate the distances k-means sees.
    """
    probs = _check_probabilities(probs)
    centred = probs - probs.mean(0, keepdim=True)
    covariance = centred.T @ centred / (len(probs) - 1)
    if correlation:
        sd = covariance.diagonal().sqrt().clamp_min(1e-12)
        covariance = covariance / sd.unsqueeze(0) / sd.unsqueeze(1)
    return covariance


def confusion_matrix(probs: Tensor, labels: Tensor, soft: bool = True) -> Tensor:
    """Symmetric confusion ``[C, C]`` (float64) between classes, from predictions and true labels.

    Row i of the raw matrix is the mean predicted distribution over the cases of class i (``soft``), or the
    fraction of them predicted as each class (``soft=False``: argmax counts). Rows of absent classes are zero.
    The result is the raw matrix plus its transpose, halved: "i taken for j" and "j taken for i" both count.
    """
    probs = _check_probabilities(probs)
    if not isinstance(labels, Tensor) or labels.shape != probs.shape[:1]:
        raise DarkKnowledgeError(f"labels must be a tensor of {len(probs)} class indices, one per case")
    num_classes = probs.shape[1]
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DarkKnowledgeError(f"labels must lie in 0..{num_classes - 1}")
    predicted = probs if soft else torch.nn.functional.one_hot(probs.argmax(1), num_classes).double()
    raw = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, labels, predicted)
    raw /= torch.bincount(labels, minlength=num_classes).clamp(min=1).double().unsqueeze(1)
    return (raw + raw.T) / 2


@dataclass(frozen=True)
class ClassSubsets:
    """The class subsets of a set of specialists, with where they came from.

    ``subsets[m]`` is the sorted tuple of class indices specialist ``m`` covers (its dustbin is every other class).
    """

    subsets: tuple[tuple[int, ...], ...]
    class_names: tuple[str, ...]
    method: str = "given"
    params: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # e.g. the generalist run and data it was computed on

    def __post_init__(self) -> None:
        subsets = tuple(tuple(sorted({int(c) for c in s})) for s in self.subsets)
        num_classes = len(self.class_names)
        for index, subset in enumerate(subsets):
            if not subset:
                raise DarkKnowledgeError(f"subset {index} is empty; every specialist needs at least one class")
            if subset[0] < 0 or subset[-1] >= num_classes:
                raise DarkKnowledgeError(f"subset {index} holds class indices outside 0..{num_classes - 1}")
            if len(subset) == num_classes:
                raise DarkKnowledgeError(f"subset {index} holds every class; a specialist needs a non-empty dustbin")
        object.__setattr__(self, "subsets", subsets)
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))

    def __len__(self) -> int:
        return len(self.subsets)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def membership(self) -> Tensor:
        """Boolean ``[specialists, classes]``: True where the specialist covers the class."""
        member = torch.zeros(len(self.subsets), self.num_classes, dtype=torch.bool)
        for m, subset in enumerate(self.subsets):
            member[m, list(subset)] = True
        return member

    def coverage(self, labels: Tensor) -> Tensor:
        """How many specialists cover each case's class (Table 4's column)."""
        return self.membership().sum(0)[labels.long()]

    def describe(self) -> list[str]:
        return [f"{m}: " + " ".join(self.class_names[c] for c in subset) for m, subset in enumerate(self.subsets)]

    def to_dict(self) -> dict[str, Any]:
        return {"format": SUBSETS_FORMAT, "method": self.method, "params": self.params, "source": self.source,
                "num_classes": self.num_classes, "class_names": list(self.class_names),
                "subsets": [{"index": m, "classes": list(s), "names": [self.class_names[c] for c in s]}
                            for m, s in enumerate(self.subsets)]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "subsets") -> ClassSubsets:
        if isinstance(data, dict) and data.get("format") == SUBSETS_FORMAT:
            schemas.check(schemas.SubsetsFile, data, where, "make it again with 'darkknowledge specialists cluster'")
        try:
            if data.get("format") != SUBSETS_FORMAT:
                raise KeyError("format")
            subsets = [entry["classes"] for entry in sorted(data["subsets"], key=lambda e: e["index"])]
            return cls(tuple(tuple(s) for s in subsets), tuple(data["class_names"]), data.get("method", "given"),
                       dict(data.get("params", {})), dict(data.get("source", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise DarkKnowledgeError(f"{where} is not a darkknowledge subsets file (bad or missing {e}); make one "
                                     f"with 'darkknowledge specialists cluster'") from None

    def save(self, path: str | Path) -> None:
        """Write as indented JSON, atomically (a crash leaves the old file or the new one)."""
        checkpoint.write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ClassSubsets:
        return cls.from_dict(checkpoint.read_json(Path(path), "subsets"), str(path))


def class_profiles(matrix: Tensor) -> Tensor:
    """The vectors k-means clusters by default: the matrix's columns with the diagonal set to zero, each scaled
    to unit length.

    The paper clusters the columns as they are. Their diagonal (a class's own variance, or its accuracy in a
    confusion matrix) is much larger than the rest, so every well-classified class sits near a multiple of its
    own unit vector, all about equally far apart; k-means then makes one cluster of most of them. On MNIST-100
    the raw covariance gave one cluster of 82 of the 100 classes. Without the diagonal and with unit length, a
    column says only *which* classes this one goes with, and the clusters are the confusable groups
    (00-09, 11-19, numbers made of 3s, 5s and 8s, of 4s, 7s and 9s, ...).
    """
    profiles = matrix.detach().to(torch.float64).clone()
    profiles.fill_diagonal_(0)
    return profiles / profiles.norm(dim=0, keepdim=True).clamp_min(1e-300)


def cluster_classes(matrix: Tensor, n_clusters: int, *, overlap: int = 0, overlap_ratio: float | None = None,
                    min_size: int = 2, normalize: bool = True, seed: int = 0, batch_size: int = 1024,
                    n_init: int = 10,
                    class_names: tuple[str, ...] | None = None, method: str = "covariance",
                    source: dict[str, Any] | None = None) -> ClassSubsets:
    """Cluster the columns of a square class-by-class ``matrix`` (:func:`prediction_covariance` or
    :func:`confusion_matrix`) into at most ``n_clusters`` class subsets with online k-means (scikit-learn's
    MiniBatchKMeans): ``n_init`` seeded runs, the one with the lowest inertia kept.

    ``overlap``: each class also joins its ``overlap`` next-nearest clusters (by distance to their centres),
    only those within ``overlap_ratio`` times its distance to its own centre when that is given.
    ``min_size``: clusters with fewer classes (before overlap) are dropped; their classes get no specialist.
    ``normalize``: cluster :func:`class_profiles` (default) rather than the raw columns (the paper, literally).
    Subsets are sorted by their smallest class, so the same seed gives the same numbering.
    """
    from sklearn.cluster import MiniBatchKMeans  # imported here: scikit-learn takes a second to import

    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise DarkKnowledgeError("the matrix to cluster must be square [classes, classes]")
    num_classes = matrix.shape[0]
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= num_classes:
        raise DarkKnowledgeError(f"n_clusters must be an integer in 1..{num_classes}, got {n_clusters!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < n_clusters:
        raise DarkKnowledgeError(f"overlap must be an integer in 0..{n_clusters - 1}, got {overlap!r}")
    if overlap_ratio is not None and not (math.isfinite(overlap_ratio) and overlap_ratio >= 1):
        raise DarkKnowledgeError(f"overlap_ratio must be a number >= 1 or unset, got {overlap_ratio!r}")
    if not isinstance(min_size, int) or min_size < 1:
        raise DarkKnowledgeError(f"min_size must be an integer >= 1, got {min_size!r}")
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(num_classes))
    if len(names) != num_classes:
        raise DarkKnowledgeError(f"{len(names)} class names for a {num_classes}-class matrix")

    columns = (class_profiles(matrix) if normalize else matrix.detach().to(torch.float64))
    columns = columns.T.contiguous().numpy()  # row j: column j of the matrix
    # MiniBatchKMeans's own n_init picks the best start by its inertia on a sample before the online updates;
    # whole runs from n_init seeds, kept by final inertia over every column, are much more stable.
    kmeans = min((MiniBatchKMeans(n_clusters=n_clusters, random_state=seed * 1000 + run, batch_size=batch_size,
                                  n_init=1).fit(columns) for run in range(n_init)), key=lambda km: km.inertia_)
    assignment = kmeans.predict(columns)
    distances = kmeans.transform(columns)  # [classes, clusters]: distance of each column to each centre
    members = [set(np.flatnonzero(assignment == k).tolist()) for k in range(n_clusters)]
    kept = [k for k in range(n_clusters) if len(members[k]) >= min_size]
    if overlap:
        for c in range(num_classes):
            own = distances[c, assignment[c]]
            others = [k for k in np.argsort(distances[c], kind="stable") if k != assignment[c] and k in kept]
            for k in others[:overlap]:
                if overlap_ratio is None or distances[c, k] <= overlap_ratio * own:
                    members[k].add(c)
    subsets = sorted((tuple(sorted(members[k])) for k in kept), key=lambda s: (s[0], s))
    subsets = [s for s in subsets if len(s) < num_classes]  # one cluster of everything would have no dustbin
    if not subsets:
        raise DarkKnowledgeError(f"clustering {num_classes} classes into {n_clusters} left no subset with at least "
                                 f"{min_size} classes and a dustbin; choose more clusters, less overlap or a "
                                 f"smaller min_size")
    params = {"n_clusters": n_clusters, "overlap": overlap, "overlap_ratio": overlap_ratio, "min_size": min_size,
              "normalize": normalize, "seed": seed, "batch_size": batch_size, "n_init": n_init, "algorithm": "sklearn MiniBatchKMeans",
              "inertia": float(kmeans.inertia_),
              "unassigned_classes": sorted(set(range(num_classes)) - set().union(*map(set, subsets)))}
    return ClassSubsets(tuple(subsets), names, method, params, dict(source or {}))
