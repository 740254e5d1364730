"""Checkpoints that lose nothing: safetensors for every tensor, a JSON sidecar for everything else.

Every file is written to a temporary name and renamed into place, so a crash leaves either the old file or the
new one, never half of one. Sidecars carry the SHA-256 of the tensors they describe: a corrupt or mismatched
file is detected on load. Nothing is ever unpickled.

A run directory holds:
  model.safetensors + model.json    the model to use (best on validation), with spec, classes, data hash, metrics
  state-eNNNN.safetensors + state.json   where training stopped: weights, optimizer state, history, for --resume
  metrics.jsonl                     one line per epoch
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DarkKnowledgeError
from .models import build_model

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
STATE_META = "state.json"
FORMAT = "darkknowledge/1"
# Keys of a sidecar that say where a teacher's (or a generalist's) files are, not what it is: a run's key leaves them
# out, so moving a results folder, or naming a teacher by another path, keeps its students resumable. What the
# teacher is stays in the key through its weights' checksums.
LOCATION_KEYS = frozenset({"run", "ensemble"})


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``; the temp file lives beside it so rename is atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # make the bytes durable before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(Path(path), write)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors atomically; returns the file's SHA-256 for the sidecar."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DarkKnowledgeError(f"{what}: {path} not found; check the path (a run directory holds {MODEL_META})") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DarkKnowledgeError(f"{what}: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                                 "the file is corrupt: retrain or restore it") from None


def read_tensors(path: Path, sha256: str, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against the checksum its sidecar recorded."""
    if not path.exists():
        raise DarkKnowledgeError(f"{what}: {path} is missing; the run directory is incomplete: retrain or restore it")
    if sha256_file(path) != sha256:
        raise DarkKnowledgeError(f"{what}: {path} does not match the checksum in its sidecar (corrupt or replaced); "
                                 "retrain or restore the file")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise DarkKnowledgeError(f"{what}: cannot read {path} ({e}); retrain or restore it") from None


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Versions and git commit, recorded in every sidecar so a result can be traced to the code that made it."""
    from . import __version__
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"darkknowledge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": commit}


def resolve_run_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory or the path of its model.json."""
    path = Path(path)
    return path.parent if path.name == MODEL_META else path


def save_model(run_dir: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the model weights, then the sidecar that vouches for them (spec, image_shape, classes, ...)."""
    run_dir = Path(run_dir)
    digest = write_tensors(run_dir / MODEL_WEIGHTS, model.state_dict())
    write_json(run_dir / MODEL_META, {"format": FORMAT, **meta, "weights": MODEL_WEIGHTS, "weights_sha256": digest,
                                      "provenance": provenance()})


def read_model_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = resolve_run_dir(run_dir)
    meta = read_json(run_dir / MODEL_META, "model")
    missing = [k for k in ("format", "spec", "image_shape", "classes", "weights_sha256") if k not in meta]
    if meta.get("format") == FORMAT and missing == ["spec"]:  # written by fit for a module of the user's own
        raise DarkKnowledgeError(f"model: {run_dir / MODEL_META} records no spec, so its model cannot be rebuilt; "
                                 "make the model with darkknowledge.build_model (a spec, or "
                                 "'package.module:factory') before fit, or pass fit meta={'spec': ...}")
    if meta.get("format") != FORMAT or missing:
        raise DarkKnowledgeError(f"model: {run_dir / MODEL_META} is not a darkknowledge model sidecar "
                                 f"(missing {', '.join(missing) or 'format'}); point to a run directory made by "
                                 "'darkknowledge train' or 'distill'")
    return meta


def load_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its sidecar and checksummed weights; returns (model in eval mode, meta)."""
    run_dir = resolve_run_dir(run_dir)
    meta = read_model_meta(run_dir)
    model = build_model(meta["spec"], tuple(meta.get("input_shape", meta["image_shape"])), len(meta["classes"]),
                        meta.get("model_options"))
    tensors = read_tensors(run_dir / meta["weights"], meta["weights_sha256"], "model")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise DarkKnowledgeError(f"model: weights in {run_dir} do not fit spec {meta['spec']!r} "
                                 f"({str(e).splitlines()[0]})") from None
    return model.eval(), meta


def save_training_state(run_dir: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any]) -> None:
    """Record where training stopped. The tensors go to a new file per epoch; the sidecar's rename commits it."""
    run_dir = Path(run_dir)
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars = {}
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    name = f"state-e{epoch:04d}.safetensors"
    digest = write_tensors(run_dir / name, tensors)
    write_json(run_dir / STATE_META, {"format": FORMAT, "epoch": epoch, "tensors": name, "tensors_sha256": digest,
                                      "optimizer_param_groups": opt["param_groups"],
                                      "optimizer_scalars": scalars, **state})
    for old in run_dir.glob("state-e*.safetensors"):  # older states are no longer referenced
        if old.name != name:
            old.unlink(missing_ok=True)


def load_training_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore model and optimizer from the last saved epoch; None when the run has no saved state yet."""
    path = Path(run_dir) / STATE_META
    if not path.exists():
        return None
    meta = read_json(path, "training state")
    tensors = read_tensors(Path(run_dir) / meta["tensors"], meta["tensors_sha256"], "training state")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    return meta


def without_locations(value: Any) -> Any:
    """``value`` (a sidecar, or part of one) without its :data:`LOCATION_KEYS`, at any depth."""
    if isinstance(value, dict):
        return {k: without_locations(v) for k, v in value.items() if k not in LOCATION_KEYS}
    if isinstance(value, list):
        return [without_locations(v) for v in value]
    return value


def run_key(meta: dict[str, Any], *parts: str, locations: bool = False) -> str:
    """What must match for --resume to continue a run: its sidecar ``meta`` without locations, and ``parts``
    (fingerprints, settings). ``locations=True``: the older key, which held them (see ``resume_training_state``)."""
    described = json.dumps(meta if locations else without_locations(meta), sort_keys=True, default=str)
    return hashlib.sha256("\n".join([described, *parts]).encode()).hexdigest()


def resume_training_state(run_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, run_key: str,
                          resume: bool, kind: str = "training run", made_of: str = "model",
                          legacy_key: str | None = None,
                          elsewhere: str = "choose another output directory") -> dict[str, Any] | None:
    """The saved state of ``run_dir`` restored into model and optimizer, or None for a new run. Refuses a saved
    run unless ``resume`` is set, and one made with other settings (another ``run_key``). ``legacy_key``: the key
    runs saved before locations were left out of it have, also accepted (the next checkpoint stores ``run_key``).
    ``elsewhere``: how the refusals tell the user to start a new run instead."""
    if run_dir is None or not (Path(run_dir) / STATE_META).exists():
        return None
    if not resume:
        raise DarkKnowledgeError(f"{run_dir} already holds a {kind}; pass --resume to continue it or {elsewhere}")
    state = load_training_state(run_dir, model, optimizer)
    if state["run_key"] not in (run_key, legacy_key):
        raise DarkKnowledgeError(f"{run_dir} holds a {kind} with other settings, {made_of} or data; resume it with "
                                 f"the same options, or {elsewhere}")
    return state
