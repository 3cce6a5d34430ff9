"""FiLo, training-free: defect phrases, position-enhanced prompts, HQ-Loc box weighting (paper and vlad profiles),
the paper profile's map and score against the reference computation, detector fallback."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlad.grounding import Box
from vlad.resources import load_prompt_file
from vlad.result import POSITION_WORDS
from vlad.scorers.filo import (
    ALL_POSITIONS,
    FiloScorer,
    defect_phrases,
    paper_boxes,
    paper_position,
    paper_weighting,
    visual_phrases,
)

CENTER = POSITION_WORDS.index("center")


class FakeDetector:
    """Returns fixed boxes (fractions of the image it is given: (x0, y0, x1, y1, score, phrase or None = the first
    phrase)) above the threshold, best first, and records the phrases and thresholds."""

    def __init__(self, *boxes):
        self.boxes = [b if len(b) == 6 else (*b, 0.9, None) for b in boxes]
        self.calls = []

    def detect(self, image, phrases, *, threshold=None):
        self.calls.append((list(phrases), threshold))
        w, h = image.size
        out = [
            Box((x0 * w, y0 * h, x1 * w, y1 * h), s, p or phrases[0], image_size=(w, h))
            for x0, y0, x1, y1, s, p in self.boxes
            if threshold is None or s > threshold
        ]
        return sorted(out, key=lambda b: -b.score)


def _filo(backbone, profile, *boxes):
    filo = FiloScorer(backbone, detector="none", profile=profile)
    if boxes:
        filo.detector = FakeDetector(*boxes)
    return filo


def _x(filo, image):
    return filo.backbone.preprocess([Image.fromarray(image)], filo.image_size)


# ---------------------------------------------------------------------- phrases and prompts
def test_phrases_are_visual_and_come_from_the_kind():
    bank = load_prompt_file("filo")
    assert visual_phrases(["unusual odor", "a crack", "a strange Smell"], bank["non_visual_words"]) == ["a crack"]
    for kind, entry in bank["kinds"].items():
        assert visual_phrases(entry["phrases"], bank["non_visual_words"]) == entry["phrases"], kind  # all visual
    assert defect_phrases("Bottle", bank) == bank["kinds"]["container"]["phrases"]
    assert defect_phrases("metal_nut", bank) == defect_phrases("screw", bank) == bank["kinds"]["fastener"]["phrases"]
    assert defect_phrases("pipe_fryum", bank) == bank["kinds"]["food"]["phrases"]
    assert defect_phrases("flux widget", bank) == bank["generic"]


@pytest.mark.parametrize("profile", ["paper", "vlad"])
def test_position_enhanced_prompts(tiny_backbone, profile):
    filo = FiloScorer(tiny_backbone, detector="none", profile=profile)
    per_position = filo._abnormal_prompts("bottle")
    assert len(per_position) == 9
    for position, prompts in zip(POSITION_WORDS, per_position, strict=True):
        if profile == "paper":  # FiLo's wording without the learned context (models/FiLo.py:127-130, 323-327)
            assert all(p.endswith(f" at {position}.") for p in prompts)
            assert f"abnormal bottle with a chipped rim at {position}." in prompts
            assert f"damaged bottle at {position}." in prompts
        else:
            assert all(p.endswith(f"at the {position}.") for p in prompts)
            assert f"a photo of a bottle with a chipped rim at the {position}." in prompts
    normal = filo._normal_prompts("bottle")
    assert ("bottle without defect" in normal) == (profile == "paper")
    assert len(normal) == (7 if profile == "paper" else 7 * 22)
    normal, abnormal = filo.position_prototypes("bottle")
    assert normal.shape == (tiny_backbone.embed_dim,)
    assert abnormal.shape == (10, tiny_backbone.embed_dim)


def test_prompt_phrases_cover_everything_written(tiny_backbone):
    filo = FiloScorer(tiny_backbone, detector="none")
    phrases = filo.prompt_phrases("bottle")
    bank = load_prompt_file("filo")
    assert set(bank["kinds"]["container"]["phrases"]) <= set(phrases)
    assert {"bottle without defect", "damaged bottle", "anomaly"} <= set(phrases)
    filo.ensemble.extra_anomalous = ("{} with a glue strip",)
    assert "bottle with a glue strip" in filo.prompt_phrases("bottle")


def test_unknown_product_says_it_uses_the_generic_list(tiny_backbone, texture_set, caplog):
    filo = FiloScorer(tiny_backbone, detector="none")
    with caplog.at_level(logging.WARNING, logger="vlad.scorers.filo"):
        r = filo.score(texture_set["good"], "flux widget")
        filo.score(texture_set["good"], "flux widget")
    assert any("'flux widget'" in w and "generic defect list" in w for w in r.warnings)
    assert sum("generic defect list" in m for m in caplog.messages) == 1  # logged once per name
    assert not any("generic defect list" in w for w in filo.score(texture_set["good"], "metal_nut").warnings)


# ---------------------------------------------------------------------- HQ-Loc
@pytest.mark.parametrize("profile", ["paper", "vlad"])
def test_hq_loc_picks_the_box_position_and_downweights_outside(tiny_backbone, texture_set, profile):
    plain = _filo(tiny_backbone, profile)
    boxed = _filo(tiny_backbone, profile, (0.0, 0.0, 0.5, 0.5))  # top-left quarter
    x = _x(boxed, texture_set["bad"])
    fp, fb = plain._extract(x), boxed._extract(x)
    assert int(fp["position"][0]) == ALL_POSITIONS
    assert int(fb["position"][0]) == POSITION_WORDS.index("top left")
    phrases, threshold = boxed.detector.calls[0]
    assert phrases[:5] == ["anomaly", "damage", "broken", "defect", "contamination"]
    assert threshold == 0.25
    weights = fb["boxmask"][0]
    half = boxed.image_size // 2
    assert torch.all(weights[:half, :half] == 1)
    assert torch.allclose(weights[half:, half:], torch.tensor(0.7))
    _, maps_boxed = boxed._score(fb, "texture", None)
    # same text for both when the position is forced equal: isolate the 0.7 weighting
    fb_all = {**fb, "position": fp["position"]}
    _, maps_all = boxed._score(fb_all, "texture", None)
    _, maps_plain = plain._score(fp, "texture", None)
    torch.testing.assert_close(maps_all[0, :half, :half], maps_plain[0, :half, :half])
    torch.testing.assert_close(maps_all[0, half:, half:], 0.7 * maps_plain[0, half:, half:])
    assert not torch.allclose(maps_boxed, maps_all)  # the top-left prompts differ from the all-position ones


@pytest.mark.parametrize("boxes", [(), ((0.0, 0.0, 0.5, 0.5, 0.9, "a banana"),)], ids=["no-box", "phrase-filtered"])
def test_no_valid_box(tiny_backbone, texture_set, boxes):
    """paper (test.py:597-641): "center" prompts and the whole map x 0.7; vlad: all positions, no down-weighting.
    A box whose phrase holds none of the detail or general words counts as no box in the paper profile."""
    paper, vlad_ = _filo(tiny_backbone, "paper", *boxes), _filo(tiny_backbone, "vlad", *boxes)
    paper.detector = paper.detector or FakeDetector()
    vlad_.detector = vlad_.detector or FakeDetector()
    x = _x(paper, texture_set["bad"])
    fp, fv = paper._extract(x), vlad_._extract(x)
    assert int(fp["position"][0]) == CENTER
    assert torch.allclose(fp["boxmask"], torch.tensor(0.7))
    if boxes:  # vlad keeps the box (its phrase is not checked)
        assert int(fv["position"][0]) == POSITION_WORDS.index("top left")
    else:
        assert int(fv["position"][0]) == ALL_POSITIONS
        assert torch.all(fv["boxmask"] == 1)
    score, maps = paper._score(fp, "texture", None)
    score_ones, maps_ones = paper._score({**fp, "boxmask": torch.ones_like(fp["boxmask"])}, "texture", None)
    torch.testing.assert_close(maps, 0.7 * maps_ones)  # the whole map
    torch.testing.assert_close(score, score_ones)  # the score reads the map before the weighting


def test_best_guess_box_is_kept(tiny_backbone, texture_set):
    """Every box covers >= 70 % of the image: the highest-scoring one is kept (test.py:243-246), in both profiles;
    a smaller box, when there is one, wins over bigger ones whatever their scores."""
    big = [(0.0, 0.0, 1.0, 0.8, 0.5, None), (0.0, 0.1, 0.9, 1.0, 0.8, None)]  # areas 0.8 and 0.81
    for profile in ("paper", "vlad"):
        filo = _filo(tiny_backbone, profile, *big)
        f = filo._extract(_x(filo, texture_set["bad"]))
        s = filo.image_size
        inside = f["boxmask"][0] == 1
        assert inside[math.ceil(0.1 * s) :, : int(0.9 * s)].all(), profile
        assert not inside[: int(0.1 * s)].any(), profile
        assert int(f["position"][0]) == CENTER, profile
        filo.detector = FakeDetector(*big, (0.6, 0.6, 0.9, 0.9, 0.3, None))
        f = filo._extract(_x(filo, texture_set["bad"]))
        assert int(f["position"][0]) == POSITION_WORDS.index("bottom right"), profile
        assert (f["boxmask"][0] == 1).float().mean() < 0.1, profile


def test_paper_box_rules():
    size = (518, 518)
    small = Box((10, 10, 100, 100), 0.5, "a crack", size)
    big = Box((0, 0, 518, 480), 0.9, "anomaly", size)
    bigger = Box((0, 0, 518, 500), 0.95, "a banana", size)
    words = ["a crack", "anomaly"]
    assert paper_boxes([bigger, big, small], words, size) == [small]
    assert paper_boxes([bigger, big], words, size) == []  # the arg-max is kept, then fails the phrase filter
    assert paper_boxes([big], words, size) == [big]
    assert paper_boxes([], words, size) == []
    assert paper_position([], 518) == CENTER
    assert paper_position([small], 518) == POSITION_WORDS.index("top left")
    assert paper_position([Box((150, 300, 195, 350), 0.5, "a crack", size)], 518) == ALL_POSITIONS  # x = 172.5
    assert paper_position([Box((250, 400, 300, 500), 0.5, "x", size)], 518) == POSITION_WORDS.index("bottom")
    tie = [Box((0, 0, 10, 10), 0.5, "x", size), Box((400, 0, 410, 10), 0.5, "x", size)]
    assert paper_position(tie, 518) == POSITION_WORDS.index("top right")  # ">=": the last of equal scores
    assert paper_position([Box((0, 0, 20, 20), 0.5, "x", (96, 96))], 96) == POSITION_WORDS.index("top left")


def test_paper_profile_sets_text_threshold_to_box_threshold(tiny_backbone, monkeypatch):
    import vlad.grounding

    seen = []
    monkeypatch.setattr(vlad.grounding, "get_detector", lambda spec, **options: seen.append((spec, options)) or 1)
    FiloScorer(tiny_backbone, detector="grounding-dino", box_threshold=0.3)
    FiloScorer(tiny_backbone, detector="grounding-dino:/models/gd", box_threshold=0.3, profile="paper")
    FiloScorer(tiny_backbone, detector="owlv2", box_threshold=0.3)
    FiloScorer(tiny_backbone, detector="grounding-dino", box_threshold=0.3, profile="vlad")
    assert seen == [
        ("grounding-dino", {"text_threshold": 0.3}),
        ("grounding-dino:/models/gd", {"text_threshold": 0.3}),
        ("owlv2", {}),
        ("grounding-dino", {}),
    ]


# ---------------------------------------------------------------------- the paper profile's map and score
def test_paper_map_and_score_follow_the_reference(tiny_backbone, texture_set):
    """models/FiLo.py:664-697 and test.py:506, 620-641, recomputed here with torchvision's GaussianBlur."""
    tv = pytest.importorskip("torchvision.transforms")
    filo = _filo(tiny_backbone, "paper", (0.0, 0.0, 0.5, 0.5))
    feats = filo._extract(_x(filo, texture_set["bad"]))
    score, maps = filo._score(feats, "texture", None)

    normal, abnormal = filo.position_prototypes("texture")
    pair = torch.stack([normal, abnormal[POSITION_WORDS.index("top left")]])
    pair = pair / pair.norm()  # Frobenius
    assert torch.allclose(pair.norm(dim=-1), torch.full((2,), 1 / math.sqrt(2)))
    s, (h, w) = filo.image_size, filo.grid
    blur = tv.GaussianBlur(3, 4.0)
    per_layer = []
    for layer in filo.layers:
        logits = 100.0 * feats[f"layer{layer}"][0] @ pair.T  # (N, 2)
        up = F.interpolate(logits.T.reshape(1, 2, h, w), size=s, mode="bilinear", align_corners=True)
        prob = torch.softmax(up, dim=1)
        per_layer.append(blur((prob[:, 1] - prob[:, 0] + 1) / 2))
    expected = torch.stack(per_layer).mean(0)[0]
    glob = float(feats["global"][0] @ pair[1])  # cos(g, t_a) / sqrt 2, no softmax
    torch.testing.assert_close(score[0], torch.tensor((glob + float(expected.max())) / 2), atol=1e-5, rtol=1e-5)
    weighted = torch.where(feats["boxmask"][0] == 1, expected, expected * 0.7)
    torch.testing.assert_close(maps[0], weighted, atol=1e-5, rtol=1e-5)


def test_paper_weighting_keeps_exact_ones():
    """test.py:639-641 marks box pixels with the value 1 and then keeps every pixel equal to 1: a saturated pixel
    outside every box is not down-weighted (after the blur no float32 pixel reaches 1, see paper_weighting)."""
    maps = torch.tensor([[[1.0, 0.5], [0.5, 0.25]]])
    inside = torch.tensor([[[False, False], [True, False]]])
    torch.testing.assert_close(paper_weighting(maps, inside), torch.tensor([[[1.0, 0.35], [0.5, 0.175]]]))


def test_vlad_profile_score_reads_the_weighted_map(tiny_backbone, texture_set):
    filo = _filo(tiny_backbone, "vlad", (0.0, 0.0, 0.5, 0.5))
    feats = filo._extract(_x(filo, texture_set["bad"]))
    score, maps = filo._score(feats, "texture", None)
    text = filo._text_batch(feats, "texture")
    glob = torch.softmax(torch.einsum("bd,bkd->bk", feats["global"], text) / 0.07, dim=-1)[:, 1]
    torch.testing.assert_close(score, (glob + maps.flatten(1).amax(-1)) / 2)


# ---------------------------------------------------------------------- fallbacks and few-shot
def test_paper_reads_the_last_refined_stream(tiny_backbone):
    """FiLo's V-V token sets alias one in-place-updated tensor: all hold the last block's refined stream."""
    n = tiny_backbone.num_layers
    assert FiloScorer(tiny_backbone, detector="none").layers == (n,)
    assert len(FiloScorer(tiny_backbone, detector="none", profile="vlad").layers) > 1
    assert FiloScorer(tiny_backbone, detector="none", layers=(2, 3)).layers == (2, 3)


def test_unavailable_detector_falls_back_and_says_so(tiny_backbone, texture_set, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    filo = FiloScorer(tiny_backbone, detector="grounding-dino:/no/such/dir")
    assert filo.detector is None
    r = filo.score(texture_set["good"], "texture")
    assert any("FiLo runs without HQ-Loc" in w for w in r.warnings)
    assert r.anomaly_map.shape == (128, 128)


@pytest.mark.parametrize("profile", ["paper", "vlad"])
def test_few_shot_runs_and_calibrates(tiny_backbone, texture_set, profile):
    filo = FiloScorer(tiny_backbone, detector="none", profile=profile).fit(texture_set["refs"])
    r = filo.score(texture_set["bad"], "texture")
    assert r.threshold_source == "calibrated"
    assert np.isfinite(r.anomaly_map).all()
