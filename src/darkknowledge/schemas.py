"""One schema per kind of file the tool reads back: model (and language-model) and state sidecars, soft-target and
token store headers, ensemble manifests, specialists' subsets files, the results.json and metrics.jsonl the report
reads and a language-model reproduction's data.json. A file is checked as a whole before any field of it is used,
so a file of the wrong shape (a list, a missing key, a string where a number goes, a path out of its folder) is
refused in one line naming the file, the field and the fix, never half-used. Fields the code does not read are left free
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
    layout: Literal["full", "topk", "sampled", "compact"]
    top_k: Positive | None
    dtype: Literal["float32", "float16"]


class StoredArray(_Schema):
    dtype: Literal["<f4", "<f2", "<u2", "<i4", "|u1"]
    shape: list[Count]
    offset: Count
    nbytes: Count
    sha256: Sha256


_ITEMSIZE = {"<f4": 4, "<f2": 2, "<u2": 2, "<i4": 4, "|u1": 1}
_STORE_ARRAYS = {"full": {"logits"}, "topk": {"topk_logits", "topk_indices", "tail_logsumexp", "tail_mean"}}
_STORE_ARRAYS["sampled"] = _STORE_ARRAYS["topk"]  # draws are kept as a top-k summary with an empty tail
_STORE_ARRAYS["compact"] = {"rows"}  # the same draws packed, a row of bytes a case (its width: the store checks)


class StoreHeader(_Schema):
    """``<key>.json`` of a soft-target store: what the arrays in its data file are, and where."""
    kind: ClassVar[str] = "soft-target store header"
    format: Literal["darkknowledge/soft-targets-1"]
    key: Sha256
    key_parts: KeyParts
    layout: Literal["full", "topk", "sampled", "compact"]
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
            if name == "rows":  # a compact row's bytes, whatever they are here
                rows.append(a.shape[-1] if len(a.shape) == 3 else -1)
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


# ---------------------------------------------------------------------------------------------------------------
# results.json of each reproduction and metrics.jsonl, as ``darkknowledge report`` reads them: the fields it
# formats or plots, with the types it needs (a number where it computes, a name where it makes a path).
# ---------------------------------------------------------------------------------------------------------------

Share = Number | None  # a rate or share that may be unknown ("-" in a table)


class MetricsRow(_Schema):
    """One line of ``metrics.jsonl``."""
    kind: ClassVar[str] = "metrics line"
    epoch: Number
    train_error_rate: Share = None
    val_error_rate: Share = None
    val_loss: Share = None


class _Results(_Schema):
    kind: ClassVar[str] = "results file"
    stage_seconds: dict[str, Any] | None = None


class TableOneRow(_Schema):
    spec: str
    parameters: Count
    test_errors: Count
    val_errors: Count | None = None
    epoch: Count
    per_class_test_errors: dict[str, Count] | None = None


class JitteredTest(_Schema):
    max_shift: Any
    unjittered_errors: dict[str, Any]
    errors: dict[str, Any]

    @model_validator(mode="after")
    def _same_models(self):
        if not set(self.errors) <= set(self.unjittered_errors):
            raise ValueError("every model in errors must be in unjittered_errors")
        return self


class SweepRow(_Schema):
    temperature: Number
    test_errors_mean: Number
    test_errors_sd: Number
    seeds: list[Any]
    val_errors: list[Any]


class Sweep(_Schema):
    rows: Annotated[list[SweepRow], Field(min_length=1)]
    chosen_on_validation: Share = None


class BiasErrors(_Schema):
    errors: Any
    error_rate: Share
    errors_on_classes: dict[str, Any]


class ChosenBias(BiasErrors):
    offset: Number


class BiasStudy(_Schema):
    before: BiasErrors
    chosen_on_validation: ChosenBias
    chosen_on_test_paper_protocol: ChosenBias
    classes: list[Any]
    offsets: Annotated[list[Number], Field(min_length=1)]
    val_errors_by_offset: list[Number]
    test_errors_by_offset: list[Number]

    @model_validator(mode="after")
    def _one_error_per_offset(self):
        if not len(self.offsets) == len(self.val_errors_by_offset) == len(self.test_errors_by_offset):
            raise ValueError("offsets, val_errors_by_offset and test_errors_by_offset must have one length")
        return self


class MnistPaper(_Schema):
    only_7_8: dict[str, Share] = {}


class MnistResults(_Results):
    """``results.json`` of ``reproduce mnist``."""
    paper: MnistPaper
    table1: dict[str, TableOneRow]
    jittered_test: JitteredTest | None = None
    temperature_sweep: dict[str, Sweep] | None
    no_threes: BiasStudy | None = None
    only_7_8: BiasStudy | None = None


class Accuracies(_Schema):
    generalist_accuracy: Share = None
    combined_accuracy: Share = None


class OverallAccuracies(Accuracies):
    relative_gain: Number


class Coverage(_Schema):
    cases: Any
    delta_correct: Any
    relative_gain: Share = None


class VariantTest(_Schema):
    conditional: Accuracies
    overall: OverallAccuracies
    by_coverage: dict[str, Coverage] = {}


class Variant(_Schema):
    test: VariantTest


class SpecialistsDataset(_Schema):
    generalist: dict[str, Any] = {}
    variants: dict[str, Variant]

    @model_validator(mode="after")
    def _generalist_accuracy(self):
        accuracy = self.generalist.get("test_accuracy")
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float, type(None))):
            raise ValueError("generalist.test_accuracy must be a number")
        return self


class PaperTable3(_Schema):
    baseline: dict[str, Share] = {}
    specialists: dict[str, Share] = {}


class SpecialistsPaper(_Schema):
    table3: PaperTable3 = PaperTable3()
    table4: dict[str, Number] = {}


class SpecialistsResults(_Results):
    """``results.json`` of ``reproduce specialists``."""
    paper: SpecialistsPaper = SpecialistsPaper()
    datasets: dict[str, SpecialistsDataset]


class PaperShares(_Schema):
    baseline: Share = None
    ensemble: Share = None
    distilled: Share = None
    share_transferred: Share = None
    target_share: Share = None


class EnsembleStudent(_Schema):
    run: str
    combine: str
    temperature: Number
    test_accuracy: Number
    test_errors: Any
    val_errors: Any
    share_transferred: Share = None


class EnsembleChosen(_Schema):
    run: FileName
    share_transferred: Share
    share_interval_95: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = None


class Baseline(_Schema):
    test_accuracy: Number
    test_errors: Any
    val_errors: Any


class RuleCounts(_Schema):
    errors: Any


class RuleTest(RuleCounts):
    accuracy: Number


class RuleResult(_Schema):
    test: RuleTest
    val: RuleCounts


class EnsemblePlan(_Schema):
    temperatures: list[Number]
    rules: list[str]


class EnsembleResults(_Results):
    """``results.json`` of ``reproduce ensemble``."""
    paper: PaperShares = PaperShares()
    plan: EnsemblePlan
    baseline: Baseline
    members: list[Any]
    ensemble: dict[str, RuleResult]
    students: Annotated[list[EnsembleStudent], Field(min_length=1)]
    chosen_on_validation: EnsembleChosen

    @model_validator(mode="after")
    def _chosen_is_a_student(self):
        if "arithmetic" not in self.ensemble:
            raise ValueError("ensemble must hold the arithmetic rule")
        if self.chosen_on_validation.run not in {s.run for s in self.students}:
            raise ValueError("chosen_on_validation.run must name one of the students")
        return self


class Curves(_Schema):
    epoch: list[Number]
    test_accuracy: list[Number]
    train_accuracy: list[Number]

    @model_validator(mode="after")
    def _one_length(self):
        if not len(self.epoch) == len(self.test_accuracy) == len(self.train_accuracy):
            raise ValueError("epoch, test_accuracy and train_accuracy must have one length")
        return self


class RegularizerSystem(_Schema):
    test_accuracy: Number
    epoch: Number
    peak_test_accuracy: Share = None
    drop_after_peak: Number
    temperature: Number | None = None
    curves: Curves


class SoftSystem(RegularizerSystem):
    temperature: Number
    run: FileName


class TrainingCases(_Schema):
    small: Count
    full: Count


class RegularizerDataset(_Schema):
    training_cases: TrainingCases
    full: RegularizerSystem
    hard_3pct: RegularizerSystem
    soft_3pct: SoftSystem


class RegularizerResults(_Results):
    """``results.json`` of ``reproduce regularizer``."""
    paper: dict[str, Any] = {}
    datasets: Annotated[dict[str, RegularizerDataset], Field(min_length=1)]

    @model_validator(mode="after")
    def _paper_accuracies(self):
        for key in ("full", "hard_3pct", "soft_3pct"):
            accuracy = self.paper.get(key, {}).get("test_accuracy") if isinstance(self.paper.get(key, {}), dict) \
                else "?"
            if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float, type(None))):
                raise ValueError(f"paper.{key} must be an object whose test_accuracy is a number")
        return self


class LmQuality(_Schema):
    test_accuracy: Share
    test_log_loss: Number
    test_perplexity: Number
    val_log_loss: Number


class LmRun(_Schema):
    """A distilled student of the temperature sweep (or the one chosen on validation)."""
    run: str
    temperature: Number


class LmShare(_Schema):
    share: Share
    low: Share
    high: Share
    gain_per_token: Number


class LmDeployment(_Schema):
    half_width_distilled: LmQuality
    half_width_labels_only: LmQuality


class LmStoreRow(_Schema):
    store: str
    bytes_per_token: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    test_accuracy: Share
    test_log_loss: Number
    share_of_dense_gain_accuracy: Share
    share_of_dense_gain_log_loss: Share
    interval_of_dense_gain_accuracy: Annotated[list[Share], Field(min_length=2, max_length=2)] | None = None
    interval_of_dense_gain_log_loss: Annotated[list[Share], Field(min_length=2, max_length=2)] | None = None


class LmData(_Schema):
    tokenizer: dict[str, Any] = {}
    tokens: dict[str, Number] = {}


class LmResults(_Results):
    """``results.json`` of ``reproduce lm``."""
    paper: PaperShares = PaperShares()
    models: dict[str, LmQuality]
    chosen_on_validation: LmRun
    data: LmData = LmData()
    share_by_temperature: dict[str, dict[str, Share]] = {}
    plan: dict[str, Any] = {}
    temperature_sweep: list[LmRun]
    share_transferred: dict[str, LmShare]
    deployment: LmDeployment
    top_k: list[LmStoreRow]
    samples: dict[str, str] | None = None
    total_seconds: Number | None = None

    @model_validator(mode="after")
    def _every_model_measured(self):
        missing = {"baseline", "ensemble", *(s.run for s in self.temperature_sweep)} - set(self.models)
        if missing:
            raise ValueError(f"models must hold {', '.join(sorted(missing))}")
        return self


RESULTS: dict[str, type[_Results]] = {"mnist": MnistResults, "specialists": SpecialistsResults,
                                      "ensemble": EnsembleResults, "regularizer": RegularizerResults,
                                      "lm": LmResults}


# ---------------------------------------------------------------------------------------------------------------
# A store in a folder (a language model's, SoftTargets.build): its header and the progress file of each torchrun rank
# ---------------------------------------------------------------------------------------------------------------

WindowRange = Annotated[list[Count], Field(min_length=2, max_length=2)]  # [start, stop) of windows


class RankProgress(_Schema):
    """``targets.rank<r>.json``: the window ranges one rank has written."""
    kind: ClassVar[str] = "token-store rank progress file"
    windows_done: list[WindowRange]


class TokenStoreHeader(_Schema):
    """``targets.json`` of a token store. Whether its fields agree with its key and with each other is checked by
    the store (:meth:`darkknowledge.soft_targets.SoftTargets.open`)."""
    kind: ClassVar[str] = "token-store header"
    format: Literal["darkknowledge/token-targets-1"]
    key: Sha256
    key_parts: dict[str, Any]
    layout: Literal["dense", "topk", "sampled", "compact"]
    top_k: Positive | None
    vocab_size: Positive
    members: Positive
    positions: Count
    context: Positive
    windows: Count
    tokenizer: str
    windows_fingerprint: str
    complete: bool
    positions_done: Count = 0
    windows_done: list[WindowRange] | None = None
    arrays: dict[str, list[Any]]
    checksums: dict[str, Sha256] | None = None

    @model_validator(mode="after")
    def _complete_has_checksums(self):
        if self.complete and set(self.checksums or {}) != set(self.arrays):
            raise ValueError("a complete store records the checksum of every array")
        if any(not start < stop <= self.windows for start, stop in self.windows_done or []):
            raise ValueError("windows_done ranges must lie in 0..windows")
        return self


class DataRecord(_Schema):
    """``data.json`` of a ``reproduce lm`` folder: the corpus, its split and the tokenizer the runs were made with."""
    kind: ClassVar[str] = "data record"
    corpus_sha256: Sha256
    documents: dict[Literal["train", "validation", "test"], list[str]]
    tokenizer: dict[str, Any]

    @model_validator(mode="after")
    def _tokenizer_checksum(self):
        sha256 = self.tokenizer.get("sha256")
        if not (isinstance(sha256, str) and len(sha256) == 64 and set(sha256) <= set("0123456789abcdef")):
            raise ValueError("tokenizer.sha256 must be the tokenizer's SHA-256 (64 hex digits)")
        return self
