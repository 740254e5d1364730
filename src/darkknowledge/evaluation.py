"""Running a model over a dataset: logits in large batches, and the test-error summary the paper reports."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .augment import jitter as jitter_images


def as_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float inputs in [0, 1], the one preprocessing every model here expects."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def autocast(bf16: bool, device: torch.device | str = "cpu"):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 4096, bf16: bool = False,
                   jitter: int = 0, seed: int = 0) -> torch.Tensor:
    """Float32 logits ``[N, classes]`` of ``model`` (in eval mode) for uint8 images ``[N, H, W]``.

    ``jitter`` > 0 translates each image by up to that many pixels first (seeded), to test invariance (§3).
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with autocast(bf16, device):
        for start in range(0, len(images), batch_size):
            batch = jitter_images(images[start:start + batch_size], jitter, generator)
            chunks.append(model(as_inputs(batch.to(device))).float().cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


@dataclass
class Evaluation:
    errors: int
    total: int
    per_class_errors: list[int]
    loss: float

    @property
    def accuracy(self) -> float:
        return 1 - self.errors / max(self.total, 1)

    def to_dict(self) -> dict:
        return {"errors": self.errors, "total": self.total, "accuracy": self.accuracy,
                "error_rate": 1 - self.accuracy, "per_class_errors": self.per_class_errors, "loss": self.loss}


def summarize(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Evaluation:
    """Errors, per-class errors (indexed by the true class) and mean cross-entropy of given logits."""
    wrong = logits.argmax(1) != labels
    per_class = torch.bincount(labels[wrong], minlength=num_classes)
    loss = torch.nn.functional.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    return Evaluation(int(wrong.sum()), len(labels), per_class.tolist(), loss)


def evaluate(model: nn.Module, data, batch_size: int = 4096, bf16: bool = False, jitter: int = 0,
             seed: int = 0) -> Evaluation:
    """Evaluate ``model`` on a LabeledImages set (test errors as in the paper's tables)."""
    logits = predict_logits(model, data.images, batch_size, bf16, jitter, seed)
    return summarize(logits, data.labels, data.num_classes)
