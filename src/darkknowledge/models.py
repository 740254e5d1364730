"""Models from one registry: a built-in spec string (``mlp:1200x2``, ``mlp:500-300,dropout=0.5``, ``cnn:small``)
or a user's factory, ``package.module:factory``.

**A user's factory** is called as ``factory(input_shape, num_classes, **options)``: ``input_shape`` is one input's
shape without the batch dimension (``(28, 28)``, ``(3, 32, 32)``, ``(13,)``), ``num_classes`` the number of
outputs, ``options`` JSON values (``--model-option k=v`` or a config file's ``model_options``). It returns an
``nn.Module`` mapping a batch of model-ready inputs ``[B, *input_shape]`` to logits ``[B, num_classes]`` (or
``[B, ..., num_classes]`` for sets with several cases per item). ``model.json`` records the spec and the options,
so every command rebuilds the same model; the module must be importable (installed, on ``PYTHONPATH``, or in the
current folder).

**Built-in kinds** register with :func:`register_model` (one decorator per kind, no if/elif chain). The MLP carries
the 2012 dropout recipe that the paper's §3 teacher used (arXiv:1207.0580): dropout on the inputs and on the hidden
units, and a max-norm bound on each hidden unit's incoming weight vector. Built-in models take float inputs (images
``[B, H, W]`` or ``[B, C, H, W]`` in [0, 1], or feature vectors for the MLP) and return logits ``[B, classes]``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import DarkKnowledgeError

SPEC_HELP = (
    "a model spec is KIND:SIZES[,option=value...], e.g. 'mlp:1200x2', 'mlp:500-300', "
    "'mlp:1200x2,dropout=0.5,input_dropout=0.2,max_norm=3.5' or 'cnn:small', or a factory "
    "'package.module:function' called as function(input_shape, num_classes, **options); language models: "
    "'gpt:layers=4,dim=192,heads=6,context=128' or 'hf:gpt2,n_layer=2,n_embd=128,n_head=4'; text classifiers: "
    "'hf-classifier:bert,num_hidden_layers=2,hidden_size=64' or 'hf-classifier:FOLDER'"
)


class MLP(nn.Module):
    """Fully connected ReLU net with optional input/hidden dropout and a max-norm weight constraint."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int,
                 input_dropout: float = 0.0, dropout: float = 0.0, max_norm: float | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.max_norm = max_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project each hidden unit's incoming weights back into the ball of radius max_norm (2012 recipe)."""
        if self.max_norm is None:
            return
        hidden_layers = [m for m in self.net if isinstance(m, nn.Linear)][:-1]
        for layer in hidden_layers:
            # Rows of a Linear weight are the incoming weight vectors of its units.
            layer.weight.renorm_(p=2, dim=0, maxnorm=self.max_norm)


class SmallCNN(nn.Module):
    """Two conv-pool blocks and a dense layer: a cheap model that is not an MLP, for any image size, grayscale
    ``[H, W]`` or with channels ``[C, H, W]``."""

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (32, 64),
                 dense: int = 128, dropout: float = 0.0):
        super().__init__()
        c1, c2 = channels
        if len(image_shape) not in (2, 3):
            raise DarkKnowledgeError(f"a cnn takes images [H, W] or [C, H, W], not inputs of shape "
                                     f"{list(image_shape)}; use an mlp or a model factory")
        h, w = image_shape[-2:]
        self.grayscale = len(image_shape) == 2  # [B, H, W] inputs get a channel dimension
        in_channels = 1 if self.grayscale else image_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        layers: list[nn.Module] = [nn.Linear(c2 * (h // 4) * (w // 4), dense), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dense, num_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1) if self.grayscale else x))


CNN_SIZES = {"small": ((32, 64), 128), "tiny": ((8, 16), 32)}
MLP_OPTIONS = {"dropout": float, "input_dropout": float, "max_norm": float}
CNN_OPTIONS = {"dropout": float}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec; ``str(spec)`` gives back a canonical string that ``parse_spec`` reads (a factory's
    ``options`` are recorded beside it, in ``model_options``)."""

    kind: str
    sizes: tuple[int, ...] | str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.kind == FACTORY:
            return str(self.sizes)
        sizes = "-".join(map(str, self.sizes)) if isinstance(self.sizes, tuple) else self.sizes
        opts = "".join(f",{k}={v:g}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{sizes}{opts}"


@dataclass(frozen=True)
class ModelKind:
    """A built-in kind: ``parse(text after 'kind:', whole spec) -> ModelSpec`` and
    ``build(spec, input_shape, num_classes) -> nn.Module``."""

    parse: Callable[[str, str], ModelSpec]
    build: Callable[[ModelSpec, tuple[int, ...], int], nn.Module]


MODEL_KINDS: dict[str, ModelKind] = {}
FACTORY = "factory"  # the kind of a parsed ``package.module:function`` spec


def register_model(kind: str, parse: Callable[[str, str], ModelSpec]):
    """Register ``kind`` (``kind:...`` specs): decorate its ``build(spec, input_shape, num_classes)``."""
    def decorator(build):
        MODEL_KINDS[kind] = ModelKind(parse, build)
        return build
    return decorator


MAX_DEPTH = 1000  # hidden layers an mlp spec may ask for


def _parse_sizes(text: str, spec: str) -> tuple[int, ...]:
    try:
        if "x" in text:  # "1200x2": two layers of 1200 units
            width, depth = text.split("x")
            if not 0 < int(depth) <= MAX_DEPTH:  # checked before the tuple of sizes is made
                raise DarkKnowledgeError(f"model spec {spec!r}: depth must be 1 to {MAX_DEPTH} layers, got {depth}")
            sizes = (int(width),) * int(depth)
        else:  # "500-300": one layer of 500 then one of 300
            sizes = tuple(int(s) for s in text.split("-"))
    except ValueError:
        raise DarkKnowledgeError(f"model spec {spec!r}: cannot read layer sizes {text!r}; {SPEC_HELP}") from None
    if not sizes or min(sizes) < 1:
        raise DarkKnowledgeError(f"model spec {spec!r}: layer sizes must be positive; {SPEC_HELP}")
    if len(sizes) > MAX_DEPTH:
        raise DarkKnowledgeError(f"model spec {spec!r}: depth must be 1 to {MAX_DEPTH} layers, got {len(sizes)}")
    return sizes


def _parse_options(parts: list[str], allowed: dict[str, type], spec: str) -> dict[str, float]:
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise DarkKnowledgeError(
                f"model spec {spec!r}: unknown option {part!r}; allowed: {', '.join(sorted(allowed))}")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise DarkKnowledgeError(f"model spec {spec!r}: option {key} needs a number, got {value!r}") from None
    for key in ("dropout", "input_dropout"):
        if not 0 <= options.get(key, 0) < 1:
            raise DarkKnowledgeError(f"model spec {spec!r}: {key} must be in [0, 1), got {options[key]}")
    if options.get("max_norm", 1) <= 0 or not math.isfinite(options.get("max_norm", 1)):
        raise DarkKnowledgeError(f"model spec {spec!r}: max_norm must be a positive number")
    return options


def _parse_mlp(rest: str, spec: str) -> ModelSpec:
    sizes_text, *option_parts = rest.split(",")
    return ModelSpec("mlp", _parse_sizes(sizes_text, spec), _parse_options(option_parts, MLP_OPTIONS, spec))


def _parse_cnn(rest: str, spec: str) -> ModelSpec:
    sizes_text, *option_parts = rest.split(",")
    if sizes_text not in CNN_SIZES:
        raise DarkKnowledgeError(
            f"model spec {spec!r}: unknown cnn size {sizes_text!r}; choose one of {', '.join(CNN_SIZES)}")
    return ModelSpec("cnn", sizes_text, _parse_options(option_parts, CNN_OPTIONS, spec))


@register_model("mlp", parse=_parse_mlp)
def _build_mlp(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), spec.sizes, num_classes, **spec.options)


@register_model("cnn", parse=_parse_cnn)
def _build_cnn(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, dense = CNN_SIZES[spec.sizes]
    return SmallCNN(tuple(input_shape), num_classes, channels, dense, **spec.options)


def _parse_language_model(kind: str):
    def parse(rest: str, spec: str) -> ModelSpec:
        from .transformer import parse_gpt, parse_hf  # checks the grammar now, as the other kinds do
        (parse_gpt if kind == "gpt" else parse_hf)(spec)
        return ModelSpec(kind, rest)
    return parse


# Language models (darkknowledge.transformer): token ids [B, S] -> logits [B, S, num_classes = vocabulary]; an
# input shape of (S,) sets the context.
@register_model("gpt", parse=_parse_language_model("gpt"))
@register_model("hf", parse=_parse_language_model("hf"))
def _build_language_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from .transformer import build_language_model
    return build_language_model(str(spec), num_classes, input_shape[-1] if input_shape else None)


def _parse_classifier(rest: str, spec: str) -> ModelSpec:
    from .classifiers import is_folder, parse  # checks the grammar now, as the other kinds do
    source, _ = parse(spec)
    if is_folder(source):  # recorded in model.json as an absolute path: any command in any folder rebuilds it
        rest = str(Path(source).expanduser().resolve()) + rest[len(source):]
    return ModelSpec("hf-classifier", rest)


# Text classifiers (darkknowledge.classifiers): (token ids, attention mask) [B, 2, L] -> logits [B, num_classes]
@register_model("hf-classifier", parse=_parse_classifier)
def _build_classifier(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from .classifiers import build
    return build(str(spec), input_shape, num_classes)


def parse_spec(spec: str, options: dict[str, Any] | None = None) -> ModelSpec:
    """Read a model spec string (a built-in kind, or ``package.module:function`` with ``options``); a malformed
    one raises DarkKnowledgeError with the grammar. A factory is not imported here (see :func:`build_model`)."""
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise DarkKnowledgeError(f"model spec {spec!r} has no ':'; {SPEC_HELP}")
    if kind in MODEL_KINDS:
        if options:
            raise DarkKnowledgeError(f"model spec {spec!r}: model options are for a factory; give {kind} options "
                                     f"in the spec itself ({SPEC_HELP})")
        return MODEL_KINDS[kind].parse(rest, text)
    if not all(part.isidentifier() for part in kind.split(".")) or not all(
            part.isidentifier() for part in rest.split(".")):
        raise DarkKnowledgeError(f"model spec {spec!r}: unknown kind {kind!r} (built-in: "
                                 f"{', '.join(sorted(MODEL_KINDS))}); {SPEC_HELP}")
    try:
        json.dumps(options or {})
    except TypeError:
        raise DarkKnowledgeError(f"model {spec}: options must be JSON values (numbers, strings, booleans, "
                                 "lists)") from None
    return ModelSpec(FACTORY, text, dict(options or {}))


def _import_factory(spec: ModelSpec) -> Callable:
    module_name, _, attribute = str(spec.sizes).partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())  # a module in the current folder, as 'python -m' would find it
            module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing
        raise DarkKnowledgeError(f"model {spec}: cannot import module {module_name} ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())}); check that it is installed or on PYTHONPATH "
                                 "(--debug shows the traceback)") from e
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise DarkKnowledgeError(f"model {spec}: module {module_name} has no callable {attribute}; give "
                                 "package.module:function")
    return factory


def build_model(spec: str | ModelSpec, input_shape: tuple[int, ...], num_classes: int,
                options: dict[str, Any] | None = None) -> nn.Module:
    """Build the model a spec names, for inputs of ``input_shape`` (one input, no batch dimension) and
    ``num_classes`` outputs; ``options`` go to a factory (see the module doc)."""
    spec = parse_spec(spec, options) if isinstance(spec, str) else spec
    input_shape = tuple(int(d) for d in input_shape)
    model = MODEL_KINDS[spec.kind].build(spec, input_shape, num_classes) if spec.kind != FACTORY \
        else _from_factory(spec, input_shape, num_classes)
    # What model.json records so every command can rebuild it, even from a folder written by fit alone.
    model.darkknowledge_spec = {"spec": str(spec), **({"model_options": spec.options} if spec.kind == FACTORY
                                                      and spec.options else {})}
    return model


def _from_factory(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    factory = _import_factory(spec)
    try:
        model = factory(input_shape, num_classes, **spec.options)
    except Exception as e:  # the user's code: any error becomes one line (the traceback with --debug)
        raise DarkKnowledgeError(f"model {spec}: {type(e).__name__} in the factory: {' '.join(str(e).split())} "
                                 f"(called as factory({input_shape}, {num_classes}"
                                 + "".join(f", {k}={v!r}" for k, v in spec.options.items())
                                 + "); --debug shows the traceback)") from e
    if not isinstance(model, nn.Module):
        raise DarkKnowledgeError(f"model {spec}: the factory returned a {type(model).__name__}, not a "
                                 "torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
