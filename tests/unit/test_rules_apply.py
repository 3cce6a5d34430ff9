"""Rules acting on results: region filters, sizes, concepts, required objects, the verdict policy, rule hits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from vlad.grounding import Box, get_detector
from vlad.regions import find_regions
from vlad.result import AnomalyResult
from vlad.rules import apply_rules, parse_rules
from vlad.rules.apply import concept_similarities

SIZE = 100
GREY, RED, BLUE, GREEN = (128, 128, 128), (255, 0, 0), (0, 0, 255), (0, 255, 0)


def planted(boxes: list[tuple[int, int, int, int]], *, label: bool = True, size: int = SIZE) -> AnomalyResult:
    """A result whose map is 1 inside the boxes (x0, y0, x1, y1) and 0 elsewhere; one region per box."""
    amap = np.zeros((size, size), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        amap[y0:y1, x0:x1] = 1.0 - 0.01 * i  # distinct peaks keep the region order stable
    mask = amap >= 0.5
    return AnomalyResult(
        pred_score=0.9 if label else 0.2,
        normalized_score=0.9 if label else 0.2,
        anomaly_map=amap,
        pred_mask=mask,
        pred_label=label,
        threshold=0.5,
        pixel_threshold=0.5,
        regions=find_regions(amap, mask),
    )


def painted(boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> np.ndarray:
    """A grey (H, W, 3) uint8 image with coloured boxes."""
    image = np.full((SIZE, SIZE, 3), GREY, np.uint8)
    for (x0, y0, x1, y1), colour in boxes:
        image[y0:y1, x0:x1] = colour
    return image


def rules(text: str):
    report = parse_rules(text)
    assert report.ok, report.not_understood
    return report.rules


def hits_of(result: AnomalyResult, effect: str) -> list:
    return [h for h in result.rule_hits if h.effect == effect]


SMALL, LARGE = (10, 10, 13, 13), (50, 50, 70, 70)  # 9 px (0.09 %) and 400 px (4 %)


# ---------------------------------------------------------------------------------------------------- sizes
def test_a_size_rule_suppresses_a_small_defect_but_not_a_large_one():
    before = planted([LARGE, SMALL])
    text = "defects smaller than 1 % of the image are fine"
    after = apply_rules(before, rules(text))
    assert [r.bbox for r in after.regions] == [LARGE]
    assert not after.pred_mask[10:13, 10:13].any()
    assert after.pred_mask[50:70, 50:70].all()
    assert after.pred_label is True
    assert after.pred_score == before.pred_score
    np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)
    (hit,) = after.rule_hits
    assert (hit.rule, hit.effect) == (text, "region suppressed")
    assert hit.detail["bbox"] == list(SMALL)
    assert hit.detail["unit"] == "percent_image"
    assert after.meta["verdict_before_rules"] == "anomalous"


def test_suppressing_every_region_lowers_the_verdict():
    text = "ignore anything under 50 pixels"
    after = apply_rules(planted([SMALL]), rules(text))
    assert after.regions == ()
    assert not after.pred_mask.any()
    assert after.pred_label is False
    assert after.pred_score == 0.9
    assert [(h.rule, h.effect) for h in after.rule_hits] == [(text, "region suppressed"), (text, "verdict lowered")]
    assert hits_of(after, "verdict lowered")[0].detail == {"before": "anomalous", "after": "normal"}
    untouched = apply_rules(planted([LARGE]), rules(text))
    assert untouched.pred_label is True
    assert untouched.rule_hits == ()


class FakeDetector:
    """Finds the phrases it was given boxes for."""

    spec = "fake"

    def __init__(self, boxes: dict[str, list[tuple[float, float, float, float]]]) -> None:
        self.boxes = boxes
        self.calls: list[list[str]] = []

    def detect(self, image, phrases, *, threshold=None):
        self.calls.append(list(phrases))
        size = image.size
        return [Box(b, 0.9, p, size) for p in phrases for b in self.boxes.get(p, [])]


def test_percent_of_the_part_uses_the_detected_object():
    region = (40, 40, 50, 50)  # 100 px: 1 % of the image, 25 % of a 20 x 20 part
    text = "defects smaller than 5 % of the part are fine"
    detector = FakeDetector({"bottle": [(35, 35, 55, 55)]})
    kept = apply_rules(planted([region]), rules(text), image=painted([]), detector=detector, object_name="bottle")
    assert len(kept.regions) == 1
    assert kept.rule_hits == ()
    assert detector.calls == [["bottle"]]
    # without a detector (or when it finds nothing) the size is taken against the image, and a hit says so
    for det, why in ((None, "no detector was given"), (get_detector("none"), "the detector found no 'bottle'")):
        after = apply_rules(planted([region]), rules(text), image=painted([]), detector=det, object_name="bottle")
        assert after.regions == ()
        note = hits_of(after, "measured against the image")
        assert len(note) == 1
        assert why in note[0].detail["reason"]
        assert note[0].rule == text
        assert hits_of(after, "region suppressed")[0].detail["unit"] == "percent_image"


# ---------------------------------------------------------------------------------------------------- regions
def test_an_ignore_region_rule_suppresses_a_defect_inside_it_only():
    top_left, bottom_right = (5, 5, 15, 15), (80, 80, 95, 95)
    text = "ignore the top left corner"
    after = apply_rules(planted([top_left, bottom_right]), rules(text))
    assert [r.bbox for r in after.regions] == [bottom_right]
    assert not after.pred_mask[5:15, 5:15].any()
    assert after.pred_mask[80:95, 80:95].all()
    (hit,) = after.rule_hits
    assert hit.rule == text
    assert hit.detail["position"] == "top left"
    assert after.pred_label is True


def test_only_regions_and_boxes():
    top, bottom = (40, 5, 60, 20), (40, 80, 60, 95)
    only = apply_rules(planted([top, bottom]), rules("only the upper half matters"))
    assert [r.bbox for r in only.regions] == [top]
    boxed = apply_rules(planted([top, bottom]), rules("ignore the box [0.3, 0.7, 0.7, 1.0]"))
    assert [r.bbox for r in boxed.regions] == [top]
    both = apply_rules(planted([bottom], label=True), rules("only the upper half matters"))
    assert both.pred_label is False
    assert hits_of(both, "verdict lowered")[0].rule == "only the upper half matters"


# ---------------------------------------------------------------------------------------------------- required objects
def test_a_required_object_fails_the_part_when_the_detector_finds_nothing():
    text = "there must be 2 screws"
    clean = planted([], label=False)
    for detector in (FakeDetector({}), get_detector("none"), FakeDetector({"screw": [(0, 0, 10, 10)]})):
        after = apply_rules(clean, rules(text), image=painted([]), detector=detector)
        assert after.pred_label is True
        assert after.pred_score == clean.pred_score
        missing = hits_of(after, "required object missing")[0]
        assert missing.rule == text
        assert missing.detail["required"] == 2
        assert missing.detail["found"] < 2
        assert hits_of(after, "verdict raised")[0].rule == text
        assert after.meta["verdict_before_rules"] == "normal"
    enough = FakeDetector({"screw": [(0, 0, 10, 10), (20, 20, 30, 30)]})
    passed = apply_rules(clean, rules(text), image=painted([]), detector=enough)
    assert passed.pred_label is False
    assert passed.rule_hits == ()
    unchecked = apply_rules(clean, rules(text), image=painted([]), detector=None)
    assert unchecked.pred_label is False
    assert hits_of(unchecked, "not evaluated")[0].detail["reason"].endswith("needs an object detector")


# ---------------------------------------------------------------------------------------------------- concepts
class ColourBackbone:
    """Crops embed by their dominant colour (red, blue, other); prompts by their words (scratch or lint: red; dent,
    hole or stain: blue; anything else: other)."""

    native_size = 8

    def preprocess(self, images, size=None):
        return torch.tensor(np.stack([np.asarray(im, np.float32).reshape(-1, 3).mean(0) for im in images]))

    def forward_visual(self, x):
        excess = x - 128.0
        emb = torch.stack([excess[:, 0].clamp_min(0), excess[:, 2].clamp_min(0), torch.full_like(x[:, 0], 0.5)], 1)
        return SimpleNamespace(global_embedding=emb)

    def encode_text(self, prompts):
        rows = [[1.0, 0, 0] if self._red(p) else [0, 1.0, 0] if self._blue(p) else [0, 0, 1.0] for p in prompts]
        return torch.tensor(rows)

    @staticmethod
    def _red(prompt: str) -> bool:
        return any(w in prompt for w in ("scratch", "lint"))

    @staticmethod
    def _blue(prompt: str) -> bool:
        return any(w in prompt for w in ("dent", "hole", "stain"))


RED_BOX, BLUE_BOX, GREEN_BOX = (10, 10, 20, 20), (70, 70, 80, 80), (10, 70, 20, 80)
IMAGE = painted([(RED_BOX, RED), (BLUE_BOX, BLUE), (GREEN_BOX, GREEN)])


def test_acceptable_and_defect_concepts_act_on_matching_regions():
    result = planted([RED_BOX, BLUE_BOX, GREEN_BOX])
    text = "scratches are fine\ndents are critical"
    after = apply_rules(result, rules(text), image=IMAGE, backbone=ColourBackbone())
    assert [r.bbox for r in after.regions] == [BLUE_BOX, GREEN_BOX]  # the red "scratch" is suppressed
    suppressed = hits_of(after, "region suppressed")[0]
    assert suppressed.rule == "scratches are fine"
    assert suppressed.detail["defect_type"] == "scratches"
    assert suppressed.detail["similarity"]["scratches"] > suppressed.detail["similarity"]["other defect"]
    critical = hits_of(after, "severity critical")[0]
    assert critical.rule == "dents are critical"
    assert critical.detail["bbox"] == list(BLUE_BOX)
    severities = {tuple(s["bbox"]): s["severity"] for s in after.meta["region_severities"]}
    assert severities == {BLUE_BOX: "critical", GREEN_BOX: "major"}
    report = json.loads(json.dumps(after.to_dict()))  # hits and meta go into report.jsonl as they are
    assert [h["effect"] for h in report["rule_hits"]] == ["region suppressed", "severity critical"]
    assert after.pred_label is True


def test_the_policy_and_severities_decide_the_verdict():
    text = "dents are critical\nfail only on critical defects"
    green_only = apply_rules(planted([GREEN_BOX]), rules(text), image=IMAGE, backbone=ColourBackbone())
    assert green_only.pred_label is False  # an unnamed (major) finding does not reach "critical"
    assert hits_of(green_only, "verdict lowered")[0].rule == "fail only on critical defects"
    raised = apply_rules(planted([BLUE_BOX], label=False), rules(text), image=IMAGE, backbone=ColourBackbone())
    assert raised.pred_label is True  # a critical dent fails the part even though the scorer passed it
    assert hits_of(raised, "verdict raised")[0].rule == "dents are critical"
    unnamed = apply_rules(
        planted([GREEN_BOX], label=False), rules("dents are critical"), image=IMAGE, backbone=ColourBackbone()
    )
    assert unnamed.pred_label is False
    assert unnamed.rule_hits == ()


def test_acceptable_rules_respect_their_location():
    red_bottom = (80, 80, 90, 90)
    image = painted([(RED_BOX, RED), (red_bottom, RED)])
    result = planted([RED_BOX, red_bottom])
    after = apply_rules(result, rules("scratches in the top left are fine"), image=image, backbone=ColourBackbone())
    assert [r.bbox for r in after.regions] == [red_bottom]
    label = FakeDetector({"label": [(70, 70, 100, 100)]})
    on_label = apply_rules(
        result, rules("scratches on the label are fine"), image=image, backbone=ColourBackbone(), detector=label
    )
    assert [r.bbox for r in on_label.regions] == [RED_BOX]
    unchecked = apply_rules(result, rules("scratches on the label are fine"), image=image, backbone=ColourBackbone())
    assert unchecked.regions == ()
    assert "no detector was given" in hits_of(unchecked, "region suppressed")[0].detail["note"]


def test_a_concept_size_rule_only_touches_its_concept():
    red_small, blue_small = (10, 10, 13, 13), (80, 80, 83, 83)
    image = painted([((5, 5, 18, 18), RED), ((75, 75, 88, 88), BLUE)])
    text = "scratches smaller than 1 % of the image are fine"
    after = apply_rules(planted([red_small, blue_small]), rules(text), image=image, backbone=ColourBackbone())
    assert [r.bbox for r in after.regions] == [blue_small]
    assert hits_of(after, "region suppressed")[0].detail["defect_type"] == "scratches"


def test_concept_rules_without_a_backbone_say_they_were_not_evaluated():
    text = "scratches are fine\ndents are critical"
    after = apply_rules(planted([RED_BOX]), rules(text))
    assert len(after.regions) == 1
    assert after.pred_label is True
    assert [(h.rule, h.effect) for h in after.rule_hits] == [
        ("scratches are fine", "not evaluated"),
        ("dents are critical", "not evaluated"),
    ]
    assert "needs a CLIP backbone and the image" in after.rule_hits[0].detail["reason"]


def test_concept_matching_with_the_tiny_clip(tiny_backbone):
    crops = [painted([]), IMAGE]
    from PIL import Image

    sims = concept_similarities(tiny_backbone, [Image.fromarray(c) for c in crops], ["scratches", "dents"], "bottle")
    assert sims.shape == (2, 3)
    assert np.isfinite(sims).all()
    assert np.abs(sims).max() <= 1.0 + 1e-5
    after = apply_rules(
        planted([RED_BOX, BLUE_BOX]),
        rules("scratches are fine\ndents are critical"),
        image=IMAGE,
        backbone=tiny_backbone,
        object_name="bottle",
    )
    suppressed = hits_of(after, "region suppressed")
    assert len(after.regions) + len(suppressed) == 2
    assert all(h.detail["defect_type"] == "scratches" for h in suppressed)
    for kept in after.meta["region_severities"]:  # a clear winner names the region: dents -> critical, else default
        assert kept["defect_type"] in ("dents", "unclassified")
        assert kept["severity"] == ("critical" if kept["defect_type"] == "dents" else "major")
        assert (kept["margin"] >= 0.02) == (kept["defect_type"] == "dents")
    assert len(hits_of(after, "severity critical")) == sum(
        k["defect_type"] == "dents" for k in after.meta["region_severities"]
    )
    assert [r.defect_type for r in after.regions] == [k["defect_type"] for k in after.meta["region_severities"]]


def test_image_of_another_size_is_rescaled():
    big = np.repeat(np.repeat(IMAGE, 2, axis=0), 2, axis=1)  # 200 x 200 photo, 100 x 100 map
    after = apply_rules(planted([RED_BOX]), rules("scratches are fine"), image=big, backbone=ColourBackbone())
    assert after.regions == ()


# ---------------------------------------------------------------------------------------------------- defect types
NOISE = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
SPECK = (40, 40, 44, 45)  # 20 px: 0.2 % of the image


def test_a_near_tie_on_the_tiny_clip_leaves_the_region_unclassified(tiny_backbone):
    from PIL import Image

    from vlad.rules.apply import _crop

    before = planted([SPECK])
    after = apply_rules(before, rules("holes are critical"), image=NOISE, backbone=tiny_backbone, object_name="bottle")
    assert not hits_of(after, "severity critical")  # no critical hole invented from noise
    from vlad.rules.apply import CONCEPT_MARGIN, UNCLASSIFIED

    crop = _crop(Image.fromarray(NOISE), before.image_size, before.regions[0])
    (row,) = concept_similarities(tiny_backbone, [crop], ["holes"], "bottle")
    assert abs(row[0] - row[1]) < CONCEPT_MARGIN  # random weights: "holes" and "other defect" are a near tie
    (region,) = after.regions
    assert region.defect_type == UNCLASSIFIED
    (typed,) = after.meta["region_severities"]
    assert (typed["defect_type"], typed["severity"], typed["rule"]) == (UNCLASSIFIED, "major", None)
    assert typed["margin"] < CONCEPT_MARGIN
    assert after.pred_label is True


def test_a_size_rule_naming_no_concept_acts_on_every_region_before_severity():
    blue_speck = (70, 70, 74, 75)  # 20 px, and CLIP calls it a hole without any doubt
    image = painted([(blue_speck, BLUE)])
    text = "ignore specks under 1 %\nholes are critical"
    after = apply_rules(planted([blue_speck], label=False), rules(text), image=image, backbone=ColourBackbone())
    assert after.regions == ()
    (hit,) = hits_of(after, "region suppressed")
    assert hit.rule == "ignore specks under 1 %"
    assert not hits_of(after, "severity critical")
    assert after.pred_label is False
    big = (40, 40, 70, 70)  # 9 %: the size rule keeps it, the defect rule names it
    kept = apply_rules(
        planted([big], label=False), rules(text), image=painted([(big, BLUE)]), backbone=ColourBackbone()
    )
    assert [r.defect_type for r in kept.regions] == ["holes"]
    assert kept.pred_label is True


def test_one_defect_type_per_region_in_rule_hits_report_and_explanation(tiny_backbone):
    from PIL import Image

    from vlad.explain.evidence import build_evidence
    from vlad.explain.template import explain_text, template_report

    after = apply_rules(planted([BLUE_BOX]), rules("dents are critical"), image=IMAGE, backbone=ColourBackbone())
    (region,) = after.regions
    assert region.defect_type == "dents"
    (hit,) = hits_of(after, "severity critical")
    assert hit.detail["defect_type"] == "dents"
    assert after.to_dict()["regions"][0]["defect_type"] == "dents"
    # the explainer gets a CLIP backbone too (the pipeline passes the scorer's): it must not name the region again
    facts = build_evidence(Image.fromarray(IMAGE), after, "bottle", backbone=tiny_backbone).facts
    assert facts["regions"][0]["defect_type"] == "dents"
    assert "looks like dents" in explain_text(facts)
    assert template_report(facts).defect_type == "dents"
    # unclassified stays unclassified everywhere
    tie = apply_rules(
        planted([SPECK]), rules("holes are critical"), image=NOISE, backbone=tiny_backbone, object_name="bottle"
    )
    facts = build_evidence(Image.fromarray(NOISE), tie, "bottle", backbone=tiny_backbone).facts
    assert facts["regions"][0]["defect_type"] == "unclassified"
    assert template_report(facts).defect_type == "unclassified"
    assert "defect type unclassified" in explain_text(facts)
    assert tie.to_dict()["regions"][0]["defect_type"] == "unclassified"


def test_a_border_band_ignores_regions_lying_in_it():
    inner, edge, straddling, corner = (40, 40, 50, 50), (0, 30, 8, 40), (2, 60, 30, 70), (92, 92, 100, 100)
    text = "ignore anything within 10 pixels of the border"
    after = apply_rules(planted([inner, edge, straddling, corner]), rules(text))
    assert [r.bbox for r in after.regions] == [inner, straddling]  # a region reaching further in is kept
    assert [h.detail["bbox"] for h in hits_of(after, "region suppressed")] == [list(edge), list(corner)]
    assert all(h.rule == text for h in after.rule_hits)
    thin = (0, 30, 4, 40)  # "the edges": a band of 5 % of the shorter side, 5 px here
    edges = apply_rules(planted([thin, edge]), rules("ignore the edges"))
    assert [r.bbox for r in edges.regions] == [edge]


def test_size_dependent_severity():
    big, small = (40, 40, 70, 70), (80, 10, 85, 15)  # 9 % and 0.25 % of the image
    image = painted([(big, BLUE), (small, BLUE)])
    text = "holes bigger than 2 % of the image are critical"
    after = apply_rules(planted([big, small], label=False), rules(text), image=image, backbone=ColourBackbone())
    severities = {tuple(s["bbox"]): s["severity"] for s in after.meta["region_severities"]}
    assert severities == {big: "critical", small: "major"}
    assert [h.detail["bbox"] for h in hits_of(after, "severity critical")] == [list(big)]
    assert after.pred_label is True
    assert hits_of(after, "verdict raised")[0].rule == text
    # naming no concept, a sized severity rule needs no CLIP and applies to every region
    anything = apply_rules(planted([big, small], label=False), rules("anything larger than 5 % is critical"))
    assert {tuple(s["bbox"]): s["severity"] for s in anything.meta["region_severities"]} == {
        big: "critical",
        small: "major",
    }
    assert anything.pred_label is True


def test_millimetre_rules_need_px_per_mm():
    stain = (40, 40, 70, 60)  # 30 x 20 px
    image = painted([(stain, BLUE)])
    text = "reject any stain larger than 5 mm"
    missing = apply_rules(planted([stain], label=False), rules(text), image=image, backbone=ColourBackbone())
    (hit,) = hits_of(missing, "not applicable")
    assert hit.rule == text
    assert "px_per_mm" in hit.detail["reason"]
    assert not hits_of(missing, "severity major")
    assert missing.pred_label is False
    at_4 = apply_rules(  # 30 px at 4 px/mm: 7.5 mm
        planted([stain], label=False), rules(f"{text}\n4 pixels per mm"), image=image, backbone=ColourBackbone()
    )
    assert hits_of(at_4, "severity major")[0].detail["size"] == 7.5
    assert at_4.pred_label is True
    at_10 = apply_rules(  # 3 mm
        planted([stain], label=False), rules(f"{text}\n10 px/mm"), image=image, backbone=ColourBackbone()
    )
    assert not hits_of(at_10, "severity major")
    assert at_10.pred_label is False


def test_dont_flag_is_acceptable():
    after = apply_rules(planted([RED_BOX]), rules("don't flag lint"), image=IMAGE, backbone=ColourBackbone())
    assert after.regions == ()
    assert hits_of(after, "region suppressed")[0].detail["defect_type"] == "lint"
    assert after.pred_label is False
