"""Scoring a language model's own verdicts (``model_says_anomalous``) against ground truth, for ``vlad eval --lvlm``.

Plain accuracy misleads here: answering "yes, anomalous" to everything scores 72.9 % on MVTec AD (most of its test
images are anomalous), so the summary also gives balanced accuracy (the mean of the rates on anomalous and on normal
images), the yes-rate, the always-yes accuracy of the same images for reference, and the unparseable-reply rate.
An unparseable reply counts as a wrong answer in accuracy and balanced accuracy (as Triad scores anything that is not
a valid choice) and is also reported on its own; it is left out of the yes-rate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from vlad.errors import ConfigError


@dataclass
class VerdictCounts:
    """Running counts of yes/no verdicts against ground truth (an unparseable verdict is ``None``)."""

    n: int = 0
    positives: int = 0  # ground-truth anomalous images
    true_pos: int = 0
    true_neg: int = 0
    yes: int = 0
    parsed: int = 0

    def add(self, label: bool, says: bool | None) -> None:
        self.n += 1
        self.positives += int(label)
        if says is None:
            return
        self.parsed += 1
        self.yes += int(says)
        self.true_pos += int(label and says)
        self.true_neg += int(not label and not says)

    def summary(self) -> dict[str, Any]:
        negatives = self.n - self.positives
        tpr = self.true_pos / self.positives if self.positives else None
        tnr = self.true_neg / negatives if negatives else None
        balanced = (tpr + tnr) / 2 if tpr is not None and tnr is not None else None
        return {
            "n": self.n,
            "n_anomalous": self.positives,
            "accuracy": _ratio(self.true_pos + self.true_neg, self.n),
            "balanced_accuracy": balanced,
            "true_positive_rate": tpr,
            "true_negative_rate": tnr,
            "yes_rate": _ratio(self.yes, self.parsed),
            "unparseable_rate": _ratio(self.n - self.parsed, self.n),
            "unparseable": self.n - self.parsed,
            "always_yes_accuracy": _ratio(self.positives, self.n),
        }


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _says_anomalous(report: Any) -> bool | None:
    """The model's yes/no from a report dict or model; None when there is no valid report."""
    if report is None:
        return None
    value = (
        report.get("model_says_anomalous")
        if isinstance(report, dict)
        else getattr(report, "model_says_anomalous", None)
    )
    return value if isinstance(value, bool) else None


class VerdictTracker:
    """Collects (category, ground truth, report) triples and summarises the model's verdict accuracy."""

    def __init__(self) -> None:
        self._per_class: dict[str, VerdictCounts] = defaultdict(VerdictCounts)
        self._all = VerdictCounts()

    def add(self, category: str, label: bool | int, report: Any) -> None:
        """Records one image.

        Args:
            category: the product class, e.g. ``bottle``.
            label: ground truth, truthy when the image is anomalous (0/1 or bool).
            report: the validated report (dict or :class:`~vlad.explain.schema.AnomalyReport`), or None when the
                reply was unparseable or the model failed.
        """
        if label not in (0, 1):
            raise ConfigError(f"label must be 0/1 or a bool, got {label!r}")
        says = _says_anomalous(report)
        self._per_class[category].add(bool(label), says)
        self._all.add(bool(label), says)

    def __len__(self) -> int:
        return self._all.n

    def summary(self) -> dict[str, Any]:
        """Per-class and overall numbers (None where undefined, e.g. balanced accuracy of a class with one label).

        Keys: ``per_class`` (each with ``n, n_anomalous, accuracy, balanced_accuracy, true_positive_rate,
        true_negative_rate, yes_rate, unparseable_rate, always_yes_accuracy``), ``macro_accuracy`` and
        ``macro_balanced_accuracy`` (means over classes where defined), ``overall`` (the same keys over all images
        pooled), and the pooled ``balanced_accuracy``, ``yes_rate``, ``unparseable_rate`` for convenience.
        """
        per_class = {name: counts.summary() for name, counts in sorted(self._per_class.items())}
        overall = self._all.summary()
        return {
            "per_class": per_class,
            "macro_accuracy": _mean(c["accuracy"] for c in per_class.values()),
            "macro_balanced_accuracy": _mean(c["balanced_accuracy"] for c in per_class.values()),
            "balanced_accuracy": overall["balanced_accuracy"],
            "yes_rate": overall["yes_rate"],
            "unparseable_rate": overall["unparseable_rate"],
            "overall": overall,
        }

    def format_table(self) -> str:
        """A plain-text table of the summary (percentages), one row per class plus ``macro`` and ``pooled``."""
        s = self.summary()
        keys = ("accuracy", "balanced_accuracy", "yes_rate", "unparseable_rate", "always_yes_accuracy")
        heads = ("acc", "bal.acc", "yes-rate", "unparse", "always-yes")
        lines = [f"{'LVLM verdicts':16s} {'n':>5s} " + " ".join(f"{h:>10s}" for h in heads)]
        for name, c in [*s["per_class"].items(), ("pooled", s["overall"])]:
            lines.append(f"{name:16s} {c['n']:5d} " + " ".join(f"{_pct(c[k]):>10s}" for k in keys))
        lines.append(
            f"{'macro':16s} {'':5s} {_pct(s['macro_accuracy']):>10s} {_pct(s['macro_balanced_accuracy']):>10s}"
        )
        return "\n".join(lines)


def _mean(values: Any) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
