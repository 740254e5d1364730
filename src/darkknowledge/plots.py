"""How every figure draws its axes and curves, so the plots of all reports read alike.

Log axes are labelled with plain numbers (1, 2, 5, 10, ... or 1%, 2%, 5%), never 10^0 or 6x10^-1; a training
curve and a validation (or test) curve of the same model share a colour and differ in style, thin and dashed
against thick and solid, with legend handles long enough to show the dashes.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.ticker as ticker

TRAIN = {"ls": (0, (4, 2)), "lw": 1.0, "alpha": 0.8}  # dashed, thin: the cases the model was fitted to
HELD_OUT = {"ls": "-", "lw": 2.0}  # solid, thick: validation or test cases
LEGEND = {"fontsize": 7, "handlelength": 3.5}


def plain_log_axis(axis, ticks: Sequence[float] | None = None, percent: bool = False) -> None:
    """Label a log-scaled ``axis`` (``ax.xaxis`` or ``ax.yaxis``) at ``ticks``, or at 1, 2 and 5 times each power
    of ten, with plain numbers; ``percent`` shows fractions as percentages (0.05 as 5%)."""
    axis.set_major_locator(ticker.FixedLocator(ticks) if ticks is not None
                           else ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(
        (lambda v, _: f"{100 * v:g}%") if percent else (lambda v, _: f"{v:g}")))
    axis.set_minor_formatter(ticker.NullFormatter())
