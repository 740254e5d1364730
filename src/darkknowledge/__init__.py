"""darkknowledge: knowledge distillation as in Hinton, Vinyals & Dean (2015).

The public API, imported on first use (``import darkknowledge`` stays fast; torch loads when a name is used)::

    from darkknowledge import Ensemble, SoftTargets, TrainConfig, Distillation, fit, distill, distillation_loss
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "ArrayTransferSet": "data", "DatasetTransferSet": "data", "LabeledImages": "data", "Transform": "data",
    "TransferSet": "data", "as_transfer_set": "data", "load_dataset": "data", "validation_split": "data",
    "Ensemble": "ensemble",
    "SoftTargets": "soft_targets",
    "Distillation": "training", "FitResult": "training", "HardTargets": "training", "TrainConfig": "training",
    "distill": "training", "fit": "training",
    "Evaluation": "evaluation", "evaluate": "evaluation", "predict_logits": "evaluation",
    "distillation_loss": "losses", "softmax_with_temperature": "losses",
    "build_model": "models", "register_model": "models",
    "load_model": "checkpoint", "save_model": "checkpoint",
    "DarkKnowledgeError": "errors",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'darkknowledge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
