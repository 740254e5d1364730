"""Whole specialist jobs on a saved generalist run, as the CLI and the experiments use them.

A specialists folder holds::

    subsets.json          the class subsets, and the generalist run (path, weights checksum) they were found for
    specialist-00/        one run directory per specialist (model.safetensors + model.json, state.json)
    specialist-01/ ...

Each specialist is trained on its own and written to its own folder, so separate processes (or machines sharing
the folder) can each train some of them: ``train_specialists(folder, indices=[0, 3])``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import checkpoint
from ..data import LabeledImages
from ..distributed import Workers, current
from ..errors import DarkKnowledgeError
from ..evaluation import predict_logits
from ..jobs import DataChoice, check_compatible
from .clustering import ClassSubsets, cluster_classes, confusion_matrix, prediction_covariance
from .combine import DEFAULT_TOL, combine
from .specialist import SpecialistConfig, train_specialist, validation_scores

SUBSETS_FILE = "subsets.json"
METHODS = ("covariance", "correlation", "confusion")


def specialist_dir(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"specialist-{index:02d}"


def generalist_data(meta: dict[str, Any], data_dir: str | None = None) -> DataChoice:
    """The data a saved model was trained with, as its sidecar records it."""
    if meta.get("data"):  # a user's files
        return DataChoice.from_meta({k: v for k, v in meta.items() if k != "train_subset"}, data_dir)
    classes = meta.get("train_classes")
    return DataChoice(meta["dataset"], data_dir, val_size=meta["validation"]["size"],
                      val_seed=meta["validation"]["seed"], subset=meta.get("subset"),
                      train_classes=tuple(classes) if classes else None)


def _load_generalist(run: str | Path, data_dir: str | None):
    run = checkpoint.resolve_run_dir(run)
    model, meta = checkpoint.load_model(run)
    train, val, test = generalist_data(meta, data_dir).load()
    check_compatible(meta, train, run)
    return model, meta, (train, val, test)


def cluster_run(generalist: str | Path, out: str | Path, n_clusters: int, method: str = "covariance",
                overlap: int = 0, overlap_ratio: float | None = None, min_size: int = 2, seed: int = 0,
                data_dir: str | None = None, normalize: bool = True) -> ClassSubsets:
    """Find class subsets for a saved generalist and write ``out/subsets.json``.

    ``covariance`` (§5): the generalist's predictions on its training split, no labels used; ``correlation``: the
    same scaled to unit diagonal (more robust, see :func:`prediction_covariance`). ``confusion`` (the paper's
    conclusion): its soft confusion matrix on its validation split (labels needed; never the test set).
    """
    if method not in METHODS:
        raise DarkKnowledgeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    model, meta, (train, val, _) = _load_generalist(generalist, data_dir)
    if method in ("covariance", "correlation"):
        data, matrix_of = train, lambda probs: prediction_covariance(probs, correlation=method == "correlation")
    else:
        if val is None:
            raise DarkKnowledgeError("the confusion method needs the generalist's validation split, and this "
                                     "generalist was trained without one; use --method covariance")
        data, matrix_of = val, lambda probs: confusion_matrix(probs, val.labels)
    probs = torch.softmax(predict_logits(model, data), 1)
    source = {"generalist": str(checkpoint.resolve_run_dir(generalist)), "spec": meta["spec"],
              "weights_sha256": meta["weights_sha256"], "dataset": meta["dataset"], "split": data.name,
              "cases": len(data)}
    subsets = cluster_classes(matrix_of(probs), n_clusters, overlap=overlap, overlap_ratio=overlap_ratio,
                              min_size=min_size, normalize=normalize, seed=seed, class_names=train.classes,
                              method=method, source=source)
    subsets.save(Path(out) / SUBSETS_FILE)
    return subsets


def read_subsets(folder: str | Path) -> ClassSubsets:
    path = Path(folder) / SUBSETS_FILE
    if not path.exists():
        raise DarkKnowledgeError(f"{path} not found; make it with 'darkknowledge specialists cluster --out {folder}'")
    subsets = ClassSubsets.load(path)
    if "generalist" not in subsets.source:
        raise DarkKnowledgeError(f"{path} names no generalist run; make it with 'darkknowledge specialists cluster'")
    return subsets


def _checked_generalist(subsets: ClassSubsets, data_dir: str | None, generalist: str | Path | None = None):
    run = generalist or subsets.source["generalist"]
    model, meta, splits = _load_generalist(run, data_dir)
    if subsets.source.get("weights_sha256") not in (None, meta["weights_sha256"]):
        raise DarkKnowledgeError(f"the generalist in {run} is not the one the subsets were found for (its weights "
                                 f"changed); cluster again")
    return model, meta, splits


def parse_indices(text: str, count: int) -> list[int]:
    """``"all"``, ``"3"`` or ``"0,2,5-7"`` -> sorted specialist indices in 0..count-1."""
    if text.strip() == "all":
        return list(range(count))
    chosen: set[int] = set()
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            chosen.update(range(int(low), int(high) + 1) if dash else [int(low)])
    except ValueError:
        raise DarkKnowledgeError(f"specialist indices must look like 'all', '3' or '0,2,5-7', got {text!r}") from None
    outside = sorted(i for i in chosen if not 0 <= i < count)
    if outside or not chosen:
        raise DarkKnowledgeError(f"specialist indices {outside or text} are not in 0..{count - 1}")
    return sorted(chosen)


def share_specialists(sizes: dict[int, int], world_size: int) -> list[list[int]]:
    """Specialist indices shared among ``world_size`` ranks so each gets about the same work: ``sizes`` maps an
    index to its subset's training cases (an epoch is one pass over them); the largest goes first, each to the
    rank with the fewest cases so far."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in sorted(sizes, key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(share) for share in shares]


def train_specialists(folder: str | Path, indices: Sequence[int] | None = None, config: SpecialistConfig | None = None,
                      resume: bool = True, data_dir: str | None = None,
                      log: Callable[[str], None] | None = None,
                      on_done: Callable[[int, dict[str, Any]], None] | None = None,
                      workers: Workers | None = None,
                      device: str | None = None) -> dict[int, dict[str, Any]]:
    """Train the specialists ``indices`` (default: all) of ``folder/subsets.json``, each into its own run
    directory; with ``resume`` finished ones are reused and interrupted ones continued. Returns per index:
    subset, seconds, best epoch, dustbin offset (also passed to ``on_done`` as each one finishes).

    Specialists are independent (§5), so under torchrun (``workers``, default: the current process group) each
    rank trains its share (:func:`share_specialists`) as a single process, and every rank returns all of them,
    each with the ``rank`` that trained it. ``device``: where each trains (default: ``auto``)."""
    workers = workers or current()
    subsets = read_subsets(folder)
    indices = list(range(len(subsets))) if indices is None else list(indices)
    generalist, meta, (train, val, _) = _checked_generalist(subsets, data_dir)
    config = config or SpecialistConfig()
    logits = predict_logits(generalist, train) if config.temperature is not None else None
    base = {k: meta[k] for k in ("spec", "image_shape", "dataset", "validation", "data_fingerprint", "subset",
                                 "train_classes") if k in meta}
    base["generalist"] = {"run": subsets.source["generalist"], "weights_sha256": meta["weights_sha256"]}
    done = {}
    outside = [i for i in indices if not 0 <= i < len(subsets)]
    if outside:
        raise DarkKnowledgeError(f"specialist indices {outside} are not in 0..{len(subsets) - 1}")
    if workers.distributed:
        labels = train.labels
        sizes = {i: int(torch.isin(labels, torch.tensor(subsets.subsets[i])).sum()) for i in indices}
        indices = share_specialists(sizes, workers.world_size)[workers.rank]
    for index in indices:
        with checkpoint.open_run(specialist_dir(folder, index), "specialist folder"):  # one writer at a time
            _, result = train_specialist(generalist, subsets.subsets[index], train, val, config,
                                         generalist_logits=logits, run_dir=specialist_dir(folder, index),
                                         resume=resume, meta={**base, "specialist_index": index}, log=log,
                                         device=device)
        done[index] = {"subset": list(result.subset), "seconds": round(result.seconds, 2),
                       "best_epoch": result.best_epoch, "dustbin_offset": result.dustbin_offset}
        if on_done is not None:
            on_done(index, done[index])
    if workers.distributed:  # the final gather: every rank learns what the others trained
        shares = workers.all_gather_json({str(i): row for i, row in done.items()})
        done = {int(i): {**row, "rank": rank} for rank, share in enumerate(shares) for i, row in share.items()}
    return dict(sorted(done.items()))


def load_specialists(folder: str | Path, subsets: ClassSubsets) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Every specialist of ``folder``, checked against its subset; a missing one is named in the error."""
    missing = [i for i in range(len(subsets)) if not (specialist_dir(folder, i) / checkpoint.MODEL_META).exists()]
    if missing:
        raise DarkKnowledgeError(f"specialists {missing} of {folder} are not trained yet; run 'darkknowledge "
                                 f"specialists train {folder} --index {','.join(map(str, missing))}'")
    loaded = []
    for index, subset in enumerate(subsets.subsets):
        model, meta = checkpoint.load_model(specialist_dir(folder, index))
        if tuple(meta.get("specialist", {}).get("subset", ())) != subset:
            raise DarkKnowledgeError(f"{specialist_dir(folder, index)} was trained for classes "
                                     f"{meta.get('specialist', {}).get('subset')} but subset {index} is "
                                     f"{list(subset)}; retrain it")
        loaded.append((model, meta))
    return loaded


def training_seconds(folder: str | Path, index: int) -> float | None:
    path = specialist_dir(folder, index) / checkpoint.STATE_META
    return round(checkpoint.read_training_state(path.parent)["seconds"], 2) if path.exists() else None


def _accuracy(correct: torch.Tensor) -> float | None:
    return float(correct.double().mean()) if len(correct) else None


def score_combination(generalist_logits: torch.Tensor, combined_log_probs: torch.Tensor, labels: torch.Tensor,
                      active: torch.Tensor, coverage: torch.Tensor) -> dict[str, Any]:
    """Table 3 (accuracy overall and on cases with an active specialist) and Table 4 (by the number of
    specialists covering the correct class) of the paper, from predictions."""
    base = generalist_logits.argmax(1) == labels
    ours = combined_log_probs.argmax(1) == labels
    on = active.any(1)

    def row(mask: torch.Tensor) -> dict[str, Any]:
        b, o = int(base[mask].sum()), int(ours[mask].sum())
        # Standard error of the change in correct cases (a sum of per-case changes in {-1, 0, 1}): how much of a
        # gain on a few thousand cases is noise.
        change = ours[mask].double() - base[mask].double()
        se = float(change.std(unbiased=False) * len(change) ** 0.5) if len(change) else 0.0
        return {"cases": int(mask.sum()), "generalist_correct": b, "combined_correct": o,
                "generalist_accuracy": _accuracy(base[mask]), "combined_accuracy": _accuracy(ours[mask]),
                "delta_correct": o - b, "delta_correct_se": se, "relative_gain": (o - b) / b if b else None}

    table4 = {str(k): row(coverage == k) for k in sorted(set(coverage.tolist()))}
    return {"test_cases": len(labels), "overall": row(torch.ones_like(on)), "conditional": row(on),
            "active_specialists_per_case": float(active.sum(1).double().mean()), "by_coverage": table4}


def evaluate_specialists(folder: str | Path, split: str = "test", top_n: int = 1, tol: float = DEFAULT_TOL,
                         data_dir: str | None = None) -> dict[str, Any]:
    """Generalist alone against generalist + specialists on a split of the generalist's dataset, as JSON-ready
    numbers (Table 3 and 4 of the paper), with the clusters and each specialist's own scores."""
    subsets = read_subsets(folder)
    generalist, meta, (train, val, test) = _checked_generalist(subsets, data_dir)
    data: LabeledImages | None = {"train": train, "val": val, "test": test}.get(split)
    if split not in ("train", "val", "test"):
        raise DarkKnowledgeError(f"split must be train, val or test, got {split!r}")
    if data is None:
        raise DarkKnowledgeError("the generalist was trained without a validation split; choose train or test")
    specialists = load_specialists(folder, subsets)
    g_logits = predict_logits(generalist, data)
    s_logits = [predict_logits(model, data) for model, _ in specialists]
    result = combine(g_logits, s_logits, subsets, top_n=top_n, tol=tol)
    scores = score_combination(g_logits, result.log_probs, data.labels, result.active, subsets.coverage(data.labels))
    per_specialist = []
    for index, ((model, meta_m), subset) in enumerate(zip(specialists, subsets.subsets)):
        own = validation_scores(model, data, subset)
        per_specialist.append({"index": index, "classes": list(subset),
                               "names": [subsets.class_names[c] for c in subset],
                               "targets": meta_m["specialist"].get("targets"),
                               "dustbin_offset": meta_m["specialist"]["dustbin_offset"],
                               "best_epoch": meta_m.get("epoch"), "training_seconds": training_seconds(folder, index),
                               "active_cases": int(result.active[:, index].sum()),
                               f"{split}_loss": own["loss"], f"{split}_errors_on_subset": own["subset_errors"],
                               f"{split}_subset_cases": own["subset_cases"]})
    return {"folder": str(folder), "generalist": subsets.source["generalist"], "dataset": meta["dataset"],
            "split": split, "top_n": top_n, "tol": tol, "solver_iterations": result.iterations,
            "max_gradient_norm": float(result.gradient_norm.max()) if len(data) else 0.0,
            "clusters": {"method": subsets.method, "subsets": subsets.describe()}, **scores,
            "specialists": per_specialist}


def describe_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"
