"""Named plans of ``darkknowledge reproduce``: an experiment's settings under a name (``reproduce lm --plan
6epochs``), each with the one line ``--help`` shows for it. A plan that made a committed ``results/`` folder lives
here rather than in a script beside its outputs, so the folder's README gives a command and results.json
(``plan_name``) says which plan wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DarkKnowledgeError


@dataclass(frozen=True)
class Named:
    plan: Any  # the experiment's Plan
    about: str  # one line for --help


def check_name(names, name: str | None, quick: bool, experiment: str) -> str:
    """The plan name asked for, one of ``names`` (``quick`` and no name: "quick"; neither: "full")."""
    if name is None:
        name = "quick" if quick else "full"
    elif quick and name != "quick":
        raise DarkKnowledgeError(f"reproduce {experiment}: --quick is --plan quick, and --plan {name} was given "
                                 "too; give one of them")
    if name not in names:
        raise DarkKnowledgeError(f"reproduce {experiment} has no plan {name!r}; choose one of "
                                 f"{', '.join(names)} (listed in 'darkknowledge reproduce --help')")
    return name


def choose(plans: dict[str, Named], name: str | None, quick: bool, experiment: str) -> tuple[str, Any]:
    """The plan called ``name`` (see check_name), as (name, plan)."""
    name = check_name(plans, name, quick, experiment)
    return name, plans[name].plan


def name_of(plans: dict[str, Named], plan: Any) -> str | None:
    """The name of the registered plan equal to ``plan`` (None: a plan built in code)."""
    return next((name for name, named in plans.items() if named.plan == plan), None)
