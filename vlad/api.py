"""The Python API: one object that loads a scorer once and inspects images.

Example:
    >>> from vlad import Detector
    >>> det = Detector("winclip", backbone="random:tiny")  # doctest: +SKIP
    >>> result = det.detect("part.png", object_name="bottle")  # doctest: +SKIP
    >>> result.pred_label, result.normalized_score, result.regions  # doctest: +SKIP
    >>> det.overlay(result, "part.png").save("part_overlay.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlad.result import AnomalyResult
from vlad.thresholds import Thresholds

if TYPE_CHECKING:
    from PIL import Image

    from vlad.scorers.base import ImageLike, Scorer


class Detector:
    """A scorer plus optional normal references, ready to inspect images of one or more products.

    Args:
        scorer: registry name (see :func:`vlad.list_scorers`).
        backbone: backbone spec; the scorer's default if None.
        references: normal reference images (paths, PIL images or arrays) for few-shot scoring.
        object_name: the product name used when :meth:`detect` is not given one.
        **scorer_kwargs: ``threshold``, ``sensitivity``, ``device``, ``image_size``, ... (see the scorer).
    """

    def __init__(
        self,
        scorer: str = "winclip",
        *,
        backbone: str | None = None,
        references: Sequence[ImageLike] | None = None,
        object_name: str = "object",
        rules: Any = None,
        detector: Any = None,
        **scorer_kwargs: Any,
    ) -> None:
        from vlad.scorers import get_scorer

        self.scorer: Scorer = get_scorer(scorer, backbone=backbone, **scorer_kwargs)
        self.object_name = object_name
        self.references: list[ImageLike] = list(references or [])
        self.rules = rules
        self.detector = detector
        if self.references:
            self.scorer.fit(self.references)

    def fit(self, references: Sequence[ImageLike]) -> Detector:
        """Use these normal references from now on (few-shot, calibrated threshold)."""
        self.references = list(references)
        self.scorer.fit(self.references)
        return self

    def detect(self, image: ImageLike, object_name: str | None = None, *, rules: Any = None) -> AnomalyResult:
        """Inspect one image; ``rules`` (words, a file, or a RuleSet) override the detector's own for this call."""
        return self.detect_many([image], object_name, rules=rules)[0]

    def detect_many(
        self, images: Sequence[ImageLike], object_name: str | None = None, *, rules: Any = None
    ) -> list[AnomalyResult]:
        """Inspect images of one product in batches, applying the rules in force (see :mod:`vlad.rules`)."""
        name = object_name or self.object_name
        rules = rules if rules is not None else self.rules
        if rules is None:
            return self.scorer.score_many(images, name)
        from vlad.rules import load_rules_arg, score_with_rules

        ruleset = load_rules_arg(rules)
        return score_with_rules(
            self.scorer, images, ruleset, object_name=name, detector=self.detector, references=self.references or None
        )

    @staticmethod
    def overlay(result: AnomalyResult, image: ImageLike) -> Image.Image:
        """The heat map over the image with the predicted regions outlined in red."""
        from vlad.scorers.base import as_pil
        from vlad.viz import render_result

        return render_result(as_pil(image), result)


def rethreshold(result: AnomalyResult, sensitivity: float) -> AnomalyResult:
    """The same result at another sensitivity, without re-scoring: thresholds shift by ``(old - new) * scale`` (see
    :mod:`vlad.thresholds`), and the mask, regions, label and normalised score follow. Rule effects are not
    re-applied (apply the rules again to the returned result)."""
    return Thresholds.of(result).with_sensitivity(sensitivity).apply(result)
