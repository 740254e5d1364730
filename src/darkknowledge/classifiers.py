"""Hugging Face sequence classifiers as teachers and students: ``hf-classifier:ARCH,key=value`` (a transformers
config, random weights, no download: ``hf-classifier:bert,num_hidden_layers=2,hidden_size=64,...``) or
``hf-classifier:FOLDER`` (a local folder, ``from_pretrained(..., local_files_only=True)``).

The model takes a text case as :mod:`darkknowledge.data.text_table` makes it, one int64 tensor ``[B, 2, L]``
(token ids, attention mask), and returns the classifier's ``.logits`` ``[B, classes]``. A student may start from
its teacher's layers (:func:`init_from_teacher`: DistilBERT's initialisation, every other layer of a teacher twice
as deep).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import DarkKnowledgeError

KIND = "hf-classifier"
HELP = ("an hf-classifier spec is hf-classifier:ARCH[,config_key=value...] with ARCH a transformers config (bert, "
        "distilbert, roberta, ...), e.g. 'hf-classifier:bert,num_hidden_layers=2,hidden_size=64,num_attention_heads=2,"
        "intermediate_size=128', or hf-classifier:FOLDER, a local Hugging Face model folder")
_LAYER = re.compile(r"\.layers?\.(\d+)\.")  # an encoder layer's index in a parameter's name


class SequenceClassifier(nn.Module):
    """A transformers ``...ForSequenceClassification`` as a module from ``[B, 2, L]`` (ids, mask) to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def parse(spec: str) -> tuple[str, dict]:
    """(ARCH or FOLDER, config options) of an ``hf-classifier:`` spec."""
    from .transformer import parse_hf  # the same key=value grammar as the causal ``hf:`` specs
    try:
        return parse_hf(spec)
    except DarkKnowledgeError:
        raise DarkKnowledgeError(f"model spec {spec!r}: {HELP}") from None


def is_folder(source: str) -> bool:
    return "/" in source or Path(source).expanduser().is_dir()


def build(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The classifier ``spec`` names with ``num_classes`` outputs for cases ``[2, L]``."""
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification
    except ImportError:
        raise DarkKnowledgeError("hf-classifier: models need Hugging Face transformers: pip install "
                                 "'darkknowledge[hf]'") from None
    if tuple(input_shape[:1]) != (2,) or len(input_shape) != 2:
        raise DarkKnowledgeError(f"model spec {spec!r} takes text (token ids and attention mask, [2, length]), "
                                 f"not inputs of shape {tuple(input_shape)}; give --data TABLE with --text-column")
    source, options = parse(spec)
    quiet_transformers()
    try:
        if is_folder(source):
            folder = Path(source).expanduser()
            if not (folder / "config.json").is_file():
                raise DarkKnowledgeError(f"model spec {spec!r}: {folder} holds no config.json (a Hugging Face "
                                         "model folder, as save_pretrained writes it)")
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_classes, local_files_only=True, ignore_mismatched_sizes=True, **options)
        else:
            config = AutoConfig.for_model(source, num_labels=num_classes, **options)
            if getattr(config, "max_position_embeddings", input_shape[1]) < input_shape[1]:
                config.max_position_embeddings = input_shape[1]
            model = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, TypeError, KeyError, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DarkKnowledgeError(f"model spec {spec!r}: transformers cannot build it: {first}") from None
    return SequenceClassifier(model)


def quiet_transformers() -> None:
    """No progress bars from transformers while it reads or writes weights: the command's own lines are the log."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def complete_spec(spec: str, vocab_size: int | None) -> str:
    """``spec`` with the tokenizer's vocabulary (``vocab_size=V``) when it builds a classifier from a config that
    does not give one: the embedding must hold every id the tokenizer makes (and no more)."""
    if not str(spec).startswith(f"{KIND}:") or vocab_size is None:
        return spec
    source, options = parse(str(spec))
    if is_folder(source) or "vocab_size" in options:
        return spec
    return f"{spec},vocab_size={vocab_size}"


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy the teacher's weights into the student where their names and shapes agree, the student's encoder
    layer ``i`` taking the teacher's layer ``i * step`` (``step`` = teacher layers // student layers: every other
    layer of a teacher twice as deep). Returns how many tensors were copied; none is a one-line error."""
    ours, theirs = student.state_dict(), teacher.state_dict()

    def layers(names) -> int:
        return 1 + max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=-1)
    step = max(1, layers(theirs) // max(1, layers(ours)))
    copied = 0
    with torch.no_grad():
        for name, tensor in ours.items():
            source = _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(int(m.group(1)) * step)), name, count=1)
            if source in theirs and theirs[source].shape == tensor.shape:
                tensor.copy_(theirs[source])
                copied += 1
    if copied == 0:
        raise DarkKnowledgeError("--init-from-teacher: no weight of the teacher fits the student (other names or "
                                 "sizes); give the student the teacher's architecture and widths, fewer layers")
    return copied
