"""The Python API: :class:`Detector` (the inspection pipeline, :mod:`vlad.pipeline`) and :func:`rethreshold`.

Example:
    >>> from vlad import Detector
    >>> det = Detector("winclip", backbone="random:tiny")  # doctest: +SKIP
    >>> result = det.detect("part.png", object_name="bottle")  # doctest: +SKIP
    >>> result.pred_label, result.normalized_score, result.regions  # doctest: +SKIP
    >>> det.overlay(result, "part.png").save("part_overlay.png")  # doctest: +SKIP
"""

from __future__ import annotations

from vlad.pipeline import Detector, InspectionRecord, rethreshold

__all__ = ["Detector", "InspectionRecord", "rethreshold"]
