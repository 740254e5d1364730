"""Shipping a trained model (§1's reason to distil: a small model that answers fast): ONNX or TorchScript files
checked to answer like the PyTorch model, each with a model card beside it (the whole job:
:func:`darkknowledge.deploy.export_run`).

An exported graph takes what the model took in training: model-ready inputs ``[B, *input_shape]``, made from
the data by the transform its model.json records (the built-in images: float32 ``[B, H, W]`` with pixels scaled
to [0, 1], uint8 / 255), and returns float32 scores ``[B, classes]`` (logits; for an ensemble, what its forward
returns). B is dynamic. The ONNX file records this in its metadata (``preprocessing``, ``classes``,
``image_shape``: one input's shape).

Loading a TorchScript file runs the code stored in it: load only files you trust. This module loads only
the file it has just written, to check it. ONNX files hold no code.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint, reading
from .data import load_dataset
from .data.transfer import UINT8_PIXELS, Transform
from .ensemble import Ensemble, is_ensemble_dir
from .errors import DarkKnowledgeError
from .evaluation import as_inputs, predict_logits

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "hf": ""}  # hf: a Hugging Face folder (text classifiers)
HF_WEIGHTS = "model.safetensors"  # what save_pretrained writes into an hf folder
DEFAULT_ATOL = 1e-4  # max |logit difference| allowed between PyTorch and the exported file (float32 reorderings)
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
TEXT_INPUT_NAMES = ("input_ids", "attention_mask")  # a text classifier's two inputs, each [batch, length] int64
PREPROCESSING = "float32 images [batch, height, width], pixels scaled to [0, 1] (uint8 / 255); no other " \
                "normalisation"
PARITY_BATCH_SIZES = (1, 7, 1000)  # the parity check runs the exported file at each: the batch is dynamic


def _extra_missing(package: str) -> DarkKnowledgeError:
    return DarkKnowledgeError(f"{package} is not installed; install the export extra: "
                              "pip install 'darkknowledge[export]'")


# --- what can be exported -------------------------------------------------------------------------------------

@dataclass
class Deployable:
    """A model ready to ship, with what a user of the exported file needs to know about it."""

    model: nn.Module
    name: str  # the run folder, as given
    kind: str  # "model" or "ensemble"
    spec: str  # model spec, or a description of the ensemble
    image_shape: tuple[int, ...]  # one input's shape (an image's [H, W] for the built-in sets)
    classes: list[str]
    dataset: str
    weight_files: list[Path]  # the safetensors files that hold its weights, for size on disk
    meta: dict[str, Any] = field(default_factory=dict)  # model.json, or the ensemble's manifest

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def training_meta(self) -> dict[str, Any]:
        """The model.json it was trained with (an ensemble's first member's)."""
        return self.meta if self.kind == "model" else self.meta["member_meta"][0]

    @property
    def transform(self) -> Transform:
        """How inputs were made from the data in training (recorded in model.json; older runs: uint8 / 255)."""
        described = (self.training_meta.get("transfer_set") or {}).get("transform")
        return Transform.from_description(described) if described else UINT8_PIXELS

    @property
    def tokenizer(self) -> Path | None:
        """A text classifier's tokenizer.json, as its model.json records it (None for other models)."""
        recorded = (self.training_meta.get("data") or {}).get("tokenizer")
        return Path(recorded) if recorded else None

    @property
    def preprocessing(self) -> str:
        if self.tokenizer is not None:
            return (f"text tokenised by the tokenizer.json written beside this file, truncated and padded to "
                    f"{self.image_shape[-1]} tokens: int64 input_ids and attention_mask [batch, "
                    f"{self.image_shape[-1]}]")
        if self.transform == UINT8_PIXELS and len(self.image_shape) == 2:
            return PREPROCESSING
        dtype = (self.training_meta.get("transfer_set") or {}).get("dtype", "float32")
        made = "float32" if not self.transform.identity else dtype
        return f"{made} inputs [batch, {', '.join(map(str, self.image_shape))}]; made from the data by: " \
               f"{self.transform.text()}"


def load_deployable(path: str | os.PathLike) -> Deployable:
    """A run directory (``model.json`` + weights) or an ensemble folder (one run per member in sub-folders,
    loaded with :class:`darkknowledge.ensemble.Ensemble` when that module is present)."""
    kind, run_dir, members = locate(path)
    if kind == "model":
        model, meta = checkpoint.load_model(run_dir)
        return Deployable(model.eval(), str(path), "model", meta["spec"], tuple(meta["image_shape"]),
                          list(meta["classes"]), meta.get("dataset", "unknown"), [run_dir / meta["weights"]], meta)
    return _load_ensemble(run_dir, members)


def locate(path: str | os.PathLike) -> tuple[str, Path, list[Path]]:
    """("model", run dir, []) or ("ensemble", folder, member run dirs); a cheap check before any long work."""
    path = Path(path)
    if not path.exists():
        raise DarkKnowledgeError(f"run {path} does not exist; give a run directory written by 'darkknowledge "
                                 "train' or 'distill' (it holds model.json)")
    run_dir = checkpoint.resolve_run_dir(path)
    if (run_dir / checkpoint.MODEL_META).exists():
        return "model", run_dir, []
    members = sorted(p.parent for p in run_dir.glob("*/" + checkpoint.MODEL_META))
    if run_dir.is_dir() and members:
        return "ensemble", run_dir, members
    raise DarkKnowledgeError(f"{path} is not a run directory (no {checkpoint.MODEL_META}) nor an ensemble folder "
                             "(no member runs in its sub-folders); give a folder written by 'darkknowledge train' "
                             "or 'distill'")


def _load_ensemble(folder: Path, members: list[Path]) -> Deployable:
    ensemble = None
    if is_ensemble_dir(folder):  # from 'train --members': members as its manifest lists them; half-finished refused
        ensemble = Ensemble.from_dir(folder)
        members = [Path(run) for run in ensemble.runs]
    metas = [checkpoint.read_model_meta(m) for m in members]
    first = metas[0]
    for member, meta in zip(members, metas):
        if meta["classes"] != first["classes"] or meta["image_shape"] != first["image_shape"]:
            raise DarkKnowledgeError(f"ensemble {folder}: member {member} differs from {members[0]} in classes or "
                                     "image size; every member must be trained on the same dataset")
    model = ensemble if ensemble is not None else Ensemble.from_runs([str(m) for m in members])
    specs = sorted({m["spec"] for m in metas})
    spec = f"ensemble of {len(members)} x {specs[0]}" if len(specs) == 1 else f"ensemble of {len(members)}: " \
        + " + ".join(m["spec"] for m in metas)
    manifest = {}
    for candidate in sorted(folder.glob("*.json")):
        try:
            manifest[candidate.name] = json.loads(reading.read_bytes(candidate, "ensemble", reading.JSON_LIMIT))
        except (ValueError, OSError, DarkKnowledgeError):  # not JSON, not a file: not part of the manifest
            continue
    return Deployable(model.eval(), str(folder), "ensemble", spec, tuple(first["image_shape"]),
                      list(first["classes"]), first.get("dataset", "unknown"),
                      [m / meta["weights"] for m, meta in zip(members, metas)],
                      {"members": [str(m) for m in members], "member_meta": metas, "manifest": manifest})


def load_test_split(dataset: str, data_dir: str | os.PathLike | None = None):
    """The test split of a named dataset: the real inputs that exported files are checked and timed on."""
    if dataset == "unknown":
        raise DarkKnowledgeError("the run does not record its dataset; it cannot be checked on test inputs; give "
                                 "--data PATH")
    return load_dataset(dataset, data_dir).test


def test_set(deployable: Deployable, data_dir: str | os.PathLike | None = None,
             data_path: str | os.PathLike | None = None):
    """The cases exported files are checked and timed on: the test split of the data the run records (or of
    ``data_path``'s files, made into inputs by the run's transform); the validation split when there is no test
    split. Checked against the model's classes and input shape."""
    from dataclasses import replace

    from .data.transfer import input_shape
    from .jobs import DataChoice
    meta = deployable.training_meta
    if data_path is not None:
        data = replace(DataChoice(None, path=str(data_path)), transform=(meta.get("transfer_set") or {}).get(
            "transform"), val_size=0)
    elif meta.get("data"):
        data = DataChoice.from_meta(meta, data_dir)
    else:
        return _checked(deployable, load_test_split(deployable.dataset, data_dir))
    _, val, test = data.load()
    return _checked(deployable, test if test is not None else val, data.name)


def _checked(deployable: Deployable, test, name: str | None = None):
    from .data.transfer import input_shape
    name = name or deployable.dataset
    if test is None:
        raise DarkKnowledgeError(f"{name} has no test or validation split to check the export on; give --data "
                                 "PATH with test cases")
    if list(test.classes) != deployable.classes or input_shape(test) != tuple(deployable.image_shape):
        raise DarkKnowledgeError(f"{deployable.name} does not match the {name} test set (classes or input shape)")
    return test


def model_inputs(data, limit: int = 10000) -> torch.Tensor:
    """The first ``limit`` cases of a transfer set as one tensor of model-ready inputs (what an exported file
    takes)."""
    from .data.transfer import batches
    count = min(len(data), limit)
    parts = [x for x, _, _ in batches(data, list(torch.arange(count).split(4096)))]
    return torch.cat(parts) if parts else torch.empty(0)


# --- writing the files ----------------------------------------------------------------------------------------

@contextmanager
def _quiet_exporter():
    """The exporters narrate and warn about things irrelevant here (torchvision ops, torch.jit deprecation)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _example(image_shape: tuple[int, int], example: torch.Tensor | None) -> torch.Tensor:
    # Batch 4: torch.export would specialise a batch of 1 to a constant.
    if example is None:
        return torch.rand(4, *image_shape)
    return as_inputs(example[:4].clone())


class _TextInputs(nn.Module):
    """A text classifier (one ``[B, 2, L]`` tensor of ids and mask) as a graph of two named inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(torch.stack([input_ids, attention_mask], 1))


def is_text(image_shape: tuple[int, ...], example: torch.Tensor | None) -> bool:
    """Whether inputs are a text case ``[2, L]`` of int64 ids and mask (see data.text_table)."""
    return example is not None and example.dtype == torch.int64 and len(image_shape) == 2 and image_shape[0] == 2


def tokenizer_beside(out: str | os.PathLike) -> Path:
    """Where a text classifier's tokenizer is written: beside its file, ``student.onnx`` ->
    ``student.onnx.tokenizer.json`` (two exports in one folder keep theirs apart, as their model cards)."""
    out = Path(out)
    return out.with_name(out.name + ".tokenizer.json")


def onnx_feed(session, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """What an ONNX session of ours takes for model-ready ``inputs``: one input, or a text case's ids and mask."""
    names = [i.name for i in session.get_inputs()]
    if tuple(names) == TEXT_INPUT_NAMES:
        return {TEXT_INPUT_NAMES[0]: np.ascontiguousarray(inputs[:, 0]),
                TEXT_INPUT_NAMES[1]: np.ascontiguousarray(inputs[:, 1])}
    return {names[0]: inputs}


def export_onnx(model: nn.Module, out: str | os.PathLike, image_shape: tuple[int, int],
                metadata: dict[str, str] | None = None, example: torch.Tensor | None = None) -> Path:
    """Write ``model`` as one self-contained ONNX file with a dynamic batch dimension (``images`` -> ``logits``;
    a text classifier: ``input_ids``, ``attention_mask`` -> ``logits``)."""
    try:
        import onnx
    except ImportError:
        raise _extra_missing("onnx") from None
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise _extra_missing("onnxscript") from None
    out = Path(out)
    model = model.eval()
    x = _example(image_shape, example)
    batch = torch.export.Dim("batch")
    if is_text(image_shape, example):
        model, args, names, dynamic = _TextInputs(model), (x[:, 0], x[:, 1]), list(TEXT_INPUT_NAMES), \
            ({0: batch}, {0: batch})
    else:
        args, names, dynamic = (x,), [INPUT_NAME], ({0: batch},)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, input_names=names, output_names=[OUTPUT_NAME],
                                    dynamic_shapes=dynamic, opset_version=ONNX_OPSET, verbose=False)
    proto = program.model_proto
    props = {"preprocessing": (metadata or {}).pop("preprocessing", PREPROCESSING),
             "image_shape": json.dumps(list(image_shape)),
             **(metadata or {})}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "darkknowledge"
    onnx.checker.check_model(proto)
    checkpoint.atomic_write(out, lambda tmp: onnx.save_model(proto, tmp))
    return out


def export_torchscript(model: nn.Module, out: str | os.PathLike, image_shape: tuple[int, int],
                       example: torch.Tensor | None = None) -> Path:
    """Write ``model`` as a TorchScript archive (scripted; traced when it cannot be scripted)."""
    out = Path(out)
    model = model.eval()
    with _quiet_exporter(), torch.no_grad():
        try:
            scripted = torch.jit.script(model)
        except Exception:  # scripting rejects some Python (e.g. loops over a list of members): tracing records it
            scripted = torch.jit.trace(model, (_example(image_shape, example),), check_trace=False)
        checkpoint.atomic_write(out, lambda tmp: scripted.save(tmp))
    return out


def export_hf_folder(model: nn.Module, out: str | os.PathLike) -> Path:
    """Write a Hugging Face classifier (``hf-classifier:`` models) as the folder ``save_pretrained`` makes
    (config.json, model.safetensors), which ``from_pretrained`` and ``hf-classifier:FOLDER`` read back."""
    from .classifiers import SequenceClassifier, quiet_transformers
    quiet_transformers()
    if not isinstance(model, SequenceClassifier):
        raise DarkKnowledgeError("--format hf is for Hugging Face classifiers (hf-classifier: models); export this "
                                 "model as onnx or torchscript")
    model.model.save_pretrained(out, safe_serialization=True)
    return Path(out)


def export_model(model: nn.Module, out: str | os.PathLike, format: str, image_shape: tuple[int, int],
                 metadata: dict[str, str] | None = None, example: torch.Tensor | None = None) -> Path:
    """Export any ``nn.Module`` that maps float images ``[B, H, W]`` to scores ``[B, classes]`` (``hf``: a
    Hugging Face classifier, as its folder)."""
    check_format(format)
    if format == "hf":
        return export_hf_folder(model, out)
    if format == "onnx":
        return export_onnx(model, out, image_shape, metadata, example)
    return export_torchscript(model, out, image_shape, example)


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise DarkKnowledgeError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")


# --- running the files ----------------------------------------------------------------------------------------

def onnx_session(path: str | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session using ``threads`` threads for each operator, none across operators."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise _extra_missing("onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Scores of an ONNX session for float inputs ``[N, H, W]``, ``batch_size`` at a time."""
    chunks = [session.run(None, onnx_feed(session, inputs[i:i + batch_size]))[0]
              for i in range(0, len(inputs), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0,), np.float32)


@torch.no_grad()
def run_torchscript(path: str | os.PathLike, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    with _quiet_exporter():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return torch.cat([module(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


@dataclass
class Parity:
    """How closely an exported file reproduces the PyTorch model on real inputs, at several batch sizes."""

    format: str
    cases: int
    batch_sizes: list[int]
    max_abs_diff: float
    argmax_mismatches: int
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.argmax_mismatches == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return (f"{self.cases} test cases, batch sizes {', '.join(map(str, self.batch_sizes))}: max |logit "
                f"difference| {self.max_abs_diff:.2e} (tolerance {self.atol:g}), {self.argmax_mismatches} "
                "different predictions")


def check_parity(path: str | os.PathLike, format: str, model: nn.Module, images: torch.Tensor,
                 atol: float = DEFAULT_ATOL, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
                 threads: int = 1) -> Parity:
    """Run the exported file on ``images`` (uint8 images, or model-ready inputs) at each batch size and compare
    with the PyTorch model."""
    check_format(format)
    expected = predict_logits(model, images).numpy()
    inputs = as_inputs(images.clone())
    if format == "onnx":
        session = onnx_session(path, threads)
        run = lambda n, b: run_onnx(session, inputs[:n].numpy(), b)  # noqa: E731
    elif format == "hf":  # read back as a user would: from_pretrained on the folder
        from .classifiers import build
        reloaded = build(f"hf-classifier:{Path(path).resolve()}", tuple(inputs.shape[1:]), expected.shape[-1])
        run = lambda n, b: predict_logits(reloaded, inputs[:n], batch_size=b).numpy()  # noqa: E731
    else:
        run = lambda n, b: run_torchscript(path, inputs[:n], b).numpy()  # noqa: E731
    worst, mismatches = 0.0, 0
    for b in batch_sizes:
        n = len(images) if b >= 100 else min(len(images), 8 * b)  # small batches on a few cases: many calls
        got = run(n, b)
        if got.shape != expected[:n].shape:
            raise DarkKnowledgeError(f"exported {format} file {path} returned shape {list(got.shape)} for "
                                     f"{n} cases in batches of {b}; expected {list(expected[:n].shape)}")
        worst = max(worst, float(np.abs(got - expected[:n]).max()) if n else 0.0)
        mismatches += int((got.argmax(1) != expected[:n].argmax(1)).sum())
    return Parity(format, len(images), list(batch_sizes), worst, mismatches, atol)
