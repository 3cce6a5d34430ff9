"""Zero-shot object detection: find named objects in an image and tell which one holds the anomaly.

``import vlad.grounding`` needs only numpy and Pillow; torch and transformers load when a detector is built.

Example:
    >>> from vlad.grounding import get_detector, which_object
    >>> detector = get_detector("grounding-dino")          # or "owlv2", "grounding-dino:/local/dir", "none"
    >>> boxes = detector.detect("part.png", ["screw", "nut"])
    >>> which_object(boxes, result.anomaly_map)[0]         # (Box, share of the anomaly inside it)
"""

from __future__ import annotations

from vlad.grounding.boxes import Box, filter_boxes, iou, nms, which_object
from vlad.grounding.detector import (
    DEFAULT_GROUNDING_DINO,
    DEFAULT_OWLV2,
    SPEC_FORMS,
    GroundingDinoDetector,
    NoDetector,
    ObjectDetector,
    Owlv2Detector,
    get_detector,
)

__all__ = [
    "DEFAULT_GROUNDING_DINO",
    "DEFAULT_OWLV2",
    "SPEC_FORMS",
    "Box",
    "GroundingDinoDetector",
    "NoDetector",
    "ObjectDetector",
    "Owlv2Detector",
    "filter_boxes",
    "get_detector",
    "iou",
    "nms",
    "which_object",
]
