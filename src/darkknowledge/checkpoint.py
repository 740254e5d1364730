"""Checkpoints that lose nothing: safetensors for every tensor, a JSON sidecar for everything else.

Every file is written to a temporary name and renamed into place, so a crash leaves either the old file or the
new one, never half of one. Sidecars carry the SHA-256 of the tensors they describe: a corrupt or mismatched
file is detected on load. Nothing is ever unpickled.

A run directory holds:
  model.safetensors + model.json    the model to use (best on validation), with spec, classes, data hash, metrics
  state-eNNNN.safetensors + state.json   where training stopped: weights, optimizer state, history, for --resume
  metrics.jsonl                     one line per epoch

The model is a pair of files committed as a unit. Its new sidecar is first made durable as ``.model.json.next``
(with the new weights' checksum), then the weights are renamed into place, then the sidecar. A crash between the
renames leaves weights that only the pending sidecar vouches for: readers use it, and the next writer to open
the run renames it into place (a pending sidecar that vouches for nothing is dropped). So the previous pair stays
valid until the new one is complete. Every rename is followed by an fsync of the folder; temp files of a writer
that died are removed when the next one opens the run (under the run's lock, :mod:`darkknowledge.locks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import locks, reading, schemas
from .errors import DarkKnowledgeError, OtherKindOfRun, TrainingDiverged
from .memory import check_fits
from .models import build_model

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
STATE_META = "state.json"
PENDING_META = ".model.json.next"  # the sidecar of a model being committed (see the module doc)
FORMAT = "darkknowledge/1"
# Keys of a sidecar that say where a teacher's (or a generalist's) files are, not what it is: a run's key leaves them
# out, so moving a results folder, or naming a teacher by another path, keeps its students resumable. What the
# teacher is stays in the key through its weights' checksums.
LOCATION_KEYS = frozenset({"run", "ensemble"})


def _kill_here_for_tests() -> None:
    """Fault injection: with DARKKNOWLEDGE_KILL_AT_RENAME=N the process kills itself (SIGKILL, as a crash would)
    just before its N-th rename, so tests can stop a run in every window between two commits."""
    global _renames
    at = os.environ.get("DARKKNOWLEDGE_KILL_AT_RENAME")
    if at:
        _renames += 1
        if _renames == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


_renames = 0


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` made durable: the folder is fsynced so the new name survives a crash of the machine."""
    _kill_here_for_tests()
    os.replace(src, dst)
    fd = os.open(Path(dst).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, write) -> str:
    """Call ``write(tmp_path)`` on a temp file beside ``path`` (so a rename is atomic) and make it durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # make the bytes durable before the rename makes them visible
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash leaves the old file or the new one."""
    tmp = _write_temp(Path(path), write)
    try:
        replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp(folder: Path, prefix: str = ".") -> None:
    """Remove temp files (``.NAME.XXXX.tmp``) a killed writer left in ``folder``; call it holding the lock."""
    for stale in Path(folder).glob(f"{prefix}*.tmp"):
        stale.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(Path(path), write)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors atomically; returns the file's SHA-256 for the sidecar."""
    tensors = _finite(tensors, path)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))
    return sha256_file(path)


def _finite(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, refused if any holds NaN or inf: nothing diverged is ever saved. Tensors that share
    memory (a Hugging Face model's ``lm_head`` tied to its embedding) are saved once each: safetensors refuses
    shared tensors, and loading the state dict ties them again (both names are the one parameter)."""
    seen, out = set(), {}
    for name, value in tensors.items():
        value = value.detach().contiguous().cpu()
        shared = value.untyped_storage().data_ptr() in seen and value.numel() > 0
        seen.add(value.untyped_storage().data_ptr())
        out[name] = value.clone() if shared else value
    tensors = out
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TrainingDiverged(f"training diverged: {name} holds NaN or inf, so {path} was not written; "
                                   "use a lower --lr (or --weight-decay)")
    return tensors


def sha256_file(path: Path) -> str:
    reading.check_file(path, "checksum", None)  # hashing a FIFO would wait, a device would never end
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, what: str) -> dict:
    """The parsed JSON of ``path``, a regular file of bounded size (:mod:`darkknowledge.reading`); else one line."""
    try:
        return json.loads(reading.read_text(path, what, reading.JSON_LIMIT))
    except FileNotFoundError:
        raise DarkKnowledgeError(f"{what}: {path} not found; check the path (a run directory holds {MODEL_META})") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DarkKnowledgeError(f"{what}: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                                 "the file is corrupt: retrain or restore it") from None


def read_tensors(path: Path, sha256: str, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against the checksum its sidecar recorded, and that it is a file
    of its own folder (a link out of the folder would let one run use, or be, another's file) holding only finite
    numbers (nothing NaN or inf is ever written, so such a file was not)."""
    path = Path(path)
    if not path.is_file():  # a file of the run, not a device or a folder
        raise DarkKnowledgeError(f"{what}: {path} is missing; the run directory is incomplete: retrain or restore it")
    if path.resolve().parent != path.parent.resolve():
        raise DarkKnowledgeError(f"{what}: {path} is a link to {path.resolve()}, outside its folder; a run's files "
                                 "are its own: copy the file in place of the link, or retrain")
    if sha256_file(path) != sha256:
        raise DarkKnowledgeError(f"{what}: {path} does not match the checksum in its sidecar (corrupt or replaced); "
                                 "retrain or restore the file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise DarkKnowledgeError(f"{what}: cannot read {path} ({e}); retrain or restore it") from None
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DarkKnowledgeError(f"{what}: {path} holds NaN or inf in {name}, which no run saves (the file was "
                                     "replaced); retrain or restore it")
    return tensors


def load_weights(model: nn.Module, path: Path, sha256: str, what: str) -> nn.Module:
    """``model`` with the checksummed weights of ``path`` loaded, after checking they are the ones it expects: the
    same names and shapes, and floating point where its own are (an integer file would be cast silently)."""
    tensors = read_tensors(path, sha256, what)
    expected = model.state_dict()
    for name, value in tensors.items():
        if name in expected and value.is_floating_point() != expected[name].is_floating_point():
            raise DarkKnowledgeError(f"{what}: {path} holds {name} as {str(value.dtype).removeprefix('torch.')} "
                                     f"where the model has {str(expected[name].dtype).removeprefix('torch.')}; "
                                     "the file was replaced: retrain or restore it")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise DarkKnowledgeError(f"{what}: weights in {path} do not fit the model its sidecar describes "
                                 f"({str(e).splitlines()[0]}); retrain or restore the run") from None
    return model


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
    """Commit the model weights and the sidecar that vouches for them (spec, image_shape, classes, ...) as a unit:
    the pending sidecar first, then the weights, then the sidecar (see the module doc)."""
    run_dir = Path(run_dir)
    tensors = _finite(model.state_dict(), run_dir / MODEL_WEIGHTS)
    weights = _write_temp(run_dir / MODEL_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    try:
        write_json(run_dir / PENDING_META, {"format": FORMAT, **meta, "weights": MODEL_WEIGHTS,
                                            "weights_sha256": sha256_file(weights), "provenance": provenance()})
        replace(weights, run_dir / MODEL_WEIGHTS)
    except BaseException:
        Path(weights).unlink(missing_ok=True)
        raise
    replace(run_dir / PENDING_META, run_dir / MODEL_META)


def _pending_meta(run_dir: Path) -> dict[str, Any] | None:
    """The pending sidecar, if there is one, it fits the schema of its own kind (image or language model) and the
    weights in place are the ones it vouches for."""
    try:
        pending = read_json(run_dir / PENDING_META, "model")
        schemas.check(schemas.sidecar_schema(pending), pending, run_dir / PENDING_META, "")
        if sha256_file(run_dir / pending["weights"]) == pending["weights_sha256"]:
            return pending
    except (OSError, ValueError, DarkKnowledgeError):
        pass
    return None


def read_model_meta(run_dir: str | os.PathLike, schema: type = schemas.ModelSidecar) -> dict[str, Any]:
    """The sidecar of a run's model, checked against ``schema`` (an image model's, or
    :class:`schemas.LanguageModelSidecar`); a pending one (a commit cut short between its renames) when the weights
    in place are the ones it vouches for. A run of the other kind is refused with :class:`OtherKindOfRun`."""
    run_dir = resolve_run_dir(run_dir)
    path, meta = run_dir / PENDING_META, _pending_meta(run_dir)
    if meta is None:
        path, meta = run_dir / MODEL_META, read_json(run_dir / MODEL_META, "model")
    if isinstance(meta, dict) and meta.get("format") == FORMAT and "spec" not in meta:  # fit, a user's module
        raise DarkKnowledgeError(f"model: {path} records no spec, so its model cannot be rebuilt; "
                                 "make the model with darkknowledge.build_model (a spec, or "
                                 "'package.module:factory') before fit, or pass fit meta={'spec': ...}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DarkKnowledgeError(f"model: {path} is not a darkknowledge model sidecar; point to a "
                                 "run directory made by 'darkknowledge train', 'distill' or 'reproduce'")
    if schemas.sidecar_schema(meta) is not schema:
        raise OtherKindOfRun(f"model: {run_dir} holds {schemas.sidecar_schema(meta).holds}, not {schema.holds}: "
                             "language models are for 'generate' and 'reproduce lm', image models for the other "
                             "commands; give a run of that kind")
    return schemas.check(schema, meta, path, "retrain the model or restore the file")


def load_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its sidecar and checksummed weights; returns (model in eval mode, meta)."""
    run_dir = resolve_run_dir(run_dir)
    meta = read_model_meta(run_dir)
    shape = tuple(meta.get("input_shape", meta["image_shape"]))
    check_fits(meta["spec"], shape, len(meta["classes"]), meta.get("model_options"), copies=2)  # may name any size
    model = build_model(meta["spec"], shape, len(meta["classes"]), meta.get("model_options"))
    return load_weights(model, run_dir / meta["weights"], meta["weights_sha256"], "model").eval(), meta


def recover(run_dir: Path) -> None:
    """Finish or drop a model commit a crash cut short, and remove temp files of dead writers. Call it holding
    the run's lock (:func:`open_run` does)."""
    run_dir = Path(run_dir)
    if (run_dir / PENDING_META).exists():
        if _pending_meta(run_dir) is not None:
            replace(run_dir / PENDING_META, run_dir / MODEL_META)
        else:  # cut short before the weights were renamed: the previous pair is the model
            (run_dir / PENDING_META).unlink()
    remove_stale_temp(run_dir)


@contextlib.contextmanager
def open_run(run_dir: str | os.PathLike | None, what: str = "run folder") -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block, after recovering it from a crash; nothing for ``None``.

    A block that fails (a refused option, bad data, an interrupt) before it wrote anything leaves no trace: the
    folders this call made are removed again when they hold only the lock file, so a refused run leaves no empty
    run folder behind to be mistaken for a run."""
    if run_dir is None:
        yield
        return
    made = [p for p in (Path(run_dir).absolute(), *Path(run_dir).absolute().parents) if not p.exists()]
    try:
        with locks.hold_folder(run_dir, what):
            recover(Path(run_dir))
            yield
    except BaseException:
        _remove_if_untouched(made)
        raise


def _remove_if_untouched(made: list[Path]) -> None:
    """Remove the folders in ``made`` (innermost first) that hold nothing but a lock file."""
    for folder in made:
        try:
            if {p.name for p in folder.iterdir()} <= {locks.LOCK_FILE}:
                (folder / locks.LOCK_FILE).unlink(missing_ok=True)
                folder.rmdir()
        except OSError:  # written to meanwhile, or never made: keep what is there
            return


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


def read_training_state(run_dir: Path) -> dict[str, Any]:
    """``state.json`` of a run, checked against its schema."""
    path = Path(run_dir) / STATE_META
    return schemas.check(schemas.TrainingState, read_json(path, "training state"), path,
                         "delete the run folder's state* files to train again, or restore the file")


def load_training_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore model and optimizer from the last saved epoch; None when the run has no saved state yet."""
    path = Path(run_dir) / STATE_META
    if not path.exists():
        return None
    meta = read_training_state(run_dir)
    tensors = read_tensors(Path(run_dir) / meta["tensors"], meta["tensors_sha256"], "training state")
    opt_state: dict[int, dict[str, Any]] = {}
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        for key, value in meta["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            opt_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise DarkKnowledgeError(f"training state: {path} does not fit this model and optimizer "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); resume with the "
                                 "options the run was started with, or choose another output directory") from None
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


def _first_epoch_model(run_dir: Path) -> bool:
    """Whether the model in ``run_dir`` is from epoch 0 or 1: what a run killed before its first state leaves."""
    try:
        epoch = read_model_meta(run_dir).get("epoch")
    except DarkKnowledgeError:
        return False
    return isinstance(epoch, int) and not isinstance(epoch, bool) and epoch <= 1


def check_startable(run_dir: Path, resume: bool, kind: str = "training run",
                    elsewhere: str = "choose another output directory") -> bool:
    """Whether ``run_dir`` holds a saved state to resume (True) or is a new run (False); refused in one line when it
    holds a state and ``resume`` is not set, or a model without a state (it would be overwritten). Cheap: a job
    calls it before costly work (a teacher's outputs), and the loop again when it starts."""
    if not (Path(run_dir) / STATE_META).exists():
        if (Path(run_dir) / MODEL_META).exists() and not (resume and _first_epoch_model(Path(run_dir))):
            raise DarkKnowledgeError(f"{run_dir} holds a model but no training state ({STATE_META} was removed), "
                                     f"so it can be neither resumed nor safely overwritten; {elsewhere}, or delete "
                                     "the folder to train it again")
        return False  # a new run (or one killed between its first model and its first state: started again)
    if not resume:
        raise DarkKnowledgeError(f"{run_dir} already holds a {kind}; pass --resume to continue it or {elsewhere}")
    return True


def resume_training_state(run_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, run_key: str,
                          resume: bool, kind: str = "training run", made_of: str = "model",
                          legacy_keys: tuple[str, ...] = (), epochs: int | None = None,
                          best_key: str = "val_errors",
                          elsewhere: str = "choose another output directory") -> dict[str, Any] | None:
    """The saved state of ``run_dir`` restored into model and optimizer, or None for a new run. Refuses a saved
    run unless ``resume`` is set, one made with other settings (another ``run_key``), one whose state says it
    stopped outside ``0..epochs``, and a folder holding a model without a state (it would be overwritten).
    ``legacy_keys``: keys older versions saved the same run with, also accepted (the next checkpoint stores
    ``run_key``). ``best_key``: what the loop compares epochs by, which ``best`` must hold.
    ``elsewhere``: how the refusals tell the user to start a new run instead."""
    if run_dir is None or not check_startable(run_dir, resume, kind, elsewhere):
        return None
    fix = "delete the run folder's state* files to train again, or restore the file"
    saved = schemas.check(schemas.ResumableState, read_training_state(run_dir), Path(run_dir) / STATE_META, fix)
    if best_key not in saved["best"]:
        raise DarkKnowledgeError(f"{Path(run_dir) / STATE_META} is not a valid training state: field "
                                 f"'best.{best_key}': Field required; {fix}")
    state = load_training_state(run_dir, model, optimizer)
    if state["run_key"] not in (run_key, *legacy_keys):
        raise DarkKnowledgeError(f"{run_dir} holds a {kind} with other settings, {made_of} or data; resume it with "
                                 f"the same options, or {elsewhere}")
    if epochs is not None and not 0 <= state["epoch"] <= epochs:
        raise DarkKnowledgeError(f"{Path(run_dir) / STATE_META} says training stopped after epoch {state['epoch']}, "
                                 f"outside 0..{epochs}; the file was edited or is corrupt: restore it, or delete the "
                                 "folder's state* files to train again")
    return state
