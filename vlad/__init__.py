"""vlad: vision-language zero-shot anomaly detection.

``import vlad`` is light: no torch, no open_clip. Heavy libraries load when a scorer or backbone is first built.

Example:
    >>> import vlad
    >>> vlad.list_scorers()
    ['winclip']
"""

from __future__ import annotations

from vlad._version import __version__
from vlad.errors import VladError
from vlad.result import AnomalyResult, Explanation, Region, RuleHit
from vlad.scorers import get_scorer, list_scorers

__all__ = [
    "AnomalyResult",
    "Detector",
    "Explanation",
    "Region",
    "RuleHit",
    "VladError",
    "__version__",
    "get_scorer",
    "list_scorers",
]


def __getattr__(name: str) -> object:
    # Detector pulls in numpy-only helpers, but keep it lazy so `import vlad` stays minimal.
    if name == "Detector":
        from vlad.api import Detector

        return Detector
    raise AttributeError(f"module 'vlad' has no attribute {name!r}")
