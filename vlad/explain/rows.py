"""Explanations for report rows: one :class:`RowExplainer` per run, with typed options (no argparse here).

``RowExplainer(ExplainOptions(lvlm="openai:http://127.0.0.1:8000/v1")).explain(image, result, "bottle")`` gives the
keys a report row gains: ``explanation``, ``report``, ``lvlm``, ``explain_error`` (what went wrong, or a ``[note: ...]``
when only part of the evidence could be sent). Nothing here fails the caller
because of a language model: failures fall back to the template explanation and say so. A backend found unavailable
is remembered for the rest of the run (one timeout, not one per image) and reported once through ``on_down``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ROW_KEYS = ("explanation", "report", "lvlm", "explain_error")


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain: the backend spec and its limits.

    Attributes:
        lvlm: ``template``, ``openai:URL[#model]`` or ``transformers:MODEL``.
        timeout: seconds per request.
        max_tokens: reply budget.
        process_note: manufacturing-process context for the prompt.
    """

    lvlm: str = "template"
    timeout: float = 60.0
    max_tokens: int = 512
    process_note: str | None = None

    def check(self) -> None:
        """Validate the spec before any work (raises ConfigError naming the accepted forms)."""
        from vlad.explain.backends import parse_backend_spec

        parse_backend_spec(self.lvlm or "template")


@dataclass
class RowExplainer:
    """Explains results for report rows, caching the backend and remembering one that is down."""

    options: ExplainOptions = field(default_factory=ExplainOptions)
    on_down: Callable[[str], None] | None = None
    _backend: Any = field(default=None, init=False, repr=False)
    _down: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.options.check()

    @property
    def down(self) -> str | None:
        """Why the language model was found unavailable in this run, or None."""
        return self._down

    def mark_down(self, reason: str) -> None:
        """Treat the language model as unavailable for the rest of the run (a check before the run found it down)."""
        self._down = reason

    def backend(self) -> Any:
        if self._backend is None:
            from vlad.explain.backends import load_backend

            self._backend = load_backend(self.options.lvlm, timeout=self.options.timeout)
        return self._backend

    def explain(self, image: Any, result: Any, object_name: str, *, backbone: Any = None) -> dict[str, Any]:
        """The row keys for one result (see the module docstring).

        Args:
            image: the photo (PIL image or uint8 array), at the result's resolution.
            result: its :class:`~vlad.result.AnomalyResult`.
            object_name: the product name.
            backbone: the scorer's CLIP backbone, to name each region's defect with a phrase of ``prompts/filo.yaml``.
        """
        from vlad.explain.evidence import build_evidence, build_facts
        from vlad.explain.explainer import explain
        from vlad.explain.template import explain_text

        spec, note = self.options.lvlm or "template", self.options.process_note
        try:
            clip = backbone if hasattr(backbone, "forward_visual") and hasattr(backbone, "encode_text") else None
            evidence = build_evidence(_as_pil(image), result, object_name, process_note=note, backbone=clip)
            if self._down is not None:
                error = f"the LVLM {spec} was unavailable earlier in this run ({self._down}); the template was used"
                return _row(f"[note: {error}] {explain_text(evidence.facts)}", None, spec, error)
            outcome = explain(evidence, self.backend(), max_tokens=self.options.max_tokens)
            if outcome.backend_down:
                self._down = outcome.failure or "unavailable"
                if self.on_down is not None:
                    self.on_down(f"the LVLM {spec} is unavailable ({self._down}); explanations use the template")
            return _row(outcome.explanation.text, outcome.report, spec, outcome.error or outcome.warning)
        except Exception as exc:  # noqa: BLE001 -- an explanation must never fail a detection run
            logger.warning(
                "explanation failed for %s: %s", object_name, exc, exc_info=logger.isEnabledFor(logging.DEBUG)
            )
            try:
                text = explain_text(build_facts(result, object_name.strip() or "object", process_note=note))
            except Exception:  # noqa: BLE001
                text = f"vlad judged this {object_name} {result.verdict} (score {result.pred_score:.4f})."
            message = " ".join(str(exc).split())[:240]
            return _row(text, None, spec, f"explanation failed ({message}); the template explanation was used")


def _row(text: str, report: dict[str, Any] | None, spec: str, error: str | None) -> dict[str, Any]:
    return {"explanation": text, "report": report, "lvlm": spec, "explain_error": error}


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
