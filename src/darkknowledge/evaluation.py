"""Running a model over a transfer set: logits in large batches, and the test-error summary the paper reports;
for sets of several cases an item (token windows), per-token log-loss, perplexity and next-token accuracy."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import math
from typing import Callable

import torch
from torch import nn

from .augment import jitter as jitter_images
from .data.transfer import UINT8_PIXELS, as_transfer_set, batches, cases_per_item, in_order
from .outputs import logits_of

PRECISIONS = ("fp32", "bf16", "fp16")
# Items a forward pass when evaluating a set of several cases an item: its logits [32, T, V] are summed as they
# come (a language model's validation logits would not fit in memory at once): the size the language models'
# own loop used, so their per-token numbers stay the same to the bit.
SEQUENCE_BATCH = 32


def as_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float inputs in [0, 1], the preprocessing of the built-in image sets (anything else as is)."""
    return UINT8_PIXELS(images) if images.dtype == torch.uint8 else images


def precision_of(bf16: bool | str | None) -> str:
    """``True``/``"bf16"``: bfloat16 autocast; ``"fp16"``: float16 autocast (CUDA, with a gradient scaler when
    training); ``False``/``None``/``"fp32"``: none."""
    if bf16 is True:
        return "bf16"
    if not bf16:
        return "fp32"
    if bf16 not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {bf16!r}")
    return bf16


def autocast(bf16: bool | str | None, device: torch.device | str = "cpu"):
    """Mixed-precision autocast on ``device`` (weights and loss stay float32), or nothing; see :func:`precision_of`.
    fp16 is a CUDA precision: on another device (a teacher kept on the CPU) the computation stays float32."""
    precision = precision_of(bf16)
    if precision == "fp32" or (precision == "fp16" and torch.device(device).type != "cuda"):
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def to_device(inputs, device: torch.device):
    """A batch's inputs (a tensor or a dict of tensors) on ``device``; non-blocking from pinned memory."""
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=inputs.is_pinned()) if inputs.device != device else inputs


@torch.no_grad()
def predict_logits(model: nn.Module, data, batch_size: int = 4096, bf16: bool | str = False,
                   jitter: int = 0, seed: int = 0) -> torch.Tensor:
    """Float32 logits ``[N, ..., classes]`` (on the CPU) of ``model`` in eval mode over ``data``: a transfer set
    (its transform applied), anything :func:`darkknowledge.data.as_transfer_set` takes, or a tensor of inputs
    (uint8 images are scaled to [0, 1]).

    ``jitter`` > 0 translates each image by up to that many pixels first (seeded), to test invariance (§3).
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, torch.Tensor):
        parts = ((as_inputs(data[i:i + batch_size]), None, None) for i in range(0, len(data), batch_size))
    else:
        data = as_transfer_set(data)
        parts = batches(data, in_order(data, batch_size))
    chunks = []
    try:
        with autocast(bf16, device):
            for inputs, _, _ in parts:
                inputs = to_device(inputs, device)
                if jitter:
                    inputs = jitter_images(inputs, jitter, generator)
                chunks.append(logits_of(model(inputs)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def labels_of(data) -> torch.Tensor:
    """Every label of a transfer set, in order (its ``labels`` when it holds them, else read batch by batch)."""
    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    return torch.cat([y for _, y, _ in batches(data, in_order(data, 4096))]) if len(data) else torch.empty(0).long()


@dataclass
class Evaluation:
    errors: int
    total: int
    per_class_errors: list[int]
    loss: float  # mean cross-entropy per case (per token: the log-loss in nats)
    # of a set of several cases an item: each item's summed negative log-likelihood and correct cases (the blocks
    # of a bootstrap over sequences)
    item_nll: list[float] | None = None
    item_correct: list[int] | None = None

    @property
    def accuracy(self) -> float:
        return 1 - self.errors / max(self.total, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"errors": self.errors, "total": self.total, "accuracy": self.accuracy,
                "error_rate": 1 - self.accuracy, "per_class_errors": self.per_class_errors, "loss": self.loss}


def summarize(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
              ignore_index: int | None = None) -> Evaluation:
    """Errors, per-class errors (indexed by the true class) and mean cross-entropy of given logits ``[..., C]``
    against labels ``[...]``; cases labelled ``ignore_index`` are left out."""
    logits, labels = logits.reshape(-1, logits.shape[-1]) if logits.numel() else logits, labels.reshape(-1)
    if ignore_index is not None:
        keep = labels != ignore_index
        logits, labels = logits[keep], labels[keep]
    wrong = logits.argmax(-1) != labels if len(labels) else torch.zeros(0, dtype=torch.bool)
    per_class = torch.bincount(labels[wrong], minlength=num_classes)
    loss = torch.nn.functional.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    return Evaluation(int(wrong.sum()), len(labels), per_class.tolist(), loss)


def evaluate(model: nn.Module, data, batch_size: int = 4096, bf16: bool | str = False, jitter: int = 0,
             seed: int = 0) -> Evaluation:
    """Evaluate ``model`` on a transfer set (test errors as in the paper's tables); a set of several cases an item
    (token windows) streams through :func:`evaluate_sequences`."""
    data = as_transfer_set(data)
    if cases_per_item(data) > 1 and not jitter:
        return evaluate_sequences(model, data, bf16=bf16)
    logits = predict_logits(model, data, batch_size, bf16, jitter, seed)
    return summarize(logits, labels_of(data), len(data.classes), getattr(data, "ignore_index", None))


@torch.no_grad()
def evaluate_sequences(logits_of: Callable[[torch.Tensor], torch.Tensor] | nn.Module, data,
                       batch_size: int = SEQUENCE_BATCH, bf16: bool | str = False) -> Evaluation:
    """Errors, per-case log-loss and per-item sums over a set of several cases an item (labels ``[B, T]``), its
    logits summed batch by batch, never held whole. ``logits_of``: a model (run in eval mode on its device) or
    any function of a batch's inputs (an ensemble's combined logits)."""
    data = as_transfer_set(data)
    model = logits_of if isinstance(logits_of, nn.Module) else None
    was_training = model is not None and model.training
    device = device_of(model) if model is not None else torch.device("cpu")
    ignore_index = getattr(data, "ignore_index", None)
    nll, correct, wrong_labels = [], [], []
    if model is not None:
        model.eval()
    try:
        for inputs, labels, _ in batches(data, in_order(data, batch_size)):
            with autocast(bf16, device):
                logits = logits_of(to_device(inputs, device))
            log_p = torch.log_softmax(logits.float(), -1)
            labels = labels.to(log_p.device)
            keep = labels != ignore_index if ignore_index is not None else None
            picked = labels.clamp_min(0) if keep is not None else labels
            token_nll = -log_p.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
            hit = log_p.argmax(-1) == labels
            if keep is not None:
                token_nll, hit = token_nll.where(keep, 0.0), hit & keep
                wrong_labels.append(labels[keep & ~hit])
            else:
                wrong_labels.append(labels[~hit])
            nll.append(token_nll.flatten(1).sum(1).double().cpu())
            correct.append(hit.flatten(1).sum(1).cpu())
    finally:
        if model is not None:
            model.train(was_training)
    item_nll, item_correct = torch.cat(nll), torch.cat(correct)
    total = int(item_correct.sum()) + sum(len(y) for y in wrong_labels)  # the cases counted: right or wrong
    per_class = torch.bincount(torch.cat(wrong_labels).cpu(), minlength=len(data.classes))
    loss = item_nll.sum().item() / total if total else float("nan")
    return Evaluation(total - int(item_correct.sum()), total, per_class.tolist(), loss, item_nll.tolist(),
                      item_correct.tolist())
