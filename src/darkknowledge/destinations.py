"""Where a command may write: never into a run, store or experiment folder that another kind of job owns.

Each of these folders is written by one kind of job, under its lock. A file another command writes into one can
replace the job's own files: ``export R --out R/model.safetensors`` replaced the run's weights, ``bench R --json
R/model.json`` its sidecar. So every command that writes a file or a folder names its destination to
:func:`refuse_foreign_destination` before any work, and is refused in one line when the destination is, or is
inside, a folder of a kind it does not write.

A folder is recognised by the names of the files it holds (nothing is read):

- ``experiment``: ``experiment.json`` or ``results.json`` (older experiment folders hold only the latter);
- ``store``: a soft-target store's ``<key>.json`` / ``.bin`` / ``.lock`` (16 hex digits) or a folder store's
  ``targets.json``;
- ``run``: a run, an ensemble or a specialists folder: ``model.json``, ``model.safetensors``, a pending sidecar,
  ``state.json``, ``ensemble.json``, ``subsets.json``, or only the lock ``.darkknowledge.lock`` (a job that has
  just started, or was killed as it started).

The kinds are tried in that order, since an experiment folder also holds its lock, and a language-model
experiment's folder its tokenizer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path

from .checkpoint import MODEL_META, MODEL_WEIGHTS, PENDING_META, STATE_META
from .ensemble import MANIFEST
from .errors import DarkKnowledgeError
from .locks import LOCK_FILE
from .specialists.jobs import SUBSETS_FILE
from .soft_targets import FOLDER_HEADER

RUN, STORE, EXPERIMENT = "run", "store", "experiment"
EXPERIMENT_FILE = "experiment.json"  # which experiment a folder holds, written as its first reproduce starts
RESULTS_FILE = "results.json"
_SOFT_TARGET_STORE = re.compile(r"[0-9a-f]{16}\.(json|bin|lock)")  # soft_targets.py names its files by key[:16]
_MARKERS = ((EXPERIMENT, (EXPERIMENT_FILE, RESULTS_FILE)), (STORE, (FOLDER_HEADER,)),
            (RUN, (MODEL_META, MODEL_WEIGHTS, PENDING_META, STATE_META, MANIFEST, SUBSETS_FILE, LOCK_FILE)))


def folder_kind(folder: str | os.PathLike) -> tuple[str, str] | None:
    """``(kind, the file that tells it)`` of a folder darkknowledge writes (see the module doc), or None."""
    try:
        names = {entry.name for entry in os.scandir(folder)}
    except OSError:  # not there, not a folder, or unreadable: holds nothing of a job's
        return None
    for kind, markers in _MARKERS:
        found = [name for name in markers if name in names]  # in the order listed: the lock last
        if kind == STORE:
            found += sorted(name for name in names if _SOFT_TARGET_STORE.fullmatch(name))
        if found:
            return kind, found[0]
    return None


def refuse_foreign_destination(path: str | os.PathLike, what: str, makes: str | None = None,
                               inside: Collection[str] = ()) -> None:
    """Raise a one-line :class:`DarkKnowledgeError` when ``path`` (a file or folder ``what`` will write, e.g.
    ``"export --out"``) is, or is inside, a folder darkknowledge writes that is not the command's own.

    ``makes``: the kind of folder the command writes at ``path`` (None: a file, so ``path`` must be no such
    folder); a folder holding nothing but a lock is taken too, having nothing to lose. ``inside``: the kinds of
    folder ``path`` may lie in (a run inside an experiment folder, an ensemble's member inside the ensemble)."""
    try:
        target = Path(path).resolve()  # through symbolic links: a link to a run folder leads into that run
    except (OSError, RuntimeError, ValueError) as e:  # a NUL character, a loop of symbolic links
        raise DarkKnowledgeError(f"{what} {str(path)!r} is not a usable path ({e}); choose another path") from None
    found = folder_kind(target)
    if found is not None and found[0] != makes and not (makes is not None and found[1] == LOCK_FILE):
        kind, marker = found
        raise DarkKnowledgeError(f"{what} {path} is a darkknowledge {kind} folder (it holds {marker}) that this "
                                 "command does not write; writing there would replace its files: choose another path")
    for folder in target.parents:
        found = folder_kind(folder)
        if found is not None and found[0] not in inside:
            kind, marker = found
            raise DarkKnowledgeError(f"{what} {path} is inside {folder}, a darkknowledge {kind} folder (it holds "
                                     f"{marker}) that this command does not write into; writing there could replace "
                                     "its files: choose a path outside it")
