"""The explainer's evidence: Triad's ROI boxes, the pictures, the facts, and fine-grained phrases per region."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers.explain_data import make_image, make_result
from vlad.errors import ConfigError
from vlad.explain.evidence import (
    best_phrases,
    build_evidence,
    build_facts,
    downscale,
    load_phrase_bank,
    phrases_for,
    png_data_url,
    roi_boxes,
)
from vlad.result import POSITION_WORDS, RuleHit


def _map(w: int, h: int, blobs: list[tuple[int, int, int, int, float]]) -> np.ndarray:
    amap = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1, v in blobs:
        amap[y0:y1, x0:x1] = v
    return amap


def _contains(outer: tuple[int, ...], inner: tuple[int, ...]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


# ---------------------------------------------------------------------- ROI boxes
def test_constant_map_has_no_roi():
    assert roi_boxes(np.full((50, 60), 0.3, np.float32), tile=16) == []


def test_one_blob_gives_a_square_tile_centred_on_it():
    boxes = roi_boxes(_map(400, 300, [(100, 100, 110, 120, 1.0)]), tile=64)
    assert boxes == [(73, 78, 137, 142)]  # 64 x 64, centred on the blob's box centre (105, 110)


def test_box_is_shifted_inside_at_the_border():
    (box,) = roi_boxes(_map(200, 100, [(0, 90, 5, 100, 1.0)]), tile=40)
    assert box == (0, 60, 40, 100)


def test_blob_larger_than_tile_keeps_its_size_and_is_squared():
    (box,) = roi_boxes(_map(400, 300, [(50, 100, 250, 140, 1.0)]), tile=64)
    assert box[2] - box[0] == box[3] - box[1] == 200
    assert _contains(box, (50, 100, 250, 140))


def test_tile_larger_than_image_gives_the_whole_image():
    assert roi_boxes(_map(100, 60, [(10, 10, 20, 20, 1.0)]), tile=384) == [(0, 0, 100, 60)]


def test_far_blobs_stay_apart_strongest_first():
    boxes = roi_boxes(_map(400, 400, [(20, 20, 30, 30, 0.95), (350, 350, 360, 360, 1.0)]), tile=32)
    assert len(boxes) == 2
    assert _contains(boxes[0], (350, 350, 360, 360))
    assert _contains(boxes[1], (20, 20, 30, 30))


def test_overlapping_boxes_are_merged_into_one_square():
    # tiles of 40 around blobs 30 px apart overlap by 25 %: more than 0.1, so they are united (then squared)
    boxes = roi_boxes(_map(400, 400, [(100, 100, 110, 110, 1.0), (130, 100, 140, 110, 1.0)]), tile=40)
    assert len(boxes) == 1
    (box,) = boxes
    assert _contains(box, (85, 85, 155, 125))
    assert box[2] - box[0] == box[3] - box[1]


def test_box_covered_by_another_is_dropped():
    # the weak blob sits inside the strong blob's tile: its own tile is more than 80 % covered
    boxes = roi_boxes(_map(400, 400, [(100, 100, 104, 104, 1.0), (104, 104, 106, 106, 0.99)]), tile=64)
    assert len(boxes) == 1
    assert _contains(boxes[0], (100, 100, 106, 106))


def test_at_most_four_rois():
    blobs = [
        (20 + 100 * i, 20 + 100 * j, 25 + 100 * i, 25 + 100 * j, 1.0 - 0.01 * (3 * i + j))
        for i in range(3)
        for j in range(3)
    ]
    boxes = roi_boxes(_map(320, 320, blobs), tile=16)
    assert len(boxes) == 4
    assert _contains(boxes[0], (20, 20, 25, 25))  # the strongest blob first


def test_threshold_is_ninety_percent_of_the_range():
    # 0.89 of the range is below the ROI level: only the peak blob makes a box
    boxes = roi_boxes(_map(400, 400, [(20, 20, 30, 30, 0.89), (300, 300, 310, 310, 1.0)]), tile=32)
    assert len(boxes) == 1
    assert _contains(boxes[0], (300, 300, 310, 310))


@pytest.mark.parametrize(
    ("kw", "word"), [({"tile": 0}, "tile"), ({"max_rois": -1}, "max_rois"), ({"tile": 2.5}, "tile")]
)
def test_roi_options_are_checked(kw, word):
    with pytest.raises(ConfigError, match=word):
        roi_boxes(np.zeros((8, 8)), **kw)


# ---------------------------------------------------------------------- pictures
def _decode(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_png_data_url_is_downscaled_keeping_aspect():
    img = _decode(png_data_url(make_image((300, 150)), 100))
    assert img.format == "PNG"
    assert img.size == (100, 50)
    assert _decode(png_data_url(make_image((40, 30)), 100)).size == (40, 30)  # never enlarged
    with pytest.raises(ConfigError, match="max image side"):
        downscale(make_image((40, 30)), 4)


def test_evidence_pictures_facts_and_crops():
    result = make_result(
        (600, 400),
        [(30, 20, 70, 50, 0.9), (500, 350, 580, 370, 0.89)],
        rule_hits=[RuleHit("ignore the label", "suppressed 1 region", {"area": 12})],
    )
    ref = make_image((600, 400), seed=3)
    ev = build_evidence(
        make_image((600, 400)),
        result,
        " bottle ",
        tile=128,
        references=[ref, ref],
        process_note="  blown glass, annealed  ",
    )
    kinds = [p.kind for p in ev.images]
    assert kinds == ["image", "overlay", "crop", "crop", "reference"]
    crops = [p for p in ev.images if p.kind == "crop"]
    assert crops[0].box == (0, 0, 128, 128)
    assert crops[0].position == "top left"
    assert crops[1].position == "bottom right"
    assert crops[1].image.size == (128, 128)
    overlay = ev.images[1].image
    assert overlay.size == (600, 400)  # the photo's size; rule hits are in the facts, regions numbered as `index`
    f = ev.facts
    assert ev.object_name == f["object"] == "bottle"
    assert [r["position"] for r in f["regions"]] == ["top left", "bottom right"]
    assert f["regions"][0]["bbox"] == [30, 20, 70, 50]
    assert f["regions"][0]["index"] == 1
    assert f["rule_hits"] == [{"rule": "ignore the label", "effect": "suppressed 1 region", "detail": {"area": 12}}]
    assert f["process_note"] == "blown glass, annealed"
    assert f["peak"] == {"value": pytest.approx(0.9), "position": "top left"}
    assert f["pictures"] == kinds
    assert f["total_area_fraction"] == pytest.approx((40 * 30 + 80 * 20) / (600 * 400), abs=1e-6)


def test_crops_covering_the_whole_photo_are_left_out():
    ev = build_evidence(make_image(), make_result(), "bottle")  # 300 x 200 with a 384 tile: the crop is the photo
    assert [p.kind for p in ev.images] == ["image", "overlay"]
    ev = build_evidence(make_image(), make_result(), "bottle", overlay=False)
    assert [p.kind for p in ev.images] == ["image"]


def test_evidence_rejects_a_size_mismatch():
    with pytest.raises(ConfigError, match=r"differs from the result's map size \(300, 200\)"):
        build_evidence(make_image((200, 300)), make_result(), "bottle")


def test_facts_of_a_normal_result_without_regions():
    result = make_result(blobs=[(280, 180, 290, 190, 0.4)], score=0.2, label=False)
    f = build_facts(result, "screw")
    assert f["verdict"] == "normal"
    assert f["regions"] == []
    assert f["peak"]["position"] == "bottom right"
    assert f["process_note"] is None
    assert f["rule_hits"] == []
    assert f["peak"]["position"] in POSITION_WORDS


# ---------------------------------------------------------------------- fine-grained phrases
BANK = {
    "templates": ["a photo of a {object} with {detail} at the {position}."],
    "generic": ["a crack", "a stain", "a strange smell"],
    "non_visual_words": ["smell"],
    "classes": {"metal_nut": ["a bent edge", "a crack"], "bottle": ["a chipped rim"]},
}


def test_phrases_for_a_class_add_the_generic_ones_without_non_visual():
    assert phrases_for(BANK, "metal nut") == ["a bent edge", "a crack", "a stain"]
    assert phrases_for(BANK, "Bottle") == ["a chipped rim", "a crack", "a stain"]
    assert phrases_for(BANK, "gear") == ["a crack", "a stain"]


def test_missing_phrase_file_means_no_phrases(monkeypatch):
    import vlad.resources

    def missing(name: str) -> dict:
        raise ConfigError(f"no prompt file '{name}.yaml'")

    monkeypatch.setattr(vlad.resources, "load_prompt_file", missing)
    assert load_phrase_bank() is None


def test_best_phrase_is_the_argmax_of_text_patch_similarity(tiny_backbone):
    import torch
    import torch.nn.functional as F

    image = make_image((128, 128), seed=5)
    result = make_result((128, 128), [(0, 0, 32, 32, 0.9), (96, 96, 128, 128, 0.8)])
    picked = best_phrases(image, result, "metal nut", tiny_backbone, BANK)
    candidates = phrases_for(BANK, "metal nut")
    assert len(picked) == 2
    assert all(p in candidates for p in picked)
    # brute force: region 1 covers the top-left 2 x 2 cells of the 8 x 8 grid (64 px input, 8 px patches)
    out = tiny_backbone.forward_visual(tiny_backbone.preprocess([image]), layers=[-1])
    tokens = F.normalize(next(iter(out.patch_tokens.values()))[0].float(), dim=-1).reshape(8, 8, -1)
    for region, (r0, c0) in zip(result.regions, [(0, 0), (6, 6)], strict=True):
        feat = F.normalize(tokens[r0 : r0 + 2, c0 : c0 + 2].reshape(-1, tokens.shape[-1]).mean(0), dim=-1)
        prompts = [
            BANK["templates"][0].format(object="metal nut", detail=p, position=region.position) for p in candidates
        ]
        expected = candidates[int(torch.argmax(tiny_backbone.encode_text(prompts) @ feat))]
        assert picked[result.regions.index(region)] == expected


def test_evidence_with_a_backbone_names_each_region(tiny_backbone):
    result = make_result((128, 128), [(0, 0, 32, 32, 0.9)])
    ev = build_evidence(make_image((128, 128)), result, "bottle", backbone=tiny_backbone, phrases=BANK)
    assert ev.facts["regions"][0]["defect_type"] in phrases_for(BANK, "bottle")
    ev = build_evidence(make_image((128, 128)), result, "bottle")
    assert "defect_type" not in ev.facts["regions"][0]
    assert best_phrases(make_image((128, 128)), result, "bottle", tiny_backbone, {"generic": []}) == [None]
