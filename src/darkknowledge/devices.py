"""Choosing where a model runs: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

Every job and command that runs a model takes ``device=None`` for :data:`DEFAULT_DEVICE` and resolves it here, so
training, distilling and evaluating agree on where a model runs unless told otherwise.
"""

from __future__ import annotations

import torch

from .errors import DarkKnowledgeError

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
DEFAULT_DEVICE = "auto"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device ``device`` names (None: :data:`DEFAULT_DEVICE`), checked to exist here; a one-line error names
    what is missing."""
    if isinstance(device, torch.device):
        text = str(device)
    else:
        text = DEFAULT_DEVICE if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError):
        raise DarkKnowledgeError(f"unknown device {device!r}; choose {DEVICE_HELP}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise DarkKnowledgeError(f"device {text}: this machine has no CUDA device (or torch was built without "
                                     "CUDA); use --device cpu or auto")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise DarkKnowledgeError(f"device {text}: only {torch.cuda.device_count()} CUDA device(s) here "
                                     f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif chosen.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DarkKnowledgeError("device mps: Apple's Metal backend is not available here; use --device cpu")
    elif chosen.type != "cpu":
        raise DarkKnowledgeError(f"unsupported device {text!r}; choose {DEVICE_HELP}")
    return chosen
