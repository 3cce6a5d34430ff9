"""Training dialogues for an inspection explainer, made from normal images with planted defects (``vlad
make-dialogues``).

Each picked normal image is kept as it is (normal) or gets a defect planted by
:func:`vlad.data.synthetic.synthesize_anomaly` inside a :func:`~vlad.data.synthetic.perlin_mask` region (anomalous),
alternating, so the set is balanced. Its mask is known, so every answer is exact. Three records are written per
image, one per turn kind:

- ``anomalygpt``: the photo and "Is there any anomaly in the image?" -> "Yes, there is an anomaly at the top left of
  the image." / "No, there are no anomalies in the image." (AnomalyGPT's wording). The position word is
  :func:`vlad.regions.position_word` of the mask's centroid (the mean of its pixel centres), the 3x3 words vlad uses
  everywhere.
- ``region``: a crop around the defect (around a random spot for a normal image) and "What is in this region?" ->
  a description of the planted defect kind (Triad's region turns).
- ``evidence``: vlad's own report request -- the system message, the photo, the heat-map overlay and the facts,
  built by :func:`vlad.explain.evidence.build_evidence` and :func:`vlad.explain.explainer.report_messages` with the
  mask as the anomaly map -- answered by the strict JSON report of :mod:`vlad.explain.schema`, so a tuned model reads
  vlad's evidence natively.

The layout (one JSON object per line of ``dialogues.jsonl``, images as files under the set's folder, paths relative
to it) is described in docs/explainer.md, "Training dialogues".
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlad.data.synthetic import ANOMALY_MODES, perlin_mask, synthesize_anomaly
from vlad.errors import ConfigError
from vlad.explain.evidence import downscale
from vlad.regions import find_regions, position_word
from vlad.result import AnomalyResult

logger = logging.getLogger(__name__)

DIALOGUES_FILE = "dialogues.jsonl"
SUMMARY_FILE = "summary.json"
TURN_KINDS = ("anomalygpt", "region", "evidence")
QUESTIONS = ("Is there any anomaly in the image?", "Is there any anomaly in the image? Answer yes or no.")
ANSWER_YES = "Yes, there is an anomaly at the {position} of the image."
ANSWER_NO = "No, there are no anomalies in the image."
REGION_QUESTION = "This is a close-up of a region of the {object}. What is in this region?"
DEFECT_WORDS = {
    "texture": ("foreign texture", "a patch of foreign texture that does not belong on the {object}"),
    "colour": ("discolouration", "a discoloured patch with a strong colour cast on the {object}"),
    "dark": ("dark stain", "a dark stain, much darker than the surrounding surface of the {object}"),
    "bright": ("bright spot", "a bright, washed-out spot, much lighter than the surrounding surface of the {object}"),
}
"""Per planted mode: the report's ``defect_type`` and the description of the region turn."""
REGION_NORMAL = "The normal surface of the {object}; there is no defect in this region."
MAX_SIDE = 512
CONFIDENCE = 0.9


@dataclass(frozen=True)
class Sample:
    """One picked image: ``index``, the source file, whether a defect was planted, its mode and mask (H, W) bool."""

    index: int
    source: Path
    anomalous: bool
    mode: str | None
    image: Image.Image
    mask: np.ndarray


def mask_position(mask: np.ndarray) -> str:
    """The position word of a mask's centroid (mean of its pixel centres, index + 0.5); ``mask`` (H, W) bool, not
    empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ConfigError("the mask is empty: it has no position")
    h, w = mask.shape
    return position_word(float(xs.mean() + 0.5), float(ys.mean() + 0.5), w, h)


def blind_answer(mask: np.ndarray) -> str:
    """AnomalyGPT's answer for a mask (H, W): yes with the centroid's position word, or no when it is empty."""
    return ANSWER_YES.format(position=mask_position(mask)) if mask.any() else ANSWER_NO


# ---------------------------------------------------------------------- samples
def plan_samples(
    sources: Sequence[Path], n: int, seed: int, load: Callable[[Path], Image.Image], max_side: int = MAX_SIDE
) -> list[Sample]:
    """Draws ``n`` samples: sources cycled in a seeded order, even indices normal, odd ones anomalous (modes cycling
    through :data:`~vlad.data.synthetic.ANOMALY_MODES`), masks covering 2..25 % of the image.

    Args:
        sources: normal image files (at least one).
        n: how many samples (at least 1).
        seed: the random seed; the output depends only on the arguments and the files.
        load: reads one file as an RGB PIL image.
        max_side: images are shrunk so their longer side is at most this many pixels.
    """
    rng = np.random.default_rng(seed)
    order = [sources[i] for i in rng.permutation(len(sources))]
    samples = []
    for i in range(n):
        source = order[i % len(order)]
        image = downscale(load(source), max_side)
        pixels = np.asarray(image, dtype=np.uint8)
        h, w = pixels.shape[:2]
        if i % 2 == 0:
            samples.append(Sample(i, source, False, None, image, np.zeros((h, w), bool)))
            continue
        mode = ANOMALY_MODES[(i // 2) % len(ANOMALY_MODES)]
        region = perlin_mask((h, w), rng, min_area_fraction=0.02, max_area_fraction=0.25)
        bad, region = synthesize_anomaly(pixels, rng, mask=region, mode=mode)
        samples.append(Sample(i, source, True, mode, Image.fromarray(bad), region))
    return samples


# ---------------------------------------------------------------------- records
def mask_result(mask: np.ndarray) -> AnomalyResult:
    """The result of a detector that found exactly the mask (H, W): the map is the mask (0/1), the score 1 when it
    has pixels and 0 otherwise, the threshold 0.5."""
    amap = mask.astype(np.float32)
    anomalous = bool(mask.any())
    return AnomalyResult(
        pred_score=1.0 if anomalous else 0.0,
        normalized_score=1.0 if anomalous else 0.0,
        anomaly_map=amap,
        pred_mask=mask.astype(bool),
        pred_label=anomalous,
        threshold=0.5,
        pixel_threshold=0.5,
        regions=find_regions(amap, mask) if anomalous else (),
        scorer="synthetic-mask",
        backbone="none",
    )


def region_box(sample: Sample, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A square box ``(x0, y0, x1, y1)`` around the defect's bounding box (or a random spot of a normal image), at
    least a third of the shorter side, inside the image."""
    h, w = sample.mask.shape
    side = max(8, min(h, w) // 3)
    if sample.anomalous:
        ys, xs = np.nonzero(sample.mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        side = max(side, x1 - x0 + 4, y1 - y0 + 4)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    else:
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
    side_x, side_y = min(side, w), min(side, h)
    bx = int(min(max(round(cx - side_x / 2), 0), w - side_x))
    by = int(min(max(round(cy - side_y / 2), 0), h - side_y))
    return bx, by, bx + side_x, by + side_y


def report_answer(sample: Sample, facts: dict[str, Any], object_name: str) -> dict[str, Any]:
    """The strict JSON report for a sample (the keys of :class:`~vlad.explain.schema.AnomalyReport`, validated)."""
    from vlad.explain.schema import AnomalyReport
    from vlad.explain.template import template_report

    base = template_report(facts)
    if not sample.anomalous:
        rationale = f"The {object_name} looks uniform everywhere, and the detector found no anomalous area."
        return AnomalyReport(**{**base.model_dump(), "rationale": rationale, "confidence": CONFIDENCE}).model_dump()
    kind, description = DEFECT_WORDS[sample.mode or "texture"]
    position = mask_position(sample.mask)
    rationale = f"There is {description.format(object=object_name)} at the {position}, where the heat map is hot."
    report = {
        **base.model_dump(),
        "defect_type": kind,
        "location": position,
        "rationale": rationale,
        "model_says_anomalous": True,
        "confidence": CONFIDENCE,
    }
    return AnomalyReport(**report).model_dump()


def _image_part(path: str) -> dict[str, str]:
    return {"type": "image", "image": path}


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _record(kind: str, messages: list[dict[str, Any]], answer: str, meta: dict[str, Any]) -> dict[str, Any]:
    turns = [*messages, {"role": "assistant", "content": [_text_part(answer)]}]
    return {"messages": turns, "meta": {**meta, "kind": kind}}


def _save_png(image: Image.Image | np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path, format="PNG")


def evidence_record(sample: Sample, object_name: str, out: Path, meta: dict[str, Any], photo: str) -> dict[str, Any]:
    """The ``evidence`` record: vlad's report request for the sample (pictures saved under ``out/images``, the
    photo reusing the file ``photo``) answered by the sample's report."""
    from vlad.explain.evidence import build_evidence
    from vlad.explain.explainer import report_messages

    evidence = build_evidence(sample.image, mask_result(sample.mask), object_name, max_side=MAX_SIDE)
    messages: list[dict[str, Any]] = []
    for message in report_messages(evidence):
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": [_text_part(content)]})
            continue
        parts, pictures = [], iter(evidence.images)
        for part in content:
            if part.get("type") != "image_url":
                parts.append(_text_part(part["text"]))
                continue
            picture = next(pictures)
            if picture.kind == "image" and picture.image.size == sample.image.size:
                parts.append(_image_part(photo))
                continue
            rel = f"images/{sample.index:05d}_{picture.kind}.png"
            data = part["image_url"]["url"].split(",", 1)[1]
            (out / rel).write_bytes(base64.b64decode(data))
            parts.append(_image_part(rel))
        messages.append({"role": message["role"], "content": parts})
    answer = json.dumps(report_answer(sample, evidence.facts, object_name))
    return _record("evidence", messages, answer, meta)


def sample_records(sample: Sample, object_name: str, out: Path, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The three records of one sample (files written under ``out``)."""
    photo, mask_rel = f"images/{sample.index:05d}.png", f"masks/{sample.index:05d}_mask.png"
    _save_png(sample.image, out / photo)
    _save_png(sample.mask.astype(np.uint8) * 255, out / mask_rel)
    position = mask_position(sample.mask) if sample.anomalous else None
    meta = {
        "index": sample.index,
        "label": int(sample.anomalous),
        "mode": sample.mode,
        "position": position,
        "mask": mask_rel,
        "source": sample.source.name,
    }
    question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    records = [
        _record("anomalygpt", [_user([_image_part(photo), _text_part(question)])], blind_answer(sample.mask), meta)
    ]
    box = region_box(sample, rng)
    crop_rel = f"images/{sample.index:05d}_region.png"
    _save_png(sample.image.crop(box), out / crop_rel)
    if sample.anomalous:
        description = DEFECT_WORDS[sample.mode or "texture"][1].format(object=object_name)
        said = description[0].upper() + description[1:] + "."
    else:
        said = REGION_NORMAL.format(object=object_name)
    asked = _user([_image_part(crop_rel), _text_part(REGION_QUESTION.format(object=object_name))])
    records.append(_record("region", [asked], said, {**meta, "box": list(box)}))
    records.append(evidence_record(sample, object_name, out, meta, photo))
    return records


def _user(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "user", "content": parts}


def write_dialogues(
    sources: Sequence[Path],
    object_name: str,
    out: Path,
    *,
    n: int,
    seed: int = 0,
    load: Callable[[Path], Image.Image] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Writes ``out/dialogues.jsonl``, ``out/images/``, ``out/masks/`` and ``out/summary.json``.

    Args:
        sources: normal image files.
        object_name: the product name used in the questions and answers.
        out: the set's folder (created).
        n: how many images to draw (3 records each); half of them (rounded down) get a planted defect.
        seed: the random seed; the same arguments and files give the same set, byte for byte.
        load: reads one file as a PIL image (default :func:`vlad.data.load_image`).
        progress: ``progress(done, total)`` after each image.

    Returns:
        The summary (also written to ``summary.json``): counts per kind, label and mode, and ``yes_rate``, the share
        of ``anomalygpt`` answers that say yes.
    """
    if not sources:
        raise ConfigError("no normal images to make dialogues from")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of images must be a positive integer, got {n!r}")
    if load is None:
        from vlad.data import load_image as load
    name = object_name.strip() or "object"
    samples = plan_samples(list(sources), n, seed, load)
    rng = np.random.default_rng([seed, 1])
    out.mkdir(parents=True, exist_ok=True)
    kinds: Counter[str] = Counter()
    with (out / DIALOGUES_FILE).open("w", encoding="utf-8") as fh:
        for done, sample in enumerate(samples, start=1):
            for record in sample_records(sample, name, out, rng):
                kinds[record["meta"]["kind"]] += 1
                fh.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(done, len(samples))
    anomalous = sum(s.anomalous for s in samples)
    summary = {
        "object": name,
        "seed": seed,
        "n_images": len(samples),
        "n_records": sum(kinds.values()),
        "records_per_kind": dict(sorted(kinds.items())),
        "n_anomalous": anomalous,
        "n_normal": len(samples) - anomalous,
        "modes": dict(sorted(Counter(s.mode for s in samples if s.mode).items())),
        "yes_rate": anomalous / len(samples),
        "n_sources": len(sources),
        "file": DIALOGUES_FILE,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
