"""FiLo, training-free: defect phrases, position-enhanced prompts, HQ-Loc box weighting, detector fallback."""

from __future__ import annotations

import numpy as np
import torch

from vlad.grounding import Box
from vlad.resources import load_prompt_file
from vlad.result import POSITION_WORDS
from vlad.scorers.filo import FiloScorer, defect_phrases, visual_phrases


class FakeDetector:
    """Returns one fixed box (in the coordinates of the image it is given) and records the phrases."""

    def __init__(self, frac_box):
        self.frac_box = frac_box
        self.calls = []

    def detect(self, image, phrases, *, threshold=None):
        self.calls.append(list(phrases))
        w, h = image.size
        x0, y0, x1, y1 = self.frac_box
        return [Box((x0 * w, y0 * h, x1 * w, y1 * h), 0.9, phrases[0], image_size=(w, h))]


def test_phrases_are_visual_and_fall_back_to_generic():
    bank = load_prompt_file("filo")
    assert visual_phrases(["unusual odor", "a crack", "a strange Smell"], bank["non_visual_words"]) == ["a crack"]
    for name, phrases in bank["classes"].items():
        assert defect_phrases(name, bank) == phrases, name  # the shipped lists are all visual
    assert defect_phrases("Bottle", bank) == bank["classes"]["bottle"]
    assert defect_phrases("gearbox housing", bank) == bank["generic"]
    assert defect_phrases("pipe_fryum", bank) == bank["classes"]["pipe fryum"]


def test_position_enhanced_prompts(tiny_backbone):
    filo = FiloScorer(tiny_backbone, detector="none")
    per_position = filo._abnormal_prompts("bottle")
    assert len(per_position) == 9
    for position, prompts in zip(POSITION_WORDS, per_position, strict=True):
        assert all(p.endswith(f"at the {position}.") for p in prompts)
        assert "a photo of a bottle with a crack in the rim at the " + position + "." in prompts
    normal, abnormal = filo.position_prototypes("bottle")
    assert normal.shape == (tiny_backbone.embed_dim,) and abnormal.shape == (10, tiny_backbone.embed_dim)


def test_hq_loc_picks_the_box_position_and_downweights_outside(tiny_backbone, texture_set):
    plain = FiloScorer(tiny_backbone, detector="none")
    boxed = FiloScorer(tiny_backbone, detector="none")
    boxed.detector = FakeDetector((0.0, 0.0, 0.5, 0.5))  # top-left quarter
    x = tiny_backbone.preprocess([__import__("PIL.Image", fromlist=["Image"]).fromarray(texture_set["bad"])],
                                 boxed.image_size)  # fmt: skip
    fp, fb = plain._extract(x), boxed._extract(x)
    assert int(fp["position"][0]) == 9 and int(fb["position"][0]) == POSITION_WORDS.index("top left")
    assert boxed.detector.calls[0][:5] == ["anomaly", "damage", "broken", "defect", "contamination"]
    weights = fb["boxmask"][0]
    half = boxed.image_size // 2
    assert torch.all(weights[:half, :half] == 1) and torch.allclose(weights[half:, half:], torch.tensor(0.7))
    _, maps_boxed = boxed._score(fb, "texture", None)
    # same text for both when the position is forced equal: isolate the 0.7 weighting
    fb_all = {**fb, "position": fp["position"]}
    _, maps_all = boxed._score(fb_all, "texture", None)
    _, maps_plain = plain._score(fp, "texture", None)
    torch.testing.assert_close(maps_all[0, :half, :half], maps_plain[0, :half, :half])
    torch.testing.assert_close(maps_all[0, half:, half:], 0.7 * maps_plain[0, half:, half:])
    assert not torch.allclose(maps_boxed, maps_all)  # the top-left prompts differ from the all-position ones


def test_unavailable_detector_falls_back_and_says_so(tiny_backbone, texture_set, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    filo = FiloScorer(tiny_backbone, detector="grounding-dino:/no/such/dir")
    assert filo.detector is None
    r = filo.score(texture_set["good"], "texture")
    assert any("FiLo runs without HQ-Loc" in w for w in r.warnings)
    assert r.anomaly_map.shape == (128, 128)


def test_few_shot_runs_and_calibrates(tiny_backbone, texture_set):
    filo = FiloScorer(tiny_backbone, detector="none").fit(texture_set["refs"])
    r = filo.score(texture_set["bad"], "texture")
    assert r.threshold_source == "calibrated" and np.isfinite(r.anomaly_map).all()
