"""Rules reaching the scorers: prompts, LAFT transforms, and an end-to-end run through a real (tiny) scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlad.errors import ConfigError
from vlad.laft import coordinates
from vlad.pipeline import Detector
from vlad.rules import RuleSet, apply_rules, configure_scorer, parse_rules
from vlad.scorers import get_scorer


def rules(text: str) -> RuleSet:
    report = parse_rules(text)
    assert report.ok, report.not_understood
    return report.rules


def features(scorer, image) -> dict[str, torch.Tensor]:
    from PIL import Image

    x = scorer.backbone.preprocess([Image.fromarray(image)], scorer.image_size)
    with torch.no_grad():
        return scorer._extract(x)


def test_concepts_join_the_prompt_sets_and_change_the_score(tiny_backbone, texture_set):
    scorer = get_scorer("winclip", backbone=tiny_backbone)
    plain = scorer.score(texture_set["bad"], "bottle").pred_score
    text = "a bent pin is critical\nscratches on the label are fine"
    hits = configure_scorer(scorer, rules(text))
    assert [(h.rule, h.effect, h.detail["set"]) for h in hits] == [
        ("a bent pin is critical", "prompt added", "anomalous"),
        ("scratches on the label are fine", "prompt added", "normal"),
    ]
    assert scorer.ensemble.extra_anomalous == ("{} with bent pin",)
    assert scorer.ensemble.extra_normal == ("{} with scratches on the label",)
    normal, anomalous = scorer.prompts("bottle")
    assert "a cropped photo of the bottle with bent pin." in anomalous
    assert "a cropped photo of the bottle with scratches on the label." in normal
    steered = scorer.score(texture_set["bad"], "bottle").pred_score
    assert steered != pytest.approx(plain, abs=1e-6)
    configure_scorer(scorer, rules(text))  # idempotent
    assert scorer.ensemble.extra_anomalous == ("{} with bent pin",)
    assert configure_scorer(scorer, RuleSet()) == []  # no rules: back to the scorer's own prompts
    assert scorer.ensemble.extra_anomalous == ()
    assert scorer.ensemble.extra_normal == ()
    assert scorer.score(texture_set["bad"], "bottle").pred_score == pytest.approx(plain, abs=1e-6)


def test_an_ignore_concept_rule_projects_the_features_and_changes_the_scores(tiny_backbone, texture_set):
    scorer = get_scorer("winclip", backbone=tiny_backbone)
    before_feats = features(scorer, texture_set["bad"])
    before = scorer.score(texture_set["bad"], "bottle").pred_score
    text = "ignore colour variation between batches"
    (hit,) = configure_scorer(scorer, rules(text))
    assert (hit.rule, hit.effect) == (text, "features transformed")
    assert "colour" in hit.detail["transform"]
    assert scorer.transform.mode == "ignore"
    assert scorer.transform.basis.concepts == ("colour",)
    after_feats = features(scorer, texture_set["bad"])
    for key in ("global", "patches"):
        assert coordinates(after_feats[key], scorer.transform.basis).abs().max() < 1e-4  # colour projected out
        assert coordinates(before_feats[key], scorer.transform.basis).abs().max() > 1e-3
        assert not torch.allclose(after_feats[key], before_feats[key])
    assert scorer.score(texture_set["bad"], "bottle").pred_score != pytest.approx(before, abs=1e-6)
    focus = configure_scorer(scorer, rules("focus on cracks"))
    assert scorer.transform.mode == "guide"
    assert focus[0].detail["concept"] == "cracks"


def test_rule_transforms_combine_with_the_scorers_own_concepts(tiny_backbone):
    scorer = get_scorer("winclip", backbone=tiny_backbone, concepts="ignore lighting")
    own = scorer.transform
    configure_scorer(scorer, rules("ignore colour"))
    assert set(scorer.transform.basis.concepts) == {"lighting", "colour"}
    configure_scorer(scorer, rules("focus on cracks"))
    assert scorer.transform.mode == "guide"
    assert scorer.transform.ignored == ("lighting",)
    configure_scorer(scorer, RuleSet())
    assert scorer.transform is own
    with pytest.raises(ConfigError, match="both ignores and focuses on 'lighting'"):
        configure_scorer(scorer, rules("focus on lighting"))


def test_scorers_without_prompts_say_not_applicable(tiny_backbone):
    text = "a bent pin is critical\nscratches are fine\nignore colour"
    for name in ("laft", "musc"):
        scorer = get_scorer(name, backbone=tiny_backbone)
        hits = configure_scorer(scorer, rules(text))
        assert [(h.rule, h.effect) for h in hits] == [
            ("a bent pin is critical", "not applicable"),
            ("scratches are fine", "not applicable"),
            ("ignore colour", "features transformed"),
        ]
        assert f"scorer {name} has no prompt ensemble" in hits[0].detail["reason"]
        assert scorer.transform.basis.concepts == ("colour",)
    filo = get_scorer("filo", backbone=tiny_backbone, detector="none")
    hits = configure_scorer(filo, rules("a bent pin is critical\nscratches are fine"))
    assert [h.effect for h in hits] == ["prompt added", "prompt added"]  # filo's position prompts take defect rules
    assert any("bent pin" in p for ps in filo._abnormal_prompts("part") for p in ps)


def test_few_shot_scorers_need_their_references_again(tiny_backbone, texture_set):
    refs = texture_set["refs"][:2]
    scorer = get_scorer("winclip", backbone=tiny_backbone).fit(refs)
    with pytest.raises(ConfigError, match="pass references= to configure_scorer"):
        configure_scorer(scorer, rules("ignore colour"))
    configure_scorer(scorer, rules("ignore colour"), references=refs)
    assert scorer.n_references == 2
    memory = scorer._references["patches"]
    assert coordinates(memory, scorer.transform.basis).abs().max() < 1e-4  # references re-extracted with it
    transform = scorer.transform
    configure_scorer(scorer, rules("ignore colour"))  # the same rules again need no references
    assert scorer.transform is transform
    with pytest.raises(ConfigError, match="references"):
        configure_scorer(scorer, RuleSet())  # dropping the transform changes the reference features again


@pytest.fixture(scope="module")
def real_result(tiny_backbone, texture_set):
    """WinCLIP+ on the planted-defect texture (it localises the defect, see test_winclip)."""
    scorer = get_scorer("winclip", backbone=tiny_backbone).fit(texture_set["refs"][:3])
    result = scorer.score(texture_set["bad"], "texture")
    assert result.regions, "the tiny WinCLIP+ no longer finds the planted defect"
    return result


def test_end_to_end_size_and_region_rules_on_a_real_scorer(real_result):
    region = max(real_result.regions, key=lambda r: r.area)
    small_rule = f"ignore anything under {region.area + 1} pixels"
    gone = apply_rules(real_result, rules(small_rule))
    assert region not in gone.regions
    assert not gone.pred_mask[region.bbox[1] : region.bbox[3], region.bbox[0] : region.bbox[2]].any()
    assert any(h.rule == small_rule and h.effect == "region suppressed" for h in gone.rule_hits)
    assert gone.pred_score == real_result.pred_score
    kept = apply_rules(real_result, rules(f"ignore anything under {region.area - 1} pixels"))
    assert region in kept.regions
    assert kept.pred_label == real_result.pred_label
    inside = apply_rules(real_result, rules(f"ignore the {region.position}"))
    assert region not in inside.regions
    other = "top left" if region.position != "top left" else "bottom right"
    outside = apply_rules(real_result, rules(f"ignore the {other} corner"))
    assert region in outside.regions
    if real_result.pred_label and len(real_result.regions) == 1:
        assert gone.pred_label is False
        assert any(h.effect == "verdict lowered" for h in gone.rule_hits)
    assert np.array_equal(gone.anomaly_map, real_result.anomaly_map)


def test_the_pipeline_applies_configuration_and_result_rules(tiny_backbone, texture_set):
    scorer = get_scorer("winclip", backbone=tiny_backbone, threshold=0.0)  # every pixel anomalous: one region
    text = "a bent pin is critical\nignore anything under 100000 pixels"
    (result,) = Detector(scorer, rules=rules(text)).detect_many([texture_set["bad"]], "bottle")
    assert [(h.rule, h.effect) for h in result.rule_hits] == [
        ("a bent pin is critical", "prompt added"),
        ("ignore anything under 100000 pixels", "region suppressed"),
        ("ignore anything under 100000 pixels", "verdict lowered"),
    ]  # the size rule removed the only region first, so no region was left to compare with "bent pin"
    assert result.regions == ()
    assert result.pred_label is False
    assert result.meta["verdict_before_rules"] == "anomalous"


def test_the_report_row_shares_one_defect_type_per_region(tiny_backbone, texture_set):
    scorer = get_scorer("winclip", backbone=tiny_backbone, threshold=0.0)  # every pixel anomalous: one region
    det = Detector(scorer, rules=rules("holes are critical"), explain="template")
    (record,) = det.inspect_many([texture_set["bad"]], "bottle")
    row = record.to_row(det.settings(), explain=True)
    (region,) = row["regions"]
    assert region["defect_type"] in ("holes", "unclassified")  # the rules' matching named it, or found no clear winner
    assert row["report"]["defect_type"] == region["defect_type"]
    word = "looks like holes" if region["defect_type"] == "holes" else "defect type unclassified"
    assert word in row["explanation"]
    severity = [h for h in row["rule_hits"] if h["effect"].startswith("severity")]
    assert [h["detail"]["defect_type"] for h in severity] == ["holes"] * (region["defect_type"] == "holes")
