"""The export job: a run's model written as an ONNX or TorchScript file, checked against PyTorch on the test
set, timed, and described by its model card.

It composes the three deployment modules, which import each other in one direction only: :mod:`.export` (the
files and their parity check) <- :mod:`.bench` (what they cost) <- :mod:`.model_card` (what they are); this job
sits above all three.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint
from .bench import BenchConfig, measure_speed
from .errors import DarkKnowledgeError
from .evaluation import evaluate
from .export import (DEFAULT_ATOL, FORMATS, HF_WEIGHTS, Parity, check_format, check_parity, export_model,
                     load_deployable, model_inputs, test_set, tokenizer_beside)
from .model_card import write_model_card


@dataclass
class ExportResult:
    out: Path
    card: Path | None
    parity: Parity
    accuracy: dict[str, Any]
    speed: dict[str, Any] | None


def card_path(out: str | os.PathLike) -> Path:
    """Where the model card of an exported file goes: beside it, ``student.onnx`` -> ``student.onnx.model_card.md``
    (one card per file, so two exports in one folder never overwrite each other's card)."""
    out = Path(out)
    return out.with_name(out.name + ".model_card.md")


def export_run(run: str | os.PathLike, format: str, out: str | os.PathLike, data_dir: str | None = None,
               atol: float = DEFAULT_ATOL, card: bool = True, command: str | None = None, threads: int = 1,
               speed: bool = True, data_path: str | os.PathLike | None = None) -> ExportResult:
    """Export a run (or ensemble folder), check it against PyTorch on the test set, write its model card.

    The file is moved into place only after the parity check passes: a file at ``out`` is always a checked one.
    """
    check_format(format)
    out = Path(out)
    if atol <= 0:
        raise DarkKnowledgeError(f"atol must be positive, got {atol}")
    if format == "hf" and out.exists():
        raise DarkKnowledgeError(f"--out {out} exists; --format hf writes a new folder: give a name not yet taken")
    if out.is_dir():
        raise DarkKnowledgeError(f"--out {out} is a folder; give a file name, e.g. {out / ('model' + FORMATS[format])}")
    deployable = load_deployable(run)
    test = test_set(deployable, data_dir, data_path)
    inputs = model_inputs(test)
    metadata = {"classes": json.dumps(deployable.classes), "model": deployable.spec, "dataset": deployable.dataset,
                "source": deployable.name, "preprocessing": deployable.preprocessing}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = export_model(deployable.model, staging / out.name, format, deployable.image_shape, metadata,
                              example=inputs)
        parity = check_parity(staged, format, deployable.model, inputs, atol, threads=threads)
        if not parity.passed:
            raise DarkKnowledgeError(f"the exported {format} model does not reproduce PyTorch: {parity.describe()}; "
                                     "nothing written")
        if deployable.tokenizer is not None and format == "hf":  # in the folder, where from_pretrained looks
            shutil.copyfile(deployable.tokenizer, staged / "tokenizer.json")
        for path in [staged, *staged.iterdir()] if staged.is_dir() else [staged]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)  # to ship: readable by the service that loads it
        os.replace(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if deployable.tokenizer is not None and format != "hf":  # a text classifier ships with its tokenizer
        checkpoint.atomic_write(tokenizer_beside(out), lambda tmp: shutil.copyfile(deployable.tokenizer, tmp))
        os.chmod(tokenizer_beside(out), 0o644)
    accuracy = evaluate(deployable.model, test).to_dict()
    measured = None
    if speed:
        measured = measure_speed(deployable.model, inputs, BenchConfig.quick(threads),
                                 onnx_path=out if format == "onnx" else None)
    card_file = None
    if card:
        card_file = write_model_card(card_path(out), deployable, out / HF_WEIGHTS if format == "hf" else out, format,
                                     parity, accuracy, measured, command)
    return ExportResult(out, card_file, parity, accuracy, measured)
