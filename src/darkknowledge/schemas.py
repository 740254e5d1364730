"""One schema per kind of file the tool reads back: model (and language-model) and state sidecars, soft-target store headers, ensemble
manifests and specialists' subsets files. A file is checked as a whole before any field of it is used, so a file
of the wrong shape (a list, a missing key, a string where a number goes, a path out of its folder) is refused in
one line naming the file, the field and the fix, never half-used. Fields the code does not read are left free
(sidecars also carry metrics and provenance), so files written by older versions still load.

Names of files a sidecar points at (``weights``, ``tensors``, ``data_file``, an ensemble member's ``run``) must be
plain names inside the sidecar's own folder: no separators, no ``..``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DarkKnowledgeError

def _plain_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError("must be a file name inside the folder (no '/', no '..')")
    return name


FileName = Annotated[str, AfterValidator(_plain_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Schema(BaseModel):
    # strict: 1.5 is not an integer, "false" is not a boolean, 1 is not True; extra keys are kept and unchecked
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    kind: ClassVar[str] = "file"


class Validation(_Schema):
    size: Count | Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    seed: Annotated[int, Field(ge=0)]


class ModelSidecar(_Schema):
    """``model.json``: what the weights beside it are."""
    kind: ClassVar[str] = "model sidecar"
    holds: ClassVar[str] = "an image model"
    format: Literal["darkknowledge/1"]
    spec: Annotated[str, Field(min_length=1)]
    image_shape: Annotated[list[Positive], Field(min_length=1, max_length=4)]
    classes: Annotated[list[str], Field(min_length=1)]
    weights: FileName
    weights_sha256: Sha256
    dataset: str | None = None
    validation: Validation | None = None
    subset: Positive | None = None
    train_subset: Positive | None = None
    train_classes: list[Count] | None = None
    input_shape: Annotated[list[Positive], Field(min_length=1, max_length=4)] | None = None
    model_options: dict[str, Any] | None = None


class LanguageModelEpoch(_Schema):
    epoch: Positive
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LanguageModelSidecar(_Schema):
    """``model.json`` of a language-model run: what the weights beside it are."""
    kind: ClassVar[str] = "language-model sidecar"
    holds: ClassVar[str] = "a language model"
    model_kind: Literal["language-model"] = Field(alias="kind")  # an image sidecar has no kind
    format: Literal["darkknowledge/1"]
    spec: Annotated[str, Field(min_length=1)]
    vocab_size: Positive
    context: Positive
    weights: FileName
    weights_sha256: Sha256
    tokenizer_sha256: Sha256
    run_key: Sha256
    history: Annotated[list[LanguageModelEpoch], Field(min_length=1)]


def sidecar_schema(meta: Any) -> type[_Schema]:
    """The schema of a model sidecar by the kind it says it is: a language model's, or else an image model's."""
    return LanguageModelSidecar if isinstance(meta, dict) and meta.get("kind") == "language-model" else ModelSidecar


class Best(_Schema):
    epoch: Count
    stale: Count
    val_errors: Count | None = None
    val_loss: Number | None = None


class TrainingState(_Schema):
    """``state.json``: where training stopped, for ``--resume``."""
    kind: ClassVar[str] = "training state"
    format: Literal["darkknowledge/1"]
    epoch: Count
    tensors: FileName
    tensors_sha256: Sha256
    optimizer_param_groups: list[dict[str, Any]]
    optimizer_scalars: dict[str, Number | bool | None]
    run_key: Annotated[str, Field(min_length=1)] | None = None
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # each loop's own; the image loops' is checked by ResumableState
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    done: bool = False


class ResumableState(TrainingState):
    """``state.json`` of a run the training loop wrote: what ``--resume`` needs to continue it."""
    kind: ClassVar[str] = "training state"
    run_key: Annotated[str, Field(min_length=1)]
    history: list[dict[str, Any]]
    best: Best
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class BestValidation(_Schema):
    log_loss: Number
    epoch: Positive
    sha256: Sha256


class LanguageModelState(TrainingState):
    """``state.json`` of a language-model run: where training stopped and its best epoch so far."""
    kind: ClassVar[str] = "language-model training state"
    run_key: Annotated[str, Field(min_length=1)]
    history: list[LanguageModelEpoch]
    best_validation: BestValidation


class TokenizerFile(_Schema):
    """``tokenizer.json``: characters (``<unk>``, the end-of-document token, then single characters) or the
    Hugging Face ``tokenizers`` JSON of a byte-level BPE."""
    kind: ClassVar[str] = "tokenizer"
    format: Literal["darkknowledge/tokenizer-1"]
    tokenizer_kind: Literal["char", "bpe"] = Field(alias="kind")
    chars: Annotated[list[str], Field(min_length=2)] | None = None
    bpe: Annotated[dict[str, Any], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        field = "chars" if self.tokenizer_kind == "char" else "bpe"
        if getattr(self, field) is None:
            raise ValueError(f"a {self.tokenizer_kind} tokenizer holds '{field}'")
        if self.chars is not None and (self.chars[:2] != ["<unk>", "<|endoftext|>"] or len(set(self.chars)) !=
                                       len(self.chars) or any(len(c) != 1 for c in self.chars[2:])):
            raise ValueError("chars must be '<unk>', '<|endoftext|>', then distinct single characters")
        return self


class KeyParts(_Schema):
    transfer_set: str
    layout: Literal["full", "topk"]
    top_k: Positive | None
    dtype: Literal["float32", "float16"]


class StoredArray(_Schema):
    dtype: Literal["<f4", "<f2", "<u2", "<i4"]
    shape: list[Count]
    offset: Count
    nbytes: Count
    sha256: Sha256


_ITEMSIZE = {"<f4": 4, "<f2": 2, "<u2": 2, "<i4": 4}
_STORE_ARRAYS = {"full": {"logits"}, "topk": {"topk_logits", "topk_indices", "tail_logsumexp", "tail_mean"}}


class StoreHeader(_Schema):
    """``<key>.json`` of a soft-target store: what the arrays in its data file are, and where."""
    kind: ClassVar[str] = "soft-target store header"
    format: Literal["darkknowledge/soft-targets-1"]
    key: Sha256
    key_parts: KeyParts
    layout: Literal["full", "topk"]
    top_k: Positive | None
    dtype: Literal["float32", "float16"]
    num_cases: Positive
    num_members: Positive
    num_classes: Positive
    stored_combine: Literal["arithmetic", "mean-logits"] | None
    members_in_teacher: Positive
    data_file: FileName
    data_bytes: Count
    arrays: dict[str, StoredArray]

    @model_validator(mode="after")
    def _arrays_fit(self):
        """Every number a reader uses agrees with the key's and with the others (they are outside the key)."""
        parts = self.key_parts
        if (self.layout, self.top_k, self.dtype) != (parts.layout, parts.top_k, parts.dtype):
            raise ValueError("layout, top_k and dtype must be the ones in key_parts")
        if self.stored_combine != getattr(parts, "stored_combine", None):
            raise ValueError("stored_combine must be the one in key_parts")
        if set(self.arrays) != _STORE_ARRAYS[self.layout]:
            raise ValueError(f"a {self.layout} store holds the arrays {', '.join(sorted(_STORE_ARRAYS[self.layout]))}")
        width = self.num_classes if self.layout == "full" else self.top_k
        for name, a in self.arrays.items():
            rows = [self.num_cases, self.num_members] + ([width] if name in ("logits", "topk_logits",
                                                                                "topk_indices") else [])
            if a.shape != rows:
                raise ValueError(f"array {name} must have shape {rows} (num_cases, num_members, classes or top_k)")
            if a.nbytes != math.prod(a.shape) * _ITEMSIZE[a.dtype]:
                raise ValueError(f"array {name}: nbytes does not match its shape and dtype")
            if a.offset + a.nbytes > self.data_bytes:
                raise ValueError(f"array {name} ends past data_bytes")
        return self


class EnsembleMember(_Schema):
    run: FileName
    seed: int
    done: bool
    epochs: Count = 0
    weights_sha256: Sha256 | None = None


class EnsembleManifest(_Schema):
    """``ensemble.json`` of a folder written by ``train --members N``."""
    kind: ClassVar[str] = "ensemble manifest"
    format: Literal["darkknowledge/ensemble-1"]
    spec: Annotated[str, Field(min_length=1)]
    dataset: str
    classes: Annotated[list[str], Field(min_length=1)]
    image_shape: Annotated[list[Positive], Field(min_length=1, max_length=4)]
    combine: Literal["arithmetic", "geometric", "logits"] = "arithmetic"
    complete: bool = False
    members: Annotated[list[EnsembleMember], Field(min_length=1)]


class Subset(_Schema):
    index: Count
    classes: Annotated[list[Count], Field(min_length=1)]


class SubsetsSource(_Schema):
    generalist: Annotated[str, Field(min_length=1)] = None  # present: a run folder; absent: refused on use
    weights_sha256: Sha256 | None = None


class SubsetsFile(_Schema):
    """``subsets.json`` of a specialists folder."""
    kind: ClassVar[str] = "subsets file"
    format: Literal["darkknowledge-subsets/1"]
    class_names: Annotated[list[str], Field(min_length=1)]
    subsets: Annotated[list[Subset], Field(min_length=1)]
    method: str = "given"
    params: dict[str, Any] = {}
    source: SubsetsSource = SubsetsSource()


def check(schema: type[BaseModel], data: Any, path: str | Path, fix: str) -> dict[str, Any]:
    """``data`` (parsed JSON of the file ``path``) if it fits ``schema``; else a one-line error naming the file,
    the first field that does not fit and ``fix``."""
    try:
        schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        where = f"field '{field}'" if field else "the file as a whole"
        message = first["msg"].removeprefix("Value error, ")
        raise DarkKnowledgeError(f"{path} is not a valid {schema.kind}: {where}: {message}; {fix}") from None
    return data
