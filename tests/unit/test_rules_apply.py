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
    """Crops embed by their dominant colour (red, blue, other); prompts by their words (scratch, dent, other)."""

    native_size = 8

    def preprocess(self, images, size=None):
        return torch.tensor(np.stack([np.asarray(im, np.float32).reshape(-1, 3).mean(0) for im in images]))

    def forward_visual(self, x):
        excess = x - 128.0
        emb = torch.stack([excess[:, 0].clamp_min(0), excess[:, 2].clamp_min(0), torch.full_like(x[:, 0], 0.5)], 1)
        return SimpleNamespace(global_embedding=emb)

    def encode_text(self, prompts):
        rows = [[1.0, 0, 0] if "scratch" in p else [0, 1.0, 0] if "dent" in p else [0, 0, 1.0] for p in prompts]
        return torch.tensor(rows)


RED_BOX, BLUE_BOX, GREEN_BOX = (10, 10, 20, 20), (70, 70, 80, 80), (10, 70, 20, 80)
IMAGE = painted([(RED_BOX, RED), (BLUE_BOX, BLUE), (GREEN_BOX, GREEN)])


def test_acceptable_and_defect_concepts_act_on_matching_regions():
    result = planted([RED_BOX, BLUE_BOX, GREEN_BOX])
    text = "scratches are fine\ndents are critical"
    after = apply_rules(result, rules(text), image=IMAGE, backbone=ColourBackbone())
    assert [r.bbox for r in after.regions] == [BLUE_BOX, GREEN_BOX]  # the red "scratch" is suppressed
    suppressed = hits_of(after, "region suppressed")[0]
    assert suppressed.rule == "scratches are fine"
    assert suppressed.detail["concept"] == "scratches"
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
    assert hits_of(after, "region suppressed")[0].detail["concept"] == "scratches"


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
    assert all(h.detail["concept"] == "scratches" for h in suppressed)
    for kept in after.meta["region_severities"]:  # the best match decides: dents -> critical, "other" -> default
        assert kept["concept"] in ("dents", None)
        assert kept["severity"] == ("critical" if kept["concept"] == "dents" else "major")
    assert len(hits_of(after, "severity critical")) == sum(
        k["concept"] == "dents" for k in after.meta["region_severities"]
    )


def test_image_of_another_size_is_rescaled():
    big = np.repeat(np.repeat(IMAGE, 2, axis=0), 2, axis=1)  # 200 x 200 photo, 100 x 100 map
    after = apply_rules(planted([RED_BOX]), rules("scratches are fine"), image=big, backbone=ColourBackbone())
    assert after.regions == ()
