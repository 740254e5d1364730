"""Whole jobs on a named dataset: train a model, distil a teacher into a student, evaluate a saved run.

They glue data, models, the training loop and checkpoints together with the bookkeeping a run needs
(validation split, sidecar metadata, class checks). The CLI and the experiments call these.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .distributed import current
from .augment import check_jitter
from .data import DEFAULT_VALIDATION_SIZE, LabeledImages, load_dataset, validation_split
from .data.files import DEFAULT_VALIDATION_FRACTION as DEFAULT_FILES_VALIDATION, load_files
from .data.idx import sha256_file
from .data.text_table import DEFAULT_MAX_LENGTH, load_text_table, load_tokenizer, tokenizer_path
from .data.transfer import Transform, input_shape, subset
from .evaluation import labels_of
from .ensemble import MANIFEST, Ensemble, is_ensemble_dir, read_manifest, write_manifest
from .classifiers import complete_spec, init_from_teacher as init_weights
from .devices import resolve_device
from .errors import DarkKnowledgeError
from .evaluation import evaluate
from .memory import check_fits
from .pretrained import is_language_model
from .models import build_model, count_parameters, parse_spec
from .soft_targets import SoftTargets, check_layout_temperature
from .losses import DEFAULT_DIVERGENCE
from .training import (Distillation, FitResult, HardTargets, TrainConfig, cache_teacher_logits, check_precision,
                       fit, run_key, silent)


def _count(size: int | float | None) -> int | float | None:
    """A whole validation size as the count it is: ``0.0`` from the command line and ``0`` from Python are one
    run (a fraction below 1 stays a fraction)."""
    return int(size) if isinstance(size, float) and size.is_integer() else size


@dataclass
class DataChoice:
    """Which data a job uses: a dataset name (and where its files are) or a user's files (``path``: see
    :mod:`darkknowledge.data.files`), how the validation split is cut, and optionally a smaller or
    class-restricted training (transfer) set."""

    dataset: str | None = "digits"
    data_dir: str | None = None
    download: bool = False
    val_size: int | float | None = None  # None: the dataset's documented default; 0: no validation split
    val_seed: int = 0
    subset: int | None = None  # use only this many training cases (a seeded random choice), before the split
    train_classes: tuple[int, ...] | None = None  # keep only these labels in the training part (§3's "no 3s")
    train_subset: int | None = None  # keep only this many cases of the training part, after the validation split
    # (a seeded random choice, so the validation split is the one the whole training set has: §6's 3%)
    path: str | None = None  # a user's files instead of a named dataset
    label_column: str | None = None  # a table's label column (default: label)
    image_size: tuple[int, int] | None = None  # resize an image folder's images to (height, width)
    transform: dict[str, Any] | None = None  # a saved model's recorded transform, applied instead of the files'
    text_columns: tuple[str, ...] | None = None  # a table of labelled text: its text column (two for pairs)
    tokenizer: str | None = None  # the tokenizer.json (or a folder holding one) that tokenises the text
    max_length: int | None = None  # tokens per text, truncated or padded (None: text_table.DEFAULT_MAX_LENGTH)
    cache_dir: str | None = None  # where the tokenised text is cached (the jobs: beside the run); not recorded

    @property
    def vocab_size(self) -> int | None:
        """The text tokenizer's vocabulary (None for other data)."""
        return load_tokenizer(self.tokenizer).get_vocab_size() if self.text_columns and self.tokenizer else None

    @property
    def name(self) -> str:
        return f"data:{Path(self.path).name}" if self.path is not None else self.dataset

    def splits(self):
        if self.text_columns:
            if self.tokenizer is None:
                raise DarkKnowledgeError("text needs a tokenizer: give --tokenizer PATH (a tokenizer.json, or a "
                                         "model folder holding one)")
            return load_text_table(self.path, self.text_columns, self.label_column, self.tokenizer,
                                   self.max_length or DEFAULT_MAX_LENGTH, self.cache_dir)
        if self.path is not None:
            return load_files(self.path, self.label_column, self.image_size,
                              Transform.from_description(self.transform) if self.transform else None)
        return load_dataset(self.dataset, self.data_dir, self.download)

    def load(self) -> tuple[Any, Any | None, Any | None]:
        """(train, validation or None, test or None: a user's files may have no test split). Validation keeps
        every class, even with ``train_classes``."""
        splits = self.splits()
        train = splits.train
        if self.subset is not None:
            if not 0 < self.subset <= len(train):
                raise DarkKnowledgeError(f"subset must be between 1 and {len(train)}, got {self.subset}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.val_seed))
            train = subset(train, order[:self.subset].sort().values)
        size = DEFAULT_VALIDATION_SIZE.get(self.dataset, DEFAULT_FILES_VALIDATION) if self.val_size is None \
            else self.val_size
        val = None
        if size:
            train, val = validation_split(train, size, self.val_seed)
        if self.train_subset is not None:
            if not 0 < self.train_subset <= len(train):
                raise DarkKnowledgeError(f"train_subset must be between 1 and {len(train)}, got {self.train_subset}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.val_seed + 1))
            train = subset(train, order[:self.train_subset].sort().values)
        if self.train_classes is not None:
            train = train.where_labels(self.train_classes) if hasattr(train, "where_labels") else \
                subset(train, torch.isin(labels_of(train), torch.tensor(self.train_classes)))
        return train, val, splits.test

    def describe(self, train) -> dict[str, Any]:
        described = {"dataset": self.name, "data_fingerprint": train.fingerprint(),
                     "validation": {"size": _count(self.val_size), "seed": self.val_seed}}
        if self.path is not None:
            described["data"] = {"path": str(Path(self.path).expanduser().resolve()),
                                 "label_column": self.label_column,
                                 "image_size": list(self.image_size) if self.image_size else None}
            if self.text_columns:
                tokenizer = tokenizer_path(self.tokenizer)
                described["data"].update(text_columns=list(self.text_columns), tokenizer=str(tokenizer),
                                         tokenizer_sha256=sha256_file(tokenizer),
                                         max_length=self.max_length or DEFAULT_MAX_LENGTH)
        if self.subset is not None:
            described["subset"] = self.subset
        if self.train_subset is not None:
            described["train_subset"] = self.train_subset
        if self.train_classes is not None:
            described["train_classes"] = list(self.train_classes)
        return described

    @classmethod
    def from_meta(cls, meta: dict[str, Any], data_dir: str | None = None) -> DataChoice:
        """The data a saved model was trained with, as its model.json records it (the files' transform replaced
        by the one the model was trained with)."""
        classes = meta.get("train_classes")
        validation = meta.get("validation") or {"size": 0, "seed": 0}
        files = meta.get("data") or {}
        if "dataset" not in meta and not files:
            raise DarkKnowledgeError("the model's model.json does not say which data it was trained on; give "
                                     "--dataset NAME or --data PATH")
        transform = (meta.get("transfer_set") or {}).get("transform") if files else None
        return cls(None if files else meta["dataset"], data_dir, val_size=validation["size"],
                   val_seed=validation["seed"],
                   subset=meta.get("subset"), train_classes=tuple(classes) if classes else None,
                   train_subset=meta.get("train_subset"), path=files.get("path"),
                   label_column=files.get("label_column"),
                   image_size=tuple(files["image_size"]) if files.get("image_size") else None, transform=transform,
                   **text_options(files))


def text_options(files: dict[str, Any]) -> dict[str, Any]:
    """A text table's DataChoice fields as a model.json's ``data`` records them (none for other data)."""
    if not files.get("text_columns"):
        return {}
    return {"text_columns": tuple(files["text_columns"]), "tokenizer": files["tokenizer"],
            "max_length": files["max_length"]}


def _model_meta(spec: str, train, data: DataChoice, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What model.json records to rebuild the model and its data: spec (and a factory's options), one input's
    shape (``image_shape``, the older name, kept for readers of older folders), classes and the data."""
    # input_shape (the same list) is added by fit's sidecar: this meta is part of a run's resume key
    meta = {"spec": str(parse_spec(spec, options)), "image_shape": list(input_shape(train)),
            "classes": list(train.classes), **data.describe(train)}
    if options:
        meta["model_options"] = dict(options)
    return meta


def train_run(spec: str, data: DataChoice, config: TrainConfig, out: str | Path | None = None,
              resume: bool = False, log: Callable[[str], None] | None = None,
              monitor: Callable | None = None, *, options: dict[str, Any] | None = None,
              device: str | None = None) -> tuple[Any, FitResult]:
    """Train a model from scratch on hard labels (a teacher, an ensemble member or a baseline).

    The initial weights come from ``config.seed`` (as do the order of cases and dropout), so a run is repeatable.
    ``monitor(train, val, test)`` may return sets whose errors ``fit`` logs every epoch (its ``monitor``).
    ``options``: a model factory's keyword arguments; ``device``: where it trains (None: the default,
    :data:`darkknowledge.devices.DEFAULT_DEVICE`).
    """
    train, val, test = _beside(data, out).load()
    spec = complete_spec(spec, data.vocab_size)
    model = _seeded_model(spec, train, config.seed, options)
    result = fit(model, train, val, config, HardTargets(), out, resume, _model_meta(spec, train, data, options), log,
                 monitor=monitor(train, val, test) if monitor else None, device=device)
    return model, result


def _beside(data: DataChoice, out: str | Path | None) -> DataChoice:
    """``data`` with tokenised text cached beside the run (``OUT/../tokenized``), so later runs read it back."""
    if not data.text_columns or data.cache_dir is not None or out is None:
        return data
    return replace(data, cache_dir=str(Path(out).parent / "tokenized"))


def _log_to_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # between progress bars, as the training loop logs


def _seeded_model(spec: str, train, seed: int, options: dict[str, Any] | None = None):
    check_fits(spec, input_shape(train), len(train.classes), options)
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return build_model(spec, input_shape(train), len(train.classes), options)


def check_compatible(model_meta: dict[str, Any], data: LabeledImages, run_dir: Path) -> None:
    """A saved model must predict the data's classes from images of the data's size."""
    if list(model_meta["classes"]) != list(data.classes):
        raise DarkKnowledgeError(
            f"model {run_dir} predicts classes {model_meta['classes']} but {data.name} has "
            f"{list(data.classes)}; use a model trained on this dataset")
    expected = tuple(model_meta.get("input_shape", model_meta["image_shape"]))
    if expected != input_shape(data):
        raise DarkKnowledgeError(
            f"model {run_dir} takes {expected} inputs but {data.name} has {input_shape(data)}; use a model "
            "trained on this dataset")


TeacherSource = str | os.PathLike | Sequence[str | os.PathLike]


def load_teacher(teacher: TeacherSource, combine: str = "arithmetic") -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A saved teacher: one run directory, several (an :class:`Ensemble` of them) or an ensemble folder (its
    ``ensemble.json``). Returns (module, what the student's sidecar records about it, a member's model.json)."""
    sources = [teacher] if isinstance(teacher, (str, os.PathLike)) else list(teacher)
    if not sources:
        raise DarkKnowledgeError("distillation needs a teacher: a run directory, several, or an ensemble folder")
    if len(sources) == 1 and (Path(sources[0]) / MANIFEST).exists():  # read_manifest says what is wrong with it
        ensemble = Ensemble.from_dir(sources[0], combine)
        return ensemble, {"ensemble": str(sources[0]), **ensemble.describe()}, ensemble.member_meta[0]
    if len(sources) == 1:
        model, meta = checkpoint.load_model(sources[0])
        return model, {"run": str(sources[0]), "spec": meta["spec"], "weights_sha256": meta["weights_sha256"]}, meta
    ensemble = Ensemble.from_runs(sources, combine)
    return ensemble, ensemble.describe(), ensemble.member_meta[0]


def teacher_data(teacher: TeacherSource) -> dict[str, Any]:
    """What a saved teacher (or the first member of an ensemble) was trained on: its model.json's ``dataset``
    and, for a user's files, ``data`` (path, label column, image size); empty for a folder written by ``fit``
    alone."""
    first = teacher if isinstance(teacher, (str, os.PathLike)) else (list(teacher) or [None])[0]
    if first is None:
        raise DarkKnowledgeError("distillation needs a teacher: a run directory, several, or an ensemble folder")
    if (Path(first) / MANIFEST).exists():
        manifest = read_manifest(first)
        meta = manifest.get("data") or {"dataset": manifest["dataset"]}
    else:
        meta = checkpoint.read_model_meta(first)
    return {k: meta[k] for k in ("dataset", "data") if k in meta}


def teacher_dataset(teacher: TeacherSource) -> str | None:
    """The dataset name a saved teacher was trained on (``data:FILE`` for a user's files)."""
    return teacher_data(teacher).get("dataset")


def distill_run(teacher_dir: TeacherSource, spec: str, data: DataChoice, config: TrainConfig, temperature: float,
                soft_weight: float = 1.0, hard_weight: float = 0.0, out: str | Path | None = None,
                resume: bool = False, log: Callable[[str], None] | None = None, *, combine: str = "arithmetic",
                store_dir: str | Path | None = None, top_k: int | None = None, samples: int | None = None,
                head: int = 0, compact: str | None = None, store_dtype: str = "float32", monitor: Callable | None = None, options: dict[str, Any] | None = None,
                device: str | None = None, teacher_device: str | None = None, divergence: str = DEFAULT_DIVERGENCE,
                beta: float | None = None, loss_chunk_mb: float | None = None,
                init_from_teacher: bool = False) -> tuple[Any, FitResult]:
    """Distil a saved teacher (a run, several runs or an ensemble folder) into a new ``spec`` student on the
    dataset's training split (§2, §3, §4).

    Without jitter the teacher's outputs are computed once over the transfer set: into the soft-target store in
    ``store_dir`` (reused by every later student of the same teacher and data) when it is given, an ensemble's
    or a top-k store in memory otherwise, and a single teacher's logits in memory when neither. ``samples`` (with
    ``head``): the sampled layout of :meth:`darkknowledge.soft_targets.SoftTargets.compute`, for T = 1, packed into
    the compact layout when ``compact`` (``log8`` or ``e4m3``) is given. With
    jitter the teacher runs online on every batch, under the run's precision as when its outputs are computed once.
    ``monitor`` as for :func:`train_run`; ``divergence``, ``beta`` and ``loss_chunk_mb`` (its ``chunk_mb``) as for
    :class:`darkknowledge.training.Distillation`. ``init_from_teacher``: the student starts from the teacher's
    weights where names and shapes agree, every other layer of a teacher twice as deep
    (:func:`darkknowledge.classifiers.init_from_teacher`).
    """
    log = log or _log_to_stderr
    objective = Distillation(temperature, soft_weight, hard_weight, divergence=divergence, beta=beta,
                             chunk_mb=loss_chunk_mb)  # checked now
    if samples is not None:
        check_layout_temperature("sampled", temperature)
    device = resolve_device(device)
    check_precision(config, device)  # before the teacher's outputs are computed for a run that cannot start
    teacher_device = resolve_device(teacher_device) if teacher_device is not None else device
    teacher, teacher_info, member_meta = load_teacher(teacher_dir, combine)
    teacher.to(teacher_device)
    _check_same_tokenizer(data, member_meta, spec)
    data, split = _teachers_split(data, member_meta)
    train, val, test = _beside(data, out).load()
    spec = complete_spec(spec, data.vocab_size)
    sources = [teacher_dir] if isinstance(teacher_dir, (str, os.PathLike)) else list(teacher_dir)
    check_compatible(member_meta, train, Path(sources[0]))
    with contextlib.ExitStack() as held:  # the run's lock before the teacher's outputs: a second writer is refused
        # before it computes them (fit takes the lock again, re-entrantly); rank 0 holds it for every rank
        if out is not None:
            current().on_main(lambda: held.enter_context(checkpoint.open_run(Path(out))))
            checkpoint.check_startable(Path(out), resume)  # a run it may not continue: refused before the store
        log(split)  # once the data is known to fit the teacher and the run may start: a refusal stays one line
        cached = store = None
        if config.jitter == 0:
            if store_dir is not None or isinstance(teacher, Ensemble) or top_k is not None or samples is not None:
                store = SoftTargets.compute(teacher, train, store_dir, top_k=top_k, samples=samples, head=head,
                                            compact=compact, dtype=store_dtype,
                                            combine=combine, bf16=config.precision, log=log)
            else:
                cached = cache_teacher_logits(teacher, train, config.precision)
        objective = replace(objective, teacher=teacher, teacher_logits=cached, store=store,
                            teacher_device=teacher_device)
        model = _seeded_model(spec, train, config.seed, options)
        if init_from_teacher:
            if isinstance(teacher, Ensemble):
                raise DarkKnowledgeError("--init-from-teacher needs one teacher run, not an ensemble")
            log(f"student: {init_weights(model, teacher)} weight tensors copied from the teacher's")
        meta = {**_model_meta(spec, train, data, options), "teacher": teacher_info,
                **({"init_from_teacher": True} if init_from_teacher else {})}
        result = fit(model, train, val, config, objective, out, resume, meta, log,
                     monitor=monitor(train, val, test) if monitor else None, device=device)
        return model, result


def _size(size: int | float | None) -> str:
    return "the data's default" if size is None else str(_count(size))


def _check_same_tokenizer(data: DataChoice, teacher_meta: dict[str, Any], spec: str) -> None:
    """Teacher and student read the same token ids: the text's tokenizer (and a student folder's own) must be the
    teacher's."""
    recorded = (teacher_meta.get("data") or {}).get("tokenizer_sha256")
    if not data.text_columns or recorded is None:
        return
    source = str(spec).partition(":")[2].split(",")[0]
    student = Path(source).expanduser() / "tokenizer.json" if str(spec).startswith("hf-classifier:") else None
    for what, file in (("--tokenizer", tokenizer_path(data.tokenizer)),
                       ("the student's folder", student if student is not None and student.is_file() else None)):
        if file is not None and sha256_file(file) != recorded:
            raise DarkKnowledgeError(f"{what} has another tokenizer ({file}) than the teacher's "
                                     f"({teacher_meta['data']['tokenizer']}): teacher and student must read the "
                                     "same token ids; drop --tokenizer, or use a student with the teacher's tokenizer")


def _teachers_split(data: DataChoice, teacher_meta: dict[str, Any]) -> tuple[DataChoice, str]:
    """The validation split a student uses, and the log line that says which: on the teacher's data without a
    ``val_size`` of its own, the teacher's recorded split (size and seed), so no case the student is validated on
    is one the teacher was trained on; another split is used as given, with a warning when it is not the
    teacher's."""
    recorded = teacher_meta.get("validation")
    files = (teacher_meta.get("data") or {}).get("path")
    same_data = teacher_meta.get("dataset") == data.name and (
        files is None or data.path is not None and Path(data.path).expanduser().resolve() == Path(files))
    if same_data and recorded is not None and data.val_size is None:
        return (replace(data, val_size=recorded["size"], val_seed=recorded["seed"]),
                f"validation split: the teacher's (size {_size(recorded['size'])}, seed {recorded['seed']})")
    given = f"validation split: size {_size(data.val_size)}, seed {data.val_seed}"
    if same_data and recorded is not None and (_count(data.val_size), data.val_seed) != (recorded["size"],
                                                                                         recorded["seed"]):
        return data, (f"{given}, as given; warning: the teacher's was size {_size(recorded['size'])}, seed "
                      f"{recorded['seed']}, so some of the student's validation cases may be cases the teacher was "
                      "trained on (its errors then read too low); drop --val-size to use the teacher's split")
    return data, given


def member_dir(index: int) -> str:
    return f"member-{index:02d}"


@dataclass
class EnsembleResult:
    folder: Path
    trained: list[int]  # members trained (or finished) by this call
    skipped: list[int]  # members already finished
    results: dict[int, FitResult]


def train_ensemble(spec: str, data: DataChoice, config: TrainConfig, out: str | Path, members: int,
                   resume: bool = False, log: Callable[[str], None] | None = None, *,
                   options: dict[str, Any] | None = None, device: str | None = None) -> EnsembleResult:
    """§4: ``members`` models of one spec and recipe differing only in seed (``config.seed + i`` for the
    initial weights, the order of cases and dropout), in ``out/member-00``, ``member-01``, ...

    ``out/ensemble.json`` lists them and is rewritten atomically after each one, so ``Ensemble.from_dir`` can
    load the finished ensemble. With ``resume`` a rerun skips finished members, resumes a half-finished one from
    its last epoch and trains the missing ones; the same call with a larger ``members`` grows the ensemble.
    """
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise DarkKnowledgeError(f"members must be an integer >= 1, got {members!r}")
    with contextlib.ExitStack() as held:  # one writer per folder: rank 0 holds its lock for every rank
        current().on_main(lambda: held.enter_context(checkpoint.open_run(Path(out), "ensemble folder")))
        return _train_ensemble(spec, data, config, Path(out), members, resume, log or _log_to_stderr, options,
                               device)


def _train_ensemble(spec: str, data: DataChoice, config: TrainConfig, out: Path, members: int, resume: bool,
                    log: Callable[[str], None], options: dict[str, Any] | None,
                    device: str | None) -> EnsembleResult:
    # Under torchrun every rank trains every member (data-parallel); rank 0 reads and writes the folder and
    # tells the others which members are left, so they need not see it.
    workers = current()
    if not workers.is_main:
        log = silent
    train, val, _ = data.load()
    meta = _model_meta(spec, train, data, options)
    entries = [{"run": member_dir(i), "seed": config.seed + i, "done": False} for i in range(members)]

    def record() -> None:
        entries[:] = workers.on_main(lambda: _record_members(out, entries, meta, data, train, val, config))

    workers.on_main(lambda: _check_ensemble_folder(out, spec, members, resume))
    record()
    trained, skipped, results = [], [], {}
    for i, entry in enumerate(entries):
        run_dir = out / entry["run"]
        member_config = replace(config, seed=entry["seed"])
        if entry["done"]:
            log(f"member {i + 1}/{members} ({entry['run']}): finished, skipped")
            skipped.append(i)
            continue
        if entry.get("model_missing"):
            # A run whose model file was deleted cannot be resumed: train that member again from the start.
            log(f"member {i + 1}/{members} ({entry['run']}): model missing, training it again")
            if workers.is_main:
                for stale in [run_dir / checkpoint.STATE_META, *run_dir.glob("state-e*.safetensors")]:
                    stale.unlink(missing_ok=True)
        log(f"member {i + 1}/{members} ({entry['run']}, seed {entry['seed']})")
        model = _seeded_model(spec, train, entry["seed"], options)  # the member's initial weights: its seed
        results[i] = fit(model, train, val, member_config, HardTargets(), run_dir, resume, meta, log, device=device)
        trained.append(i)
        record()
    return EnsembleResult(out, trained, skipped, results)


def _check_ensemble_folder(out: Path, spec: str, members: int, resume: bool) -> None:
    """``out`` may hold nothing, or (with ``resume``) an ensemble of the same spec and at most ``members``."""
    if is_ensemble_dir(out):
        if not resume:
            raise DarkKnowledgeError(f"{out} already holds an ensemble; pass --resume to finish or grow it, or "
                                     "choose another output directory")
        old = read_manifest(out)
        if len(old["members"]) > members:
            raise DarkKnowledgeError(f"{out} holds an ensemble of {len(old['members'])} members; asking for "
                                     f"{members} would leave some out: pass --members {len(old['members'])} or more")
        if old.get("spec") != str(parse_spec(spec)):
            raise DarkKnowledgeError(f"{out} holds an ensemble of {old.get('spec')} members, not {spec}; train "
                                     "the same spec or choose another output directory")
    elif out.exists() and checkpoint.MODEL_META in {p.name for p in out.iterdir()}:
        raise DarkKnowledgeError(f"{out} holds a single run, not an ensemble; choose another output directory")


def _record_members(out: Path, entries: list[dict[str, Any]], meta: dict[str, Any], data: DataChoice, train, val,
                    config: TrainConfig) -> list[dict[str, Any]]:
    """``entries`` updated from the member folders (finished? model file missing?), after rewriting
    ``ensemble.json``. A finished member trained with other settings is refused."""
    for entry in entries:
        run_dir = out / entry["run"]
        state_path = run_dir / checkpoint.STATE_META
        state = checkpoint.read_training_state(run_dir) if state_path.exists() else {}
        entry["done"] = bool(state.get("done")) and (run_dir / checkpoint.MODEL_META).exists()
        entry["model_missing"] = bool(state) and not (run_dir / checkpoint.MODEL_META).exists()
        entry["epochs"] = state.get("epoch", 0)
        if entry["done"]:
            if state.get("run_key") != run_key(meta, train, val, replace(config, seed=entry["seed"]),
                                                HardTargets()):
                raise DarkKnowledgeError(f"{run_dir} was trained with other settings, model or data; finish the "
                                         "ensemble with the options it was started with, or choose another "
                                         "output directory")
            entry["weights_sha256"] = checkpoint.read_model_meta(run_dir)["weights_sha256"]
    write_manifest(out, {"spec": meta["spec"], "dataset": data.name, "classes": meta["classes"],
                         "image_shape": meta["image_shape"], "combine": "arithmetic",
                         "complete": all(e["done"] for e in entries),
                         "members": [{k: v for k, v in e.items() if k != "model_missing"} for e in entries],
                         "training": {k: v for k, v in config.settings().items() if k != "seed"},
                         "data": data.describe(train)})
    return entries


def evaluate_run(run_dir: str | Path, data: DataChoice | None = None, split: str = "test",
                 jitter: int = 0, combine: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Errors of a saved model, or of an ensemble folder (members combined by ``combine``, default the
    manifest's rule), on a split of its dataset (or ``data``'s), as a JSON-ready dict; run on ``device`` (None:
    :data:`darkknowledge.devices.DEFAULT_DEVICE`, as for training)."""
    if is_language_model(run_dir):  # its units are tokens: pretrained.evaluate_causal_lm on a corpus's windows
        raise DarkKnowledgeError(f"{run_dir} is a language model: evaluate it on a text corpus, "
                                 "evaluate RUN --data CORPUS --split test")
    if is_ensemble_dir(run_dir):
        model = Ensemble.from_dir(run_dir, combine)
        meta = model.member_meta[0]  # the members share dataset and split (train_ensemble makes them so)
        name = f"ensemble of {len(model)} x {meta['spec']} ({model.combine})"
    elif combine is not None:
        raise DarkKnowledgeError(f"{run_dir} is one model, not an ensemble folder; drop --combine, or give the "
                                 "folder 'train --members N' wrote")
    else:
        model, meta = checkpoint.load_model(run_dir)
        name = meta["spec"]
    if data is None:  # the data the model was trained with, as its sidecar records it
        data = DataChoice.from_meta(meta)
    elif data.path is not None and data.transform is None:  # other files, made into inputs as in training
        data = replace(data, transform=(meta.get("transfer_set") or {}).get("transform"))
    train, val, test = data.load()
    chosen = {"train": train, "val": val, "test": test}.get(split)
    if split not in ("train", "val", "test"):
        raise DarkKnowledgeError(f"split must be train, val or test, got {split!r}")
    if chosen is None and split == "test":
        raise DarkKnowledgeError(f"{data.name} has no test split (a user's files hold one as x_test/y_test or a "
                                 "test/ folder); choose --split val or train, or give --data with a test split")
    if chosen is None:
        raise DarkKnowledgeError(f"{data.name} has no validation split with val_size 0; choose train or test")
    check_compatible(meta, chosen, Path(run_dir))
    check_jitter(jitter, input_shape(chosen))
    result = evaluate(model.to(resolve_device(device)), chosen, jitter=jitter).to_dict()
    result["per_class_errors"] = dict(zip(chosen.classes, result["per_class_errors"]))  # readable JSON
    return {"run": str(run_dir), "model": name, "parameters": count_parameters(model),
            "dataset": data.name, "split": split, "jitter": jitter, **result}
