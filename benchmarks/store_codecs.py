"""Every way of storing a language model's teacher outputs, measured on the same rows (issue 31, items 2 and 3).

For each codec, on one sample of teacher rows (``p``: the dense distribution at T = 1, from float16 logits):

- bytes per token, counted from the encoded arrays themselves;
- encode and decode tokens/s on one core, in CPU time (encode: from the dense logits to the stored bytes, the
  top-k or the draws included; decode: from the bytes to what the loss reads, e.g. a ``TopKTargets``);
- the mean over positions of ``KL(r || p)``, ``r`` the rebuilt distribution: listed ids get their stored
  probabilities; a top-k row's tail mass ``exp(tail_logsumexp - Z)`` is spread evenly over the unlisted ids; a
  sampled row's tail is empty. ``KL(p || r)`` where it is finite (never for sampled rows: ``r`` is 0 off the
  draws). A sampled row is an unbiased estimate of ``p``, not an approximation of it: its KL per row is large
  though the mean of its draws is ``p``;
- against ``q``, a weaker model's dense distribution: the mean of ``|CE(r, q) - CE(p, q)|`` and of the signed
  error (``ce_bias``; draws err both ways, a summary one way).

Codecs: dense float16 (the reference), ``topk`` (the folder store's arrays: float16 logits, 16-bit ids at
V <= 65,536, the tail's two float32 numbers: 4k + 8 bytes), ``sampled`` with a head (``soft_targets.drawn_rows``,
the same arrays: 4 (h + K) + 8 bytes), ``darkknowledge.store_codec.CompactCodec`` when the package has it, and
DistillKit's ``LogprobCompressor`` imported from a checkout given by ``--distillkit PATH`` (nothing of it is copied
here; its rebuild is its own ``densify`` with the missing mass spread evenly, ``symmetric_uniform``; the ``zero``
rebuild's KL is recorded beside it).

Teacher rows: a dense folder store (``--store``), or language-model runs computed on the training windows of the
``reproduce lm`` folder that trained them (``--teacher RUN... --experiment OUT``: the rows a dense store of them
would hold); ``--weaker RUN`` gives q. Without either, a small teacher and a weaker model are trained here for
seconds on Shakespeare (``$DARKKNOWLEDGE_DATA/shakespeare``) and the numbers are a smoke test (the JSON says so);
``--quick`` makes that tiny (the tests)::

    python benchmarks/store_codecs.py --store RUNS/lm/runs/token-targets/KEY [--positions 20000] \\
        [--distillkit PATH] [--weaker RUNS/lm/runs/baseline --experiment RUNS/lm] [--out results/store-codecs]

``distillkit_store`` turns DistillKit's rebuilt rows into one of our top-k folder stores (see its docstring).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from darkknowledge import checkpoint
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.losses import TopKTargets, topk_targets
from darkknowledge.soft_targets import SoftTargets, drawn_rows

TOPK = (8, 32)
SAMPLED = ((16, 16), (8, 24), (0, 32))  # (head h, draws K): 4 (h + K) + 8 bytes a token
# (h, K, quantisation) of the compact codec: 66, 56, 58 and 50 B a token at V = 4,096, then 32 and 30 B
COMPACT = ((16, 16, "log8"), (16, 16, "e4m3"), (12, 16, "log8"), (12, 16, "e4m3"), (8, 24, "log8"),
           (0, 32, "log8"), (6, 10, "log8"), (6, 10, "e4m3"), (4, 12, "log8"))
# DistillKit's README: the recommended setting (~300 B a token at its vocabularies), its "budget pick" (~114 B),
# and settings of ours near 64 and 32 B a token at V = 4,096 (12-bit ids).
DISTILLKIT = {
    "recommended": dict(k=128, exact_k=16, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, 3, 4, "sqrt"],
                        term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
    "budget": dict(k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"],
                   term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
    # plain top-32 in bfloat16 through the same code: what the README says its budget pick beats
    "top-32 bf16": dict(k=32, exact_k=32, exact_dtype="bfloat16", polynomial_terms=None, residual_bins=[],
                        delta_encoding=False, error_diffusion=False),
    "~64B": dict(k=32, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"],
                 term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
    "~32B": dict(k=16, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"],
                 term_dtype="float16", residual_bins=[], delta_encoding=False, error_diffusion=False),
}
SEED_KEY = hashlib.sha256(b"benchmarks/store_codecs.py").hexdigest()  # seeds the draws as a store's key would


# ---------------------------------------------------------------------------------------------------------------
# Codecs: encode dense logits to bytes, decode the bytes to what the loss reads, rebuild a distribution from that
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Codec:
    name: str
    family: str
    settings: dict[str, Any]
    encode: Callable[[torch.Tensor, int], Any]  # logits [n, V] float32, first window -> arrays
    decode: Callable[[Any], Any]  # arrays -> what training reads
    rebuild: Callable[[Any], torch.Tensor]  # what training reads -> log r [n, V] (-inf: probability 0)
    extra_rebuilds: dict[str, Callable[[Any], torch.Tensor]] = field(default_factory=dict)


def nbytes(arrays) -> int:
    """Bytes of everything a codec stored (NumPy arrays or tensors, in a dict or alone)."""
    parts = arrays.values() if isinstance(arrays, dict) else [arrays]
    return sum(a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size() for a in parts)


def rebuild_topk(t: TopKTargets, vocab_size: int) -> torch.Tensor:
    """log r of a top-k summary at T = 1: the listed ids at ``v - Z``, the tail's mass spread evenly over the
    others (none for an empty tail, ``tail_logsumexp = -inf``: sampled rows)."""
    values, ids, tail = t.logits.float(), t.indices.long(), t.tail_logsumexp.float()
    z = torch.logaddexp(values.logsumexp(-1), tail)
    unlisted = vocab_size - values.shape[-1]
    log_r = (tail - z - math.log(max(unlisted, 1))).unsqueeze(-1).expand(-1, vocab_size).clone()
    return log_r.scatter_(-1, ids, values - z.unsqueeze(-1))


def dense_codec() -> Codec:
    return Codec("dense float16", "dense", {}, lambda x, _: x.half().numpy(),
                 lambda a: torch.from_numpy(a).float(), lambda x: x.log_softmax(-1))


def _store_arrays(t: TopKTargets, vocab_size: int) -> dict[str, np.ndarray]:
    """A folder store's arrays of top-k rows: float16 logits, 16-bit ids (32-bit past 65,536), the tail's two
    float32 numbers."""
    return {"topk_logits": t.logits.half().numpy(),
            "topk_indices": t.indices.numpy().astype("<u2" if vocab_size <= 1 << 16 else "<i4"),
            "tail": torch.stack([t.tail_logsumexp, t.tail_mean], -1).float().numpy()}


def _from_store_arrays(a: dict[str, np.ndarray]) -> TopKTargets:
    tail = torch.from_numpy(a["tail"])
    return TopKTargets(torch.from_numpy(a["topk_logits"]).float(), torch.from_numpy(a["topk_indices"]).long(),
                       tail[:, 0], tail[:, 1])


def topk_codec(k: int, vocab_size: int) -> Codec:
    return Codec(f"topk k={k}", "topk", {"k": k}, lambda x, _: _store_arrays(topk_targets(x, k), vocab_size),
                 _from_store_arrays, lambda t: rebuild_topk(t, vocab_size))


def sampled_codec(head: int, draws: int, vocab_size: int, context: int) -> Codec:
    def encode(x: torch.Tensor, first_window: int) -> dict[str, np.ndarray]:
        # seeded by window, as a folder store draws them
        return _store_arrays(drawn_rows(x, SEED_KEY, draws, head, first_window, context), vocab_size)

    return Codec(f"sampled h={head} K={draws}", "sampled", {"head": head, "draws": draws}, encode,
                 _from_store_arrays, lambda t: rebuild_topk(t, vocab_size))


def compact_codecs(vocab_size: int, context: int, settings) -> tuple[list[Codec], list[dict[str, str]]]:
    """``darkknowledge.store_codec.CompactCodec`` at each (h, K, quantisation), or why not."""
    try:
        store_codec = importlib.import_module("darkknowledge.store_codec")
    except ImportError:
        return [], [{"name": "compact", "reason": "darkknowledge.store_codec is not in this checkout (branch "
                                                  "compact not merged)"}]
    codecs = []
    for head, draws, quant in settings:
        if head + draws > vocab_size:
            continue
        codec = store_codec.CompactCodec(vocab_size, head, draws, quant)

        def encode(x, first_window, codec=codec, head=head, draws=draws):
            return codec.encode(drawn_rows(x, SEED_KEY, draws, head, first_window, context))

        codecs.append(Codec(f"compact h={head} K={draws} {quant}", "compact",
                            {"head": head, "draws": draws, "quant": quant}, encode, codec.decode,
                            lambda t: rebuild_topk(t, vocab_size)))
    return codecs, []


def distillkit_codecs(path: str | None, vocab_size: int) -> tuple[list[Codec], list[dict[str, str]], dict]:
    """DistillKit's ``LogprobCompressor`` at :data:`DISTILLKIT`'s settings, imported from the checkout at ``path``
    (nothing of it is copied here), or the one line saying why not; and what the checkout is."""
    if path is None:
        return [], [{"name": "distillkit", "reason": "no --distillkit PATH given (a checkout of "
                                                     "github.com/arcee-ai/DistillKit)"}], {}
    root = Path(path).expanduser().resolve()
    if not (root / "distillkit" / "compression").is_dir():
        raise DarkKnowledgeError(f"--distillkit {path}: no distillkit/compression folder there; give the root of "
                                 "a DistillKit checkout")
    sys.path.insert(0, str(root))
    try:
        compression = importlib.import_module("distillkit.compression")
        handling = importlib.import_module("distillkit.missing_probability").MissingProbabilityHandling
        densify = importlib.import_module("distillkit.compression.densify").densify
        compression.LogprobCompressor  # noqa: B018  the lazy import runs here: a missing dependency shows now
    except ImportError as e:
        return [], [{"name": "distillkit", "reason": f"DistillKit at {root} does not import here: {e}"}], {}
    finally:
        sys.path.remove(str(root))
    codecs = []
    for name, settings in DISTILLKIT.items():
        config = compression.DistributionQuantizationConfig(d=vocab_size, **settings)
        compressor = compression.LogprobCompressor(config)

        def rebuild(decoded, missing):
            ids, logprobs = decoded
            return densify(ids, logprobs.float(), vocab_size, missing=missing, renormalize=True).float()

        codecs.append(Codec(
            f"distillkit {name}", "distillkit", settings,
            lambda x, _, c=compressor: c.compress(x.log_softmax(-1)),
            lambda a, c=compressor: c.decompress_to_sparse(a),
            lambda d: rebuild(d, handling.SYMMETRIC_UNIFORM),
            {"kl_rebuilt_to_dense_zero_tail": lambda d: rebuild(d, handling.ZERO)}))
    return codecs, [], {"path": str(root), "commit": _git_head(root)}


def _git_head(root: Path) -> str | None:
    """The commit a git checkout is at (None: not a checkout, or no git here)."""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------

def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, 0 log 0 = 0 (inf where a > 0 and b = 0)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def measure(codecs: list[Codec], logits: torch.Tensor, weaker: torch.Tensor | None, context: int,
            chunk_windows: int = 8, log: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """Every codec on rows ``logits`` [n, V] (float16, whole windows of ``context``), chunk by chunk: p (and q)
    made once a chunk for all codecs; encode and decode timed in CPU time of the one thread (the machine is
    shared, so wall time would count the other processes' turns)."""
    n, vocab_size = logits.shape
    chunk = chunk_windows * context
    names = ("encode_s", "decode_s", "stored", "kl_rebuilt_to_dense", "kl_dense_to_rebuilt", "ce_abs_error",
             "ce_bias")
    totals = [{name: 0.0 for name in (*names, *codec.extra_rebuilds)} for codec in codecs]
    for start in range(0, n, chunk):
        x = logits[start:start + chunk].float()
        log_p = x.log_softmax(-1)
        if weaker is not None:
            log_q = weaker[start:start + chunk].float().log_softmax(-1)
            ce_p = -(log_p.exp() * log_q).sum(-1)
        for codec, total in zip(codecs, totals):
            started = time.process_time()
            arrays = codec.encode(x, start // context)
            encoded = time.process_time()
            decoded = codec.decode(arrays)
            total["decode_s"] += time.process_time() - encoded
            total["encode_s"] += encoded - started
            total["stored"] += nbytes(arrays)
            log_r = codec.rebuild(decoded)
            total["kl_rebuilt_to_dense"] += kl(log_r, log_p).double().sum().item()
            total["kl_dense_to_rebuilt"] += kl(log_p, log_r).double().sum().item()
            if weaker is not None:
                r = log_r.exp()
                ce_r = -torch.where(r > 0, r * log_q, torch.zeros_like(log_q)).sum(-1)
                total["ce_abs_error"] += (ce_r - ce_p).abs().double().sum().item()
                total["ce_bias"] += (ce_r - ce_p).double().sum().item()
            for name, rebuild in codec.extra_rebuilds.items():
                total[name] += kl(rebuild(decoded), log_p).double().sum().item()
        log(f"{min(start + chunk, n):,} of {n:,} rows")
    rows = []
    for codec, total in zip(codecs, totals):
        means = {name: total[name] / n for name in total if name not in names[:3]}
        if not math.isfinite(means["kl_dense_to_rebuilt"]):
            means["kl_dense_to_rebuilt"] = None  # r is 0 where p is not (sampled rows, a zero tail)
        if weaker is None:
            means["ce_abs_error"] = means["ce_bias"] = None
        rows.append({"name": codec.name, "family": codec.family, "settings": codec.settings,
                     "bytes_per_token": total["stored"] / n,
                     "times_smaller_than_dense": 2 * vocab_size * n / total["stored"],
                     "encode_tokens_per_s": n / total["encode_s"], "decode_tokens_per_s": n / total["decode_s"],
                     **means})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The teacher outputs: a sample of a dense store's rows, or a small teacher trained here (a smoke test)
# ---------------------------------------------------------------------------------------------------------------

def sample_windows(windows: int, positions: int, context: int, seed: int) -> np.ndarray:
    """Whole windows at random (sorted), enough to hold ``positions`` rows: a store's rows come by window."""
    count = min(windows, max(1, math.ceil(positions / context)))
    return np.sort(np.random.default_rng(seed).choice(windows, count, replace=False))


def store_rows(path: str, positions: int, seed: int) -> tuple[torch.Tensor, dict[str, Any], np.ndarray]:
    """Rows of whole windows of a dense folder store, float16 ``[n, V]``; what the store is; the windows."""
    store = SoftTargets.open(path, verify=False)
    header = store.header
    if store.layout != "dense" or store.num_members != 1 or "context" not in header:
        raise DarkKnowledgeError(f"--store {path} is a {store.layout} store; give a dense token store (a folder "
                                 "made by 'store build' or 'reproduce lm' without --top-k or --samples)")
    context = header["context"]
    chosen = sample_windows(header["windows"], positions, context, seed)
    rows = (chosen[:, None] * context + np.arange(context)).reshape(-1)
    logits = store.member_logits(rows)[:, 0].half()
    return logits, {"store": str(Path(path).resolve()), "key": store.key, "context": context,
                    "vocab_size": store.num_classes, "store_positions": len(store)}, chosen


def experiment_windows(experiment: str, context: int, data_dir: str | None):
    """The training windows of a ``reproduce lm`` folder (its tokenizer.json and data.json; the corpus from the
    data dir), without writing there."""
    from darkknowledge.data.datasets import resolve_data_dir
    from darkknowledge.data.text import TextTokenizer, TokenWindows, load_corpus, tokenise_corpus
    out = Path(experiment)
    if not (out / "data.json").is_file() or not (out / "tokenizer.json").is_file():
        raise DarkKnowledgeError(f"--experiment {experiment}: no data.json and tokenizer.json there; give the "
                                 "folder of the reproduce lm run")
    record = checkpoint.read_json(out / "data.json", "data")
    tokenizer = TextTokenizer.load(out / "tokenizer.json", sha256=record["tokenizer"]["sha256"])
    corpus = load_corpus(resolve_data_dir(data_dir) / "shakespeare")
    # only the training split is needed: one document of the others keeps tokenise_corpus's windows non-empty
    documents = {split: names if split == "train" else names[:1] for split, names in record["documents"].items()}
    train = tokenise_corpus(corpus, documents, tokenizer, context).windows["train"]
    return TokenWindows(train.ids.numpy()[:record["tokens"]["train"] + 1], context, "train", train.vocab_size)


def run_models(runs: list[str]) -> tuple[torch.nn.Module, int]:
    """Language-model runs as one model (several: their mean distribution, as a store of them holds) and its
    context."""
    from darkknowledge.language_model import EnsembleLM, load_language_model
    loaded = [load_language_model(run) for run in runs]
    models = [model.eval() for model, _ in loaded]
    return (models[0] if len(models) == 1 else EnsembleLM(models)), loaded[0][1]["context"]


def logits_at(model: torch.nn.Module, windows, chosen: np.ndarray, batch: int = 16) -> torch.Tensor:
    """A language model's logits ``[len(chosen) * context, V]`` (float16) on the windows ``chosen``."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(chosen), batch):
            ids = windows.batch(torch.from_numpy(chosen[start:start + batch]))[0]
            out = model(ids)
            parts.append(getattr(out, "logits", out).reshape(-1, windows.vocab_size).half())
    return torch.cat(parts)


def smoke_rows(positions: int, seed: int, quick: bool, data_dir: str | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A small teacher and a weaker model trained here for seconds on Shakespeare; their logits on windows of
    the training split. Not a real teacher: the numbers are a smoke test."""
    from darkknowledge.data.datasets import resolve_data_dir
    from darkknowledge.data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
    from darkknowledge.language_model import LMConfig, train_language_model
    vocab, context, tokens = (320, 16, 4_000) if quick else (4096, 64, 120_000)
    teacher_spec, weaker_spec = ((f"gpt:layers=1,dim=16,heads=2,context={context}",) * 2 if quick else
                                 (f"gpt:layers=2,dim=64,heads=4,context={context}",
                                  f"gpt:layers=1,dim=16,heads=2,context={context}"))
    corpus = load_corpus(resolve_data_dir(data_dir) / "shakespeare")
    # a few works a split: enough for the tokens trained on, and only they are tokenised
    documents = {split: names[:3] for split, names in split_documents(corpus.documents).items()}
    text = "".join(corpus.documents[n] for n in documents["train"])[:tokens * 5]
    tokenizer = TextTokenizer.train([text], "bpe", vocab)
    splits = tokenise_corpus(corpus, documents, tokenizer, context, max_tokens=tokens)
    train, val = splits.windows["train"], splits.windows["validation"]
    quiet = lambda _: None  # noqa: E731
    teacher, _ = train_language_model(teacher_spec, tokenizer, train, val, LMConfig(epochs=1, seed=seed), log=quiet)
    weaker_windows = type(train)(train.ids.numpy()[:tokens // 8 + 1], context, "train", train.vocab_size)
    weaker, _ = train_language_model(weaker_spec, tokenizer, weaker_windows, val, LMConfig(epochs=1, seed=seed + 1),
                                     log=quiet)
    chosen = sample_windows(len(train), positions, context, seed)
    return (logits_at(teacher, train, chosen), logits_at(weaker, train, chosen),
            {"smoke_test": True, "teacher": teacher_spec, "weaker": weaker_spec, "context": context,
             "vocab_size": tokenizer.vocab_size, "trained_tokens": train.num_tokens})


# ---------------------------------------------------------------------------------------------------------------
# DistillKit's rows as one of our stores
# ---------------------------------------------------------------------------------------------------------------

def distillkit_store(source: str, folder: str, distillkit: str, setting: str = "budget",
                     batch_windows: int = 16) -> SoftTargets:
    """A top-k folder store (``k`` = the setting's k) holding DistillKit's rebuilt rows of the dense store
    ``source``: its decompressed ids, their log-probabilities as logits, and the tail's correct summary (the
    missing mass ``1 - sum exp(logprobs)`` as ``tail_logsumexp``, its mean logit that of the even spread), so a
    student trained on it sees what DistillKit's ``symmetric_uniform`` loss would. Same windows, tokenizer and
    vocabulary as ``source``; the store's key records the DistillKit setting, so it never passes for ours::

        PYTHONPATH=src python -c "import sys; sys.path.insert(0, 'benchmarks'); import store_codecs; \\
            store_codecs.distillkit_store('RUNS/token-targets/KEY', 'RUNS/token-targets', '/tmp/distillkit')"

    Rows whose listed mass reaches 1 keep a tail of 1e-8 (DistillKit's own floor in ``densify``)."""
    dense = SoftTargets.open(source, verify=False)
    codecs, skipped, _ = distillkit_codecs(distillkit, dense.num_classes)
    if skipped:
        raise DarkKnowledgeError(skipped[0]["reason"])
    codec = next(c for c in codecs if c.name == f"distillkit {setting}")
    windows = _StoreWindows(dense)
    return SoftTargets.build(_DistillKitRows(dense, codec), windows, folder,
                             tokenizer_sha256=dense.header.get("tokenizer") or "none",
                             top_k=codec.settings["k"], batch_windows=batch_windows)


class _StoreWindows:
    """What ``SoftTargets.build`` needs of windows, read from a dense store's header (its rows are not windows
    of tokens we hold; the store's fingerprint stands for them)."""

    def __init__(self, store: SoftTargets):
        self.context, self.vocab_size = store.header["context"], store.num_classes
        self.num_tokens, self._windows, self._fingerprint = len(store), store.header["windows"], \
            store.transfer_fingerprint

    def __len__(self) -> int:
        return self._windows

    def fingerprint(self) -> str:
        return self._fingerprint

    def batch(self, indices):
        return torch.as_tensor(indices, dtype=torch.int64), None


class _DistillKitRows(torch.nn.Module):
    """A 'teacher' whose output for windows is DistillKit's rebuilt rows of the dense store: log r, with the
    missing mass spread evenly; ``SoftTargets.build`` keeps its top k, exactly the listed ids, and the tail."""

    def __init__(self, dense: SoftTargets, codec: Codec):
        super().__init__()
        self.dense, self.codec, self.context = dense, codec, dense.header["context"]

    def extra_repr(self) -> str:  # the store's key holds the module's repr: the codec, its settings, the rows
        return f"{self.codec.name} {json.dumps(self.codec.settings, sort_keys=True)} of store {self.dense.key}"

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        rows = (windows[:, None] * self.context + torch.arange(self.context)).reshape(-1)
        x = self.dense.member_logits(rows)[:, 0]
        log_r = self.codec.rebuild(self.codec.decode(self.codec.encode(x, 0)))
        return log_r.reshape(len(windows), self.context, -1)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def table(result: dict[str, Any]) -> str:
    lines = ["| codec | bytes/token | x smaller | encode tok/s | decode tok/s | KL(r‖p) | KL(p‖r) | "
             "\\|ΔCE\\| vs weaker |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["codecs"]:
        lines.append(f"| {r['name']} | {r['bytes_per_token']:.1f} | {r['times_smaller_than_dense']:.0f} | "
                     f"{r['encode_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{_number(r['kl_rebuilt_to_dense'])} | {_number(r['kl_dense_to_rebuilt'])} | "
                     f"{_number(r['ce_abs_error'])} |")
    lines += [f"| {s['name']} | skipped: {s['reason']} |||||||" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean KL(rebuilt || dense) against bytes a token, both log; beside it the cross-entropy error against the
    weaker model where there is one (a sampled row's KL is large though it is unbiased: the error shows it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from darkknowledge.plots import LEGEND, plain_log_axis
    measures = [("kl_rebuilt_to_dense", "mean KL(rebuilt || dense), nats")]
    if result["ce_reference"]:
        measures.append(("ce_abs_error", "mean |CE(rebuilt, q) - CE(dense, q)|, nats"))
    fig, axes = plt.subplots(1, len(measures), figsize=(6.5 * len(measures), 4.5), squeeze=False)
    for ax, (measure, label) in zip(axes[0], measures):
        labelled: list[tuple[float, float]] = []
        for family, marker in (("topk", "o"), ("sampled", "s"), ("compact", "D"), ("distillkit", "^")):
            rows = [r for r in result["codecs"] if r["family"] == family and r[measure] > 0]
            if not rows:
                continue
            ax.scatter([r["bytes_per_token"] for r in rows], [r[measure] for r in rows], marker=marker,
                       label=family)
            for r in rows:
                x, y = r["bytes_per_token"], r[measure]
                if any(abs(math.log(x / a)) < 0.04 and abs(math.log(y / b)) < 0.04 for a, b in labelled):
                    continue  # a twin at the same place (e.g. the two quantisations): one label
                labelled.append((x, y))
                ax.annotate(r["name"].split(" ", 1)[-1], (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_axis(ax.xaxis, ticks=[t for t in (16, 32, 64, 128, 256, 512) if
                                        t <= 2 * max(r["bytes_per_token"] for r in result["codecs"]
                                                     if r["family"] != "dense")])
        plain_log_axis(ax.yaxis)
        ax.set_xlabel("bytes per token (log)")
        ax.set_ylabel(label + " (log)")
        ax.legend(**LEGEND)
    fig.suptitle(f"Store codecs at V = {result['vocab_size']:,}, {result['positions']:,} positions (dense "
                 f"float16: {2 * result['vocab_size']:,} B, error 0)"
                 + (": smoke test" if result["source"].get("smoke_test") else ""), fontsize=9)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a dense token store folder (without it or --teacher: a smoke test on a "
                                        "small teacher trained here)")
    parser.add_argument("--positions", type=int, default=20_000, help="rows sampled, as whole windows (20,000)")
    parser.add_argument("--distillkit", help="a DistillKit checkout's root: its codec runs beside ours")
    parser.add_argument("--teacher", nargs="+", metavar="RUN", help="instead of --store: language-model runs "
                        "(their mean distribution) whose outputs are computed here on the --experiment's windows")
    parser.add_argument("--weaker", help="a language-model run folder: q of the cross-entropy error (with "
                                         "--experiment)")
    parser.add_argument("--experiment", help="the reproduce lm folder whose training windows the store or the "
                                             "runs are over (for --teacher and --weaker)")
    parser.add_argument("--data-dir", help="where shakespeare/ is (default $DARKKNOWLEDGE_DATA)")
    parser.add_argument("--out", default="results/store-codecs", help="folder for codecs.json, codecs.md, "
                                                                      "codecs.png")
    parser.add_argument("--quick", action="store_true", help="everything tiny: a smoke test of the script")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.positions < 1:
        parser.error(f"--positions must be at least 1, got {args.positions}")
    if args.store and args.teacher:
        parser.error("give --store or --teacher, not both")
    if (args.weaker or args.teacher) and not args.experiment:
        parser.error("--teacher and --weaker need --experiment (the reproduce lm folder of their windows)")
    if args.weaker and not (args.store or args.teacher):
        parser.error("--weaker is for --store or --teacher (the smoke test trains its own)")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.store or args.teacher:
        windows = None
        if args.store:
            logits, source, chosen = store_rows(args.store, args.positions, args.seed)
        else:
            teacher, context = run_models(args.teacher)
            windows = experiment_windows(args.experiment, context, args.data_dir)
            chosen = sample_windows(len(windows), args.positions, context, args.seed)
            logits = logits_at(teacher, windows, chosen)
            source = {"teacher": [str(Path(r).resolve()) for r in args.teacher], "context": context,
                      "vocab_size": windows.vocab_size, "windows_fingerprint": windows.fingerprint(),
                      "experiment": str(Path(args.experiment).resolve())}
        weaker = None
        if args.weaker:
            model, context = run_models([args.weaker])
            if windows is None:
                windows = experiment_windows(args.experiment, context, args.data_dir)
                fingerprint = SoftTargets.open(args.store, verify=False).header["windows_fingerprint"]
                if windows.fingerprint() != fingerprint:
                    raise DarkKnowledgeError(f"--experiment {args.experiment}: its training windows are not the "
                                             "store's; give the reproduce lm folder that built the store")
            weaker = logits_at(model, windows, chosen)
            source["weaker"] = str(Path(args.weaker).resolve())
    else:
        logits, weaker, source = smoke_rows(args.positions if not args.quick else min(args.positions, 256),
                                            args.seed, args.quick, args.data_dir)
    print(f"teacher outputs: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    vocab_size, context = logits.shape[1], source["context"]
    codecs = [dense_codec(), *[topk_codec(k, vocab_size) for k in TOPK if k < vocab_size],
              *[sampled_codec(h, k, vocab_size, context) for h, k in SAMPLED if h + k <= vocab_size]]
    compact, skipped = compact_codecs(vocab_size, context, COMPACT)
    theirs, not_theirs, distillkit = distillkit_codecs(args.distillkit, vocab_size)
    rows = measure(codecs + compact + theirs, logits, weaker, context,
                   log=lambda line: print(f"{line} ({time.perf_counter() - started:.0f} s)", file=sys.stderr))
    result = {"command": "python benchmarks/store_codecs.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "source": source, "positions": logits.shape[0], "vocab_size": vocab_size,
              "threads": torch.get_num_threads(), "distillkit": distillkit,
              "ce_reference": "a weaker model's dense distribution" if weaker is not None else None,
              "codecs": rows, "skipped": skipped + not_theirs, "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "codecs.json", result)
    checkpoint.atomic_write(out / "codecs.md", lambda p: Path(p).write_text(table(result)))
    plot(result, out / "codecs.png")
    print(table(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except DarkKnowledgeError as error:
        sys.exit(f"error: {error}")
