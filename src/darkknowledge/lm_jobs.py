"""Whole jobs of a language model on a user's corpus, as the command line runs them: the corpus split and
tokenised with the teacher's tokenizer (:class:`Corpus`), the teacher's outputs stored once (:func:`build_store`),
a run evaluated in its units (:func:`evaluate_lm_run`). Models and tokenizers come from
:func:`darkknowledge.pretrained.load_causal_lm`, so every verb takes the same folders."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .data.text import TextSplits, TextTokenizer, load_corpus, split_documents, tokenise_corpus
from .devices import resolve_device
from .errors import DarkKnowledgeError
from .evaluation import device_of
from .language_model import evaluate_language_model
from .outputs import logits_width
from .pretrained import (HF_TOKENIZER, RealVocabulary, load_causal_lm, load_hf_tokenizer, spec_of,
                         student_from_teacher_layers)
from .soft_targets import DRAWN, SoftTargets
from .transformer import CausalTransformer

LAYOUTS = ("dense", "topk", "sampled", "compact")
DEFAULT_CONTEXT = 1024  # the longest window a corpus is cut into when --context is not given
SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class Corpus:
    """A user's corpus (``--data``, ``--text-column``), split by whole documents (fractions and seed recorded) and
    cut into windows of ``context`` tokens."""

    path: str
    text_column: str | None = None
    context: int | None = None  # None: the model's positions, at most DEFAULT_CONTEXT
    validation: float = 0.1
    test: float = 0.1
    seed: int = 0

    def splits(self, tokenizer: TextTokenizer) -> TextSplits:
        corpus = load_corpus(self.path, self.text_column)
        documents = split_documents(corpus.documents, self.validation, self.test, self.seed)
        return tokenise_corpus(corpus, documents, tokenizer, self.context)

    def describe(self, splits: TextSplits) -> dict[str, Any]:
        """What a run or store records of its data: where, how it was split (sizes in documents and tokens)."""
        return {"path": str(Path(self.path).expanduser().resolve()), "text_column": self.text_column,
                "context": self.context, "split": {"validation": self.validation, "test": self.test,
                                                   "seed": self.seed},
                "documents": {name: len(names) for name, names in splits.documents.items()},
                "tokens": {name: w.num_tokens for name, w in splits.windows.items()},
                "corpus_sha256": splits.corpus_sha256, "skipped_empty": splits.skipped_empty}


def positions_of(model: nn.Module, description: dict[str, Any] | None = None) -> int | None:
    """How many positions a model reads at most (None: no limit it states)."""
    if description and description.get("context"):
        return int(description["context"])
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    for name in ("context", "n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def check_context(context: int, model: nn.Module, description: dict[str, Any], role: str) -> None:
    """``--context`` must fit the model's positions: refused in one line before any work."""
    positions = positions_of(model, description)
    if positions is not None and context > positions:
        raise DarkKnowledgeError(f"--context {context} is longer than the {role} {description.get('source', '')} "
                                 f"reads ({positions} positions); give --context {positions} or less")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def padding_rows(model: nn.Module, tokenizer: TextTokenizer, role: str, source: str) -> int:
    """How many outputs the model has past its tokenizer's tokens (one forward of one token: cheap). Fewer
    outputs than tokens are refused in one line: some token would have no logit."""
    width = logits_width(model)
    if width < tokenizer.vocab_size:
        raise DarkKnowledgeError(f"the {role} {source} gives {width} logits a token but its tokenizer has "
                                 f"{tokenizer.vocab_size} tokens; fewer outputs than tokens: use a model and the "
                                 "tokenizer it was trained with")
    return width - tokenizer.vocab_size


def on_real_vocabulary(model: nn.Module, tokenizer: TextTokenizer, role: str, source: str,
                       log: Callable[[str], None] = _to_stderr) -> nn.Module:
    """The model scoring its tokenizer's tokens only. Published checkpoints pad their output layer to a round
    number (152,064 rows for a tokenizer of 151,665 tokens, say): rows no token id reaches, never a label. Such a
    model comes back cut to the tokenizer's vocabulary (:class:`darkknowledge.pretrained.RealVocabulary`, so every
    softmax, the store's, the loss's and evaluation's, is over the real tokens; one line logged), a model with as
    many outputs as tokens comes back as it is, and one with fewer is refused in one line."""
    padding = padding_rows(model, tokenizer, role, source)
    if not padding:
        return model
    log(f"the {role} {source} has {tokenizer.vocab_size + padding:,} outputs for its tokenizer's "
        f"{tokenizer.vocab_size:,} tokens: the {padding:,} padding rows past them are ignored")
    return RealVocabulary(model, tokenizer.vocab_size)


def load_model(source: str | Path, corpus: Corpus, role: str, dtype: str | None = None,
               log: Callable[[str], None] = _to_stderr) -> tuple[nn.Module, TextTokenizer, Corpus]:
    """A teacher (or a model to evaluate) with its tokenizer, checked against ``--context`` and cut to its real
    vocabulary (:func:`on_real_vocabulary`), and the corpus with its context settled (unset: the model's
    positions, at most :data:`DEFAULT_CONTEXT`). ``dtype``: a Hugging Face folder's weights (float32, bfloat16,
    float16; None: the folder's own)."""
    model, tokenizer, description = load_causal_lm(source, dtype)
    if corpus.context is None:
        corpus = replace(corpus, context=min(positions_of(model, description) or DEFAULT_CONTEXT, DEFAULT_CONTEXT))
    check_context(corpus.context, model, description, role)
    return on_real_vocabulary(model, tokenizer, role, str(source), log), tokenizer, corpus


def _progress(total_label: str) -> Callable[[int, int], None]:
    """A store build's progress on stderr: tokens done, of all, and tokens a second, at most once a second."""
    started, last = time.perf_counter(), [0.0]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"{total_label}: {done:,}/{total:,} tokens ({done / max(now - started, 1e-9):,.0f} tokens/s so "
                  "far)", file=sys.stderr, flush=True)
    return show


def build_store(teacher: str | Path, corpus: Corpus, out: str | Path, layout: str = "topk", *,
                top_k: int | None = None, head: int = 0, samples: int | None = None, quant: str | None = None,
                dtype: str | None = None, device: str | None = None, log: Callable[[str], None] = print,
                on_chunk: Callable[[int, int], None] | None = None) -> tuple[SoftTargets, dict[str, Any]]:
    """The teacher's per-token outputs over the corpus's training windows, computed once into ``out`` (a folder
    of stores, each in its key's sub-folder: keyed to teacher (its weights in ``dtype``), tokenizer, corpus,
    context and layout); a killed build resumes where it stopped. Returns the store and what to report (bytes per
    token, tokens/s). ``layout="compact"``: the sampled layout's draws packed by
    :class:`darkknowledge.store_codec.CompactCodec`, its head quantised by ``quant`` (default ``log8``).
    ``device``: where the teacher runs (None: the default device; under torchrun on CUDA each rank's own GPU)."""
    if layout not in LAYOUTS:
        raise DarkKnowledgeError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "topk" and top_k is None:
        top_k = 32
    if layout in DRAWN and samples is None:
        raise DarkKnowledgeError(f"--layout {layout} needs --samples K (draws a token; e.g. --head 16 --samples 16)")
    if layout != "topk" and top_k is not None:
        raise DarkKnowledgeError(f"--top-k is for --layout topk, not {layout}")
    if layout not in DRAWN and (head or samples is not None):
        raise DarkKnowledgeError(f"--head and --samples are for --layout sampled or compact, not {layout}")
    if layout != "compact" and quant is not None:
        raise DarkKnowledgeError(f"--quant is for --layout compact, not {layout}")
    if layout == "compact" and quant is None:
        quant = "log8"
    model, tokenizer, corpus = load_model(teacher, corpus, "teacher", dtype, log)
    model = model.to(resolve_device(device))
    train = corpus.splits(tokenizer).windows["train"]
    log(f"teacher {teacher}: {_weights_dtype(model)} weights on {device_of(model)}, context {corpus.context}")
    started = time.perf_counter()
    store = SoftTargets.build(model, train, out, tokenizer_sha256=tokenizer.sha256, top_k=top_k,
                               samples=samples, head=head, compact=quant, log=log,
                               on_chunk=on_chunk or _progress(f"store {layout}"))
    seconds = store.header.get("build_seconds") or (time.perf_counter() - started)
    return store, {"store": str(store.path), "layout": store.layout, "top_k": store.top_k, "head": store.head,
                   **({"quant": quant} if quant else {}), "tokens": len(store), "bytes_per_token": store.bytes_per_case,
                   "tokens_per_second": len(store) / max(seconds, 1e-9)}


def _weights_dtype(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def evaluate_lm_run(run: str | Path, corpus: Corpus, split: str = "test", device: str | None = None,
                    dtype: str | None = None) -> dict[str, Any]:
    """Per-token log-loss, perplexity and next-token accuracy of a language model (a run or a folder
    :func:`load_causal_lm` reads, a folder's weights in ``dtype``) on a split of ``corpus``, split as training
    split it."""
    if split not in SPLIT_NAMES:
        raise DarkKnowledgeError(f"split must be train, val or test, got {split!r}")
    model, tokenizer, corpus = load_model(run, corpus, "model", dtype)
    windows = corpus.splits(tokenizer).windows[SPLIT_NAMES[split]]
    result = evaluate_language_model(model.to(resolve_device(device)), windows)
    return {"run": str(run), "data": corpus.path, "split": split, "dtype": _weights_dtype(model),
            "context": corpus.context, "tokens": result["tokens"], "log_loss": result["log_loss"],
            "perplexity": result["perplexity"], "accuracy": result["accuracy"]}


def _store_for(folder: str | Path, teacher: nn.Module, windows, tokenizer: TextTokenizer) -> SoftTargets:
    """The store in ``folder`` (one store, or a folder of them as ``store build --out`` writes) built from this
    teacher over these windows with this tokenizer; another teacher's, tokenizer's or corpus's is refused."""
    from .soft_targets import module_sha256
    folder = Path(folder)
    found = [folder] if (folder / "targets.json").exists() else sorted(p.parent for p in folder.glob("*/targets.json"))
    if not found:
        raise DarkKnowledgeError(f"{folder} holds no token store; build one with 'darkknowledge store build'")
    teacher_sha, problems = module_sha256(teacher), []
    for candidate in found:
        try:
            store = SoftTargets.open(candidate, windows=windows, tokenizer_sha256=tokenizer.sha256,
                                      vocab_size=tokenizer.vocab_size)
        except DarkKnowledgeError as error:
            problems.append(str(error))
            continue
        if teacher_sha in store.header["key_parts"]["members"]:
            return store
        problems.append(f"token store {candidate} was built from another teacher (or this one "
                        "in another --dtype); build one from this teacher")
    raise DarkKnowledgeError(problems[0] if len(problems) == 1 else
                             f"none of the {len(found)} stores in {folder} is this teacher's over this corpus "
                             f"and tokenizer ({problems[0]})")


def check_language_model_spec(spec: str) -> None:
    """A language model's spec: ``gpt:``, ``hf:`` or a factory (an image model's is refused in one line)."""
    from .models import FACTORY, parse_spec
    if parse_spec(spec).kind not in ("gpt", "hf", FACTORY):
        raise DarkKnowledgeError(f"a text corpus trains a language model: give gpt:..., hf:..., "
                                 f"package.module:factory or a model folder, not {spec!r}")


def _student_from_teacher(teacher: nn.Module, layers: list[int], tokenizer: TextTokenizer,
                          context: int) -> tuple[str, nn.Module]:
    """``(spec, first weights)`` of a student made of the teacher's ``layers`` (``--student-init
    teacher-layers=...``), in float32 whatever the teacher's dtype, its output layer the teacher's (padding rows
    and all); a ``gpt:`` one reads the run's ``context`` positions (the first rows of the teacher's table), as the
    run rebuilds it."""
    whole = teacher.model if isinstance(teacher, RealVocabulary) else teacher  # a padded teacher, cut to its tokens
    student = student_from_teacher_layers(whole, layers).float()
    if isinstance(student, CausalTransformer) and student.config.context != context:
        student.config = replace(student.config, context=context)
        student.position = nn.Embedding.from_pretrained(student.position.weight[:context].detach().clone(),
                                                        freeze=False)
    return spec_of(student, tokenizer.vocab_size, f"of the teacher's layers {','.join(map(str, layers))}"), student


def _student(spec: str, tokenizer: TextTokenizer, corpus: Corpus) -> tuple[str, nn.Module | None]:
    """``(spec, first weights or None)``: a ``gpt:``/``hf:`` spec or a factory is built by the run from its seed;
    a folder (:func:`load_causal_lm`: a run, or a Hugging Face folder, its spec read from its config) starts from
    its weights, in float32, and must share the teacher's tokenizer; its output layer may be padded past it."""
    if not Path(spec).expanduser().is_dir():
        check_language_model_spec(spec)
        return spec, None
    model, student_tokenizer, description = load_causal_lm(spec, "float32")
    check_context(corpus.context, model, description, "student")
    if student_tokenizer.sha256 != tokenizer.sha256:
        raise DarkKnowledgeError(f"the student {spec} has another tokenizer than the teacher (SHA-256 "
                                 f"{student_tokenizer.sha256[:12]}, the teacher's {tokenizer.sha256[:12]}); teacher "
                                 "and student must share one")
    padding_rows(model, tokenizer, "student", spec)  # the run trains it on the real vocabulary, padding kept
    if description["kind"] == "huggingface":  # trained in float32 (--bf16 is autocast), rebuilt from its spec
        return spec_of(model, tokenizer.vocab_size, spec), model.float()
    if not description.get("spec"):
        raise DarkKnowledgeError(f"the student folder {spec} does not name its architecture (no spec); give a "
                                 "gpt: or hf: spec instead")
    return description["spec"], model


def lm_run(spec: str, corpus: Corpus, config, out: str | Path, resume: bool = False, *,
           tokenizer: TextTokenizer | None = None, teacher: str | Path | None = None, store: str | Path | None = None,
           objective: dict[str, Any] | None = None, device: str | None = None, teacher_device: str | None = None,
           student_init: list[int] | None = None, dtype: str | None = None,
           log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``spec`` (a spec, a factory or a folder) on ``corpus`` into the run folder ``out``, on the one loop
    (``config``: a :class:`darkknowledge.training.TrainConfig`): on labels without ``teacher`` (``tokenizer``: the
    one to use), else distilled from the teacher (its tokenizer), read from ``store`` or run online on
    ``teacher_device``. ``objective``: temperature, soft_weight, hard_weight, divergence, beta.
    ``student_init``: the teacher's layers the student starts from (its architecture, ``spec`` unused). ``dtype``:
    the teacher folder's weights (None: the folder's own). A folder holding a run of other settings is refused; a
    killed run continues with ``resume``."""
    from . import checkpoint
    from .language_model import Objective, train_language_model
    online = None
    if teacher is not None:
        online, tokenizer, corpus = load_model(teacher, corpus, "teacher", dtype, log)
    elif tokenizer is None:
        raise DarkKnowledgeError("a language-model run needs a tokenizer or a teacher")
    elif corpus.context is None:
        corpus = replace(corpus, context=128)
    if student_init is not None and online is None:
        raise DarkKnowledgeError("--student-init teacher-layers=... starts a student from a teacher's layers: give "
                                 "--teacher")
    spec, first = _student(spec, tokenizer, corpus) if student_init is None else \
        _student_from_teacher(online, student_init, tokenizer, corpus.context)
    splits = corpus.splits(tokenizer)
    train, validation = splits.windows["train"], splits.windows["validation"]
    if (Path(out) / checkpoint.STATE_META).exists():
        checkpoint.check_startable(Path(out), resume)  # a killed run continues only when asked
    soft = {}
    if online is not None and store is not None:
        soft = {"store": _store_for(store, online, train, tokenizer)}
    elif online is not None:
        soft = {"teacher": online, "teacher_device": teacher_device}
    goal = Objective(**soft, **(objective or {})) if soft else Objective()
    return train_language_model(spec, tokenizer, train, validation, config, goal, out, log=log, device=device,
                                model=first, refuse_others=True, data=corpus.describe(splits),
                                init={"teacher_layers": student_init} if student_init is not None else None)


def corpus_tokenizer(corpus: Corpus, choice: str = "bpe", vocab_size: int = 4096) -> TextTokenizer:
    """A run's tokenizer with no teacher: ``choice`` a ``tokenizer.json`` path, or ``char`` / ``bpe`` trained on the
    corpus's training split, as the reproduction trains its own. A Hugging Face folder, or its tokenizer.json, gives
    that folder's tokenizer (a labels-only twin of a student distilled from the folder's teacher)."""
    if choice not in ("char", "bpe"):
        path = Path(choice)
        if path.is_dir():
            return load_hf_tokenizer(path)
        try:
            return TextTokenizer.load(path)
        except DarkKnowledgeError:
            if path.name != HF_TOKENIZER:
                raise
            return load_hf_tokenizer(path.parent)  # not one darkknowledge wrote: the folder's, with its eos token
    corpus_documents = load_corpus(corpus.path, corpus.text_column)
    documents = split_documents(corpus_documents.documents, corpus.validation, corpus.test, corpus.seed)
    return TextTokenizer.train([corpus_documents.documents[n] for n in documents["train"]], choice, vocab_size)
