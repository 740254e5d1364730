"""An experiment's output folder: it holds one experiment, and one ``reproduce`` at a time writes it.

Each ``reproduce_*`` function is wrapped by :func:`experiment_folder`, which before any work

1. refuses a folder that is a run or a store, or lies inside one (:mod:`darkknowledge.destinations`);
2. takes the folder's lock (``.darkknowledge.lock``, as runs do) for the whole reproduction: a second
   ``reproduce`` on the same folder is refused naming the first. The stages' runs are sub-folders with their
   own locks, and ``reproduce lm --jobs N`` trains them in worker processes that never take this one;
3. refuses a folder holding another experiment, named by its ``experiment.json`` (written atomically as the first
   reproduction starts) or, in a folder made before that file existed, recognised from its ``results.json``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import checkpoint, locks
from ..destinations import EXPERIMENT, EXPERIMENT_FILE, RESULTS_FILE, refuse_foreign_destination
from ..errors import DarkKnowledgeError
from ..html_report import detect_kind


def held_experiment(out: Path) -> tuple[str, str] | None:
    """``(experiment, the file that says so)`` of an experiment folder, or None for a folder holding none."""
    if (out / EXPERIMENT_FILE).exists():
        record = checkpoint.read_json(out / EXPERIMENT_FILE, "experiment folder")
        if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
            raise DarkKnowledgeError(f"{out / EXPERIMENT_FILE} is not a valid experiment record (an object with an "
                                     f"'experiment' name); delete it if {out / RESULTS_FILE} is this experiment's, "
                                     "or choose another --out")
        return record["experiment"], EXPERIMENT_FILE
    if (out / RESULTS_FILE).exists():
        results = checkpoint.read_json(out / RESULTS_FILE, "results")
        return (detect_kind(results) if isinstance(results, dict) else "unknown"), RESULTS_FILE
    return None


def _refuse_another(out: Path, experiment: str) -> tuple[str, str] | None:
    """:func:`held_experiment`, refused in one line when it is another experiment."""
    held = held_experiment(out)
    if held is not None and held[0] != experiment:
        name, source = held
        known = name != "unknown"
        what = f"the {name}" if known else "an unknown"
        fix = f"'reproduce {name}' continues it there, or " if known else ""
        raise DarkKnowledgeError(f"reproduce {experiment}: {out} holds {what} experiment ({source}), whose results "
                                 f"this one would replace; {fix}choose another --out")
    return held


@contextlib.contextmanager
def hold_experiment(out: str | Path, experiment: str) -> Iterator[None]:
    """Hold ``out`` as the folder of ``experiment`` while the block runs (see the module doc)."""
    out = Path(out)
    refuse_foreign_destination(out, f"reproduce {experiment} --out", makes=EXPERIMENT, inside=(EXPERIMENT,))
    _refuse_another(out, experiment)  # before the lock too, so that a refusal leaves the folder as it was
    with locks.hold_folder(out, "experiment folder"):
        held = _refuse_another(out, experiment)  # again: another reproduction may have claimed it meanwhile
        checkpoint.remove_stale_temp(out)  # of a reproduction killed as it wrote results.json or the report
        if held is None or held[1] == RESULTS_FILE:  # a new folder, or one made before experiment.json existed
            checkpoint.write_json(out / EXPERIMENT_FILE, {"experiment": experiment})
        yield


def experiment_folder(experiment: str) -> Callable[[Callable], Callable]:
    """Decorate ``reproduce_<experiment>(out, ...)`` to run holding ``out`` (:func:`hold_experiment`)."""
    def wrap(reproduce: Callable) -> Callable:
        @functools.wraps(reproduce)
        def held(out, *args, **kwargs):
            with hold_experiment(out, experiment):
                return reproduce(out, *args, **kwargs)
        return held
    return wrap
