"""Models built from a short spec string: ``mlp:1200x2``, ``mlp:500-300,dropout=0.5``, ``cnn:small``.

The MLP carries the 2012 dropout recipe that the paper's §3 teacher used (arXiv:1207.0580): dropout on the
inputs and on the hidden units, and a max-norm bound on each hidden unit's incoming weight vector.
Every model takes float images ``[B, H, W]`` in [0, 1] and returns logits ``[B, classes]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DarkKnowledgeError

SPEC_HELP = (
    "a model spec is KIND:SIZES[,option=value...], e.g. 'mlp:1200x2', 'mlp:500-300', "
    "'mlp:1200x2,dropout=0.5,input_dropout=0.2,max_norm=3.5' or 'cnn:small'"
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
    """Two conv-pool blocks and a dense layer: a cheap model that is not an MLP, for any image size."""

    def __init__(self, image_shape: tuple[int, int], num_classes: int, channels: tuple[int, int] = (32, 64),
                 dense: int = 128, dropout: float = 0.0):
        super().__init__()
        c1, c2 = channels
        h, w = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        layers: list[nn.Module] = [nn.Linear(c2 * (h // 4) * (w // 4), dense), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dense, num_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


CNN_SIZES = {"small": ((32, 64), 128), "tiny": ((8, 16), 32)}
MLP_OPTIONS = {"dropout": float, "input_dropout": float, "max_norm": float}
CNN_OPTIONS = {"dropout": float}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec; ``str(spec)`` gives back a canonical string that ``parse_spec`` reads."""

    kind: str
    sizes: tuple[int, ...] | str
    options: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        sizes = "-".join(map(str, self.sizes)) if isinstance(self.sizes, tuple) else self.sizes
        opts = "".join(f",{k}={v:g}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{sizes}{opts}"


def _parse_sizes(text: str, spec: str) -> tuple[int, ...]:
    try:
        if "x" in text:  # "1200x2": two layers of 1200 units
            width, depth = text.split("x")
            sizes = (int(width),) * int(depth)
        else:  # "500-300": one layer of 500 then one of 300
            sizes = tuple(int(s) for s in text.split("-"))
    except ValueError:
        raise DarkKnowledgeError(f"model spec {spec!r}: cannot read layer sizes {text!r}; {SPEC_HELP}") from None
    if not sizes or min(sizes) < 1:
        raise DarkKnowledgeError(f"model spec {spec!r}: layer sizes must be positive; {SPEC_HELP}")
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


def parse_spec(spec: str) -> ModelSpec:
    """Read a model spec string; a malformed one raises DarkKnowledgeError with the grammar."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep or not rest:
        raise DarkKnowledgeError(f"model spec {spec!r} has no ':'; {SPEC_HELP}")
    sizes_text, *option_parts = rest.split(",")
    if kind == "mlp":
        return ModelSpec("mlp", _parse_sizes(sizes_text, spec), _parse_options(option_parts, MLP_OPTIONS, spec))
    if kind == "cnn":
        if sizes_text not in CNN_SIZES:
            raise DarkKnowledgeError(
                f"model spec {spec!r}: unknown cnn size {sizes_text!r}; choose one of {', '.join(CNN_SIZES)}")
        return ModelSpec("cnn", sizes_text, _parse_options(option_parts, CNN_OPTIONS, spec))
    raise DarkKnowledgeError(f"model spec {spec!r}: unknown kind {kind!r}; {SPEC_HELP}")


def build_model(spec: str | ModelSpec, image_shape: tuple[int, int], num_classes: int) -> nn.Module:
    """Build the model a spec names, for images of ``image_shape`` and ``num_classes`` outputs."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "mlp":
        return MLP(image_shape[0] * image_shape[1], spec.sizes, num_classes, **spec.options)
    channels, dense = CNN_SIZES[spec.sizes]
    return SmallCNN(tuple(image_shape), num_classes, channels, dense, **spec.options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
