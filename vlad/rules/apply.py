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

After scoring, :func:`apply_rules` changes only ``pred_label``, ``pred_mask``, ``regions`` (each remaining region's
``defect_type``), ``rule_hits`` and ``meta`` (``verdict_before_rules``, ``region_severities``); ``pred_score``,
``normalized_score`` and the anomaly map are never changed. In order:

0. rules in millimetres give a ``not applicable`` hit and do nothing when the rule set has no ``px_per_mm``;
1. region rules (only / ignore by area or box), border rules and size rules without a concept suppress regions,
   whatever the regions look like; a region is inside an area when its centroid is, in the border band when its
   whole box is; a suppressed region's pixels leave ``pred_mask``;
2. when acceptable, defect or size rules naming a concept exist, each remaining region's crop is compared by CLIP
   with those concepts and with a generic "other defect" prompt set (``prompts/rules.yaml``). The region's defect
   type is the best concept only when it beats the second-best candidate (another concept or "other defect") by
   :data:`CONCEPT_MARGIN` in cosine similarity; otherwise it is :data:`~vlad.result.UNCLASSIFIED` and no concept rule
   acts on it. The type is stored once, on the region (``Region.defect_type``), and every hit, the report and the
   explainer read it from there;
3. size rules naming a concept, then acceptable rules (with their location: area, or a part found by the detector)
   suppress the regions of their type; defect rules give the remaining regions of their type (and, with
   ``min_size``, of at least that size; a defect rule naming no concept acts on every region of that size) their
   severity: the highest of those that apply;
4. required objects are counted with the detector; too few fail the part;
5. the verdict: when the rules touched any region (or the policy ranks a remaining region below ``fail_at``), the
   part fails when a remaining region's severity is at least ``fail_at`` -- an unnamed region (severity
   ``policy.default_severity``) only counts when the scorer itself judged the image anomalous, so rules raise a
   verdict only by naming a defect or a missing object. Otherwise the scorer's label stands. A failed required-object
   check always fails the part.

Every change is a :class:`~vlad.result.RuleHit` carrying the user's words. Deviation from a literal reading of
"% of the part": the part is the detector's best box for the product name that holds the region's centroid (its
largest-score box otherwise); without a detector, or when it finds nothing, the size is measured against the image and
a hit says so. A size in ``mm`` is the longer side of the region's box, in ``mm2`` its pixel area, converted with
``px_per_mm`` (pixels of the photo per millimetre). torch is imported only inside the CLIP matching.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from vlad.errors import ConfigError
from vlad.result import UNCLASSIFIED, AnomalyResult, Region, RuleHit
from vlad.rules.parse import concept_key
from vlad.rules.schema import (
    AcceptableRule,
    Area,
    BorderRule,
    DefectRule,
    FocusConceptRule,
    IgnoreConceptRule,
    MinSizeRule,
    RegionRule,
    RequiredObjectRule,
    RuleSet,
    in_mm,
    rule_tables,
    severity_rank,
)

logger = logging.getLogger(__name__)

__all__ = ["CONCEPT_MARGIN", "UNCLASSIFIED", "apply_rules", "concept_similarities", "configure_scorer"]

CONCEPT_MARGIN = 0.02
"""How much higher (cosine similarity) a region's best concept must score than the second-best candidate (another
concept or "other defect") to name the region; below it the region is :data:`~vlad.result.UNCLASSIFIED`. CLIP's
logit scale is 100, so 0.02 means the winner is e^2 ~ 7.4 times as likely as the runner-up in CLIP's own zero-shot
softmax (88 % of a two-way choice); the ties this guards against (random weights, a crop that shows nothing in
particular) differ by about 0.001-0.005. See docs/rules.md."""
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
    if getattr(scorer, "baked", None):  # an exported model (vlad.export): its text prototypes are constants
        return scorer.baked
    if getattr(scorer, "ensemble", None) is None:
        return f"scorer {scorer.name} has no prompt ensemble (it compares image features only)"
    if getattr(scorer, "uses_learned_text", False):
        return f"scorer {scorer.name} uses learned text features instead of prompts"
    return None


def _configure_prompts(scorer: Any, ruleset: RuleSet, baseline: _Baseline) -> tuple[list[RuleHit], bool]:
    rules = [r for r in ruleset.of_kind(DefectRule, AcceptableRule) if r.concept]  # "anything larger than 5 %": none
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
    return " ".join(["{} with " + str(rule.concept), " or ".join(words)]).strip()


def _configure_transform(
    scorer: Any, ruleset: RuleSet, baseline: _Baseline, references: Sequence[Any] | None, object_name: str
) -> list[RuleHit]:
    rules = ruleset.of_kind(IgnoreConceptRule, FocusConceptRule)
    if not rules:
        if getattr(scorer, "transform", None) is not baseline.transform:
            _set_transform(scorer, baseline.transform, references)
        return []
    if getattr(scorer, "baked", None):  # an exported model: its feature transform is part of the graph
        return [RuleHit(r.label, "not applicable", {"scorer": scorer.name, "reason": scorer.baked}) for r in rules]
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
    defect_type: str | None = None
    margin: float | None = None
    similarity: dict[str, float] = field(default_factory=dict)

    @property
    def typed(self) -> dict[str, Any]:
        """The region's defect type and how it was decided, for hit details (empty before concept matching)."""
        if self.defect_type is None:
            return {}
        return {"defect_type": self.defect_type, "margin": self.margin, "similarity": self.similarity}


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

    @property
    def mm_per_map_pixel(self) -> tuple[float, float] | None:
        """Millimetres per map pixel along x and y, or None without ``px_per_mm``. ``px_per_mm`` counts pixels of the
        photo, which may be larger than the map."""
        ppm = self.ruleset.px_per_mm
        if ppm is None:
            return None
        photo = self.image.size if self.image is not None else self.size
        return photo[0] / self.size[0] / ppm, photo[1] / self.size[1] / ppm

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
    """Applies the region, border, size, concept, required-object and policy rules to a scored result.

    Args:
        result: the scorer's result.
        ruleset: the rules (and ``px_per_mm``, for rules in millimetres).
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
    findings = [_Finding(r, defect_type=r.defect_type) for r in result.regions]
    skipped = _unmeasurable(ctx)
    _apply_regions(ctx, findings, skipped)
    _apply_sizes(ctx, findings, skipped, with_concept=False)
    if _concept_rules(ruleset) and any(f.kept for f in findings):
        _match_concepts(ctx, findings)
    _apply_sizes(ctx, findings, skipped, with_concept=True)
    _apply_acceptable(ctx, findings)
    _apply_defects(ctx, findings, skipped)
    required_failed = _check_required(ctx)
    label = _verdict(ctx, findings, required_failed)
    return result.replace(
        pred_label=label,
        pred_mask=_remove_suppressed(result.pred_mask, [f.region for f in findings if not f.kept]),
        regions=tuple(replace(f.region, defect_type=f.defect_type) for f in findings if f.kept),
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


def _unmeasurable(ctx: _Context) -> set[int]:
    """The ids of the rules in millimetres when there is no ``px_per_mm``; each gets a ``not applicable`` hit."""
    if ctx.ruleset.px_per_mm is not None:
        return set()
    out = set()
    for rule in ctx.ruleset.rules:
        if in_mm(rule):
            out.add(id(rule))
            ctx.hit(
                rule,
                "not applicable",
                reason="the rule is in millimetres and the camera's scale is unknown; give px_per_mm (pixels per "
                "millimetre) in the product profile or rules file, or write e.g. '12 pixels per mm'",
            )
    return out


def _concept_rules(ruleset: RuleSet) -> list[Any]:
    sized = [r for r in ruleset.of_kind(MinSizeRule) if r.concept]
    return [r for r in ruleset.of_kind(AcceptableRule, DefectRule) if r.concept] + sized


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


def _apply_regions(ctx: _Context, findings: list[_Finding], skipped: set[int]) -> None:
    for rule in ctx.ruleset.of_kind(RegionRule, BorderRule):
        if id(rule) in skipped:
            continue
        if isinstance(rule, BorderRule):
            band = _band(ctx, rule)
            reason = f"inside the border band ({band[0]:.4g} x {band[1]:.4g} pixels)"
            for f in findings:
                if f.kept and _in_band(f.region, band, ctx.size):
                    _suppress(ctx, f, rule, reason=reason)
            continue
        boxes = rule.area.boxes()
        for f in findings:
            if f.kept and _centroid_in(f.region, boxes, ctx.size) != (rule.mode == "only"):
                where = "outside" if rule.mode == "only" else "inside"
                _suppress(ctx, f, rule, reason=f"centroid {where} {rule.area.describe().removeprefix('in ')}")


def _band(ctx: _Context, rule: BorderRule) -> tuple[float, float]:
    """The border band's width in map pixels along x and y."""
    if rule.unit == "pixels":
        return rule.width, rule.width
    if rule.unit == "percent_side":
        side = rule.width / 100 * min(ctx.size)
        return side, side
    mm = ctx.mm_per_map_pixel
    assert mm is not None  # rules in mm without px_per_mm are skipped
    return rule.width / mm[0], rule.width / mm[1]


def _in_band(region: Region, band: tuple[float, float], size: tuple[int, int]) -> bool:
    """True when the region's whole box lies within the band along one side of the image."""
    x0, y0, x1, y1 = region.bbox
    bx, by = band
    return x1 <= bx or y1 <= by or x0 >= size[0] - bx or y0 >= size[1] - by


def _apply_sizes(ctx: _Context, findings: list[_Finding], skipped: set[int], *, with_concept: bool) -> None:
    for rule in ctx.ruleset.of_kind(MinSizeRule):
        if bool(rule.concept) != with_concept or id(rule) in skipped:
            continue
        for f in findings:
            if not f.kept or (rule.concept and not _names(f, rule.concept)):
                continue
            size, measured = _region_size(ctx, rule, rule.unit, f.region)
            if size < rule.value:
                _suppress(ctx, f, rule, size=round(size, 4), unit=measured, limit=rule.value, **f.typed)


def _names(finding: _Finding, concept: str) -> bool:
    """True when concept matching gave the finding the type ``concept`` (plural and articles do not matter)."""
    return finding.defect_type not in (None, UNCLASSIFIED) and concept_key(finding.defect_type) == concept_key(concept)


def _region_size(ctx: _Context, rule: Any, unit: str, region: Region) -> tuple[float, str]:
    """The region's size in ``unit`` (or % of the image when the part cannot be found) and the unit measured."""
    if unit == "pixels":
        return float(region.area), "pixels"
    if unit in ("mm", "mm2"):
        mm = ctx.mm_per_map_pixel
        assert mm is not None  # rules in mm without px_per_mm are skipped
        if unit == "mm2":
            return region.area * mm[0] * mm[1], "mm2"
        x0, y0, x1, y1 = region.bbox
        return max((x1 - x0) * mm[0], (y1 - y0) * mm[1]), "mm"
    if unit == "percent_object":
        box = _object_box(ctx, rule, region)
        if box is not None:
            return 100.0 * region.area / max((box[2] - box[0]) * (box[3] - box[1]), 1e-9), "percent_object"
    return 100.0 * region.area_fraction, "percent_image"


def _object_box(ctx: _Context, rule: Any, region: Region) -> tuple[float, ...] | None:
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
    """Gives each kept region its defect type: the concept its crop matches best by at least :data:`CONCEPT_MARGIN`
    over the runner-up, else :data:`UNCLASSIFIED` (also when "other defect" matches best)."""
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
        f.defect_type, f.margin = classify(row, concepts)
        f.similarity = {c: round(float(s), 4) for c, s in zip([*concepts, "other defect"], row, strict=True)}


def classify(similarities: Sequence[float], concepts: Sequence[str]) -> tuple[str, float]:
    """``(defect type, margin)`` of one region from its similarities with ``concepts`` and, last, "other defect".

    The type is the best concept when it leads the runner-up by at least :data:`CONCEPT_MARGIN`, else
    :data:`UNCLASSIFIED`; the margin is the best similarity minus the second best (rounded to 4 places).
    """
    row = np.asarray(similarities, dtype=np.float64)
    order = np.argsort(-row, kind="stable")
    margin = float(row[order[0]] - row[order[1]]) if len(row) > 1 else float("inf")
    best = int(order[0])
    named = best < len(concepts) and margin >= CONCEPT_MARGIN
    return (concepts[best] if named else UNCLASSIFIED), round(margin, 4)


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
                _suppress(ctx, f, rule, **f.typed, **extra)


def _apply_defects(ctx: _Context, findings: list[_Finding], skipped: set[int]) -> None:
    """Each remaining region gets the highest severity of the defect rules that name it (its type, and its size)."""
    rules = [r for r in ctx.ruleset.of_kind(DefectRule) if id(r) not in skipped]
    for f in findings:
        if not f.kept:
            continue
        best: tuple[DefectRule, dict[str, Any]] | None = None
        for rule in rules:
            if rule.concept is not None and not _names(f, rule.concept):
                continue
            sized: dict[str, Any] = {}
            if rule.min_size is not None:
                size, measured = _region_size(ctx, rule, rule.unit or "percent_image", f.region)
                if size < rule.min_size:
                    continue
                sized = {"size": round(size, 4), "unit": measured, "min_size": rule.min_size}
            if best is None or severity_rank(rule.severity) > severity_rank(best[0].severity):
                best = rule, sized
        if best is not None:
            rule, sized = best
            f.severity, f.severity_rule = rule.severity, rule.label
            ctx.hit(rule, f"severity {rule.severity}", **_region_detail(f.region), **f.typed, **sized)


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
        {
            "bbox": list(f.region.bbox),
            "severity": f.severity or default,
            "defect_type": f.defect_type,
            "margin": f.margin,
            "rule": f.severity_rule,
        }
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
