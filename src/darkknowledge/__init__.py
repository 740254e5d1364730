"""darkknowledge: knowledge distillation as in Hinton, Vinyals & Dean (2015)."""

__version__ = "0.1.0"
