"""Language models' own parts: their recipe (:class:`LMConfig`, :class:`Objective`), their run folders, evaluation
in their units, sampling, and the bootstrap of a share of an ensemble's gain.

Training is :func:`darkknowledge.training.fit`'s: token windows are a transfer set (a case is one token
position) and a :class:`darkknowledge.soft_targets.SoftTargets` store (built over them) feeds its
:class:`darkknowledge.training.Distillation` (the §2 objective per token). :func:`train_language_model` only
turns the recipe into a :class:`darkknowledge.training.TrainConfig` (AdamW with betas 0.9 / 0.95, a linear
warm-up then a cosine decay, gradient clipping, the epoch kept by validation log-loss, so model selection never
sees the test split) and the run folder into a language-model run; the loop brings devices, precision,
accumulation, DDP and resume (after every epoch).

A finished run folder holds ``model.safetensors`` + ``model.json`` (``kind: language-model``: spec, vocabulary,
context, the tokenizer's SHA-256, the data it saw, metrics, the run's key) and ``tokenizer.json`` (with its
``tokenizer_config.json``: the Hugging Face format), checked against the SHA-256 on load, and the loop's
``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint, distributed, schemas, training
from .data.text import TextTokenizer, TokenWindows
from .errors import DarkKnowledgeError, OtherKindOfRun
from .ensemble import ensemble_logits
from .evaluation import device_of, evaluate_sequences
from .losses import DEFAULT_DIVERGENCE, check_drawn_targets, describe_divergence
from .memory import check_fits
from .models import build_model
from .outputs import first_logits, logits_width
from .soft_targets import DRAWN, SoftTargets, module_sha256
from .transformer import build_language_model

KIND = "language-model"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # beside it, so transformers.AutoTokenizer.from_pretrained(run) loads it
BEST_WEIGHTS = "best.safetensors"  # the best epoch of a run the language models' own loop stopped unfinished


@dataclass(frozen=True)
class LMConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of all steps spent warming the learning rate up from 0
    clip: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Objective:
    """Hard labels only (``store is None``), or the §2 objective per token against a token store, with any
    divergence of :data:`darkknowledge.losses.DIVERGENCES` (forward KL, the paper's, by default)."""

    store: SoftTargets | None = None
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    divergence: str = DEFAULT_DIVERGENCE
    beta: float | None = None
    teacher: nn.Module | None = None  # a teacher run online on every batch, instead of a store
    teacher_device: str | None = None  # where the online teacher runs (None: the student's device)

    def __post_init__(self):
        describe_divergence(self.divergence, beta=self.beta)
        if self.store is not None and self.teacher is not None:
            raise DarkKnowledgeError("distil from a token store or from a teacher run online, not both")
        if self.teacher is not None:  # what the teacher is, once: the run's key holds it
            object.__setattr__(self, "_teacher_sha256", module_sha256(self.teacher))
        if self.store is not None:  # up front, before any training
            if self.store.layout in DRAWN:
                check_drawn_targets(self.divergence)
            self.store.check_temperature(self.temperature)

    def describe(self) -> dict[str, Any]:
        if self.teacher is not None:
            return {"objective": "distillation", "temperature": self.temperature, "soft_weight": self.soft_weight,
                    "hard_weight": self.hard_weight, **describe_divergence(self.divergence, beta=self.beta),
                    "teacher": self._teacher_sha256, "online": True}
        if self.store is None:
            return {"objective": "labels"}
        return {"objective": "distillation", "temperature": self.temperature, "soft_weight": self.soft_weight,
                "hard_weight": self.hard_weight, **describe_divergence(self.divergence, beta=self.beta),
                "store": self.store.key, "layout": self.store.layout,
                "top_k": self.store.top_k,
                # the top-k loss matches the tail's total mass (before: spread it evenly); runs of the old loss are
                # trained again, not reused
                **({"topk_tail": "bucket"} if self.store.layout == "topk" else {})}


class EnsembleLM(nn.Module):
    """Members as one language model: ``log mean_m softmax(member_m)``, the distribution the store holds."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = getattr(members[0], "config", None)

    def forward(self, ids: Tensor) -> Tensor:
        return ensemble_logits(list(self.members), ids)


def evaluate_language_model(logits_of: Callable[[Tensor], Tensor] | nn.Module, windows: TokenWindows,
                            batch_size: int = 32) -> dict[str, Any]:
    """Per-token log-loss (nats), perplexity and next-token accuracy over every window; per-window sums too
    (``window_nll``, ``window_correct``: the blocks of a bootstrap over sequences)."""
    result = evaluate_sequences(logits_of, windows, batch_size)
    return {"log_loss": result.loss, "perplexity": result.perplexity, "accuracy": result.accuracy,
            "tokens": result.total, "window_nll": result.item_nll, "window_correct": result.item_correct}


def train_config(config: LMConfig) -> training.TrainConfig:
    """The recipe as the loop's settings: the arithmetic the language models' own loop had (results/lm* were
    trained with it), down to the order of each epoch."""
    return training.TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        schedule="cosine", warmup=config.warmup, clip_grad_norm=config.clip, seed=config.seed, optimizer="adamw",
        optimizer_options={"betas": (0.9, 0.95)}, select_by="log_loss", epoch_order="language-model",
        progress=False)


def run_key(spec: str, tokenizer_sha256: str, train: TokenWindows, config: LMConfig | training.TrainConfig,
            objective: Objective, init: dict[str, Any] | None = None) -> str:
    settings = config.settings() if isinstance(config, training.TrainConfig) else asdict(config)
    parts = {"spec": spec, "tokenizer": tokenizer_sha256, "train": train.fingerprint(), "config": settings,
             "objective": objective.describe(), **({"init": init} if init else {})}  # no init: the keys of old runs
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def train_language_model(spec: str, tokenizer: TextTokenizer, train: TokenWindows, validation: TokenWindows,
                         config: LMConfig | training.TrainConfig = LMConfig(), objective: Objective = Objective(),
                         run_dir: str | Path | None = None, log: Callable[[str], None] = print,
                         device: str | torch.device | None = "cpu", *, model: nn.Module | None = None,
                         refuse_others: bool = False, data: dict[str, Any] | None = None,
                         init: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or resume, or reuse a finished run of the same key) and return ``(best model on the CPU,
    model.json meta)``. ``device``: where it trains (``auto``: CUDA when present). One writer per run folder: its
    lock is held for the whole job.

    ``config``: the recipe (:class:`LMConfig`), or the loop's settings as they are (the command line's). ``model``:
    the student's first weights (e.g. a pretrained folder's) instead of ``spec``'s seeded ones; ``spec`` still
    names its architecture. ``refuse_others``: a folder holding a run of other settings is refused in one line and
    left as it is (the command line's rule) instead of trained again. ``data``: what model.json records of the
    corpus. ``init``: what ``model``'s first weights are (e.g. ``{"teacher_layers": [0, 2]}``), in the run's key
    and model.json, so that a run started from other weights is not reused or resumed.

    Under torchrun every rank calls it alike: rank 0 alone holds the lock, reuses, tidies and writes the folder;
    all train (:func:`darkknowledge.training.fit`) and return the same model."""
    workers = distributed.current()
    log = log if workers.is_main else training.silent
    with contextlib.ExitStack() as held:
        if run_dir is not None:  # a refusal (the folder in use) stops every rank
            workers.on_main(lambda: held.enter_context(checkpoint.open_run(run_dir)))
        if objective.store is not None:  # a store of other windows, tokenizer or vocabulary: refused in one line
            SoftTargets.open(objective.store.path, windows=train, tokenizer_sha256=tokenizer.sha256,
                             vocab_size=tokenizer.vocab_size, verify=False)
        key = run_key(spec, tokenizer.sha256, train, config, objective, init)
        run_dir = Path(run_dir) if run_dir is not None else None
        finished = None

        def reusable() -> bool:  # rank 0 looks (and tidies the folder); the other ranks then load what it found
            nonlocal finished
            finished = _reusable_run(run_dir, key, tokenizer, log)
            return finished is not None

        if run_dir is not None and workers.on_main(reusable):
            log(f"{run_dir}: finished run of these settings, reused")
            return finished if finished is not None else load_language_model(run_dir)
        if model is None:
            check_fits(spec, (train.context,), tokenizer.vocab_size)  # before a spec of any size is built
            torch.manual_seed(config.seed)
            model = _build(spec, tokenizer.vocab_size, train.context)
        settings = config if isinstance(config, training.TrainConfig) else train_config(config)
        loss = training.HardTargets() if objective.store is None and objective.teacher is None else \
            training.Distillation(objective.temperature, objective.soft_weight, objective.hard_weight,
                                  store=objective.store, teacher=objective.teacher,
                                  teacher_device=objective.teacher_device, divergence=objective.divergence,
                                  beta=objective.beta)
        # the spec lets the loop rebuild its best model on resume (the model registry knows gpt: and hf: specs)
        fit_meta = {"spec": spec, "tokenizer_sha256": tokenizer.sha256, **({"init": init} if init else {})}
        if run_dir is not None:
            fit_key = training.run_key(fit_meta, train, validation, settings, loss)

            def prepare() -> None:
                _adopt_stopped_run(run_dir, key, fit_key, fit_meta, train)
                _clear_other_run(run_dir, fit_key, log, refuse_others)
            workers.on_main(prepare)
        padding = logits_width(model) - tokenizer.vocab_size  # output rows past the tokens (hf:...,vocab_size=N)
        if padding:
            log(f"the student's {padding:,} output rows past the tokenizer's {tokenizer.vocab_size:,} tokens are "
                "padding: trained on the real tokens, kept in what is saved")
        with first_logits(model, tokenizer.vocab_size) if padding else contextlib.nullcontext():
            result = training.fit(model, train, validation, settings, loss, run_dir=run_dir, resume=True,
                                  meta=fit_meta, log=log, device=device)
        meta = {"kind": KIND, "spec": spec, "vocab_size": tokenizer.vocab_size, "context": train.context,
                "tokenizer_sha256": tokenizer.sha256, "train": train.describe(),
                "config": settings.settings() if isinstance(config, training.TrainConfig) else asdict(config),
                **({"data": data} if data is not None else {}), **({"init": init} if init else {}),
                **objective.describe(), "best_epoch": result.best_epoch,
                "history": _per_epoch(result.history, train.num_tokens), "run_key": key}
        model.cpu()
        if run_dir is not None:
            def commit() -> None:
                save_language_model(run_dir, model, tokenizer, meta)
                _drop_resume_files(run_dir)
            workers.on_main(commit)
        return model.eval(), meta


def _build(spec: str, vocab_size: int, context: int) -> nn.Module:
    """A ``gpt:`` or ``hf:`` spec's model, or a user's factory's (called as ``factory((context,), vocab_size)``)."""
    if spec.partition(":")[0] in ("gpt", "hf"):
        return build_language_model(spec, vocab_size, context)
    return build_model(spec, (context,), vocab_size)


def _adopt_stopped_run(run_dir: Path, key: str, fit_key: str, fit_meta: dict[str, Any], train: TokenWindows) -> None:
    """A run of these settings that the language models' own loop stopped (its state keyed by ``key``, its best
    epoch in best.safetensors) continues in the one loop: its state rewritten in fit's terms. The tensors, epoch
    order and schedule are the same, so it ends where it would have."""
    path = run_dir / checkpoint.STATE_META
    try:  # anything else (no state, fit's own, another run's or a damaged one) is not for adopting
        state = schemas.check(schemas.LanguageModelState, checkpoint.read_json(path, "training state"), path, "")
        old_best = state.pop("best_validation")
        weights = checkpoint.read_tensors(run_dir / BEST_WEIGHTS, old_best["sha256"], "best weights")
    except DarkKnowledgeError:
        return
    if state["run_key"] != key:
        return
    history, elapsed = [], 0.0
    for record in state["history"]:  # each epoch's own seconds, where fit counts them cumulatively
        elapsed += record["seconds"]
        errors = round((1 - record["val_accuracy"]) * record["val_tokens"])
        history.append({**record, "val_errors": errors, "val_error_rate": errors / record["val_tokens"],
                        "val_loss": record["val_log_loss"], "seconds": round(elapsed, 3)})
    best_record = history[old_best["epoch"] - 1]
    model = build_language_model(fit_meta["spec"], train.vocab_size, train.context)
    model.load_state_dict(weights)
    shape = [train.context]
    checkpoint.save_model(run_dir, model, {**fit_meta, "input_shape": shape, "image_shape": shape,
                                           "classes": list(train.classes), "epoch": old_best["epoch"],
                                           "metrics": best_record})
    checkpoint.write_json(path, {**state, "run_key": fit_key, "history": history, "seconds": elapsed, "done": False,
                                 "best": {"epoch": old_best["epoch"], "val_errors": best_record["val_errors"],
                                          "stale": state["epoch"] - old_best["epoch"],
                                          "val_log_loss": old_best["log_loss"]}})
    (run_dir / BEST_WEIGHTS).unlink()


def _clear_other_run(run_dir: Path, fit_key: str, log: Callable[[str], None], refuse: bool = False) -> None:
    """A folder holding a run of other settings (another spec, data, recipe or objective), or a state that cannot
    resume (damaged, or its tensors fail their checksum), is trained again from the start, as the language models'
    own loop did; with ``refuse``, it is refused in one line and left as it is."""
    state = run_dir / checkpoint.STATE_META
    if state.exists():
        try:
            saved = schemas.check(schemas.ResumableState, checkpoint.read_training_state(run_dir), state,
                                  "it cannot resume the run")
            checkpoint.read_tensors(run_dir / saved["tensors"], saved["tensors_sha256"], "training state")
            if saved["run_key"] == fit_key:
                return
            reason = "holds a run of other settings"
        except DarkKnowledgeError as error:
            reason = str(error)
    elif (run_dir / checkpoint.MODEL_META).exists():
        reason = "holds a model of other settings"
    else:
        return
    if refuse:
        raise DarkKnowledgeError(f"{run_dir} {reason}; choose another --out, or delete the folder to train it again")
    log(f"{run_dir}: {reason}; training starts afresh")
    _drop_resume_files(run_dir)
    for name in (checkpoint.MODEL_META, checkpoint.MODEL_WEIGHTS):
        (run_dir / name).unlink(missing_ok=True)


def _per_epoch(history: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """The loop's records with each epoch's own seconds (the loop counts them cumulatively) and tokens a second."""
    out, before = [], 0.0
    for record in history:
        seconds = record["seconds"] - before
        before = record["seconds"]
        out.append({**record, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)})
    return out


def _drop_resume_files(run_dir: Path) -> None:
    """Finished: model.json now vouches for the run, so the resume files go."""
    for path in [run_dir / BEST_WEIGHTS, run_dir / checkpoint.STATE_META, *run_dir.glob("state-e*.safetensors")]:
        path.unlink(missing_ok=True)


def save_language_model(run_dir: str | Path, model: nn.Module, tokenizer: TextTokenizer, meta: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(run_dir, tokenizer)
    checkpoint.save_model(run_dir, model, meta)


def save_tokenizer(folder: str | Path, tokenizer: TextTokenizer) -> None:
    """``tokenizer.json`` (Hugging Face format) and ``tokenizer_config.json`` in ``folder``, each atomically."""
    checkpoint.atomic_write(Path(folder) / TOKENIZER_FILE, tokenizer.save)
    checkpoint.write_json(Path(folder) / TOKENIZER_CONFIG, tokenizer.hf_config())


def load_language_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a language-model run folder (eval mode) and its model.json (the pending one of a commit a
    crash cut short, as :func:`darkknowledge.checkpoint.read_model_meta` reads it). Checked as
    :func:`darkknowledge.checkpoint.load_model` checks an image model: its size against the memory before it is
    built, and its weights' names, shapes, dtypes and values against the model."""
    run_dir = checkpoint.resolve_run_dir(run_dir)
    meta = checkpoint.read_model_meta(run_dir, schemas.LanguageModelSidecar)
    check_fits(meta["spec"], (meta["context"],), meta["vocab_size"], copies=2)  # a spec may name any size
    try:
        model = _build(meta["spec"], meta["vocab_size"], meta["context"])
    except (RuntimeError, MemoryError) as error:
        raise DarkKnowledgeError(f"model: {run_dir / checkpoint.MODEL_META} describes a model that cannot be built "
                                 f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                                 "train the run again or restore the file") from None
    return checkpoint.load_weights(model, run_dir / meta["weights"], meta["weights_sha256"], "model").eval(), meta


def load_run_tokenizer(run_dir: str | Path, meta: dict[str, Any]) -> TextTokenizer:
    """The run's tokenizer.json, checked against the SHA-256 and the vocabulary its model.json records: one of
    darkknowledge's, or the Hugging Face folder's that a student distilled from that folder's teacher keeps byte for
    byte (:class:`darkknowledge.pretrained.HFTokenizer`, its SHA-256 that of the file)."""
    path = Path(run_dir) / TOKENIZER_FILE
    try:
        tokenizer = TextTokenizer.load(path, sha256=meta["tokenizer_sha256"])
    except DarkKnowledgeError:
        from .pretrained import load_hf_tokenizer  # imported here: pretrained builds on this module
        try:
            tokenizer = load_hf_tokenizer(run_dir)
        except DarkKnowledgeError:
            tokenizer = None
        if tokenizer is None or tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DarkKnowledgeError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but the run's model "
                                 f"{meta['vocab_size']}; restore the run's tokenizer.json, or train the run again")
    return tokenizer


def _reusable_run(run_dir: Path, key: str, tokenizer: TextTokenizer,
                  log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]] | None:
    """The finished run in ``run_dir`` if it is one of these settings and whole, else None (train it again).
    Its tokenizer.json must be the one its model.json records: one damaged, swapped or missing is rewritten from
    ``tokenizer`` (the same one: its SHA-256 is in the key). A run whose files are damaged is trained again, never
    reused; a folder holding an image model is refused (:class:`OtherKindOfRun`), never trained over."""
    if not (run_dir / checkpoint.MODEL_META).exists() and not (run_dir / checkpoint.PENDING_META).exists():
        return None
    if _in_progress(run_dir):
        return None
    try:
        model, meta = load_language_model(run_dir)
    except OtherKindOfRun:
        raise
    except DarkKnowledgeError as error:
        log(f"{run_dir}: its model cannot be used ({error}); training it again")
        return None
    if meta["run_key"] != key or meta["tokenizer_sha256"] != tokenizer.sha256:
        return None
    path = run_dir / TOKENIZER_FILE
    try:
        load_run_tokenizer(run_dir, meta)
    except DarkKnowledgeError as error:
        save_tokenizer(run_dir, tokenizer)
        log(f"{run_dir}: {TOKENIZER_FILE} repaired from the corpus's tokenizer ({error})")
    _drop_resume_files(run_dir)  # a run killed after its commit left them
    return model, meta


def _in_progress(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds this module's run still training in fit: fit's own sidecar of its best epoch so
    far (it records the tokenizer; an image model's sidecar does not, a finished run's is of kind language-model)."""
    try:
        return "tokenizer_sha256" in checkpoint.read_model_meta(run_dir)
    except DarkKnowledgeError:
        return False


@torch.no_grad()
def generate(model: nn.Module, tokenizer: TextTokenizer, prompt: str, tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, context: int | None = None) -> str:
    """Sample ``tokens`` tokens after ``prompt`` (the last ``context`` tokens condition each step)."""
    if not temperature > 0:
        raise DarkKnowledgeError(f"sampling temperature must be > 0, got {temperature}")
    if tokens < 0 or (top_k is not None and top_k < 1):
        raise DarkKnowledgeError(f"tokens must be >= 0 and top_k >= 1, got {tokens} and {top_k}")
    ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.int64)
    if ids.numel() == 0:
        ids = torch.tensor([tokenizer.end_of_document])
    generator = torch.Generator().manual_seed(seed)
    context = context or getattr(getattr(model, "config", None), "context", 128)
    model.eval()
    device = device_of(model)  # the ids follow the model; the draw stays on the CPU, with its seeded generator
    out = ids.tolist()
    for _ in range(tokens):
        logits = model(torch.tensor([out[-context:]], device=device))[0, -1, :tokenizer.vocab_size]  # no padding
        logits = logits.double().cpu()  # any float temperature
        logits = (logits - logits.max()) / temperature  # at most 0: a tiny temperature gives -inf, never NaN
        if top_k is not None:
            cutoff = logits.topk(min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < cutoff, -math.inf)
        out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return tokenizer.decode(out[len(ids):]) if len(out) > len(ids) else ""


def block_bootstrap_share(baseline: dict, ensemble: dict, student: dict, metric: str, samples: int = 2000,
                          seed: int = 0) -> dict[str, float]:
    """Share of the ensemble's gain the student keeps, ``(student - baseline) / (ensemble - baseline)``, with a
    95% percentile interval from resampling whole test windows (blocks keep the correlation between tokens)."""
    field = "window_nll" if metric == "log_loss" else "window_correct"
    values = np.array([baseline[field], ensemble[field], student[field]], dtype=np.float64)  # [3, windows]
    tokens_per_window = baseline["tokens"] / values.shape[1]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.shape[1], size=(samples, values.shape[1]))

    def share(sums: np.ndarray) -> np.ndarray:
        b, e, s = sums
        return (s - b) / np.where(e - b == 0, np.nan, e - b)

    point = float(share(values.sum(1)))
    draws = share(values[:, picks].sum(-1))
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    gain = (values[1].sum() - values[0].sum()) / (values.shape[1] * tokens_per_window)
    return {"share": point, "low": float(low), "high": float(high), "gain_per_token": float(gain),
            "ensemble_better": ensemble_is_better(metric, float(gain))}


def ensemble_is_better(metric: str, gain_per_token: float) -> bool:
    """Whether the ensemble gains over the baseline (``gain_per_token``: ensemble minus baseline): accuracy up, or
    log-loss down. Without a gain there is nothing to transfer: a share of a loss (or of noise) means nothing."""
    return gain_per_token > 0 if metric == "accuracy" else gain_per_token < 0


def no_gain_note(metric: str, share: dict[str, Any]) -> str | None:
    """The line a report gives under a share of :func:`block_bootstrap_share` whose ensemble did not gain on test
    (None when it did); from ``gain_per_token`` alone, so results written before ``ensemble_better`` read the same."""
    if ensemble_is_better(metric, share["gain_per_token"]):
        return None
    return (f"On test the ensemble is no better than the baseline in {metric} (gain per token "
            f"{share['gain_per_token']:+.4f}): there is no gain to transfer, and this share means nothing.")
