"""Rules acting on the pipeline: before scoring (prompts and LAFT features) and after it (regions and the verdict).

Before scoring, :func:`configure_scorer`:

- defect concepts join the scorer's abnormal prompt set as ``"{} with <concept>"`` and acceptable ones the normal set
  (``scorer.ensemble.extra_anomalous`` / ``extra_normal``: winclip, crane, filo; FiLo only uses the normal set, its
  abnormal prompts come from ``prompts/filo.yaml``). Scorers without a prompt ensemble (laft, musc) or with learned
  text features get a ``not applicable`` hit per rule, never silence.
- ignore / focus concept rules become one LAFT transform (:func:`vlad.laft.build_transform`), set as
  ``scorer.transform`` (every scorer steers its features with it). A transform the scorer already had (its
  ``concepts=`` option) is combined with the rules' one: when it is a :class:`~vlad.laft.ConceptTransform` its concepts
  are rebuilt together with the rules' into one transform (LAFT's union of subspaces, each concept's k chosen by
  explained variance -- a ``components=`` given to the laft scorer is not carried over); any other callable runs
  first and the rules' transform after it. Reconfiguring starts again from what the scorer had before the first call.
  A few-shot scorer's reference features depend on the transform, so a changed transform needs ``references=`` to
  fit them again; changed prompts clear its calibrated thresholds (they are recomputed on the next score).

After scoring, :func:`apply_rules` changes only ``pred_label``, ``pred_mask``, ``regions``, ``rule_hits`` and
``meta`` (``verdict_before_rules``, ``region_severities``); ``pred_score``, ``normalized_score`` and the anomaly map are
never changed. In order:

1. region rules (only / ignore by area or box) and size rules without a concept suppress regions; a region is inside
   an area when its centroid is, and a suppressed region's pixels leave ``pred_mask``;
2. when acceptable, defect or concept size rules exist, each remaining region's crop is compared by CLIP with those
   concepts and with a generic "other defect" prompt set (``prompts/rules.yaml``); the best match names the region
   (a concept must beat "other defect" to claim it);
3. concept size rules, then acceptable rules (with their location: area, or a part found by the detector) suppress
   regions; defect rules give the regions they name their severity;
4. required objects are counted with the detector; too few fail the part;
5. the verdict: when the rules touched any region (or the policy ranks a remaining region below ``fail_at``), the part
   fails when a remaining region's severity is at least ``fail_at`` -- an unnamed region (severity
   ``policy.default_severity``) only counts when the scorer itself judged the image anomalous, so rules raise a
   verdict only by naming a defect or a missing object. Otherwise the scorer's label stands. A failed required-object
   check always fails the part.

Every change is a :class:`~vlad.result.RuleHit` carrying the user's words. Deviation from a literal reading of
"% of the part": the part is the detector's best box for the product name that holds the region's centroid (its
largest-score box otherwise); without a detector, or when it finds nothing, the size is measured against the image and
a hit says so. torch is imported only inside the CLIP matching.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from vlad.errors import ConfigError
from vlad.result import AnomalyResult, Region, RuleHit
from vlad.rules.parse import concept_key
from vlad.rules.schema import (
    AcceptableRule,
    Area,
    DefectRule,
    FocusConceptRule,
    IgnoreConceptRule,
    MinSizeRule,
    RegionRule,
    RequiredObjectRule,
    RuleSet,
    rule_tables,
    severity_rank,
)

logger = logging.getLogger(__name__)

_NO_EXTRA_ANOMALOUS: dict[str, str] = {}  # scorers whose abnormal prompts ignore the ensemble's extra states
_CROP_PAD = 0.5  # each side of a region's box grows by this share of its size before cropping
_MIN_CROP_FRACTION = 0.125  # crops are at least this share of the image's shorter side


# ---------------------------------------------------------------------------------------------------- before scoring
@dataclass
class _Baseline:
    transform: Any
    extra_normal: tuple[str, ...]
    extra_anomalous: tuple[str, ...]


def configure_scorer(
    scorer: Any, ruleset: RuleSet, *, references: Sequence[Any] | None = None, object_name: str = "object"
) -> list[RuleHit]:
    """Puts the concept rules into a scorer: prompts (defect / acceptable) and the LAFT transform (ignore / focus).

    Args:
        scorer: a :class:`~vlad.scorers.base.Scorer`.
        ruleset: the rules; calling again with other rules replaces the earlier rules' prompts and transform.
        references: the normal references to fit again when the scorer is few-shot and the transform changes (their
            features were computed with the old one).
        object_name: fills ``{object}`` in the LAFT prompts.

    Returns:
        one hit per concept rule: ``prompt added``, ``features transformed`` or ``not applicable`` (with the reason).

    Raises:
        ConfigError: the scorer already holds references, the transform changes and ``references`` is None; or the
            rules both ignore and focus on one concept.
    """
    baseline = scorer.rules_state.setdefault("baseline", _baseline(scorer))
    transform_hits = _configure_transform(scorer, ruleset, baseline, references, object_name)  # may raise: first
    hits, prompts_changed = _configure_prompts(scorer, ruleset, baseline)
    if prompts_changed:
        scorer.invalidate_calibration()  # calibrated thresholds depend on the text prototypes
    return hits + transform_hits


def _baseline(scorer: Any) -> _Baseline:
    ensemble = getattr(scorer, "ensemble", None)
    normal = tuple(getattr(ensemble, "extra_normal", ()))
    anomalous = tuple(getattr(ensemble, "extra_anomalous", ()))
    return _Baseline(getattr(scorer, "transform", None), normal, anomalous)


def _prompt_block(scorer: Any) -> str | None:
    """Why the scorer cannot take prompt rules, or None when it can."""
    if getattr(scorer, "ensemble", None) is None:
        return f"scorer {scorer.name} has no prompt ensemble (it compares image features only)"
    if getattr(scorer, "uses_learned_text", False):
        return f"scorer {scorer.name} uses learned text features instead of prompts"
    return None


def _configure_prompts(scorer: Any, ruleset: RuleSet, baseline: _Baseline) -> tuple[list[RuleHit], bool]:
    rules = ruleset.of_kind(DefectRule, AcceptableRule)
    ensemble = getattr(scorer, "ensemble", None)
    normal, anomalous = list(baseline.extra_normal), list(baseline.extra_anomalous)
    hits = []
    for rule in rules:
        reason = _prompt_block(scorer)
        if reason is None and isinstance(rule, DefectRule):
            reason = _NO_EXTRA_ANOMALOUS.get(scorer.name)
            reason = None if reason is None else f"scorer {scorer.name}: {reason}"
        if reason is not None:
            hits.append(RuleHit(rule.label, "not applicable", {"scorer": scorer.name, "reason": reason}))
            continue
        target, name = (anomalous, "anomalous") if isinstance(rule, DefectRule) else (normal, "normal")
        phrase = prompt_phrase(rule)
        if phrase not in target:
            target.append(phrase)
        hits.append(RuleHit(rule.label, "prompt added", {"set": name, "prompt": phrase, "scorer": scorer.name}))
    if ensemble is None:
        return hits, False
    changed = (tuple(normal), tuple(anomalous)) != (ensemble.extra_normal, ensemble.extra_anomalous)
    ensemble.extra_normal, ensemble.extra_anomalous = tuple(normal), tuple(anomalous)
    return hits, changed


def prompt_phrase(rule: DefectRule | AcceptableRule) -> str:
    """The prompt-ensemble state for a rule: ``"{} with <concept>"`` (plus where, for acceptable rules)."""
    words: list[str] = []
    if isinstance(rule, AcceptableRule) and rule.where is not None:
        words = [f"in the {p}" for p in rule.where.positions]
        if rule.where.object:
            words.append(f"on the {rule.where.object}")
    return " ".join(["{} with " + rule.concept, " or ".join(words)]).strip()


def _configure_transform(
    scorer: Any, ruleset: RuleSet, baseline: _Baseline, references: Sequence[Any] | None, object_name: str
) -> list[RuleHit]:
    rules = ruleset.of_kind(IgnoreConceptRule, FocusConceptRule)
    if not rules:
        if getattr(scorer, "transform", None) is not baseline.transform:
            _set_transform(scorer, baseline.transform, references)
        return []
    from vlad.laft import ConceptTransform, build_transform

    clauses = [("ignore" if isinstance(r, IgnoreConceptRule) else "guide", r.concept) for r in rules]
    own = baseline.transform
    if isinstance(own, ConceptTransform):
        clauses = _transform_clauses(own) + clauses
    key = (_clauses_text(clauses), object_name)
    built = scorer.rules_state.get("transform")
    if built is not None and built[0] == key and scorer.transform is built[1]:
        transform = built[1]  # the same rules again: nothing to rebuild or re-fit
    else:
        transform = build_transform(scorer.backbone, key[0], object_name=object_name)
        if own is not None and not isinstance(own, ConceptTransform):
            transform = ChainedTransform(own, transform)
        _set_transform(scorer, transform, references)
        scorer.rules_state["transform"] = (key, transform)
    detail = {"transform": transform.describe(), "scorer": scorer.name}
    return [RuleHit(r.label, "features transformed", {**detail, "concept": r.concept}) for r in rules]


def _transform_clauses(transform: Any) -> list[tuple[str, str]]:
    """The (mode, concept) clauses a ConceptTransform was built from."""
    if transform.mode == "ignore":
        return [("ignore", c) for c in transform.basis.concepts]
    return [("ignore", c) for c in transform.ignored] + [("guide", c) for c in transform.basis.concepts]


def _clauses_text(clauses: list[tuple[str, str]]) -> str:
    """``[("ignore", "colour"), ("guide", "cracks")]`` -> ``"ignore colour; focus on cracks"`` (no repeats)."""
    seen = list(dict.fromkeys(clauses))
    ignored = [c.replace("_", " ") for m, c in seen if m == "ignore"]
    guided = [c.replace("_", " ") for m, c in seen if m == "guide"]
    parts = []
    if ignored:
        parts.append("ignore " + " and ".join(ignored))
    if guided:
        parts.append("focus on " + " and ".join(guided))
    return "; ".join(parts)


def _set_transform(scorer: Any, transform: Any, references: Sequence[Any] | None) -> None:
    try:
        scorer.set_transform(transform, references=references)
    except ConfigError as exc:
        raise ConfigError(f"{exc}: pass references= to configure_scorer, or configure before fit()") from exc


@dataclass(frozen=True, eq=False)
class ChainedTransform:
    """Two feature transforms one after the other: ``then(first(x))``."""

    first: Any
    then: Any

    def __call__(self, x: Any) -> Any:
        """(..., D) -> (..., D)."""
        return self.then(self.first(x))

    def describe(self) -> str:
        first = self.first.describe() if hasattr(self.first, "describe") else type(self.first).__name__
        return f"{first}, then {self.then.describe()}"


# ---------------------------------------------------------------------------------------------------- after scoring
@dataclass
class _Finding:
    """One region of the result and what the rules decided about it."""

    region: Region
    kept: bool = True
    suppressed_by: str | None = None
    severity: str | None = None
    severity_rule: str | None = None
    concept: str | None = None
    similarity: dict[str, float] = field(default_factory=dict)


@dataclass
class _Context:
    result: AnomalyResult
    ruleset: RuleSet
    image: Image.Image | None
    backbone: Any
    detector: Any
    object_name: str
    hits: list[RuleHit] = field(default_factory=list)
    _boxes: dict[str, list[tuple[float, float, float, float, float]]] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the anomaly map."""
        return self.result.image_size

    def hit(self, rule: Any, effect: str, **detail: Any) -> None:
        self.hits.append(RuleHit(rule.label, effect, detail))

    def boxes(self, phrase: str) -> list[tuple[float, float, float, float, float]] | None:
        """Detected ``(x0, y0, x1, y1, score)`` of a phrase in map pixels, best first; None without a detector."""
        if self.detector is None or self.image is None:
            return None
        if phrase not in self._boxes:
            sx, sy = self.size[0] / self.image.width, self.size[1] / self.image.height
            found = self.detector.detect(self.image, [phrase])
            self._boxes[phrase] = sorted(
                ((b.xyxy[0] * sx, b.xyxy[1] * sy, b.xyxy[2] * sx, b.xyxy[3] * sy, b.score) for b in found),
                key=lambda b: -b[4],
            )
        return self._boxes[phrase]


def apply_rules(
    result: AnomalyResult,
    ruleset: RuleSet,
    *,
    image: Any = None,
    backbone: Any = None,
    detector: Any = None,
    object_name: str = "object",
    scorer_hits: Sequence[RuleHit] = (),
) -> AnomalyResult:
    """Applies the region, size, concept, required-object and policy rules to a scored result.

    Args:
        result: the scorer's result.
        ruleset: the rules.
        image: the photo the result is about (path, PIL image or uint8 array); needed for concept matching and the
            detector. Its size may differ from the map's; boxes are rescaled.
        backbone: a CLIP backbone (``preprocess``, ``forward_visual``, ``encode_text``) for concept matching.
        detector: an object with ``detect(image, phrases)`` returning boxes (:mod:`vlad.grounding`), for required
            objects, "% of the part" sizes and acceptable rules located on a part.
        object_name: the product name (prompts and "% of the part").
        scorer_hits: hits from :func:`configure_scorer`, put first in ``rule_hits``.

    Returns:
        a copy of ``result``; see the module docstring for what changes.
    """
    ctx = _Context(result, ruleset, _as_image(image), backbone, detector, object_name.strip() or "object")
    findings = [_Finding(r) for r in result.regions]
    _apply_regions(ctx, findings)
    _apply_sizes(ctx, findings, with_concept=False)
    if _concept_rules(ruleset) and any(f.kept for f in findings):
        _match_concepts(ctx, findings)
    _apply_sizes(ctx, findings, with_concept=True)
    _apply_acceptable(ctx, findings)
    _apply_defects(ctx, findings)
    required_failed = _check_required(ctx)
    label = _verdict(ctx, findings, required_failed)
    return result.replace(
        pred_label=label,
        pred_mask=_remove_suppressed(result.pred_mask, [f.region for f in findings if not f.kept]),
        regions=tuple(f.region for f in findings if f.kept),
        rule_hits=(*result.rule_hits, *scorer_hits, *ctx.hits),
        meta={**result.meta, "verdict_before_rules": result.verdict, "region_severities": _severities(ctx, findings)},
    )


def _as_image(image: Any) -> Image.Image | None:
    if image is None or isinstance(image, Image.Image):
        return None if image is None else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if isinstance(image, (str, Path)):
        from vlad.data.images import load_image

        return load_image(image)
    raise ConfigError(f"image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")


def _concept_rules(ruleset: RuleSet) -> list[Any]:
    sized = [r for r in ruleset.of_kind(MinSizeRule) if r.concept]
    return [*ruleset.of_kind(AcceptableRule, DefectRule), *sized]


def _suppress(ctx: _Context, finding: _Finding, rule: Any, **detail: Any) -> None:
    finding.kept, finding.suppressed_by = False, rule.label
    ctx.hit(rule, "region suppressed", **_region_detail(finding.region), **detail)


def _region_detail(region: Region) -> dict[str, Any]:
    return {
        "bbox": list(region.bbox),
        "position": region.position,
        "area": region.area,
        "area_fraction": round(region.area_fraction, 6),
    }


def _centroid_in(region: Region, boxes: list[tuple[float, ...]], size: tuple[int, int]) -> bool:
    """True when the region's centroid lies in one of the boxes (image fractions)."""
    x, y = region.centroid[0] / size[0], region.centroid[1] / size[1]
    return any(x0 <= x < x1 + (x1 >= 1) and y0 <= y < y1 + (y1 >= 1) for x0, y0, x1, y1 in boxes)


def _apply_regions(ctx: _Context, findings: list[_Finding]) -> None:
    for rule in ctx.ruleset.of_kind(RegionRule):
        boxes = rule.area.boxes()
        for f in findings:
            if f.kept and _centroid_in(f.region, boxes, ctx.size) != (rule.mode == "only"):
                where = "outside" if rule.mode == "only" else "inside"
                _suppress(ctx, f, rule, reason=f"centroid {where} {rule.area.describe().removeprefix('in ')}")


def _apply_sizes(ctx: _Context, findings: list[_Finding], *, with_concept: bool) -> None:
    for rule in ctx.ruleset.of_kind(MinSizeRule):
        if bool(rule.concept) != with_concept:
            continue
        for f in findings:
            if not f.kept or (rule.concept and not _names(f, rule.concept)):
                continue
            size, measured = _region_size(ctx, rule, f.region)
            if size < rule.value:
                _suppress(ctx, f, rule, size=round(size, 4), unit=measured, limit=rule.value, concept=f.concept)


def _names(finding: _Finding, concept: str) -> bool:
    """True when concept matching named the finding with ``concept`` (plural and articles do not matter)."""
    return finding.concept is not None and concept_key(finding.concept) == concept_key(concept)


def _region_size(ctx: _Context, rule: MinSizeRule, region: Region) -> tuple[float, str]:
    """The region's size in the rule's unit (or % of the image when the part cannot be found) and that unit."""
    if rule.unit == "pixels":
        return float(region.area), "pixels"
    if rule.unit == "percent_object":
        box = _object_box(ctx, rule, region)
        if box is not None:
            return 100.0 * region.area / max((box[2] - box[0]) * (box[3] - box[1]), 1e-9), "percent_object"
    return 100.0 * region.area_fraction, "percent_image"


def _object_box(ctx: _Context, rule: MinSizeRule, region: Region) -> tuple[float, ...] | None:
    boxes = ctx.boxes(ctx.object_name)
    if not boxes:
        why = "no detector was given" if boxes is None else f"the detector found no {ctx.object_name!r}"
        if not any(h.rule == rule.label and h.effect == "measured against the image" for h in ctx.hits):
            ctx.hit(rule, "measured against the image", reason=f"{why}; the size is taken as % of the image")
        return None
    cx, cy = region.centroid
    holding = [b for b in boxes if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
    return (holding or boxes)[0]


# ---------------------------------------------------------------------------------------------------- concepts
def _match_concepts(ctx: _Context, findings: list[_Finding]) -> None:
    """Names each kept region with the concept its crop matches best (or None for "other defect")."""
    rules = _concept_rules(ctx.ruleset)
    bb = ctx.backbone
    if ctx.image is None or not all(hasattr(bb, a) for a in ("preprocess", "forward_visual", "encode_text")):
        need = "the image" if bb is not None else "a CLIP backbone and the image"
        for rule in rules:
            ctx.hit(rule, "not evaluated", reason=f"comparing regions with {rule.concept!r} needs {need}")
        return
    concepts = list(dict.fromkeys(r.concept for r in rules))
    kept = [f for f in findings if f.kept]
    crops = [_crop(ctx.image, ctx.size, f.region) for f in kept]
    sims = concept_similarities(bb, crops, concepts, ctx.object_name)
    for f, row in zip(kept, sims, strict=True):
        best = int(np.argmax(row))
        f.concept = concepts[best] if best < len(concepts) else None
        f.similarity = {c: round(float(s), 4) for c, s in zip([*concepts, "other defect"], row, strict=True)}


def _crop(image: Image.Image, map_size: tuple[int, int], region: Region) -> Image.Image:
    """The region's box (map pixels) in the image, padded and at least an eighth of the image's shorter side."""
    w, h = image.size
    sx, sy = w / map_size[0], h / map_size[1]
    x0, y0, x1, y1 = region.bbox
    cx, cy = (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy
    side = _MIN_CROP_FRACTION * min(w, h)
    half_w = max((x1 - x0) * sx * (1 + 2 * _CROP_PAD), side) / 2
    half_h = max((y1 - y0) * sy * (1 + 2 * _CROP_PAD), side) / 2
    box = (
        max(0, int(cx - half_w)),
        max(0, int(cy - half_h)),
        min(w, int(np.ceil(cx + half_w))),
        min(h, int(np.ceil(cy + half_h))),
    )
    return image.crop(box)


def concept_similarities(backbone: Any, crops: list[Image.Image], concepts: list[str], object_name: str) -> np.ndarray:
    """(R, C + 1) cosine similarities of R crops with C concepts and, last, the generic "other defect" prompts.

    Each concept's prototype is the renormalised mean of its normalised prompt embeddings (``concept_templates`` of
    ``prompts/rules.yaml``); each crop's embedding is the backbone's normalised global embedding.
    """
    import torch
    import torch.nn.functional as F

    tables = rule_tables()
    groups = [[t.format(concept=c, object=object_name) for t in tables["concept_templates"]] for c in concepts]
    groups.append([t.format(object=object_name) for t in tables["other_defect_prompts"]])
    with torch.no_grad():
        text = torch.stack([F.normalize(backbone.encode_text(g).float().mean(0), dim=-1) for g in groups])
        x = backbone.preprocess(crops, getattr(backbone, "native_size", None))
        images = F.normalize(backbone.forward_visual(x).global_embedding.float(), dim=-1)
    return (images @ text.to(images.device).T).cpu().numpy()


def _location_ok(ctx: _Context, where: Area | None, region: Region) -> tuple[bool, str | None]:
    """Whether the region lies where an acceptable rule allows it, and a note when that could not be checked."""
    if where is None:
        return True, None
    if (where.positions or where.box is not None) and _centroid_in(region, where.boxes(), ctx.size):
        return True, None
    if where.object:
        boxes = ctx.boxes(where.object)
        if boxes is None:
            return True, f"not checked that it lies on the {where.object}: no detector was given"
        cx, cy = region.centroid
        return any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes), None
    return False, None


def _apply_acceptable(ctx: _Context, findings: list[_Finding]) -> None:
    for rule in ctx.ruleset.of_kind(AcceptableRule):
        for f in findings:
            if not f.kept or not _names(f, rule.concept):
                continue
            ok, note = _location_ok(ctx, rule.where, f.region)
            if ok:
                extra = {"note": note} if note else {}
                _suppress(ctx, f, rule, concept=f.concept, similarity=f.similarity, **extra)


def _apply_defects(ctx: _Context, findings: list[_Finding]) -> None:
    for rule in ctx.ruleset.of_kind(DefectRule):
        for f in findings:
            if f.kept and _names(f, rule.concept):
                f.severity, f.severity_rule = rule.severity, rule.label
                ctx.hit(
                    rule,
                    f"severity {rule.severity}",
                    **_region_detail(f.region),
                    concept=f.concept,
                    similarity=f.similarity,
                )


# ---------------------------------------------------------------------------------------------------- verdict
def _check_required(ctx: _Context) -> list[str]:
    """The labels of the required-object rules that failed."""
    failed = []
    for rule in ctx.ruleset.of_kind(RequiredObjectRule):
        boxes = ctx.boxes(rule.object)
        if boxes is None:
            need = "an object detector" if ctx.detector is None else "the image"
            ctx.hit(rule, "not evaluated", reason=f"checking that a {rule.object} is present needs {need}")
            continue
        if len(boxes) < rule.min_count:
            failed.append(rule.label)
            spec = str(getattr(ctx.detector, "spec", type(ctx.detector).__name__))
            ctx.hit(
                rule,
                "required object missing",
                object=rule.object,
                found=len(boxes),
                required=rule.min_count,
                detector=spec,
            )
    return failed


def _verdict(ctx: _Context, findings: list[_Finding], required_failed: list[str]) -> bool:
    policy = ctx.ruleset.policy
    before = ctx.result.pred_label
    kept = [f for f in findings if f.kept]
    fail_rank = severity_rank(policy.fail_at)
    below = [f for f in kept if f.severity is None and severity_rank(policy.default_severity) < fail_rank]
    touched = len(kept) < len(findings) or any(f.severity for f in kept) or bool(below)
    failing = [
        f
        for f in kept
        if severity_rank(f.severity or policy.default_severity) >= fail_rank and (before or f.severity is not None)
    ]
    label = (bool(failing) if touched else before) or bool(required_failed)
    if label != before:
        if label:
            causes = required_failed or [f.severity_rule for f in failing if f.severity_rule]
        else:
            causes = [f.suppressed_by for f in findings if f.suppressed_by] + ([policy.label] * bool(below))
        detail = {"before": "anomalous" if before else "normal", "after": "anomalous" if label else "normal"}
        ctx.hits += [
            RuleHit(c, "verdict raised" if label else "verdict lowered", dict(detail))
            for c in dict.fromkeys(c for c in causes if c)
        ]
    return label


def _severities(ctx: _Context, findings: list[_Finding]) -> list[dict[str, Any]]:
    default = ctx.ruleset.policy.default_severity
    return [
        {"bbox": list(f.region.bbox), "severity": f.severity or default, "concept": f.concept, "rule": f.severity_rule}
        for f in findings
        if f.kept
    ]


def _remove_suppressed(mask: np.ndarray, regions: list[Region]) -> np.ndarray:
    """(H, W) bool mask without the pixels of the suppressed regions (their 8-connected components; a region that
    matches no component loses the mask pixels inside its box)."""
    out = np.asarray(mask, dtype=bool).copy()
    if not regions:
        return out
    labels, count = ndimage.label(out, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    index = {}
    for i, slc in enumerate(ndimage.find_objects(labels), start=1):
        if slc is not None:
            index[(slc[1].start, slc[0].start, slc[1].stop, slc[0].stop, int(areas[i]))] = i
    for region in regions:
        label = index.get((*region.bbox, region.area))
        if label is not None:
            out[labels == label] = False
        else:
            x0, y0, x1, y1 = region.bbox
            out[y0:y1, x0:x1] = False
    return out
