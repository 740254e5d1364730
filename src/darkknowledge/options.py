"""Bounds of every option, applied to the parsed options whatever their source: the command line and a
``--config`` TOML file go through the same checks, after both are merged.

argparse converts command-line strings (``--lr 1e308`` is a float) but takes a config file's values as they come
(``epochs = 1.5``, ``resume = "false"``), so each value is checked here against its option's kind (an on/off flag
takes a boolean, an integer option an integer, a path option a string), its choices, and a finite range.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .errors import DarkKnowledgeError

SEED_MAX = 2**63 - 1  # seeds and their offsets (member i's seed + i, epoch seeds) stay within torch's 64 bits

# Ranges, by option name: (low, high, low included, high included). An integer or number option not named here
# is bounded to what 64 bits hold.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 1_000_000, True, True),
    "batch_size": (1, 10_000_000, True, True),
    "grad_accumulation": (1, 10_000_000, True, True),  # and at most --batch-size (TrainConfig checks)
    "lr": (0, 100, False, True),
    "momentum": (0, 1, True, False),
    "weight_decay": (0, 1, True, True),
    "jitter": (0, 64, True, True),
    "seed": (0, SEED_MAX, True, True),
    "val_seed": (0, SEED_MAX, True, True),
    "val_size": (0, 1_000_000_000, True, True),
    "patience": (1, 1_000_000, True, True),
    "step_epochs": (1, 1_000_000, True, True),
    "members": (1, 1000, True, True),
    "temperature": (0, 10_000, False, True),
    "soft_weight": (0, 1000, True, True),
    "hard_weight": (0, 1000, True, True),
    "top_k": (1, 1_000_000, True, True),
    "atol": (0, 1000, False, True),
    "threads": (1, 1024, True, True),
    "jobs": (1, 1024, True, True),
    "calls": (1, 10_000_000, True, True),
    "clusters": (1, 100_000, True, True),
    "overlap": (0, 100_000, True, True),
    "overlap_ratio": (0, 1, True, True),
    "min_size": (1, 100_000, True, True),
    "subset_fraction": (0, 1, False, False),
    "top_n": (1, 100_000, True, True),
    "tol": (0, 1, True, True),
}
_ANY_INT = (-(2**63), 2**63 - 1, True, True)
_ANY_NUMBER = (-1e300, 1e300, True, True)


def install(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and its sub-command parsers report a usage problem as one :class:`UsageError` line (not
    argparse's usage block and exit), and refuse an empty path (``--out ''`` would mean the current folder)."""
    def error(message: str, prog: str = parser.prog) -> None:
        # A sub-command names itself ("darkknowledge train: ..."); the program's own name is already the line's
        # "darkknowledge: error:" prefix.
        where = f"{prog}: " if " " in prog else ""
        raise UsageError(f"{where}{message}; see '{prog} --help'")
    parser.error = error
    for action in parser._actions:
        if action.type is Path:
            action.type = _path
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                install(sub)


class UsageError(DarkKnowledgeError):
    """A command line argparse cannot read (exit status 2, as argparse's own)."""


def _path(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("a path must not be empty ('.' is the current folder)")
    return Path(text)


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Raise a one-line :class:`DarkKnowledgeError` for the first option of ``args`` (parsed by ``parser``,
    a config file's values included) that is of the wrong kind or out of its range."""
    source = f" (on the command line or in {args.config})" if getattr(args, "config", None) else ""
    for action in _actions(parser, args):
        value = getattr(args, action.dest, None)
        problem = None if value is None else _problem(action, value)
        if problem:
            flag = max(action.option_strings, key=len) if action.option_strings else action.dest
            raise DarkKnowledgeError(f"option {flag} {problem}, got {value!r}{source}")


def _actions(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The actions of ``parser`` and of the sub-command parsers ``args`` chose, at any depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                yield from _actions(action.choices[chosen], args)
        elif action.dest not in (argparse.SUPPRESS, "help", "version", "config"):
            yield action


def _problem(action: argparse.Action, value: Any) -> str | None:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else "is on or off: give true or false (a TOML boolean)"
    if isinstance(value, list) and (action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
                                    or type(action).__name__ == "_Repeatable"):
        problems = [_problem_of_one(action, v) for v in value]
        return next((p for p in problems if p), None)
    return _problem_of_one(action, value)


def _problem_of_one(action: argparse.Action, value: Any) -> str | None:
    if action.type is int or (action.type is None and isinstance(value, int) and action.dest in RANGES):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
        return _out_of_range(action.dest, value, RANGES.get(action.dest, _ANY_INT))
    if action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        return _out_of_range(action.dest, value, RANGES.get(action.dest, _ANY_NUMBER))
    if action.type in (_path, Path, str, None) and not isinstance(value, (str, Path)):
        return "must be a text (a path or a name)"
    if action.choices is not None and value not in action.choices:
        return f"must be one of {', '.join(map(str, action.choices))}"
    return None


def _out_of_range(name: str, value: float, bounds: tuple[float, float, bool, bool]) -> str | None:
    low, high, low_in, high_in = bounds
    inside = (low <= value if low_in else low < value) and (value <= high if high_in else value < high)
    if inside:
        return None
    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"
    return f"must be in {'[' if low_in else '('}{show(low)}, {show(high)}{']' if high_in else ')'}"
