"""A small causal transformer language model (GPT-style, pre-norm), the built-in ``gpt:`` spec, and Hugging Face
causal LMs (``hf:gpt2,n_layer=2,...``) built from a config with no hub download.

Every model here maps token ids ``[B, S]`` (int64) to next-token logits ``[B, S, V]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DarkKnowledgeError

GPT_HELP = ("a gpt spec is gpt:layers=L,dim=D,heads=H,context=C[,dropout=P], e.g. "
            "'gpt:layers=4,dim=192,heads=6,context=128'")
HF_HELP = ("an hf spec is hf:ARCH[,config_key=value...] with ARCH a transformers config (gpt2, llama, ...), e.g. "
           "'hf:gpt2,n_layer=2,n_embd=128,n_head=4'")


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 4
    dim: int = 192
    heads: int = 6
    context: int = 128
    dropout: float = 0.0

    def __str__(self) -> str:
        dropout = f",dropout={self.dropout:g}" if self.dropout else ""
        return f"gpt:layers={self.layers},dim={self.dim},heads={self.heads},context={self.context}{dropout}"


def parse_gpt(spec: str) -> GPTConfig:
    """``gpt:layers=4,dim=192,heads=6,context=128``: every key optional (defaults above); dim divisible by heads."""
    _, _, rest = spec.partition(":")
    values: dict = {}
    types = {"layers": int, "dim": int, "heads": int, "context": int, "dropout": float}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in types:
            raise DarkKnowledgeError(f"model spec {spec!r}: unknown option {part!r}; {GPT_HELP}")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise DarkKnowledgeError(f"model spec {spec!r}: {key} needs a number, got {value!r}") from None
    config = GPTConfig(**values)
    if min(config.layers, config.dim, config.heads, config.context) < 1 or config.dim % config.heads:
        raise DarkKnowledgeError(f"model spec {spec!r}: sizes must be positive and dim divisible by heads; {GPT_HELP}")
    if not 0 <= config.dropout < 1:
        raise DarkKnowledgeError(f"model spec {spec!r}: dropout must be in [0, 1)")
    return config


class Block(nn.Module):
    """Pre-norm attention + MLP, each with a residual; attention is causal (a position sees only the past)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads, self.dropout = config.heads, config.dropout
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.qkv, self.proj = nn.Linear(config.dim, 3 * config.dim), nn.Linear(config.dim, config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim),
                                 nn.Dropout(config.dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and an output layer tied to the embedding."""

    _no_split_modules = ["Block"]  # Hugging Face's name for a model's blocks: FSDP's units (sharding.blocks)

    def __init__(self, config: GPTConfig, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        self.embed = nn.Embedding(vocab_size, config.dim)
        self.position = nn.Embedding(config.context, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections keeps deep nets stable
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.config.context:
            raise DarkKnowledgeError(f"{ids.shape[1]} tokens exceed the model's context of {self.config.context}")
        x = self.drop(self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM as a plain ``ids -> logits [B, S, V]`` module (its output's ``.logits``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


def parse_hf(spec: str) -> tuple[str, dict]:
    _, _, rest = spec.partition(":")
    arch, *parts = rest.split(",")
    if not arch:
        raise DarkKnowledgeError(f"model spec {spec!r}: no architecture; {HF_HELP}")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise DarkKnowledgeError(f"model spec {spec!r}: option {part!r} is not key=value; {HF_HELP}")
        options[key] = parse_value(value)
    return arch, options


def parse_value(text: str) -> bool | int | float | str:
    """A config value as transformers' typed configs want it: ``true``/``false`` (any case) a bool, then an int,
    a float, else the text itself (``gelu_new``)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


POSITION_KEYS = ("n_positions", "max_position_embeddings")  # a config's position limit (GPT-2's name, most others')


def hf_config(spec: str, vocab_size: int, context: int | None):
    """The transformers config of ``hf:ARCH,key=value,...``: ``AutoConfig.for_model(arch, vocab_size=V,
    **options)``.

    ``context`` (None: 128) fills the config's position limit when the architecture has one (GPT-2's
    ``n_positions``, Llama's ``max_position_embeddings``) and the spec names none under either name; a named one
    shorter than ``context`` is refused in one line. An option ``vocab_size=N`` (at least V) pads the output layer
    to N rows, as published checkpoints do; the rows past V are padding, left out of every softmax by the loop and
    by evaluation.
    """
    try:
        from transformers import AutoConfig
    except ImportError:
        raise DarkKnowledgeError("hf: models need Hugging Face transformers: pip install 'darkknowledge[hf]'") from None
    arch, options = parse_hf(spec)
    rows = options.pop("vocab_size", vocab_size)
    if not isinstance(rows, int) or rows < vocab_size:
        raise DarkKnowledgeError(f"model spec {spec!r}: vocab_size={rows} is fewer outputs than the tokenizer's "
                                 f"{vocab_size} tokens; give vocab_size={vocab_size} or more (rows past the tokens "
                                 "are padding), or leave it out")
    named = next((options[key] for key in POSITION_KEYS if key in options), None)
    if isinstance(named, int) and context is not None and context > named:
        raise DarkKnowledgeError(f"model spec {spec!r}: windows of {context} tokens are longer than its {named} "
                                 f"positions; give --context {named} or less")
    try:
        # the architecture's special ids belong to its own tokenizer (GPT-2's 50256), not to this vocabulary
        special = {key: None for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key not in options}
        config = AutoConfig.for_model(arch, vocab_size=rows, **{**special, **options})
    # transformers 5's typed configs refuse a value with their own exception (4's with ValueError or TypeError)
    except Exception as error:  # noqa: BLE001
        raise _cannot_build(spec, error) from None
    for key in POSITION_KEYS if named is None else ():  # GPT-2 reads either name as n_positions
        if hasattr(config, key):
            setattr(config, key, context or 128)
    return config


def build_hf(spec: str, vocab_size: int, context: int | None) -> nn.Module:
    """``hf:gpt2,n_layer=2``: the :func:`hf_config` of the spec -> ``AutoModelForCausalLM``, built from the config
    alone (random weights, no download)."""
    config = hf_config(spec, vocab_size, context)
    from transformers import AutoModelForCausalLM
    try:
        return HFCausalLM(AutoModelForCausalLM.from_config(config))
    except Exception as error:  # noqa: BLE001  (a config the model class refuses)
        raise _cannot_build(spec, error) from None


def _cannot_build(spec: str, error: Exception) -> DarkKnowledgeError:
    """Whatever transformers refused in a spec's config or model, said in one line."""
    why = " ".join(str(error).split()) or type(error).__name__
    return DarkKnowledgeError(f"model spec {spec!r}: transformers cannot build it: {why}")


def count_parameters(spec: str, vocab_size: int, context: int | None = None) -> int:
    """How many parameters :func:`build_language_model` would make, without making them: a spec may name any
    size (one of 10^8 layers would not even finish building on the ``meta`` device). A ``gpt:`` spec is counted
    from its sizes; an ``hf:`` one is built on ``meta`` with one and two layers and extrapolated to its own."""
    kind = spec.partition(":")[0]
    if kind == "gpt":
        config = parse_gpt(spec)
        d = config.dim
        block = 12 * d * d + 13 * d  # qkv, proj, the 4x MLP (weights and biases) and two norms
        return (vocab_size + (context or config.context)) * d + config.layers * block + 2 * d
    if kind != "hf":
        build_language_model(spec, vocab_size, context)  # refuses the kind in one line
    arch, options = parse_hf(spec)
    layer_keys = [key for key in options if key in ("n_layer", "num_hidden_layers", "num_layers")]
    layers = options.get(layer_keys[0], 1) if layer_keys else 1
    sizes = []
    for n in (1, 2):  # a transformer's parameters grow linearly with its layers
        small = ",".join([f"hf:{arch}", *(f"{k}={v}" for k, v in options.items() if k not in layer_keys),
                          *([f"{layer_keys[0]}={n}"] if layer_keys else [])])
        with torch.device("meta"):
            sizes.append(sum(p.numel() for p in build_hf(small, vocab_size, context).parameters()))
    return sizes[0] + (layers - 1) * (sizes[1] - sizes[0])


def build_language_model(spec: str, vocab_size: int, context: int | None = None) -> nn.Module:
    """The model a ``gpt:`` or ``hf:`` spec names, with ``vocab_size`` outputs."""
    kind = spec.partition(":")[0]
    if kind == "gpt":
        config = parse_gpt(spec)
        if context is not None and context != config.context:
            config = GPTConfig(config.layers, config.dim, config.heads, context, config.dropout)
        return CausalTransformer(config, vocab_size)
    if kind == "hf":
        return build_hf(spec, vocab_size, context)
    raise DarkKnowledgeError(f"language model spec {spec!r}: kind must be gpt or hf; {GPT_HELP}; {HF_HELP}")
