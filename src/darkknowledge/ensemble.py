"""§2/§4: an ensemble of teachers, combined into one set of soft targets.

The paper: "the soft targets of an ensemble are the arithmetic or geometric mean of the members' distributions".
At temperature T each member's distribution is ``p_m = softmax(v_m / T)``, so the three rules are, per case:

- ``arithmetic`` (default, as the paper's §4): ``p = mean_m softmax(v_m / T)``.
- ``geometric``: ``p ∝ prod_m softmax(v_m / T) ** (1/M)``, i.e. ``softmax(mean_m log_softmax(v_m / T))``.
- ``logits``: ``p = softmax(mean_m v_m / T)``.

**geometric and logits give the same soft targets at every T**: ``log_softmax(v_m / T) = v_m / T - c_m`` with
``c_m`` one number per case and member, and a per-case constant drops out of a softmax. They are kept as two
names because both are common, but a comparison of the two will show identical students.

**The arithmetic mean does not commute with the temperature**: softening the ensemble's T=1 distribution,
``softmax(log(mean_m p_m(T=1)) / T)``, is *not* the mean of the softened members. So one logit vector per case
cannot give the arithmetic rule's targets at every T. This is why :class:`Ensemble` exposes each member's logits
(:meth:`Ensemble.member_logits`) and :func:`soft_targets` combines them at the temperature asked for, and why the
soft-target store keeps each member's logits (see ``soft_targets.py``).

:meth:`Ensemble.forward` returns the combined distribution at T = 1 as log-probabilities (a valid logit vector:
its softmax is the ensemble's prediction), so the ensemble evaluates, exports and benches like one model:

- arithmetic: ``log(mean_m softmax(v_m))`` (computed as a logsumexp, stable for confident members);
- geometric: ``log_softmax(mean_m log_softmax(v_m))``;
- logits: ``mean_m v_m`` (not normalised).

For geometric and logits, dividing that output by T gives exactly the rule's soft targets at T; for arithmetic it
gives the softened ensemble, not the paper's targets: use :meth:`Ensemble.soft_targets` or the store.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint, reading, schemas
from .errors import DarkKnowledgeError
from .outputs import logits_of

COMBINE_RULES = ("arithmetic", "geometric", "logits")
MANIFEST = "ensemble.json"
MANIFEST_FORMAT = "darkknowledge/ensemble-1"


def check_combine(combine: str) -> str:
    if combine not in COMBINE_RULES:
        raise DarkKnowledgeError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
    return combine


# ---------------------------------------------------------------------------------------------------------------
# Combining member logits [B, M, C] (one implementation for the live ensemble and the store)
# ---------------------------------------------------------------------------------------------------------------

def combined_logits(member_logits: Tensor, combine: str) -> Tensor:
    """``[B, M, C]`` member logits -> ``[B, C]``: the ensemble's T = 1 output as :meth:`Ensemble.forward` gives it.

    With one member the member's own logits come back unchanged, whatever the rule (every rule is the identity).
    """
    if member_logits.shape[1] == 1:
        return member_logits[:, 0]
    if combine == "arithmetic":
        log_p = torch.log_softmax(member_logits, dim=-1)
        return torch.logsumexp(log_p, dim=1) - math.log(member_logits.shape[1])
    if combine == "geometric":
        return torch.log_softmax(torch.log_softmax(member_logits, dim=-1).mean(1), dim=-1)
    if combine == "logits":
        return member_logits.mean(1)
    raise DarkKnowledgeError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")


@torch.no_grad()
def ensemble_logits(members: Sequence[nn.Module], ids: Tensor) -> Tensor:
    """``log mean_m softmax(member_m(ids))`` in float32: the members' arithmetic mean at T = 1 of sequence models
    (``[B, S, V]``), the distribution a language model's store holds."""
    log_probs = torch.stack([torch.log_softmax(logits_of(m(ids)).float(), -1) for m in members])
    return log_probs.logsumexp(0) - math.log(len(members)) if len(members) > 1 else log_probs[0]


def soft_targets(member_logits: Tensor, combine: str, temperature: float) -> Tensor:
    """The ensemble's soft targets at ``temperature``: probabilities ``[B, C]`` by the rule (see module doc)."""
    v = member_logits / temperature
    if combine == "arithmetic":
        return torch.softmax(v, dim=-1).mean(1)
    if combine == "geometric":
        return torch.softmax(torch.log_softmax(v, dim=-1).mean(1), dim=-1)
    if combine == "logits":
        return torch.softmax(v.mean(1), dim=-1)
    raise DarkKnowledgeError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")


def distillation_targets(member_logits: Tensor, combine: str, temperature: float) -> dict[str, Tensor]:
    """Keyword arguments for :func:`darkknowledge.losses.distillation_loss` that give the rule's targets at T.

    One member, geometric or logits: ``teacher_logits`` (a logit vector whose softmax at T is exactly the
    targets; for one member these are the very logits, so a one-teacher store trains exactly like cached logits).
    Arithmetic over several members: ``soft_targets``, the mean of the softened members.
    """
    if member_logits.shape[1] == 1 or combine != "arithmetic":
        return {"teacher_logits": combined_logits(member_logits, combine)}
    return {"soft_targets": soft_targets(member_logits, combine, temperature)}


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------

class Ensemble(nn.Module):
    """Any number of members (``nn.Module`` s mapping a batch of inputs to logits ``[B, C]``) as one teacher.

    ``forward`` returns the combined T = 1 log-probabilities (module doc); :meth:`member_logits` each member's
    logits ``[B, M, C]``; :meth:`soft_targets` the rule's targets at any temperature. The members are put in eval
    mode: an ensemble is a teacher.
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "arithmetic",
                 runs: Sequence[str | os.PathLike] | None = None, member_meta: Sequence[dict] | None = None):
        super().__init__()
        members = list(members)
        if not members:
            raise DarkKnowledgeError("an ensemble needs at least one member")
        for i, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise DarkKnowledgeError(f"ensemble member {i} must be a torch.nn.Module, got {type(member).__name__}")
        self.members = nn.ModuleList(members)
        self.combine = check_combine(combine)
        self.runs = [str(r) for r in runs] if runs is not None else None  # where each member was loaded from
        self.member_meta = list(member_meta) if member_meta is not None else None  # their model.json
        self.eval()

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"

    def member_logits(self, inputs: Tensor) -> Tensor:
        """Each member's logits ``[B, M, C]``: one pass of each member over the batch."""
        outputs = [logits_of(member(inputs)) for member in self.members]
        # Only the class dimension is compared: a set of batch sizes would pin the batch when exporting.
        classes = [o.shape[-1] for o in outputs]
        if any(c != classes[0] for c in classes):
            raise DarkKnowledgeError(f"ensemble members return logits of different shapes (classes {classes}); "
                                     "every member must predict the same classes")
        return torch.stack(outputs, dim=1)

    def forward(self, inputs: Tensor) -> Tensor:
        return combined_logits(self.member_logits(inputs), self.combine)

    def soft_targets(self, inputs: Tensor, temperature: float) -> Tensor:
        """Probabilities ``[B, C]``: the paper's ensemble soft targets at ``temperature`` under ``combine``."""
        return soft_targets(self.member_logits(inputs), self.combine, temperature)

    def with_combine(self, combine: str) -> Ensemble:
        """The same members (shared, not copied) under another rule."""
        return Ensemble(list(self.members), combine, self.runs, self.member_meta)

    # -- loading saved runs ----------------------------------------------------------------------------------

    @classmethod
    def from_runs(cls, run_dirs: Sequence[str | os.PathLike], combine: str = "arithmetic") -> Ensemble:
        """Members loaded from run directories (checksummed safetensors; nothing unpickled).

        Every member must predict the same classes from images of the same size; a disagreement is refused
        naming both runs, before any weights are read.
        """
        check_combine(combine)
        run_dirs = [checkpoint.resolve_run_dir(d) for d in run_dirs]
        if not run_dirs:
            raise DarkKnowledgeError("an ensemble needs at least one member run")
        metas = [checkpoint.read_model_meta(d) for d in run_dirs]
        first, first_dir = metas[0], run_dirs[0]
        for run_dir, meta in zip(run_dirs[1:], metas[1:]):
            if list(meta["classes"]) != list(first["classes"]):
                raise DarkKnowledgeError(
                    f"ensemble members disagree: {run_dir} predicts {_describe_classes(meta['classes'])} but "
                    f"{first_dir} predicts {_describe_classes(first['classes'])}; every member must be trained on "
                    "the same classes")
            if list(meta["image_shape"]) != list(first["image_shape"]):
                raise DarkKnowledgeError(
                    f"ensemble members disagree: {run_dir} takes {tuple(meta['image_shape'])} images but "
                    f"{first_dir} takes {tuple(first['image_shape'])}; every member must be trained on the same "
                    "data")
        models = [checkpoint.load_model(d)[0] for d in run_dirs]
        return cls(models, combine, run_dirs, metas)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, combine: str | None = None) -> Ensemble:
        """The members listed in ``folder/ensemble.json`` (written by ``darkknowledge train --members N``).

        A half-finished ensemble is refused (finish it with ``--resume``); ``combine`` defaults to the manifest's.
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        members = manifest["members"]
        unfinished = [m["run"] for m in members if not m.get("done")]
        if unfinished:
            raise DarkKnowledgeError(
                f"ensemble {folder} is half-finished: {len(members) - len(unfinished)} of {len(members)} members "
                f"trained ({', '.join(unfinished)} not); finish it with 'darkknowledge train --members "
                f"{len(members)} --resume --out {folder}' and the same options")
        ensemble = cls.from_runs([folder / m["run"] for m in members], combine or manifest.get("combine",
                                                                                               "arithmetic"))
        for member, meta in zip(members, ensemble.member_meta):
            if member.get("weights_sha256") not in (None, meta["weights_sha256"]):
                raise DarkKnowledgeError(f"ensemble {folder}: {member['run']} holds other weights than its manifest "
                                         f"{MANIFEST} records; rerun 'darkknowledge train --members {len(members)} "
                                         f"--resume --out {folder}' to record them")
        return ensemble

    @property
    def classes(self) -> list[str] | None:
        return list(self.member_meta[0]["classes"]) if self.member_meta else None

    def describe(self) -> dict[str, Any]:
        """For sidecars: the rule and each member's run, spec and weight checksum (when loaded from runs)."""
        described: dict[str, Any] = {"combine": self.combine, "size": len(self)}
        if self.member_meta:
            described["members"] = [{"run": run, "spec": meta["spec"], "weights_sha256": meta["weights_sha256"]}
                                    for run, meta in zip(self.runs, self.member_meta)]
        return described


def _describe_classes(classes: Sequence[str]) -> str:
    classes = list(classes)
    shown = classes if len(classes) <= 12 else classes[:5] + ["..."] + classes[-3:]
    return f"{len(classes)} classes [{', '.join(map(str, shown))}]"


# ---------------------------------------------------------------------------------------------------------------
# The manifest of an ensemble folder
# ---------------------------------------------------------------------------------------------------------------

def is_ensemble_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an ensemble manifest written by ``train --members`` (another ensemble.json is not)."""
    try:
        manifest = json.loads(reading.read_bytes(Path(path) / MANIFEST, "ensemble", reading.JSON_LIMIT))
        return manifest.get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError, DarkKnowledgeError):
        return False


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise DarkKnowledgeError(f"{folder} is not an ensemble folder (no {MANIFEST}); make one with "
                                 "'darkknowledge train --members N --out FOLDER', or give members as --teacher A "
                                 "--teacher B")
    manifest = checkpoint.read_json(path, "ensemble")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DarkKnowledgeError(f"ensemble: {path} is not a darkknowledge ensemble manifest; make the folder with "
                                 "'darkknowledge train --members N'")
    return schemas.check(schemas.EnsembleManifest, manifest, path,
                         "rerun 'darkknowledge train --members N --resume' with the options it was made with")


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Atomically (temp file + rename): a crash leaves the previous manifest or the new one."""
    checkpoint.write_json(Path(folder) / MANIFEST, {"format": MANIFEST_FORMAT, **manifest,
                                                     "provenance": checkpoint.provenance()})
