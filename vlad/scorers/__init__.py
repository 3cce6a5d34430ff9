"""The scorer registry: explicit, lazy, string-keyed. Importing this module imports no scorer (and no torch).

Adding a scorer means adding its module, one line to ``_SCORERS`` and its one-line summary (the first line of the
class docstring, a test checks they agree) to ``_SUMMARIES``, which ``vlad scorers`` prints without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlad._optional import require
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

_SUMMARIES: dict[str, str] = {
    "anomalyclip": "AnomalyCLIP: V-V dual-path dense CLIP maps and object-agnostic (learned) prompts (ICLR 2024).",
    "crane": "Crane / Crane+: E-Attn dual-path dense CLIP maps with local-to-global image scores (arXiv 2504.11055).",
    "filo": "FiLo: fine-grained defect descriptions and detector-guided localisation, training-free (ACM MM 2024).",
    "laft": 'LAFT-AD: kNN on CLIP features after a language-defined feature transform ("ignore colour", "focus on '
    'cracks").',
    "musc": "MuSc: mutual scoring of a batch of unlabeled images of one product (ICLR 2024); zero-shot, no prompts.",
    "winclip": "WinCLIP / WinCLIP+: prompt ensemble and multi-scale windows, few-shot patch memory (CVPR 2023).",
}


_FACTS: dict[str, tuple[str, tuple[float, float], bool]] = {
    # name: (default backbone family, raw score range, needs normal references)
    "anomalyclip": ("dense", (0.0, 1.0), False),
    "crane": ("dense", (0.0, 1.0), False),
    "filo": ("dense", (0.0, 1.0), False),
    "laft": ("winclip", (0.0, 2.0), True),  # cosine distances
    "musc": ("dense", (0.0, 2.0), False),  # patch distances (vlad profile); the paper profile's are in [0, 1]
    "winclip": ("winclip", (0.0, 1.0), False),
}


_TRANSDUCTIVE = frozenset({"musc"})
"""Scorers whose scores depend on the whole batch (they cannot tile)."""


def scorer_facts(name: str) -> dict[str, Any]:
    """What can be checked about a scorer before building it (imports nothing heavy): its default backbone spec,
    the range of its raw scores (where a threshold means something), whether it needs normal references and whether
    it is transductive (scores depend on the whole batch)."""
    from vlad.backbones import DEFAULT_BACKBONE, WINCLIP_BACKBONE

    if name not in _FACTS:
        raise UnknownScorerError(f"unknown scorer {name!r}; available: {', '.join(list_scorers())}")
    family, score_range, needs_references = _FACTS[name]
    backbone = DEFAULT_BACKBONE if family == "dense" else WINCLIP_BACKBONE
    return {
        "default_backbone": backbone,
        "score_range": score_range,
        "needs_references": needs_references,
        "transductive": name in _TRANSDUCTIVE,
    }


def list_scorers() -> list[str]:
    """Registered scorer names, sorted."""
    return sorted(_SCORERS)


def scorer_summary(name: str) -> str:
    """One line on what the scorer ``name`` does (imports nothing)."""
    _check_name(name)
    return _SUMMARIES[name]


def scorer_class(name: str) -> type[Scorer]:
    """The class registered under ``name`` (imports its module, and torch and open_clip with it).

    Raises:
        UnknownScorerError: no scorer of that name.
        MissingDependencyError: torch or open_clip is not installed (``pip install 'vlad[clip]'``).
    """
    _check_name(name)
    for package in ("torch", "open_clip"):
        require(package, "clip", what=f"the {name} scorer")
    module, _, attr = _SCORERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _check_name(name: str) -> None:
    if name not in _SCORERS:
        raise UnknownScorerError(f"unknown scorer {name!r}; available: {', '.join(list_scorers())}")


def get_scorer(name: str, **config: Any) -> Scorer:
    """Build the scorer registered under ``name``; ``config`` goes to its constructor.

    ``backbone="onnx:DIR"`` runs a model exported by ``vlad export --format onnx`` with onnxruntime
    (:class:`~vlad.scorers.onnx_runtime.OnnxScorer`); ``name`` and the options must agree with its manifest.

    Example:
        >>> scorer = get_scorer("winclip", backbone="random:tiny")  # doctest: +SKIP
        >>> result = scorer.score("part.png", "bottle")  # doctest: +SKIP
    """
    from vlad.backbones.spec import ONNX_PREFIX, is_onnx_spec

    if is_onnx_spec(config.get("backbone")):  # an export run by onnxruntime: no torch, no open_clip
        _check_name(name)
        from vlad.scorers.onnx_runtime import OnnxScorer

        spec = config.pop("backbone").strip()
        return OnnxScorer(name, spec.removeprefix(ONNX_PREFIX), spec=spec, **config)  # type: ignore[return-value]
    return scorer_class(name)(**config)
