"""Ranking of scores, the ROC / precision-recall summaries built on it, and partial trapezoid areas.

Only one ``np.sort`` of all scores is needed (no ``argsort`` of the large array, which is many times slower): counts
at any threshold come from ``searchsorted`` on the sorted scores and on the sorted positives. Curves are evaluated
only where they can bend, i.e. at each distinct positive score ("at" point, ``score >= v``) and just above it ("pre"
point, ``score > v``); every other distinct threshold adds only negatives and lies on a horizontal segment between
two of these points, so areas, interpolation and F1 are unchanged (the same argument as scikit-learn's
``drop_intermediate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlad.metrics._checks import UndefinedMetricError


@dataclass(frozen=True)
class Ranking:
    """Sorted scores of a labelled sample.

    Attributes:
        ordered: all scores, ascending, shape ``(P,)``.
        positives: the positive samples' scores, ascending, shape ``(P_pos,)``.
        top_weights: ``top_weights[k]`` is the summed weight of the ``k`` highest-scoring positives, shape
            ``(P_pos + 1,)``; None when no weights were given.
    """

    ordered: np.ndarray
    positives: np.ndarray
    top_weights: np.ndarray | None = None

    @property
    def n_pos(self) -> int:
        return int(self.positives.size)

    @property
    def n_neg(self) -> int:
        return int(self.ordered.size - self.positives.size)

    def counts(self, thresholds: np.ndarray, strict: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """True positives, false positives and summed positive weight for ``score > t`` (strict) or ``score >= t``.

        Args:
            thresholds: thresholds, shape ``(K,)``.
            strict: compare with ``>`` instead of ``>=``.

        Returns:
            ``(tps, fps, weights)``, each shape ``(K,)``; ``weights`` is None without ``top_weights``.
        """
        side = "right" if strict else "left"
        tps = self.n_pos - np.searchsorted(self.positives, thresholds, side=side)
        fps = self.ordered.size - np.searchsorted(self.ordered, thresholds, side=side) - tps
        weights = None if self.top_weights is None else self.top_weights[tps]
        return tps, fps, weights


def rank(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> Ranking:
    """Sorts the scores and the positives' scores (with their optional weights).

    Args:
        scores: finite scores, shape ``(P,)``.
        positive: True for positive samples, shape ``(P,)``.
        weights: one weight per positive sample in the order of ``scores[positive]``, shape ``(P_pos,)``.

    Returns:
        The ranking.
    """
    positive_scores = scores[positive]
    if weights is None:
        return Ranking(ordered=np.sort(scores), positives=np.sort(positive_scores))
    order = np.argsort(positive_scores)
    top_weights = np.concatenate(([0.0], np.cumsum(weights[order][::-1])))
    return Ranking(ordered=np.sort(scores), positives=positive_scores[order], top_weights=top_weights)


def distinct_positive_scores(ranking: Ranking) -> np.ndarray:
    """The distinct positive scores, descending, shape ``(K,)``."""
    values = ranking.positives
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep][::-1]


def curve_counts(ranking: Ranking) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Counts at (0, 0), at every "pre" and "at" point from the highest score down, and with everything included.

    Returns:
        ``(tps, fps, weights)``, each shape ``(2K + 2,)``, non-decreasing; ``weights`` None without weights.
    """
    values = distinct_positive_scores(ranking)
    before = ranking.counts(values, strict=True)
    at = ranking.counts(values, strict=False)
    totals = (ranking.n_pos, ranking.n_neg, None if ranking.top_weights is None else ranking.top_weights[-1])
    series = []
    for pre_part, at_part, total in zip(before, at, totals, strict=True):
        if pre_part is None:
            series.append(None)
            continue
        middle = np.column_stack((pre_part, at_part)).ravel()
        series.append(np.concatenate(([0], middle, [total])))
    return series[0], series[1], series[2]


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal area under ``y(x)``, ``x`` non-decreasing; both shape ``(K,)``."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x <= x_max``, interpolating ``y`` linearly at exactly ``x_max``.

    Same rule as the MVTec AD evaluation code (``trapezoid(..., x_max)``): points with ``x == x_max`` are kept and
    no interpolation is needed then.

    Args:
        x: non-decreasing abscissae starting at 0, shape ``(K,)``.
        y: ordinates, shape ``(K,)``.
        x_max: upper integration limit, ``0 < x_max``.

    Returns:
        The (unnormalised) area.
    """
    cut = int(np.searchsorted(x, x_max, side="right"))  # x[cut - 1] <= x_max < x[cut]
    if cut == x.size:
        return trapezoid(y, x)
    x0, x1, y0, y1 = x[cut - 1], x[cut], y[cut - 1], y[cut]
    y_at_limit = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return trapezoid(np.append(y[:cut], y_at_limit), np.append(x[:cut], x_max))


def require_both_classes(ranking: Ranking, what: str) -> None:
    """Raises ``UndefinedMetricError`` unless there is at least one positive and one negative."""
    if ranking.n_pos == 0 or ranking.n_neg == 0:
        present = "anomalous (1)" if ranking.n_pos else "normal (0)"
        raise UndefinedMetricError(
            f"{what} is undefined when labels contain only one class; got only {present} samples "
            f"({ranking.n_pos} anomalous, {ranking.n_neg} normal), need at least one of each"
        )


def require_positives(ranking: Ranking, what: str) -> None:
    """Raises ``UndefinedMetricError`` unless there is at least one positive."""
    if ranking.n_pos == 0:
        raise UndefinedMetricError(
            f"{what} is undefined when labels contain no anomalous (1) sample; got {ranking.n_neg} normal ones"
        )


def roc_area(ranking: Ranking) -> float:
    """Area under the ROC curve from (0, 0), trapezoid over distinct thresholds (as scikit-learn)."""
    require_both_classes(ranking, "AUROC")
    tps, fps, _ = curve_counts(ranking)
    return trapezoid(tps / ranking.n_pos, fps / ranking.n_neg)


def _precision_recall(ranking: Ranking) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at each distinct positive score (descending), each shape ``(K,)``."""
    values = distinct_positive_scores(ranking)
    tps, fps, _ = ranking.counts(values, strict=False)
    return tps / (tps + fps), tps / ranking.n_pos, values


def ap_score(ranking: Ranking) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (as scikit-learn).

    Thresholds holding only negatives leave recall unchanged and add nothing, so only the positives' are used.
    """
    require_positives(ranking, "average precision")
    precision, recall, _ = _precision_recall(ranking)
    return max(0.0, float(np.sum(np.diff(recall, prepend=0.0) * precision)))


def best_f1(ranking: Ranking) -> tuple[float, float]:
    """Maximum F1 over distinct thresholds and the highest threshold reaching it.

    A threshold holding only negatives has the recall of the threshold above it and a lower precision, so the
    maximum is always at a positive score; points with ``P + R == 0`` cannot occur there.
    """
    require_positives(ranking, "F1-max")
    precision, recall, values = _precision_recall(ranking)
    f1 = 2.0 * precision * recall / (precision + recall)
    best = int(np.argmax(f1))
    return float(f1[best]), float(values[best])
