"""Copy the chosen MNIST runs' models (model.json + model.safetensors, nothing else) into results/mnist/runs/NAME,
so the weights behind results.json's Table 1 are in the repository and ``darkknowledge evaluate
results/mnist/runs/NAME`` reprints its number (tests/test_results.py checks that it does).

    python results/mnist/publish.py teacher=/work/runs/mnist-teacher-long small=RUN distilled=RUN

NAME is a key of results.json's ``table1`` (teacher, small, distilled). Each source must be a finished run
(its state.json says done; ``--unfinished`` copies the best model so far anyway). The weights are checked
against their sidecar's checksum, staged in a hidden folder beside the target and renamed into place (the old
folder is first renamed to .NAME.old, and put back by the next publish if a crash came between the renames).
Afterwards each published model is evaluated on test and compared with the number results.json records for it:
a mismatch (exit 1) means results.json describes other weights; rerun ``darkknowledge reproduce mnist --out
results/mnist`` on these runs, or publish the runs it used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from darkknowledge import checkpoint, locks
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.jobs import DataChoice, evaluate_run

HERE = Path(__file__).resolve().parent
NAMES = ("teacher", "small", "distilled")  # the models .gitignore lets into results/mnist/runs


def publish(name: str, source: Path, runs: Path, unfinished: bool = False) -> Path:
    """Copy ``source``'s model into ``runs/name``, replacing what was there; returns the new folder."""
    target = runs / name
    if target.resolve() == source.resolve():  # reproduce --out results/mnist trained it there: nothing to copy
        raise DarkKnowledgeError(f"{source} is already {target}; its model.json and model.safetensors are the "
                                 "files to commit (.gitignore leaves out the rest)")
    with locks.hold_folder(source):  # refuses a run that a darkknowledge process is writing
        state = source / checkpoint.STATE_META
        if state.exists() and not checkpoint.read_json(state, "training state").get("done") and not unfinished:
            raise DarkKnowledgeError(f"{source} has not finished training (its state.json is not done); wait for "
                                     "it, or pass --unfinished to publish its best model so far")
        meta = checkpoint.read_model_meta(source)
        runs.mkdir(parents=True, exist_ok=True)
        old = runs / f".{name}.old"
        if old.exists() and not target.exists():  # a publish cut short between its renames: put the old back
            checkpoint.replace(old, target)
        shutil.rmtree(old, ignore_errors=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=runs))
        try:
            shutil.copyfile(source / meta["weights"], staged / checkpoint.MODEL_WEIGHTS)
            checkpoint.write_json(staged / checkpoint.MODEL_META, {**meta, "weights": checkpoint.MODEL_WEIGHTS})
            checkpoint.load_model(staged)  # the copy's checksum and shapes, before it replaces anything
        except BaseException:
            shutil.rmtree(staged)
            raise
    if target.exists():
        checkpoint.replace(target, old)
    checkpoint.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def recorded_errors(results: Path, name: str) -> int | None:
    """The test errors results.json's Table 1 records for ``name`` (None when it records none)."""
    if not results.exists():
        return None
    return json.loads(results.read_text()).get("table1", {}).get(name, {}).get("test_errors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN", help=f"NAME one of {', '.join(NAMES)}; RUN a run folder")
    parser.add_argument("--unfinished", action="store_true", help="also publish runs still training (their best model)")
    parser.add_argument("--data-dir", help="folder holding mnist/ (default: $DARKKNOWLEDGE_DATA)")
    parser.add_argument("--into", type=Path, default=HERE, help="results folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        chosen = [tuple(item.split("=", 1)) for item in args.runs]
        bad = [item for item, pair in zip(args.runs, chosen) if len(pair) != 2 or pair[0] not in NAMES]
        if bad:
            raise DarkKnowledgeError(f"cannot read {bad[0]!r}: give NAME=RUN with NAME one of {', '.join(NAMES)}")
        published = [publish(name, Path(run), args.into / "runs", args.unfinished) for name, run in chosen]
        mismatched = 0
        for folder in published:
            data = DataChoice.from_meta(checkpoint.read_model_meta(folder), args.data_dir)
            errors = evaluate_run(folder, data)["errors"]
            recorded = recorded_errors(args.into / "results.json", folder.name)
            mismatched += errors != recorded
            print(f"{folder}: {errors} test errors; results.json records {recorded}"
                  + ("" if errors == recorded else "  <- MISMATCH"))
    except DarkKnowledgeError as e:
        print(f"darkknowledge: error: {e}", file=sys.stderr)
        return 2
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
