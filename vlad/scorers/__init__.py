"""The scorer registry: explicit, lazy, string-keyed. Importing this module imports no scorer (and no torch).

Adding a scorer means adding its module and one line to ``_SCORERS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlad.errors import UnknownScorerError

if TYPE_CHECKING:
    from vlad.scorers.base import Scorer

_SCORERS: dict[str, str] = {
    "anomalyclip": "vlad.scorers.anomalyclip:AnomalyClipScorer",
    "crane": "vlad.scorers.crane:CraneScorer",
    "filo": "vlad.scorers.filo:FiloScorer",
    "laft": "vlad.scorers.laft:LaftScorer",
    "musc": "vlad.scorers.musc:MuscScorer",
    "winclip": "vlad.scorers.winclip:WinClipScorer",
}


def list_scorers() -> list[str]:
    """Registered scorer names, sorted."""
    return sorted(_SCORERS)


def scorer_class(name: str) -> type[Scorer]:
    """The class registered under ``name`` (imports its module)."""
    if name not in _SCORERS:
        raise UnknownScorerError(f"unknown scorer {name!r}; available: {', '.join(list_scorers())}")
    module, _, attr = _SCORERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def get_scorer(name: str, **config: Any) -> Scorer:
    """Build the scorer registered under ``name``; ``config`` goes to its constructor.

    Example:
        >>> scorer = get_scorer("winclip", backbone="random:tiny")  # doctest: +SKIP
        >>> result = scorer.score("part.png", "bottle")  # doctest: +SKIP
    """
    return scorer_class(name)(**config)
