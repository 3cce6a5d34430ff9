"""What a language model is shown about one image: pictures (the photo, its heat-map overlay, close-ups of the
suspicious regions, optionally a normal reference) and text facts from the scorer.

Region-of-interest crops follow Triad's EG-RoI recipe (``LLaVA-NeXT/llava/mm_utils.py`` in ``tzjtatata/Triad``;
METHODS.md section 3.9): threshold the expert map at ``min + 0.9 * (max - min)``, take each connected component's
bounding box, grow it to at least the model's tile size (384 px for SigLIP-so400m) centred and shifted inside the
image, merge boxes whose overlap (intersection over the smaller box) is above 0.1, drop boxes more than 0.8 covered,
make them square, and keep at most 4. Only numpy, scipy and Pillow are needed here; torch is imported only when a
backbone is passed in to pick fine-grained defect phrases.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from scipy import ndimage

from vlad.errors import ConfigError
from vlad.regions import position_word
from vlad.result import AnomalyResult

if TYPE_CHECKING:
    from vlad.backbones.clip import ClipBackbone

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), ends exclusive
ROI_LEVEL = 0.9
MERGE_OVERLAP = 0.1
COVERED_OVERLAP = 0.8
MAX_ROIS = 4
DEFAULT_TILE = 384
DEFAULT_MAX_SIDE = 512
_EIGHT = np.ones((3, 3), dtype=bool)


# ---------------------------------------------------------------------- ROI boxes (Triad)
def roi_boxes(anomaly_map: np.ndarray, *, tile: int = DEFAULT_TILE, max_rois: int = MAX_ROIS) -> list[Box]:
    """Triad's expert-guided regions of interest on an anomaly map.

    Args:
        anomaly_map: (H, W) finite map at the image's resolution; higher is more anomalous.
        tile: the model's tile side in pixels; every box is grown to at least ``min(tile, W) x min(tile, H)``.
        max_rois: how many boxes to keep at most (strongest peak first).

    Returns:
        Up to ``max_rois`` boxes ``(x0, y0, x1, y1)`` inside the image, strongest first; square unless the image is
        too narrow for the side. Empty for a constant map (nothing stands out).

    Raises:
        ConfigError: if ``tile`` or ``max_rois`` is not a positive integer or the map is not 2-D.
    """
    amap = np.asarray(anomaly_map, dtype=np.float64)
    if amap.ndim != 2 or min(amap.shape) == 0:
        raise ConfigError(f"anomaly_map must be a non-empty (H, W) array, got shape {amap.shape}")
    for name, value in (("tile", tile), ("max_rois", max_rois)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    lo, hi = float(amap.min()), float(amap.max())
    if not hi > lo:
        return []
    labels, count = ndimage.label(amap >= lo + ROI_LEVEL * (hi - lo), structure=_EIGHT)
    peaks = ndimage.maximum(amap, labels, index=np.arange(1, count + 1))
    h, w = amap.shape
    slices = ndimage.find_objects(labels)
    boxes: list[Box] = []
    for i in np.argsort(-np.asarray(peaks), kind="stable"):
        sy, sx = slices[i]
        boxes.append(_grow((sx.start, sy.start, sx.stop, sy.stop), tile, w, h))
    merged = _merge_boxes(boxes)
    return [_square(b, w, h) for b in merged][:max_rois]


def _grow(box: Box, tile: int, w: int, h: int) -> Box:
    """The box widened/heightened to at least the tile (at most the image), centred, then shifted inside."""
    x0, y0, x1, y1 = box
    x0, x1 = _span(x0, x1, max(x1 - x0, min(tile, w)), w)
    y0, y1 = _span(y0, y1, max(y1 - y0, min(tile, h)), h)
    return x0, y0, x1, y1


def _span(a: int, b: int, side: int, limit: int) -> tuple[int, int]:
    """An interval of length ``min(side, limit)`` centred on ``[a, b)`` and shifted to lie in ``[0, limit)``."""
    side = min(side, limit)
    start = int(math.floor((a + b) / 2 - side / 2))
    start = min(max(start, 0), limit - side)
    return start, start + side


def _area(b: Box) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(_area(a), _area(b))


def _merge_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Triad's merge: a box more than 0.8 covered by a kept box is dropped, one overlapping more than 0.1 is united
    with it; repeated until nothing changes (a union can create new overlaps). Order of first appearance is kept."""
    kept = list(boxes)
    changed = True
    while changed:
        changed = False
        out: list[Box] = []
        for box in kept:
            for j, other in enumerate(out):
                ratio = _overlap(box, other)
                if ratio > COVERED_OVERLAP and _area(box) <= _area(other):
                    changed = True
                    break
                if ratio > MERGE_OVERLAP:
                    out[j] = (
                        min(box[0], other[0]),
                        min(box[1], other[1]),
                        max(box[2], other[2]),
                        max(box[3], other[3]),
                    )
                    changed = True
                    break
            else:
                out.append(box)
        kept = out
    return kept


def _square(box: Box, w: int, h: int) -> Box:
    """The box made square (side = its longer side), centred and shifted inside; clipped where the image is
    narrower than the side."""
    side = max(box[2] - box[0], box[3] - box[1])
    x0, x1 = _span(box[0], box[2], side, w)
    y0, y1 = _span(box[1], box[3], side, h)
    return x0, y0, x1, y1


# ---------------------------------------------------------------------- images
@dataclass(frozen=True)
class EvidenceImage:
    """One picture shown to the model.

    Attributes:
        kind: ``image`` (the photo), ``overlay`` (heat map), ``crop`` (a region of interest) or ``reference``.
        image: the RGB picture at its own resolution.
        box: for crops, ``(x0, y0, x1, y1)`` in the photo's pixels.
        position: for crops, the position word of the box centre.
    """

    kind: str
    image: Image.Image
    box: Box | None = None
    position: str | None = None

    def data_url(self, max_side: int) -> str:
        """A ``data:image/png;base64,...`` URL of the picture downscaled so its longer side is at most ``max_side``."""
        return png_data_url(self.image, max_side)


def png_data_url(image: Image.Image, max_side: int) -> str:
    """PNG data URL of an image shrunk (aspect kept, Lanczos) so its longer side is at most ``max_side`` pixels."""
    img = downscale(image, max_side)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """The RGB image shrunk so its longer side is at most ``max_side`` (never enlarged)."""
    _check_max_side(max_side)
    img = image.convert("RGB")
    scale = max_side / max(img.size)
    if scale >= 1.0:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _check_max_side(max_side: int) -> None:
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 8:
        raise ConfigError(f"max image side must be an integer >= 8, got {max_side!r}")


# ---------------------------------------------------------------------- the evidence bundle
@dataclass
class Evidence:
    """Everything the explainer shows a model about one image.

    Attributes:
        object_name: the product name.
        result: the scorer's result being explained.
        facts: JSON-serialisable facts (see :func:`build_facts`).
        images: the pictures, in the order they are shown.
        max_side: longer side in pixels at which pictures are encoded.
    """

    object_name: str
    result: AnomalyResult
    facts: dict[str, Any]
    images: list[EvidenceImage] = field(default_factory=list)
    max_side: int = DEFAULT_MAX_SIDE


def build_evidence(
    image: Image.Image,
    result: AnomalyResult,
    object_name: str,
    *,
    process_note: str | None = None,
    references: Sequence[Image.Image] = (),
    backbone: ClipBackbone | None = None,
    phrases: dict[str, Any] | None = None,
    tile: int = DEFAULT_TILE,
    max_rois: int = MAX_ROIS,
    max_side: int = DEFAULT_MAX_SIDE,
    overlay: bool = True,
) -> Evidence:
    """Builds the pictures and facts for one image and its result.

    Crops whose box covers nearly the whole photo (90 % or more of its area, as happens for images smaller than the
    tile) are left out: they would repeat the photo. That is a deliberate deviation from Triad, which always adds them.

    Args:
        image: the photo (any PIL mode; converted to RGB), at the result's resolution.
        result: the scorer's result for this photo.
        object_name: the product name, e.g. ``bottle``.
        process_note: optional user-written manufacturing-process text (Triad's CoT-M idea), passed on verbatim.
        references: normal reference photos; the first one is shown (one-shot comparison, as in Triad).
        backbone: a CLIP backbone; when given, each region the rules gave no defect type gets its best fine-grained
            defect phrase as its type.
        phrases: a phrase bank in ``prompts/filo.yaml``'s format; default: that file when it exists.
        tile: the model's tile side for Triad's box growing.
        max_rois: at most this many crops.
        max_side: pictures are encoded with their longer side at most this many pixels.
        overlay: include the heat-map overlay picture.

    Returns:
        The :class:`Evidence`.

    Raises:
        ConfigError: if the image size differs from the result's map or an option is out of range.
    """
    rgb = image.convert("RGB")
    if rgb.size != result.image_size:
        raise ConfigError(f"image size {rgb.size} differs from the result's map size {result.image_size}")
    _check_max_side(max_side)
    name = object_name.strip() or "object"
    region_phrases = None
    if backbone is not None and any(r.defect_type is None for r in result.regions):  # the rules' type is final
        region_phrases = best_phrases(rgb, result, name, backbone, phrases)
    facts = build_facts(result, name, process_note=process_note, region_phrases=region_phrases)
    pictures = [EvidenceImage("image", rgb)]
    if overlay:
        from vlad.viz import render_result

        pictures.append(EvidenceImage("overlay", render_result(rgb, result)))
    w, h = rgb.size
    for box in roi_boxes(result.anomaly_map, tile=tile, max_rois=max_rois):
        if _area(box) >= 0.9 * w * h:
            continue
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        pictures.append(EvidenceImage("crop", rgb.crop(box), box=box, position=position_word(*centre, w, h)))
    if references:
        pictures.append(EvidenceImage("reference", references[0].convert("RGB")))
    facts["pictures"] = [p.kind for p in pictures]
    return Evidence(object_name=name, result=result, facts=facts, images=pictures, max_side=max_side)


def build_facts(
    result: AnomalyResult,
    object_name: str,
    *,
    process_note: str | None = None,
    region_phrases: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """The text facts about a result, as a JSON-serialisable dict.

    Keys: ``object, scorer, backbone, verdict, pred_score, normalized_score, threshold, threshold_source,
    image_size, peak (value and position of the map's maximum), regions (index, position, bbox, area, area_fraction,
    peak_score, mean_score, source, defect_type), total_area_fraction, rule_hits (rule, effect, detail),
    process_note, warnings``.

    A region's ``defect_type`` is the one the rules gave it (``Region.defect_type``: a rule's concept or
    ``unclassified``), so the explanation and the report say what the rule hits say; only a region the rules did not
    type takes its entry of ``region_phrases`` (FiLo's phrase); without either the key is absent.
    """
    amap = result.anomaly_map
    h, w = amap.shape
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    regions = []
    for i, r in enumerate(result.regions):
        entry = {
            "index": i + 1,
            "position": r.position,
            "bbox": list(r.bbox),
            "area": r.area,
            "area_fraction": round(r.area_fraction, 6),
            "peak_score": round(r.peak_score, 6),
            "mean_score": round(r.mean_score, 6),
            "source": r.source,
        }
        if r.defect_type is not None:
            entry["defect_type"] = r.defect_type
        elif region_phrases is not None and i < len(region_phrases) and region_phrases[i]:
            entry["defect_type"] = region_phrases[i]
        regions.append(entry)
    note = (process_note or "").strip() or None
    return {
        "object": object_name,
        "scorer": result.scorer,
        "backbone": result.backbone,
        "verdict": result.verdict,
        "pred_score": round(result.pred_score, 6),
        "normalized_score": round(result.normalized_score, 6),
        "threshold": round(result.threshold, 6),
        "threshold_source": result.threshold_source,
        "image_size": [w, h],
        "peak": {"value": round(float(amap[py, px]), 6), "position": position_word(px + 0.5, py + 0.5, w, h)},
        "regions": regions,
        "total_area_fraction": round(float(sum(r.area_fraction for r in result.regions)), 6),
        "rule_hits": [{"rule": hit.rule, "effect": hit.effect, "detail": hit.detail} for hit in result.rule_hits],
        "process_note": note,
        "warnings": list(result.warnings),
    }


# ---------------------------------------------------------------------- fine-grained phrases (FiLo)
def load_phrase_bank() -> dict[str, Any] | None:
    """``prompts/filo.yaml`` when it exists (``classes: {name: [phrases]}``, ``generic: [phrases]``), else None."""
    from vlad.resources import load_prompt_file

    try:
        return load_prompt_file("filo")
    except (ConfigError, FileNotFoundError):
        logger.info("no prompts/filo.yaml: regions get no fine-grained defect phrase")
        return None


def phrases_for(bank: dict[str, Any], object_name: str) -> list[str]:
    """The phrases of the object's kind (see :func:`vlad.finegrained.resolve_kind`: ``metal_nut``, ``pcb3`` and other
    dataset spellings are normalised) plus the generic ones, without phrases naming things a camera cannot see (the
    bank's ``non_visual_words``)."""
    from vlad.finegrained import GENERIC, kind_phrases

    own, source = kind_phrases(bank, object_name)
    own = [] if source == GENERIC else own
    banned = [w.lower() for w in bank.get("non_visual_words") or []]
    out: list[str] = []
    for phrase in [*own, *(bank.get("generic") or [])]:
        text = str(phrase).strip()
        if text and text not in out and not any(b in text.lower() for b in banned):
            out.append(text)
    return out


def best_phrases(
    image: Image.Image,
    result: AnomalyResult,
    object_name: str,
    backbone: ClipBackbone,
    bank: dict[str, Any] | None = None,
) -> list[str | None]:
    """Picks, for each region, the defect phrase whose CLIP text embedding is closest to the region's patch tokens.

    The region's feature is the mean of the backbone's last-layer projected patch tokens whose cells overlap the
    region's box; each phrase is embedded through the bank's first template (``a photo of a {object} with {detail}
    at the {position}.``), with the region's position word. Cosine similarity decides.

    Args:
        image: the RGB photo.
        result: its result (regions in photo pixels).
        object_name: the product name.
        backbone: an open_clip backbone (:class:`~vlad.backbones.clip.ClipBackbone`).
        bank: phrase bank; default :func:`load_phrase_bank`.

    Returns:
        One phrase (or None when there is no bank or no phrase) per region, in the result's region order.
    """
    bank = load_phrase_bank() if bank is None else bank
    candidates = phrases_for(bank, object_name) if bank else []
    if not candidates or not result.regions:
        return [None] * len(result.regions)
    import torch
    import torch.nn.functional as F

    template = (bank.get("templates") or ["a photo of a {object} with {detail} at the {position}."])[0]
    x = backbone.preprocess([image])
    out = backbone.forward_visual(x, layers=[-1])
    tokens = F.normalize(next(iter(out.patch_tokens.values()))[0].float(), dim=-1)  # (N, D)
    gh, gw = out.grid
    grid = tokens.reshape(gh, gw, -1)
    w, h = image.size
    picked: list[str | None] = []
    for region in result.regions:
        x0, y0, x1, y1 = region.bbox
        c0, c1 = int(x0 * gw / w), max(int(math.ceil(x1 * gw / w)), int(x0 * gw / w) + 1)
        r0, r1 = int(y0 * gh / h), max(int(math.ceil(y1 * gh / h)), int(y0 * gh / h) + 1)
        feat = F.normalize(grid[r0:r1, c0:c1].reshape(-1, grid.shape[-1]).mean(0), dim=-1)
        prompts = [template.format(object=object_name, detail=p, position=region.position) for p in candidates]
        with torch.no_grad():
            sims = backbone.encode_text(prompts) @ feat.to(backbone.device)
        picked.append(candidates[int(torch.argmax(sims))])
    return picked
