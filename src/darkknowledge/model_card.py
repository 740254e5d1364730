"""The model card written beside every exported file: what the model is, what it was trained on and by whom
(which teacher, at what temperature), how to feed it, how accurate and how fast it is, and how it was made."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import checkpoint
from .export import INPUT_NAME, OUTPUT_NAME, PREPROCESSING, TEXT_INPUT_NAMES, Deployable, Parity, tokenizer_beside


def _teacher_lines(meta: dict[str, Any]) -> list[str]:
    teacher = meta.get("teacher")
    if meta.get("objective") != "distillation" and not teacher:
        return ["Not distilled: trained on the hard labels of its training set (a teacher or a baseline)."]
    lines = []
    if isinstance(teacher, dict):
        lines.append(f"- Teacher: `{teacher.get('run', '?')}`, spec `{teacher.get('spec', '?')}`, weights SHA-256 "
                     f"`{str(teacher.get('weights_sha256', '?'))[:16]}...`")
    elif teacher:
        lines.append(f"- Teacher: {teacher}")
    for key, label in (("temperature", "Temperature T"), ("soft_weight", "Soft-target weight (x T^2, §2)"),
                       ("hard_weight", "Hard-label weight")):
        if key in meta:
            lines.append(f"- {label}: {meta[key]:g}")
    if "divergence" in meta:  # recorded only when not the paper's forward KL
        beta = f", beta {meta['beta']:g}" if "beta" in meta else ""
        lines.append(f"- Soft term: {meta['divergence']}{beta} instead of the paper's forward KL")
    return lines


def _data_lines(deployable: Deployable) -> list[str]:
    meta = deployable.meta if deployable.kind == "model" else deployable.meta["member_meta"][0]
    lines = [f"- Dataset: {deployable.dataset}; classes in output order: {', '.join(deployable.classes)}"]
    if "data_fingerprint" in meta:
        lines.append(f"- Training data fingerprint (SHA-256 of inputs and labels): `{meta['data_fingerprint']}`")
    validation = meta.get("validation")
    selected = bool(validation) and validation.get("size") != 0  # size 0: trained on every training case
    if selected:
        size = "the dataset's default number of" if validation.get("size") is None else validation["size"]
        lines.append(f"- Validation split (model selection only): {size} cases cut from the training set, "
                     f"seed {validation.get('seed')}")
    elif validation:
        lines.append("- Validation split: none; trained on every training case")
    if "subset" in meta:
        lines.append(f"- Training subset: {meta['subset']} cases")
    if "train_classes" in meta:
        lines.append(f"- Transfer set restricted to classes {meta['train_classes']}")
    training = meta.get("training")
    if training:
        lines.append(f"- Training: {training.get('epochs')} epoch(s), batch {training.get('batch_size')}, lr "
                     f"{training.get('lr')}, jitter {training.get('jitter')} px, seed {training.get('seed')}; "
                     + (f"best validation epoch {meta.get('epoch', '?')}" if selected
                        else f"last epoch kept ({meta.get('epoch', '?')})"))
    return lines


def _speed_lines(speed: dict[str, Any] | None) -> list[str]:
    if not speed:
        return ["Not measured (run `darkknowledge bench` on the run folder)."]
    from .bench import machine
    info = machine()
    first = next(iter(speed.values()))
    lines = [f"Quick measurement at export time on {info['cpu']} ({info['cpu_count']} cores), "
             f"{first['latency_calls']} batch-1 calls and {first['throughput_calls']} calls at batch "
             f"{first['batch_size']}; `darkknowledge bench` measures longer.", "",
             "| runtime | latency ms, batch 1 (median / p99) | throughput, cases/s |", "|---|---:|---:|"]
    for runtime, s in speed.items():
        name = {"pytorch": f"PyTorch {info['torch']}", "onnxruntime": f"onnxruntime {info.get('onnxruntime', '')}"}
        lines.append(f"| {name.get(runtime, runtime)} | {s['latency_ms_median']:.3f} / {s['latency_ms_p99']:.3f} | "
                     f"{s['throughput_per_s']:,.0f} |")
    return lines


def _usage(format: str, file: str, deployable: Deployable) -> list[str]:
    if deployable.tokenizer is not None:  # a text classifier: its tokenizer makes both inputs
        length = deployable.image_shape[-1]
        code = ["import numpy as np, onnxruntime as ort", "from tokenizers import Tokenizer",
                f"tokenizer = Tokenizer.from_file({tokenizer_beside(file).name!r})",
                f"tokenizer.enable_truncation({length})",
                f"tokenizer.enable_padding(length={length})  # pad_id: the id of its [PAD] token",
                f"session = ort.InferenceSession({file!r})",
                "encoded = tokenizer.encode_batch(texts)",
                "feed = {'input_ids': np.array([e.ids for e in encoded], np.int64),",
                "        'attention_mask': np.array([e.attention_mask for e in encoded], np.int64)}",
                "predictions = session.run(None, feed)[0].argmax(1)"]
        if format == "hf":
            folder = file  # an hf export's card names its folder
            code = ["from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast",
                    f"model = AutoModelForSequenceClassification.from_pretrained({folder!r})",
                    f"tokenizer = PreTrainedTokenizerFast(tokenizer_file={folder + '/tokenizer.json'!r}, "
                    "pad_token='[PAD]')  # its padding token",
                    f"inputs = tokenizer(texts, truncation=True, max_length={length}, padding='max_length', "
                    "return_tensors='pt')",
                    "predictions = model(input_ids=inputs['input_ids'], "
                    "attention_mask=inputs['attention_mask']).logits.argmax(1)"]
        if format in ("onnx", "hf"):
            return ["```python", *code, "```"]
    if deployable.preprocessing != PREPROCESSING:  # not the built-in images: the inputs as the model took them
        made = "inputs = ...  # " + deployable.preprocessing
        call = f"session.run(None, {{{INPUT_NAME!r}: inputs}})[0]" if format == "onnx" else "model(inputs)"
        load = [f"import onnxruntime as ort", f"session = ort.InferenceSession({file!r})"] if format == "onnx" \
            else ["import torch  # a TorchScript file runs the code inside it: load only files you trust",
                  f"model = torch.jit.load({file!r})"]
        return ["```python", *load, made, f"predictions = {call}.argmax(-1)", "```"]
    h, w = deployable.image_shape
    if format == "onnx":
        code = ["import numpy as np, onnxruntime as ort",
                f"session = ort.InferenceSession({file!r})",
                f"images = np.asarray(uint8_images, dtype=np.float32).reshape(-1, {h}, {w}) / 255",
                f"logits = session.run(None, {{{INPUT_NAME!r}: images}})[0]",
                "predictions = logits.argmax(1)"]
    else:
        code = ["import torch  # a TorchScript file runs the code inside it: load only files you trust",
                f"model = torch.jit.load({file!r})",
                f"images = torch.as_tensor(uint8_images).reshape(-1, {h}, {w}).float() / 255",
                "predictions = model(images).argmax(1)"]
    return ["```python", *code, "```"]


def _inputs_line(deployable: Deployable) -> str:
    if deployable.tokenizer is not None:
        return f"- Inputs `{'`, `'.join(TEXT_INPUT_NAMES)}`: {deployable.preprocessing}; batch size free."
    return (f"- Input `{INPUT_NAME}`: {deployable.preprocessing}; shape [batch, "
            f"{', '.join(map(str, deployable.image_shape))}], batch size free.")


def render_model_card(deployable: Deployable, exported: Path, format: str, parity: Parity,
                      accuracy: dict[str, Any], speed: dict[str, Any] | None, command: str | None) -> str:
    meta = deployable.meta
    now = checkpoint.provenance()
    trained = (meta.get("provenance") or {}) if deployable.kind == "model" else \
        (meta["member_meta"][0].get("provenance") or {})
    from .models import count_parameters
    errors, total = accuracy["errors"], accuracy["total"]
    per_class = accuracy.get("per_class_errors")
    per_class_text = ", ".join(f"{c}: {e}" for c, e in zip(deployable.classes, per_class)) if per_class else ""
    lines = [
        f"# Model card: {exported.name}",
        "",
        f"{'An ensemble' if deployable.kind == 'ensemble' else 'A model'} exported by darkknowledge "
        f"(knowledge distillation, Hinton, Vinyals & Dean 2015) as {format} from `{deployable.name}`.",
        "",
        "## Model",
        f"- Architecture: `{deployable.spec}`, {count_parameters(deployable.model):,} parameters",
        f"- File: `{exported.name}` ({format}, {exported.stat().st_size:,} bytes, SHA-256 "
        f"`{checkpoint.sha256_file(exported)}`)",
    ]
    if deployable.kind == "ensemble":
        lines.append(f"- Members: {', '.join(f'`{m}`' for m in meta['members'])}")
    else:
        lines.append(f"- Weights it was exported from: `{meta['weights']}` (SHA-256 `{meta['weights_sha256']}`)")
    lines += [
        "",
        "## Inputs and outputs",
        _inputs_line(deployable),
        f"- Output `{OUTPUT_NAME}`: float32 [batch, {len(deployable.classes)}], one score per class in the order "
        f"{', '.join(deployable.classes)}; the prediction is the argmax, probabilities are softmax(logits) (temperature 1: T > 1 is only "
        "for training).",
        "",
        *_usage(format, exported.parent.name if format == "hf" else exported.name, deployable),
        "",
        "## Training data",
        *_data_lines(deployable),
        "",
        "## Teacher",
        *(_teacher_lines(meta) if deployable.kind == "model" else
          ["An ensemble: its members were trained on hard labels; it is meant to be a teacher."]),
        "",
        "## Accuracy",
        f"- {deployable.dataset} test set: {errors} errors in {total} cases ({100 * errors / max(total, 1):.2f}% "
        f"error, accuracy {100 * accuracy['accuracy']:.2f}%), measured with PyTorch at export time",
    ]
    if per_class_text:
        lines.append(f"- Errors per true class: {per_class_text}")
    lines += [
        f"- The exported file against PyTorch: {parity.describe()}",
        "",
        "## Speed",
        *_speed_lines(speed),
        "",
        "## Provenance",
        f"- Command: `{command or 'darkknowledge.deploy.export_run (Python)'}`",
        f"- Exported with darkknowledge {now.get('darkknowledge')} at git commit `{now.get('git_commit')}`, "
        f"torch {now.get('torch')}",
        f"- Model trained at git commit `{trained.get('git_commit')}`, torch {trained.get('torch')}",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, deployable: Deployable, exported: Path, format: str, parity: Parity,
                     accuracy: dict[str, Any], speed: dict[str, Any] | None, command: str | None) -> Path:
    path = Path(path)
    text = render_model_card(deployable, Path(exported), format, parity, accuracy, speed, command)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    os.chmod(path, 0o644)
    return path
