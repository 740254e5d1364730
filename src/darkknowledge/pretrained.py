"""Where a language model and its tokenizer come from: a darkknowledge language-model run folder, or a local
Hugging Face folder (``config.json``, safetensors weights, ``tokenizer.json``). Every verb that takes ``--teacher``
or ``--student PATH`` for text reads it through :func:`load_causal_lm`, so they all accept the same things.

Teacher and student share one tokenizer (:func:`check_same_tokenizer`). Their output layers may still differ in
size: published checkpoints pad the vocabulary to a round number (151,936 or 152,064 rows for the same 151,665
tokens), and the rows past the tokenizer's last id are never a label. :func:`real_vocabulary` gives the size both
models share, and :class:`RealVocabulary` cuts a model's logits to it, so every softmax (the store's, the loss's,
evaluation's) is over the real tokens only, the padding masked out.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint, reading
from .data.text import TextTokenizer, TokenWindows
from .devices import resolve_device
from .errors import DarkKnowledgeError
from .language_model import evaluate_language_model, load_language_model, load_run_tokenizer
from .outputs import logits_of
from .transformer import POSITION_KEYS, CausalTransformer, GPTConfig, HFCausalLM, build_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_CONFIG, HF_TOKENIZER, HF_TOKENIZER_CONFIG = "config.json", "tokenizer.json", "tokenizer_config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# what a config holds that is not its architecture: bookkeeping, the dtype the weights came in, the vocabulary
# (every run gives its own; rows padded past it are a spec's vocab_size); the rest of what differs from the
# architecture's defaults is a spec's
NOT_ARCHITECTURE = ("transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "torch_dtype",
                    "vocab_size")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")  # a folder that names no eos token: the usual ones


class HFTokenizer:
    """A Hugging Face folder's ``tokenizer.json`` (read with ``tokenizers``), offering what
    :class:`darkknowledge.data.text.TextTokenizer` offers: ``encode``, ``decode``, ``vocab_size``,
    ``end_of_document`` (its eos token), ``sha256`` (of the file's bytes) and ``describe``."""

    kind = "huggingface"

    def __init__(self, text: bytes, eos_token: str | None, source: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DarkKnowledgeError("a Hugging Face tokenizer needs tokenizers: pip install "
                                     "'darkknowledge[text]'") from None
        try:
            self._tokenizer = Tokenizer.from_str(text.decode())
        except Exception as error:  # tokenizers raises plain Exceptions on a file it cannot read
            raise DarkKnowledgeError(f"{source} is not a tokenizer tokenizers can read "
                                     f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                                     "restore the folder's tokenizer.json") from None
        self.text, self.sha256 = text.decode(), hashlib.sha256(text).hexdigest()
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids may skip some: every id must have its row
        names = [eos_token] if eos_token else [name for name in EOS_NAMES if name in vocab]
        if not names or names[0] not in vocab:
            raise DarkKnowledgeError(f"{source}: no end-of-document (eos) token found (named {eos_token!r}); set "
                                     f"eos_token in {HF_TOKENIZER_CONFIG} to one of the tokenizer's tokens")
        self.eos_token, self.end_of_document = names[0], vocab[names[0]]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def to_hf_json(self) -> str:
        return self.text

    def save(self, path: str | Path) -> None:
        """The file's own bytes (a run distilled from this folder's teacher saves it so): the same SHA-256."""
        Path(path).write_text(self.text)

    def hf_config(self) -> dict[str, Any]:
        """``tokenizer_config.json`` beside :meth:`save`: the class that loads it and its eos token."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256, "eos_token": self.eos_token}


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a Hugging Face ``config.json`` and no darkknowledge ``model.json``."""
    path = Path(path)
    return (path / HF_CONFIG).is_file() and not (path / checkpoint.MODEL_META).exists()


def is_language_model(path: str | os.PathLike) -> bool:
    """A Hugging Face folder, or a run whose model.json says it holds a language model."""
    if is_hf_folder(path):
        return True
    try:
        return checkpoint.read_json(checkpoint.resolve_run_dir(path) / checkpoint.MODEL_META, "model").get(
            "kind") == "language-model"
    except (DarkKnowledgeError, AttributeError):
        return False


def load_causal_lm(source: str | Path, dtype: str | None = None
                   ) -> tuple[nn.Module, TextTokenizer | HFTokenizer, dict[str, Any]]:
    """``(model in eval mode, its tokenizer, what it is)`` for the folder ``source``: a darkknowledge run or a
    Hugging Face folder. The model maps ids ``[B, S]`` to logits ``[B, S, V]``; ``max_positions`` in what it is
    says how many tokens it can see at once (None: no limit). ``dtype`` (float32, bfloat16, float16) is a Hugging
    Face model's; None keeps the folder's."""
    path = Path(source)
    if dtype is not None and dtype not in DTYPES:
        raise DarkKnowledgeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if is_hf_folder(path):
        return _load_hf(path, dtype)
    if not (checkpoint.resolve_run_dir(path) / checkpoint.MODEL_META).exists() and \
            not (checkpoint.resolve_run_dir(path) / checkpoint.PENDING_META).exists():
        raise DarkKnowledgeError(f"{path} is neither a Hugging Face folder ({HF_CONFIG}, safetensors weights, "
                                 f"{HF_TOKENIZER}) nor a darkknowledge run ({checkpoint.MODEL_META}); give one of them")
    model, meta = load_language_model(path)
    tokenizer = load_run_tokenizer(checkpoint.resolve_run_dir(path), meta)
    return model, tokenizer, {"source": str(source), "kind": "darkknowledge", "spec": meta["spec"],
                              "vocab_size": meta["vocab_size"], "context": meta["context"],
                              "max_positions": _max_positions(model, meta["context"])}


def _max_positions(model: nn.Module, context: int) -> int:
    """A ``gpt:`` model sees its context; an ``hf:`` one its config's position limit (at least the context)."""
    if isinstance(model, HFCausalLM):
        return hf_max_positions(model.model.config) or context
    return context


def hf_max_positions(config: Any) -> int | None:
    """The most tokens a transformers config's model sees at once (None: it names no limit)."""
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def _load_hf(path: Path, dtype: str | None) -> tuple[nn.Module, HFTokenizer, dict[str, Any]]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise DarkKnowledgeError("Hugging Face folders need transformers: pip install 'darkknowledge[hf]'") from None
    if not any((path / name).is_file() for name in HF_WEIGHTS):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weights"]
        raise DarkKnowledgeError(f"{path} has no safetensors weights ({', '.join(found)}; pickled .bin files are "
                                 "never loaded); save the model with save_pretrained(safe_serialization=True)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as error:  # an unknown model_type is a ValueError, a damaged file an OSError or JSON error
        raise DarkKnowledgeError(f"{path / HF_CONFIG}: transformers cannot read this config "
                                 f"({' '.join(str(error).split())[:300]}); upgrade transformers or fix the "
                                 "file") from None
    tokenizer = load_hf_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True,
                                                     dtype=DTYPES[dtype] if dtype else "auto")
    except Exception as error:  # weights that do not fit the config, a truncated file, a class it does not have
        raise DarkKnowledgeError(f"{path}: transformers cannot load the model "
                                 f"({' '.join(str(error).split())[:300]}); restore the folder") from None
    vocab = config.vocab_size  # the output rows, padding included
    if tokenizer.vocab_size > vocab:
        raise DarkKnowledgeError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                 f"{vocab} outputs; the folder's tokenizer is not its model's")
    wrapped = HFCausalLM(model).eval()
    return wrapped, tokenizer, {"source": str(path), "kind": "huggingface", "model_type": config.model_type,
                                "architecture": type(model).__name__, "vocab_size": vocab,
                                "max_positions": hf_max_positions(config),
                                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                                "parameters": sum(p.numel() for p in model.parameters())}


def load_hf_tokenizer(folder: str | Path) -> HFTokenizer:
    """The folder's ``tokenizer.json``, its eos token named by ``tokenizer_config.json`` (else a usual name)."""
    folder = Path(folder)
    path = folder / HF_TOKENIZER
    if not path.is_file():
        raise DarkKnowledgeError(f"{folder} has no {HF_TOKENIZER} (only fast tokenizers are read); save the "
                                 "tokenizer beside the model: tokenizer.save_pretrained(folder)")
    eos = None
    if (folder / HF_TOKENIZER_CONFIG).is_file():
        eos = checkpoint.read_json(folder / HF_TOKENIZER_CONFIG, "tokenizer config").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return HFTokenizer(reading.read_bytes(path, "tokenizer", reading.JSON_LIMIT), eos, path)


def check_same_tokenizer(teacher: TextTokenizer | HFTokenizer, student: TextTokenizer | HFTokenizer) -> None:
    """Refuse, in one line, a student whose tokenizer is not its teacher's: the same text must give the same ids,
    or the teacher's targets are for other tokens. Compared as Hugging Face JSON (a run's tokenizer exported to a
    folder is still the run's)."""
    if teacher.sha256 == student.sha256 or json.loads(teacher.to_hf_json()) == json.loads(student.to_hf_json()):
        return
    raise DarkKnowledgeError(f"the student's tokenizer ({student.vocab_size} tokens, SHA-256 {student.sha256[:12]}) "
                             f"is not the teacher's ({teacher.vocab_size} tokens, SHA-256 {teacher.sha256[:12]}); "
                             "a student must use its teacher's tokenizer: build it with --student hf:... or "
                             "gpt:... (it takes the teacher's), or give a student trained with that tokenizer")


def real_vocabulary(tokenizer: TextTokenizer | HFTokenizer, *models: int) -> int:
    """The vocabulary teacher and student share: the tokenizer's tokens. Each model's output size (``models``)
    may add padding rows beyond them; one smaller than the tokenizer is refused in one line."""
    for size in models:
        if size < tokenizer.vocab_size:
            raise DarkKnowledgeError(f"a model with {size} outputs cannot score a tokenizer of "
                                     f"{tokenizer.vocab_size} tokens; teacher and student must share the tokenizer")
    return tokenizer.vocab_size


class RealVocabulary(nn.Module):
    """``model`` with its logits cut to the first ``vocab_size`` (the real tokens): the padding rows past the
    tokenizer's last id get no probability in any softmax taken over them."""

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    def forward(self, ids: Tensor) -> Tensor:
        return logits_of(self.model(ids))[..., :self.vocab_size]


def parse_student_init(text: str) -> list[int]:
    """``teacher-layers=0,2,4`` (``--student-init``): the teacher's layers a student starts from, in order."""
    name, _, value = text.partition("=")
    try:
        layers = [int(part) for part in value.split(",")] if name == "teacher-layers" else []
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise DarkKnowledgeError(f"--student-init {text!r}: give teacher-layers=I,J,... (the teacher's layers to "
                                 "keep, from 0), e.g. teacher-layers=0,2,4")
    return layers


def student_from_teacher_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A student of the teacher's architecture with ``len(layers)`` layers, each a copy of the teacher's layer of
    that index, and copies of its embeddings, final norm and output layer (DistilBERT's start). Works on a
    ``gpt:`` model (its ``blocks``) and on a Hugging Face model (the module list holding its config's layers)."""
    inner = teacher.model if isinstance(teacher, HFCausalLM) else teacher
    config = getattr(inner, "config", None)
    count = next((getattr(config, key) for key in ("num_hidden_layers", "n_layer", "layers")
                  if isinstance(getattr(config, key, None), int)), None)
    stacks = [(name, module) for name, module in inner.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == count]
    if count is None or len(stacks) != 1:
        raise DarkKnowledgeError(f"cannot find the layers of a {type(inner).__name__} (one list of {count} layers); "
                                 "--student-init teacher-layers works on gpt: models and Hugging Face causal LMs")
    if max(layers) >= count:
        raise DarkKnowledgeError(f"--student-init teacher-layers={','.join(map(str, layers))}: the teacher has "
                                 f"{count} layers (0 to {count - 1})")
    student = copy.deepcopy(teacher)  # embeddings, norms and head copied, not shared with the teacher
    inner_student = student.model if isinstance(student, HFCausalLM) else student
    path, _ = stacks[0]
    parent_name, _, attribute = path.rpartition(".")
    parent = inner_student.get_submodule(parent_name) if parent_name else inner_student
    kept = nn.ModuleList(copy.deepcopy(getattr(parent, attribute)[i]) for i in layers)
    for index, layer in enumerate(kept):  # Hugging Face attention numbers its layer (its cache slot)
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    setattr(parent, attribute, kept)
    if isinstance(inner_student.config, GPTConfig):
        inner_student.config = dataclasses.replace(inner_student.config, layers=len(layers))
    else:
        _set_layer_count(inner_student.config, layers)
    return student


def spec_of(model: nn.Module, vocab_size: int, source: str) -> str:
    """The ``gpt:`` or ``hf:`` spec that builds ``model``'s architecture again for a run whose tokenizer has
    ``vocab_size`` tokens (the run records it, and reloads its weights into what it builds): a student folder's
    (``source`` names it) or a student made of a teacher's layers. A ``gpt:`` model's config as it is; a Hugging
    Face model's config as ``hf:ARCH,key=value,...`` with every value that differs from the architecture's
    defaults, its positions and special ids always (a spec builds them from the run's context and sets no ids),
    and its output rows when padded past the tokenizer's. A config such a spec does not rebuild setting for
    setting and weight shape for weight shape (a list or a table of its own, a text with commas) is refused in one
    line."""
    if isinstance(model, CausalTransformer):
        return str(model.config)
    inner = model.model if isinstance(model, HFCausalLM) else model
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise DarkKnowledgeError(f"the student {source}: a {type(inner).__name__} has no gpt: or transformers "
                                 "config to name its architecture by; give a gpt: or hf: spec instead")
    from transformers import AutoConfig
    defaults, values = AutoConfig.for_model(config.model_type).to_dict(), config.to_dict()
    always = (*POSITION_KEYS, "bos_token_id", "eos_token_id", "pad_token_id")
    options = {key: value for key, value in values.items() if key not in NOT_ARCHITECTURE and _fits_a_spec(value)
               and (key in always or key not in defaults or defaults[key] != value)}
    padded = {"vocab_size": config.vocab_size} if config.vocab_size != vocab_size else {}
    spec = ",".join([f"hf:{config.model_type}", *(f"{key}={value}" for key, value in {**padded, **options}.items())])
    with torch.device("meta"):  # the architecture only: no memory, no initialisation
        rebuilt = build_hf(spec, vocab_size, None)
    theirs = rebuilt.model.config.to_dict()
    differ = sorted(key for key in set(values) | set(theirs)
                    if key not in NOT_ARCHITECTURE and values.get(key) != theirs.get(key))
    shapes = [{key: value.shape for key, value in m.state_dict().items()} for m in (rebuilt.model, inner)]
    if differ or shapes[0] != shapes[1]:
        weights = "alike" if shapes[0] == shapes[1] else "differ"
        raise DarkKnowledgeError(f"the student {source}: an hf: spec cannot rebuild its architecture (settings "
                                 f"{', '.join(differ) or 'none'} differ, weights {weights}); give --student "
                                 "hf:ARCH,key=value,... instead")
    return spec


def _fits_a_spec(value: Any) -> bool:
    """Whether ``key=value`` in a spec carries ``value``: a bool, a number, a text without the spec's separators."""
    return isinstance(value, (bool, int, float)) or (isinstance(value, str) and "," not in value and "=" not in value)


def _set_layer_count(config: Any, layers: list[int]) -> None:
    """A Hugging Face config says the student's number of layers (and, where it lists one per layer, the kept
    ones')."""
    for key in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, len(layers))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]


def evaluate_causal_lm(source: str | Path, windows: TokenWindows, batch_size: int = 32, device: str = "cpu",
                       dtype: str | None = None) -> dict[str, Any]:
    """What ``evaluate RUN --data CORPUS`` prints for a language model (a run or a Hugging Face folder): per-token
    log-loss (nats), perplexity and next-token accuracy over ``windows`` (tokenised with the model's own
    tokenizer), on its real vocabulary. Windows longer than the model's positions are refused in one line."""
    model, tokenizer, described = load_causal_lm(source, dtype=dtype)
    limit = described["max_positions"]
    if limit is not None and windows.context > limit:
        raise DarkKnowledgeError(f"--context {windows.context} is longer than {source}'s {limit} positions; give "
                                 f"--context {limit} or less")
    if windows.vocab_size != tokenizer.vocab_size:
        raise DarkKnowledgeError(f"the windows were tokenised with {windows.vocab_size} tokens but {source}'s "
                                 f"tokenizer has {tokenizer.vocab_size}; tokenise the corpus with the model's own")
    vocab = real_vocabulary(tokenizer, described["vocab_size"])
    result = evaluate_language_model(RealVocabulary(model, vocab).to(resolve_device(device)), windows, batch_size)
    return {"model": described, "split": windows.name, "tokens": result["tokens"], "log_loss": result["log_loss"],
            "perplexity": result["perplexity"], "accuracy": result["accuracy"]}
