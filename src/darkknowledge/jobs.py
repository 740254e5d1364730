"""Whole jobs on a named dataset: train a model, distil a teacher into a student, evaluate a saved run.

They glue data, models, the training loop and checkpoints together with the bookkeeping a run needs
(validation split, sidecar metadata, class checks). The CLI and the experiments call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint
from .data import DEFAULT_VALIDATION_SIZE, LabeledImages, load_dataset, validation_split
from .errors import DarkKnowledgeError
from .evaluation import evaluate
from .models import build_model, count_parameters, parse_spec
from .training import Distillation, FitResult, HardTargets, TrainConfig, cache_teacher_logits, fit


@dataclass
class DataChoice:
    """Which data a job uses: dataset name, where its files are, how the validation split is cut, and
    optionally a smaller or class-restricted training (transfer) set."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_size: int | float | None = None  # None: the dataset's documented default; 0: no validation split
    val_seed: int = 0
    subset: int | None = None  # use only this many training cases (a seeded random choice), before the split
    train_classes: tuple[int, ...] | None = None  # keep only these labels in the training part (§3's "no 3s")

    def load(self) -> tuple[LabeledImages, LabeledImages | None, LabeledImages]:
        """(train, validation or None, test). Validation keeps every class, even with ``train_classes``."""
        splits = load_dataset(self.dataset, self.data_dir, self.download)
        train = splits.train
        if self.subset is not None:
            if not 0 < self.subset <= len(train):
                raise DarkKnowledgeError(f"subset must be between 1 and {len(train)}, got {self.subset}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.val_seed))
            train = train.subset(order[:self.subset].sort().values)
        size = DEFAULT_VALIDATION_SIZE[self.dataset] if self.val_size is None else self.val_size
        val = None
        if size:
            train, val = validation_split(train, size, self.val_seed)
        if self.train_classes is not None:
            train = train.where_labels(self.train_classes)
        return train, val, splits.test

    def describe(self, train: LabeledImages) -> dict[str, Any]:
        described = {"dataset": self.dataset, "data_fingerprint": train.fingerprint(),
                     "validation": {"size": self.val_size, "seed": self.val_seed}}
        if self.subset is not None:
            described["subset"] = self.subset
        if self.train_classes is not None:
            described["train_classes"] = list(self.train_classes)
        return described


def _model_meta(spec: str, train: LabeledImages, data: DataChoice) -> dict[str, Any]:
    return {"spec": str(parse_spec(spec)), "image_shape": list(train.image_shape), "classes": list(train.classes),
            **data.describe(train)}


def train_run(spec: str, data: DataChoice, config: TrainConfig, out: str | Path | None = None,
              resume: bool = False, log: Callable[[str], None] | None = None) -> tuple[Any, FitResult]:
    """Train a model from scratch on hard labels (a teacher, an ensemble member or a baseline)."""
    train, val, _ = data.load()
    model = build_model(spec, train.image_shape, train.num_classes)
    result = fit(model, train, val, config, HardTargets(), out, resume, _model_meta(spec, train, data), log)
    return model, result


def check_compatible(model_meta: dict[str, Any], data: LabeledImages, run_dir: Path) -> None:
    """A saved model must predict the data's classes from images of the data's size."""
    if list(model_meta["classes"]) != list(data.classes):
        raise DarkKnowledgeError(
            f"model {run_dir} predicts classes {model_meta['classes']} but {data.name} has "
            f"{list(data.classes)}; use a model trained on this dataset")
    if tuple(model_meta["image_shape"]) != data.image_shape:
        raise DarkKnowledgeError(
            f"model {run_dir} takes {tuple(model_meta['image_shape'])} images but {data.name} has "
            f"{data.image_shape}; use a model trained on this dataset")


def distill_run(teacher_dir: str | Path, spec: str, data: DataChoice, config: TrainConfig, temperature: float,
                soft_weight: float = 1.0, hard_weight: float = 0.0, out: str | Path | None = None,
                resume: bool = False, log: Callable[[str], None] | None = None) -> tuple[Any, FitResult]:
    """Distil a saved teacher into a new ``spec`` student on the dataset's training split (§2, §3).

    Without jitter the teacher's logits are computed once over the transfer set; with jitter it runs online.
    """
    teacher, teacher_meta = checkpoint.load_model(teacher_dir)
    train, val, _ = data.load()
    check_compatible(teacher_meta, train, Path(teacher_dir))
    cached = cache_teacher_logits(teacher, train, config.bf16) if config.jitter == 0 else None
    objective = Distillation(temperature, soft_weight, hard_weight, teacher=teacher, teacher_logits=cached)
    model = build_model(spec, train.image_shape, train.num_classes)
    meta = {**_model_meta(spec, train, data),
            "teacher": {"run": str(teacher_dir), "spec": teacher_meta["spec"],
                        "weights_sha256": teacher_meta["weights_sha256"]}}
    result = fit(model, train, val, config, objective, out, resume, meta, log)
    return model, result


def evaluate_run(run_dir: str | Path, data: DataChoice | None = None, split: str = "test",
                 jitter: int = 0) -> dict[str, Any]:
    """Errors of a saved model on a split of its dataset (or ``data``'s), as a JSON-ready dict."""
    model, meta = checkpoint.load_model(run_dir)
    if data is None:  # the data the model was trained with, as its sidecar records it
        classes = meta.get("train_classes")
        data = DataChoice(meta["dataset"], val_size=meta["validation"]["size"], val_seed=meta["validation"]["seed"],
                          subset=meta.get("subset"), train_classes=tuple(classes) if classes else None)
    train, val, test = data.load()
    chosen = {"train": train, "val": val, "test": test}.get(split)
    if split not in ("train", "val", "test"):
        raise DarkKnowledgeError(f"split must be train, val or test, got {split!r}")
    if chosen is None:
        raise DarkKnowledgeError(f"{data.dataset} has no validation split with val_size 0; choose train or test")
    check_compatible(meta, chosen, Path(run_dir))
    result = evaluate(model, chosen, jitter=jitter).to_dict()
    result["per_class_errors"] = dict(zip(chosen.classes, result["per_class_errors"]))  # readable JSON
    return {"run": str(run_dir), "model": meta["spec"], "parameters": count_parameters(model),
            "dataset": data.dataset, "split": split, "jitter": jitter, **result}
