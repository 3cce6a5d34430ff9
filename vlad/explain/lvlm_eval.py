"""Blind and grounded evaluation of a language model's own anomaly verdicts (``vlad eval --lvlm SPEC --lvlm-mode``).

- **blind**: the model sees only the photo and the question "Is there any anomaly in the image? Answer yes or no.",
  as AnomalyGPT and the LVLM anomaly-detection benchmarks ask it. Its reply is read by :func:`parse_yes_no`.
- **grounded**: the model sees vlad's evidence (the photo, the heat-map overlay, the crops and the detector's facts,
  the explanation path of the pipeline) and answers with the JSON report; its ``model_says_anomalous`` is its verdict.
  Besides accuracy, how often it disagrees with the detector and, when it does, who was right.

Per class and pooled: accuracy, balanced accuracy (the mean of the hit rates on anomalous and on normal images),
yes-rate (over parsed replies), unparseable rate, and the always-yes accuracy of the same images for reference. An
unparseable reply (or a failed request) counts as wrong in accuracy and balanced accuracy and is left out of the
yes-rate, as in :mod:`vlad.explain.verdicts`.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vlad.errors import ConfigError
from vlad.explain.errors import LVLMError, LVLMUnavailable
from vlad.explain.verdicts import VerdictCounts

logger = logging.getLogger(__name__)

MODES = ("blind", "grounded", "both")
BLIND_QUESTION = "Is there any anomaly in the image? Answer yes or no."
BLIND_MAX_TOKENS = 32
_YES_WORDS = {"yes", "yeah", "yep", "true", "anomalous", "defective", "abnormal"}
_NO_WORDS = {"no", "nope", "false", "normal", "none"}
_NEGATIVE = re.compile(
    r"\b(?:no|not any|without|free of|zero)\s+(?:visible\s+|obvious\s+|apparent\s+|signs? of\s+)?"
    r"(?:anomal|defect|damage|flaw)"
    r"|\bnot\s+(?:anomalous|defective|damaged|abnormal)\b"
    r"|\b(?:defect|anomaly|flaw)[- ]free\b"
    r"|\b(?:is|looks|appears|seems)\s+(?:normal|fine|ok|okay|good|intact|flawless)\b"
    r"|\b(?:doesn't|does not|don't|do not|cannot|can't)\s+(?:see|find|detect|contain|have|show|spot)\b"
)
_POSITIVE = re.compile(
    r"\bthere\s+(?:is|are)\s+(?:an?\s+|some\s+|one\s+|two\s+|several\s+)?(?:visible\s+|clear\s+|obvious\s+)?"
    r"(?:anomal|defect|damage|flaw|scratch|crack|dent|hole|stain)"
    r"|\b(?:anomal\w*|defects?)\s+(?:is\s+|are\s+)?(?:present|detected|visible|found)\b"
    r"|\b(?:is|looks|appears|seems)\s+(?:anomalous|defective|damaged|abnormal)\b"
    r"|\b(?:has|have|shows?|contains?)\s+(?:an?\s+)?(?:\w+\s+)?(?:anomal|defect|scratch|crack|dent|hole|stain|flaw)"
)


def parse_yes_no(text: str | None) -> bool | None:
    """The yes/no in a reply: True for yes (anomalous), False for no, None when it cannot be told.

    The first word decides when it is one ("Yes, ...", "**No**.", "no anomaly"); otherwise a sentence saying there
    is (or is not) an anomaly or defect ("There is no anomaly", "The image shows a scratch"). A reply holding both a
    negative and a positive statement, or neither, is unparseable.
    """
    if not text or not text.strip():
        return None
    low = text.strip().lower()
    first = re.match(r"[^a-z0-9]*([a-z]+)", low)
    if first and first.group(1) in _YES_WORDS:
        return True
    if first and first.group(1) in _NO_WORDS:
        return False
    negative, positive = _NEGATIVE.search(low), _POSITIVE.search(low)
    if negative and not positive:
        return False
    if positive and not negative:
        return True
    return None


def blind_messages(image: Any, max_side: int = 512) -> list[dict[str, Any]]:
    """One user turn: the photo (a PNG data URL, longer side at most ``max_side``) and :data:`BLIND_QUESTION`."""
    from vlad.explain.evidence import png_data_url

    parts = [
        {"type": "image_url", "image_url": {"url": png_data_url(image, max_side)}},
        {"type": "text", "text": BLIND_QUESTION},
    ]
    return [{"role": "user", "content": parts}]


@dataclass
class BlindAsker:
    """Asks a model backend the blind question; a backend found unavailable is not asked again in the run."""

    backend: Any
    max_tokens: int = BLIND_MAX_TOKENS
    down: str | None = None

    def __post_init__(self) -> None:
        if not getattr(self.backend, "is_model", False):
            raise ConfigError(
                "--lvlm-mode blind needs a language model (--lvlm openai:... or transformers:...); "
                "the template has no opinion of its own"
            )

    def ask(self, image: Any) -> dict[str, Any]:
        """``{"says": True/False/None, "reply": text or None, "error": one line or None}`` for one PIL photo."""
        if self.down is not None:
            return {"says": None, "reply": None, "error": f"the LVLM was unavailable earlier in this run ({self.down})"}
        try:
            reply = self.backend.complete(blind_messages(image), max_tokens=self.max_tokens)
        except LVLMError as exc:
            if isinstance(exc, LVLMUnavailable):
                self.down = str(exc)
            logger.info("blind LVLM question failed: %s", exc)
            return {"says": None, "reply": None, "error": str(exc)}
        return {"says": parse_yes_no(reply), "reply": reply, "error": None}


# ---------------------------------------------------------------------- statistics
@dataclass
class _Counts(VerdictCounts):
    """:class:`~vlad.explain.verdicts.VerdictCounts` plus, in grounded mode, the disagreements with the detector and
    who was right in them."""

    disagree: int = 0
    model_right: int = 0
    detector_right: int = 0

    def add(self, label: bool, says: bool | None, detector: bool | None = None) -> None:  # type: ignore[override]
        super().add(label, says)
        if says is not None and detector is not None and says != detector:
            self.disagree += 1
            self.model_right += int(says == label)
            self.detector_right += int(detector == label)

    def summary(self, grounded: bool = False) -> dict[str, Any]:  # type: ignore[override]
        out = super().summary()
        if grounded:
            out.update(
                disagreements=self.disagree,
                disagreement_rate=_ratio(self.disagree, self.parsed),
                model_right=self.model_right,
                detector_right=self.detector_right,
            )
        return out


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


@dataclass
class ModeTracker:
    """Collects one mode's verdicts: ``add(category, label, says, detector)``; ``detector`` (the detector's verdict,
    True for anomalous) only in grounded mode."""

    mode: str
    _per_class: dict[str, _Counts] = field(default_factory=lambda: defaultdict(_Counts))
    _all: _Counts = field(default_factory=_Counts)

    def __post_init__(self) -> None:
        if self.mode not in ("blind", "grounded"):
            raise ConfigError(f"mode must be blind or grounded, got {self.mode!r}")

    def add(self, category: str, label: bool | int, says: bool | None, detector: bool | None = None) -> None:
        if label not in (0, 1):
            raise ConfigError(f"label must be 0/1 or a bool, got {label!r}")
        if self.mode == "grounded" and detector is None:
            raise ConfigError("grounded verdicts need the detector's verdict")
        for counts in (self._per_class[category], self._all):
            counts.add(bool(label), says, detector if self.mode == "grounded" else None)

    def summary(self) -> dict[str, Any]:
        """``{"mode", "per_class": {class: numbers}, "overall": numbers}`` (None where a number is undefined)."""
        grounded = self.mode == "grounded"
        per_class = {name: c.summary(grounded) for name, c in sorted(self._per_class.items())}
        return {"mode": self.mode, "per_class": per_class, "overall": self._all.summary(grounded)}

    def format_table(self) -> str:
        """A plain-text table (percentages; counts for the disagreement columns), one row per class plus pooled."""
        s = self.summary()
        cols = [
            ("acc", "accuracy"),
            ("bal.acc", "balanced_accuracy"),
            ("yes-rate", "yes_rate"),
            ("unparse", "unparseable_rate"),
            ("always-yes", "always_yes_accuracy"),
        ]
        counts = [("disagree", "disagreements"), ("model-ok", "model_right"), ("detect-ok", "detector_right")]
        if self.mode != "grounded":
            counts = []
        head = f"{'LVLM ' + self.mode:16s} {'n':>5s} " + " ".join(f"{h:>10s}" for h, _ in cols + counts)
        lines = [head]
        for name, c in [*s["per_class"].items(), ("pooled", s["overall"])]:
            cells = [f"{_pct(c[k]):>10s}" for _, k in cols] + [f"{c[k]:>10d}" for _, k in counts]
            lines.append(f"{name:16s} {c['n']:5d} " + " ".join(cells))
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_says(report: Any) -> bool | None:
    """``model_says_anomalous`` of a report dict (None when there is no valid report or no opinion)."""
    value = report.get("model_says_anomalous") if isinstance(report, dict) else None
    return value if isinstance(value, bool) else None


class LVLMEvaluation:
    """The blind and/or grounded verdicts of one evaluation run.

    Args:
        mode: ``blind``, ``grounded`` or ``both``.
        backend: the model backend asked the blind question (needed for ``blind`` and ``both``).
        max_tokens: the blind reply's budget.
    """

    def __init__(self, mode: str, backend: Any = None, *, max_tokens: int = BLIND_MAX_TOKENS) -> None:
        if mode not in MODES:
            raise ConfigError(f"--lvlm-mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.blind = ModeTracker("blind") if mode in ("blind", "both") else None
        self.grounded = ModeTracker("grounded") if mode in ("grounded", "both") else None
        self.asker = BlindAsker(backend, max_tokens) if self.blind is not None else None

    @property
    def needs_image(self) -> bool:
        """True when :meth:`observe` needs the photo (blind mode)."""
        return self.blind is not None

    def observe(
        self, category: str, label: bool | int, *, image: Any = None, detector: bool | None = None, report: Any = None
    ) -> dict[str, Any]:
        """Records one image: asks the blind question about ``image`` (blind) and reads the report's verdict against
        the detector's (grounded).

        Returns:
            The keys an eval image row gains: ``lvlm_blind`` (``says``, ``reply``, ``error``) and/or
            ``lvlm_grounded`` (``says``, ``detector``).
        """
        row: dict[str, Any] = {}
        if self.blind is not None and self.asker is not None:
            answer = self.asker.ask(image)
            self.blind.add(category, label, answer["says"])
            row["lvlm_blind"] = answer
        if self.grounded is not None:
            says = report_says(report)
            self.grounded.add(category, label, says, bool(detector))
            row["lvlm_grounded"] = {"says": says, "detector": bool(detector)}
        return row

    def summary(self) -> dict[str, Any]:
        """``{"mode", "blind": ModeTracker summary or None, "grounded": ... or None}``."""
        return {
            "mode": self.mode,
            "blind": None if self.blind is None else self.blind.summary(),
            "grounded": None if self.grounded is None else self.grounded.summary(),
        }

    def format_tables(self) -> str:
        """The blind and/or grounded tables, with a legend of the grounded columns."""
        tables = [t.format_table() for t in (self.blind, self.grounded) if t is not None]
        if self.grounded is not None:
            tables.append(
                "disagree: the model's verdict differs from the detector's; model-ok / detect-ok: which of the two "
                "matched the ground truth then"
            )
        return "\n".join(tables)
