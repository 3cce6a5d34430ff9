"""Zero-shot object detectors behind one small contract: an image and some phrases in, scored boxes out.

Two transformers models are supported (groundingdino-py is not: it is broken with transformers 5):

- Grounding DINO (``IDEA-Research/grounding-dino-tiny`` by default; Liu et al., ECCV 2024): the phrases are lower-cased
  and joined into one caption, ``"a screw. a bottle cap."``.
- OWLv2 (``google/owlv2-base-patch16-ensemble``; Minderer et al., NeurIPS 2023): one text query per phrase.

Detector specs for :func:`get_detector`: ``grounding-dino``, ``grounding-dino:MODEL``, ``owlv2``, ``owlv2:MODEL``,
``none``, or a bare local folder (its ``config.json`` names the model type). ``MODEL`` is a Hugging Face Hub id or a
folder saved with ``save_pretrained``. Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) a model that is not in
the local cache fails within seconds with :class:`~vlad.errors.WeightsNotFoundError`.

torch and transformers are imported when a detector is built, never when this module is imported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from vlad._optional import require
from vlad.errors import ConfigError
from vlad.grounding._loading import folder_model_type, load_detector_model
from vlad.grounding.boxes import Box, clip_box, nms, sort_boxes

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path
DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_OWLV2 = "google/owlv2-base-patch16-ensemble"
SPEC_FORMS = "grounding-dino, grounding-dino:MODEL, owlv2, owlv2:MODEL, none, or a local model folder"
"""Accepted :func:`get_detector` specs; MODEL is a Hugging Face Hub id or a local folder."""


@runtime_checkable
class ObjectDetector(Protocol):
    """Anything that finds phrases in an image."""

    def detect(self, image: ImageInput, phrases: Sequence[str], *, threshold: float | None = None) -> list[Box]:
        """Boxes for the phrases, sorted by score descending; an empty list when nothing is found."""
        ...


class NoDetector:
    """The ``none`` spec: finds nothing, so callers need no special case for "no detector"."""

    spec = "none"

    def detect(self, image: ImageInput, phrases: Sequence[str], *, threshold: float | None = None) -> list[Box]:
        """Checks the phrases like the real detectors do and returns an empty list."""
        check_phrases(phrases)
        if threshold is not None:
            check_threshold("threshold", threshold)
        return []


class _TransformersDetector:
    """Shared loading, input checks and box clean-up of the transformers detectors."""

    kind: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: str | tuple[Any, Any],
        *,
        device: str,
        box_threshold: float,
        nms_iou: float | None,
        local_files_only: bool | None,
    ) -> None:
        from vlad.backbones import resolve_device

        for package in ("torch", "transformers"):
            require(package, "detect", what=f"the {self.kind} detector")
        self.box_threshold = check_threshold("box_threshold", box_threshold)
        self.nms_iou = None if nms_iou is None else check_threshold("nms_iou", nms_iou)
        self.device = resolve_device(device)
        self.model, self.processor, source = load_detector_model(
            model, kind=self.kind, model_types=self.model_types, device=self.device, local_files_only=local_files_only
        )
        self.spec = f"{self.kind}:{source}"

    def detect(self, image: ImageInput, phrases: Sequence[str], *, threshold: float | None = None) -> list[Box]:
        """Finds the phrases in an image.

        Args:
            image: a Pillow image (converted to RGB) or an image file (loaded with vlad's checks).
            phrases: what to look for, e.g. ``["screw", "bottle cap"]``; duplicates are ignored.
            threshold: box score threshold for this call; the detector's ``box_threshold`` if None. A box is kept
                when its score is strictly above it.

        Returns:
            Boxes in pixels of ``image``, clipped to it, sorted by score descending, each carrying one of the input
            phrases and the image size. Boxes that have no area left after clipping are dropped. An empty list when
            the model finds nothing above the threshold.

        Raises:
            ConfigError: no phrases, an empty or non-string phrase, or a threshold outside [0, 1].
            ImageLoadError: an image file that cannot be read.
        """
        labels = check_phrases(phrases)
        thr = self.box_threshold if threshold is None else check_threshold("threshold", threshold)
        pil = _as_rgb(image)
        import torch

        with torch.inference_mode():
            raw = self._predict(pil, labels, thr)
        boxes = []
        for xyxy, score, phrase in raw:
            x0, y0, x1, y1 = clip_box(xyxy, pil.size)
            if x1 > x0 and y1 > y0:
                boxes.append(Box((x0, y0, x1, y1), min(max(score, 0.0), 1.0), phrase, pil.size))
        if self.nms_iou is not None:
            boxes = nms(boxes, self.nms_iou)
        logger.debug("%s found %d boxes for %d phrases", self.spec, len(boxes), len(labels))
        return sort_boxes(boxes)

    def _predict(self, image: Image.Image, phrases: list[str], threshold: float) -> list[tuple[Any, float, str]]:
        """``(xyxy in image pixels, score, phrase)`` for every box above ``threshold`` (unclipped)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, device={self.device!r}, box_threshold={self.box_threshold})"


class GroundingDinoDetector(_TransformersDetector):
    """Grounding DINO through transformers (``GroundingDinoForObjectDetection``).

    Boxes and scores come from the processor's ``post_process_grounded_object_detection``; the score is the highest
    token probability of the query over the whole caption, as in Grounding DINO. Deviation on purpose: upstream
    labels a box with the caption tokens above ``text_threshold``, which may mix phrases ("screw bottle") or be
    empty. Here each box gets exactly one input phrase: the one whose tokens have the highest mean probability
    (the mean, not the max, because words shared by phrases such as "a" get identical probabilities in every phrase).
    A box is dropped when no token of that phrase reaches ``text_threshold`` (upstream would label it with nothing).
    Phrases whose tokens do not fit into the model's text length (256 tokens for the released models) are dropped
    with a warning.

    Args:
        model: a Hub id, a local folder, or an already-built ``(model, processor)`` pair.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        box_threshold: default box score threshold in [0, 1].
        text_threshold: token probability a box's phrase must reach, in [0, 1].
        nms_iou: when set, boxes of the same phrase overlapping a better one by more IoU are dropped (upstream: no
            suppression).
        local_files_only: True never downloads; None downloads unless ``HF_HUB_OFFLINE`` is set.

    Raises:
        ConfigError: a bad threshold or a model of another type.
        WeightsNotFoundError: the model is neither on disk nor downloadable.
    """

    kind = "grounding-dino"
    model_types = ("grounding-dino",)

    def __init__(
        self,
        model: str | tuple[Any, Any] = DEFAULT_GROUNDING_DINO,
        device: str = "auto",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        local_files_only: bool | None = None,
        *,
        nms_iou: float | None = None,
    ) -> None:
        self.text_threshold = check_threshold("text_threshold", text_threshold)
        super().__init__(
            model, device=device, box_threshold=box_threshold, nms_iou=nms_iou, local_files_only=local_files_only
        )

    def _predict(self, image: Image.Image, phrases: list[str], threshold: float) -> list[tuple[Any, float, str]]:
        phrases, caption, token_sets, token_ids = self._caption(phrases)
        inputs = self.processor(images=image, text=caption, return_tensors="pt").to(self.device)
        if inputs["input_ids"][0].tolist() != token_ids:
            raise RuntimeError(f"the processor tokenised {caption!r} differently from its tokenizer")
        outputs = self.model(**inputs)
        width, height = image.size
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)],
        )[0]
        probs = outputs.logits[0].sigmoid().float()  # (queries, max_text_len)
        kept = probs[probs.max(dim=-1).values > threshold]  # the processor's own keep rule, in the same order
        if len(kept) != len(result["boxes"]):
            raise RuntimeError(f"post-processing kept {len(result['boxes'])} boxes but the logits give {len(kept)}")
        out = []
        for query, box, score in zip(kept, result["boxes"].tolist(), result["scores"].tolist(), strict=True):
            index, best_token = _best_phrase(query, token_sets)
            if best_token >= self.text_threshold:
                out.append((box, float(score), phrases[index]))
        return out

    def _caption(self, phrases: list[str]) -> tuple[list[str], str, list[list[int]], list[int]]:
        """Phrases that fit, the caption, each phrase's token positions in the tokenised caption, and its token ids."""
        words = [p.lower().rstrip(". ") for p in phrases]
        for phrase, word in zip(phrases, words, strict=True):
            if not word or "." in word:
                raise ConfigError(f"Grounding DINO phrases must not contain '.' (it separates phrases), got {phrase!r}")
        caption, spans = "", []
        for word in words:
            spans.append((len(caption), len(caption) + len(word)))
            caption += word + ". "
        caption = caption.rstrip()
        encoding = self.processor.tokenizer(caption, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        limit = int(getattr(self.model.config, "max_text_len", len(offsets)))
        token_sets = [[i for i, (a, b) in enumerate(offsets) if b > a and s <= a and b <= e] for s, e in spans]
        fits = [bool(t) and max(t) + 2 < limit for t in token_sets]  # room for the phrase's "." and the [SEP]
        if not all(fits):
            if not fits[0]:
                raise ConfigError(f"the phrase {phrases[0]!r} does not fit into Grounding DINO's {limit} text tokens")
            n = fits.index(False)
            logger.warning("Grounding DINO reads %d text tokens: dropped phrases %s", limit, phrases[n:])
            return self._caption(phrases[:n])
        return phrases, caption, token_sets, list(encoding["input_ids"])


class Owlv2Detector(_TransformersDetector):
    """OWLv2 through transformers (``Owlv2ForObjectDetection``), one text query per phrase.

    OWLv2's processor pads the image at the bottom and right to a square before resizing, so the model's boxes are
    fractions of that padded square. They are scaled by the square's side ``max(width, height)`` on both axes (the
    processor is given ``target_sizes=[(side, side)]``, which is right whichever way a transformers version scales)
    and then clipped to the image; boxes lying wholly in the padding are dropped. Phrases longer than the text
    model's length (16 tokens for the released models) are truncated by the tokenizer.

    Args:
        model: a Hub id, a local folder, or an already-built ``(model, processor)`` pair.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        box_threshold: default box score threshold in [0, 1] (0.1 is the transformers default).
        local_files_only: True never downloads; None downloads unless ``HF_HUB_OFFLINE`` is set.
        nms_iou: boxes of the same phrase overlapping a better one by more than this IoU are dropped (OWLv2 predicts
            one box per image patch, so near-duplicates are common); None keeps them all.

    Raises:
        ConfigError: a bad threshold or a model of another type.
        WeightsNotFoundError: the model is neither on disk nor downloadable.
    """

    kind = "owlv2"
    model_types = ("owlv2",)

    def __init__(
        self,
        model: str | tuple[Any, Any] = DEFAULT_OWLV2,
        device: str = "auto",
        box_threshold: float = 0.1,
        local_files_only: bool | None = None,
        *,
        nms_iou: float | None = 0.5,
    ) -> None:
        super().__init__(
            model, device=device, box_threshold=box_threshold, nms_iou=nms_iou, local_files_only=local_files_only
        )

    def _predict(self, image: Image.Image, phrases: list[str], threshold: float) -> list[tuple[Any, float, str]]:
        inputs = self.processor(images=image, text=[phrases], truncation=True, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        side = max(image.size)
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=[(side, side)]
        )[0]
        labels = result["labels"].tolist()
        return [
            (box, float(score), phrases[label])
            for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), labels, strict=True)
        ]


def get_detector(spec: str = "grounding-dino", **options: Any) -> ObjectDetector:
    """Builds a detector from a spec string.

    Args:
        spec: ``grounding-dino``, ``grounding-dino:MODEL``, ``owlv2``, ``owlv2:MODEL``, ``none``, or a local model
            folder whose ``config.json`` says ``grounding-dino`` or ``owlv2``. MODEL is a Hub id or a local folder.
        **options: passed to the detector class (``device``, ``box_threshold``, ``text_threshold``, ``nms_iou``,
            ``local_files_only``); ignored for ``none``.

    Returns:
        A :class:`GroundingDinoDetector`, an :class:`Owlv2Detector` or a :class:`NoDetector`.

    Raises:
        ConfigError: an unknown spec form (the message lists the accepted ones) or a bad option.
        WeightsNotFoundError: the model is neither on disk nor downloadable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty detector spec {spec!r}; use one of: {SPEC_FORMS}")
    spec = spec.strip()
    if spec.lower() == "none":
        return NoDetector()
    classes: dict[str, type[_TransformersDetector]] = {"grounding-dino": GroundingDinoDetector, "owlv2": Owlv2Detector}
    kind, sep, model = spec.partition(":")
    if kind in classes:
        if sep and not model.strip():
            raise ConfigError(f"detector spec {spec!r} names no model after ':'; use one of: {SPEC_FORMS}")
        return classes[kind](model.strip(), **options) if sep else classes[kind](**options)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        model_type = folder_model_type(folder)
        if model_type not in classes:
            raise ConfigError(f"folder {spec} has no config.json of a grounding-dino or owlv2 model ({model_type!r})")
        return classes[model_type](str(folder), **options)
    raise ConfigError(f"unknown detector spec {spec!r}; use one of: {SPEC_FORMS}")


def check_phrases(phrases: Sequence[str]) -> list[str]:
    """Validates phrases; returns them stripped, without duplicates, in their first order."""
    if isinstance(phrases, str) or not isinstance(phrases, Sequence):
        raise ConfigError(f"phrases must be a list of strings, e.g. ['screw'], got {type(phrases).__name__}")
    if not phrases:
        raise ConfigError("phrases is empty; name at least one object to detect, e.g. ['screw']")
    out: list[str] = []
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase.strip():
            raise ConfigError(f"every phrase must be a non-empty string, got {phrase!r}")
        if phrase.strip() not in out:
            out.append(phrase.strip())
    return out


def check_threshold(name: str, value: float) -> float:
    """Validates a number in [0, 1]."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _best_phrase(query: torch.Tensor, token_sets: list[list[int]]) -> tuple[int, float]:
    """(index of the phrase with the highest mean token probability, that phrase's highest token probability).

    Args:
        query: (max_text_len,) token probabilities of one query.
        token_sets: token positions of each phrase.
    """
    means = [float(query[t].mean()) for t in token_sets]
    index = int(np.argmax(means))
    return index, float(query[token_sets[index]].max())


def _as_rgb(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        from vlad.data.images import load_image

        return load_image(image)
    raise ConfigError(f"image must be a PIL image or a file path, got {type(image).__name__}")
