"""Training, evaluating, saving and sampling causal language models on token windows.

The loop reads like the image loop (:mod:`darkknowledge.training`) but is its own: AdamW with warm-up and a
cosine decay, gradient clipping, token windows as cases, and the §2 objective per token
(:func:`darkknowledge.losses.distillation_loss` with ``[B, S, V]`` logits) when a :class:`TokenTargets` store is
given. After every epoch it evaluates on the validation windows and saves its state, so a stopped run resumes at
the next epoch (the state carries a key of everything that defines the run: other settings start afresh).
The model kept is the epoch best on validation log-loss (model selection never sees the test split).

A run folder holds ``model.safetensors`` + ``model.json`` (``kind: language-model``: spec, vocabulary, context,
the tokenizer's SHA-256, the data it saw, metrics) and ``tokenizer.json``, checked against the SHA-256 on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint, schemas
from .data.text import TextTokenizer, TokenWindows
from .errors import DarkKnowledgeError, TrainingDiverged
from .losses import distillation_loss
from .token_store import TokenTargets, ensemble_logits
from .transformer import build_language_model

KIND = "language-model"
TOKENIZER_FILE = "tokenizer.json"
BEST_WEIGHTS = "best.safetensors"  # the best epoch so far, while a run is unfinished


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
    """Hard labels only (``store is None``), or the §2 objective per token against a token store."""

    store: TokenTargets | None = None
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0

    def __post_init__(self):
        if self.store is not None and self.store.layout == "sampled" and self.temperature != 1:
            raise DarkKnowledgeError(f"a sampled store holds draws at T = 1, so it distils at temperature 1 only, "
                                     f"got {self.temperature}; use temperature 1 or a dense or top-k store")

    def describe(self) -> dict[str, Any]:
        if self.store is None:
            return {"objective": "labels"}
        return {"objective": "distillation", "temperature": self.temperature, "soft_weight": self.soft_weight,
                "hard_weight": self.hard_weight, "store": self.store.header["key"], "layout": self.store.layout,
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


@torch.no_grad()
def evaluate_language_model(logits_of: Callable[[Tensor], Tensor] | nn.Module, windows: TokenWindows,
                            batch_size: int = 32) -> dict[str, Any]:
    """Per-token log-loss (nats), perplexity and next-token accuracy over every window; per-window sums too
    (``window_nll``, ``window_correct``: the blocks of a bootstrap over sequences)."""
    if isinstance(logits_of, nn.Module):
        logits_of.eval()
    nll, correct = [], []
    for start in range(0, len(windows), batch_size):
        ids, labels = windows.batch(torch.arange(start, min(start + batch_size, len(windows))))
        log_p = torch.log_softmax(logits_of(ids).float(), -1)
        nll.append(-log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1).double())
        correct.append((log_p.argmax(-1) == labels).sum(1))
    window_nll, window_correct = torch.cat(nll), torch.cat(correct)
    tokens = windows.num_tokens
    log_loss = window_nll.sum().item() / tokens
    return {"log_loss": log_loss, "perplexity": math.exp(log_loss), "accuracy": window_correct.sum().item() / tokens,
            "tokens": tokens, "window_nll": window_nll.tolist(), "window_correct": window_correct.tolist()}


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {k: evaluation[k] for k in ("log_loss", "perplexity", "accuracy", "tokens")}


def _learning_rate(config: LMConfig, step: int, total: int) -> float:
    warmup = max(1, round(config.warmup * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def run_key(spec: str, tokenizer_sha256: str, train: TokenWindows, config: LMConfig, objective: Objective) -> str:
    parts = {"spec": spec, "tokenizer": tokenizer_sha256, "train": train.fingerprint(), "config": asdict(config),
             "objective": objective.describe()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def train_language_model(spec: str, tokenizer: TextTokenizer, train: TokenWindows, validation: TokenWindows,
                         config: LMConfig = LMConfig(), objective: Objective = Objective(),
                         run_dir: str | Path | None = None, log: Callable[[str], None] = print
                         ) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or resume, or reuse a finished run of the same key) and return ``(best model, model.json meta)``.
    One writer per run folder: its lock is held for the whole job, as ``training.fit`` holds its own."""
    with checkpoint.open_run(run_dir):
        return _train_language_model(spec, tokenizer, train, validation, config, objective, run_dir, log)


def _train_language_model(spec: str, tokenizer: TextTokenizer, train: TokenWindows, validation: TokenWindows,
                          config: LMConfig, objective: Objective, run_dir: str | Path | None,
                          log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    if objective.store is not None:
        TokenTargets.open(objective.store.folder, windows=train, tokenizer_sha256=tokenizer.sha256,
                          vocab_size=tokenizer.vocab_size, verify=False)
    key = run_key(spec, tokenizer.sha256, train, config, objective)
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and (run_dir / checkpoint.MODEL_META).exists():
        model, meta = load_language_model(run_dir)
        if meta.get("run_key") == key:
            log(f"{run_dir}: finished run of these settings, reused")
            return model, meta
    torch.manual_seed(config.seed)
    model = build_language_model(spec, tokenizer.vocab_size, train.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"log_loss": math.inf}
    first_epoch = 1
    state_path = run_dir / checkpoint.STATE_META if run_dir is not None else None
    # A saved state of other settings (another spec, data or objective) is left alone and training starts afresh.
    if state_path is not None and state_path.exists() and \
            checkpoint.read_json(state_path, "training state").get("run_key") == key:
        state = checkpoint.load_training_state(run_dir, model, optimizer)
        first_epoch, history, best = state["epoch"] + 1, state["history"], state["best_validation"]
        best["weights"] = checkpoint.read_tensors(run_dir / BEST_WEIGHTS, best["sha256"], "best weights")
        log(f"{run_dir}: resumed after epoch {state['epoch']}")
    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        started, sums, tokens = time.perf_counter(), {}, 0
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, (epoch - 1) * steps_per_epoch + step,
                                             config.epochs * steps_per_epoch)
            indices = order[step * config.batch_size:(step + 1) * config.batch_size]
            ids, labels = train.batch(indices)
            logits = model(ids)
            if objective.store is None:
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
                parts = {"loss": loss}
            else:
                terms = distillation_loss(logits, labels=labels, temperature=objective.temperature,
                                          soft_weight=objective.soft_weight, hard_weight=objective.hard_weight,
                                          **objective.store.targets(train, indices))
                loss, parts = terms.total, {"loss": terms.total, "soft": terms.soft, "soft_kl": terms.kl,
                                            "hard": terms.hard}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            for name, value in parts.items():  # tensors: no synchronisation to Python per step
                sums[name] = sums.get(name, 0) + value.detach() * labels.numel()
            tokens += labels.numel()
        seconds = time.perf_counter() - started
        if not math.isfinite(float(sums["loss"])):  # before anything of this epoch is evaluated or saved
            raise TrainingDiverged.in_epoch(epoch)
        val = _summary(evaluate_language_model(model, validation))
        record = {"epoch": epoch, **{f"train_{k}": float(v) / tokens for k, v in sums.items()}, "seconds": seconds,
                  "tokens_per_second": tokens / seconds, **{f"val_{k}": v for k, v in val.items()}}
        history.append(record)
        is_best = val["log_loss"] < best["log_loss"]
        if is_best:
            best = {"log_loss": val["log_loss"], "epoch": epoch,
                    "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if run_dir is not None:
            if is_best:  # the best weights first, then the state that points at them
                best["sha256"] = checkpoint.write_tensors(run_dir / BEST_WEIGHTS, best["weights"])
            checkpoint.save_training_state(run_dir, epoch, model, optimizer, {
                "run_key": key, "history": history,
                "best_validation": {k: v for k, v in best.items() if k != "weights"}})
        log(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}, val log-loss "
            f"{val['log_loss']:.4f}, val accuracy {val['accuracy']:.4f} ({record['tokens_per_second']:.0f} tok/s)")
    model.load_state_dict(best["weights"])
    meta = {"kind": KIND, "spec": spec, "vocab_size": tokenizer.vocab_size, "context": train.context,
            "tokenizer_sha256": tokenizer.sha256, "train": train.describe(), "config": asdict(config),
            **objective.describe(), "best_epoch": best["epoch"], "history": history, "run_key": key}
    if run_dir is not None:
        save_language_model(run_dir, model, tokenizer, meta)
        # Finished: model.json now vouches for the run, so the resume files go.
        for path in [run_dir / BEST_WEIGHTS, run_dir / checkpoint.STATE_META, *run_dir.glob("state-e*.safetensors")]:
            path.unlink(missing_ok=True)
    return model.eval(), meta


def save_language_model(run_dir: str | Path, model: nn.Module, tokenizer: TextTokenizer, meta: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / TOKENIZER_FILE)
    checkpoint.save_model(run_dir, model, meta)


def load_language_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a language-model run folder (eval mode) and its model.json."""
    run_dir = checkpoint.resolve_run_dir(run_dir)
    meta = checkpoint.read_json(run_dir / checkpoint.MODEL_META, "model")
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise DarkKnowledgeError(f"{run_dir} is not a language-model run (its model.json has no kind "
                                 f"'{KIND}'); give a run made by 'darkknowledge reproduce lm' or train_language_model")
    schemas.check(schemas.LanguageModelSidecar, meta, run_dir / checkpoint.MODEL_META,
                  "train the run again or restore the file")
    model = build_language_model(meta["spec"], meta["vocab_size"], meta["context"])
    model.load_state_dict(checkpoint.read_tensors(run_dir / meta["weights"], meta["weights_sha256"], "model"))
    return model.eval(), meta


def load_run_tokenizer(run_dir: str | Path, meta: dict[str, Any]) -> TextTokenizer:
    return TextTokenizer.load(Path(run_dir) / TOKENIZER_FILE, sha256=meta["tokenizer_sha256"])


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
    out = ids.tolist()
    for _ in range(tokens):
        logits = model(torch.tensor([out[-context:]]))[0, -1].double()  # a tiny temperature is 0 in float32
        # shifted before the division: a tiny temperature makes the others -inf (greedy), never inf - inf (NaN)
        logits = (logits - logits.max()) / temperature
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
