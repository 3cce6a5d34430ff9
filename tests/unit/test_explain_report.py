"""The report schema, the reply parser, and the template backend's explanations and answers."""

from __future__ import annotations

import json

import pytest

from tests.helpers.explain_data import GOOD_REPORT, good_reply, make_image, make_result
from vlad.explain.evidence import build_evidence, build_facts
from vlad.explain.explainer import explain, facts_text, report_text
from vlad.explain.schema import AnomalyReport, parse_report, report_json_schema, response_format
from vlad.explain.template import TemplateBackend, answer, classify, explain_text, template_report
from vlad.result import RuleHit


# ---------------------------------------------------------------------- schema
def test_schema_is_strict_and_complete():
    schema = report_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"]) == set(GOOD_REPORT)
    assert schema["properties"]["severity"]["enum"] == ["none", "minor", "major", "critical"]
    rf = response_format()
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["name"] == "anomaly_report"
    assert rf["json_schema"]["schema"] == schema


@pytest.mark.parametrize(
    "text",
    [good_reply(), f"```json\n{good_reply()}\n```", f"Here is the report:\n{good_reply()}\nThanks."],
)
def test_valid_reports_parse(text):
    parsed = parse_report(text)
    assert parsed.error is None
    assert parsed.report == AnomalyReport(**GOOD_REPORT)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("no json here", "no JSON object"),
        ("{not: json}", "not valid JSON"),
        ("[1, 2] {", "no JSON object"),
        (good_reply(extra="x"), "extra: Extra inputs are not permitted"),
        (good_reply(verdict="Anomalous"), "verdict: Input should be 'normal' or 'anomalous'"),
        (good_reply(confidence=1.5), "confidence: Input should be less than or equal to 1"),
        (good_reply(model_says_anomalous="maybe"), "model_says_anomalous"),
        (json.dumps({k: v for k, v in GOOD_REPORT.items() if k != "rationale"}), "rationale: Field required"),
    ],
)
def test_invalid_replies_give_a_one_line_reason(text, reason):
    parsed = parse_report(text)
    assert parsed.report is None
    assert reason in parsed.error
    assert "\n" not in parsed.error


# ---------------------------------------------------------------------- template explanations
def _facts(**kw) -> dict:
    return build_facts(make_result(**kw), "bottle")


def test_template_explanation_states_verdict_regions_rules_and_cautions():
    facts = _facts(
        rule_hits=[RuleHit("ignore the label", "suppressed 1 region")],
        warnings=["backbone random:tiny has random weights: scores and maps are meaningless"],
    )
    text = explain_text(facts)
    assert text.startswith(
        "vlad's winclip scorer judges this bottle anomalous: its score 0.8000 is above the threshold"
    )
    assert "2 areas are above the pixel threshold: the top left (2.0 % of the image), the bottom right (1.0 %" in text
    assert 'Rules applied: "ignore the label" (suppressed 1 region).' in text
    assert "random weights" in text


def test_template_report_restates_the_detector():
    report = template_report(_facts())
    assert report.verdict == "anomalous"
    assert report.model_says_anomalous is True
    assert report.location == "top left, bottom right"
    assert report.defect_type == "anomaly"
    assert report.severity == "major"  # normalised 0.8 >= 0.75
    assert report.confidence == pytest.approx(0.6)
    normal = template_report(_facts(blobs=[], score=0.3, label=False))
    assert (normal.verdict, normal.severity, normal.location, normal.defect_type) == ("normal", "none", "none", "none")
    assert normal.confidence == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("score", "blobs", "severity"),
    [
        (0.6, [(0, 0, 10, 10, 0.9)], "minor"),
        (0.95, [(0, 0, 150, 150, 0.9)], "critical"),
        (0.6, [(0, 0, 100, 100, 0.9)], "major"),
    ],
)
def test_template_severity_heuristic(score, blobs, severity):
    assert template_report(_facts(score=score, blobs=blobs)).severity == severity


def test_template_explain_outcome_has_a_valid_report():
    ev = build_evidence(make_image(), make_result(), "bottle")
    outcome = explain(ev, TemplateBackend())
    assert outcome.error is None
    assert not outcome.unparseable
    assert outcome.explanation.backend == "template"
    opinion = {k: outcome.report[k] for k in ("model_says_anomalous", "confidence")}
    assert opinion == {"model_says_anomalous": None, "confidence": None}  # only a model has an opinion
    restated = {k: v for k, v in outcome.report.items() if k not in opinion}
    assert AnomalyReport.model_validate({**restated, "model_says_anomalous": True, "confidence": 1.0}).verdict == (
        "anomalous"
    )


# ---------------------------------------------------------------------- template answers
@pytest.mark.parametrize(
    ("question", "intents"),
    [
        ("Where is it?", ["location"]),
        ("how big is the defect?", ["size"]),
        ("How sure are you?", ["confidence"]),
        ("what rule fired?", ["rules"]),
        ("Why is it anomalous?", ["why"]),
        ("is it ok?", ["verdict"]),
        ("where is it and how large?", ["location", "size"]),
        ("help", ["help"]),
        ("what colour is the cap?", []),
        ("is it a hole?", ["kind"]),
        ("Is that a scratch or a crack on the rim?", ["kind"]),
        ("does it have a dent?", ["kind"]),
        ("is it a defect?", ["verdict"]),
        ("would you reject this?", ["decision"]),
        ("should I accept it?", ["decision"]),
    ],
)
def test_questions_are_classified(question, intents):
    assert classify(question) == intents


def test_fact_answers_come_from_the_facts():
    facts = _facts(rule_hits=[RuleHit("ignore the label", "suppressed 1 region", {"area": 12})])
    assert answer("where?", facts) == (
        "The anomalous areas are at the top left (pixels x 30-69, y 20-49) and the bottom right (pixels x 250-279, "
        "y 150-169)."
    )
    size = answer("how big is it?", facts)
    assert "covering 3.00 % of the image" in size
    assert "the top left covers 2.00 % (1200 px, box 40 x 30 px)" in size
    sure = answer("how sure?", facts)
    assert "0.8000 against a threshold of 0.5000 (the scorer's default threshold" in sure
    assert "0.80" in sure
    assert (
        answer("what rule fired?", facts) == 'One rule fired: "ignore the label", which suppressed 1 region (area: 12).'
    )
    why = answer("why?", facts)
    assert why.startswith("vlad's winclip scorer judges this bottle anomalous")
    assert "ignore the label" in why


def test_fact_answers_for_a_normal_image():
    facts = _facts(blobs=[(280, 180, 290, 190, 0.4)], score=0.2, label=False, threshold_source="calibrated")
    assert answer("where?", facts).endswith("The strongest response of the map is at the bottom right of the image.")
    assert answer("how big?", facts).startswith("Nothing is above the pixel threshold")
    assert "calibrated on normal reference images" in answer("how confident are you?", facts)
    assert answer("did any rule fire?", facts) == "No rule fired: no rules changed this result."


def test_other_questions_say_a_model_is_needed_and_how():
    text = answer("What colour is the cap?", _facts())
    assert "needs a language model" in text
    assert "--lvlm openai:http://127.0.0.1:8000/v1" in text


def test_random_weights_are_mentioned_when_asked_how_sure():
    facts = _facts(warnings=["backbone random:tiny has random weights: scores and maps are meaningless"])
    assert answer("how sure?", facts).endswith("These numbers come from random backbone weights and mean nothing.")


def _named(**kw) -> dict:
    """Facts whose two regions carry defect phrases (as when a CLIP backbone named them)."""
    return build_facts(make_result(**kw), "bottle", region_phrases=["a hole", "a scratch"])


def test_kind_questions_answer_yes_from_the_region_phrases():
    facts = _named(rule_hits=[RuleHit("any hole is critical", "prompt added")])
    text = answer("is it a hole?", facts)
    assert text.startswith(
        "Yes, most likely: of the defect descriptions vlad compares, the closest one for the area at the top left is "
        '"a hole".'
    )
    assert "(The part's verdict is anomalous.)" in text
    assert 'The rule "any hole is critical" is about it: prompt added.' in text
    assert 'the area at the bottom right is "a scratch"' in answer("are there any scratches?", facts)


def test_kind_questions_answer_no_and_unclear():
    text = answer("is it a crack?", _named())
    assert text.startswith(
        'Probably not a crack: the closest defect descriptions vlad found are "a hole" at the top left and "a scratch" '
        "at the bottom right."
    )
    unnamed = answer("is it a hole?", _facts())  # no backbone named the regions
    assert unnamed.startswith("I cannot tell: the detector marks 2 areas but names no defect type")
    assert "needs a language model" in unnamed
    assert answer("is it a hole?", _facts(blobs=[], score=0.3, label=False)) == (
        "No hole that the detector can see: no area is above the pixel threshold and the part is normal."
    )


def test_would_you_reject_answers_from_the_verdict_and_the_rules_that_decided():
    hits = [
        RuleHit("any hole is critical", "prompt added", {"set": "anomalous"}),
        RuleHit("a dent is a defect", "verdict raised", {"before": "normal", "after": "anomalous"}),
    ]
    text = answer("would you reject this?", _facts(rule_hits=hits))
    assert text.startswith("I would reject it: the verdict is anomalous (score 0.8000 against the threshold 0.5000).")
    assert 'The rules decided it: "a dent is a defect" (verdict raised).' in text
    assert text.endswith('Applied without changing the verdict: "any hole is critical" (prompt added).')
    normal = answer("should I accept it?", _facts(blobs=[], score=0.3, label=False))
    assert normal == (
        "I would accept it: the verdict is normal (score 0.3000 against the threshold 0.5000). No rule changed this "
        "verdict: it is the detector's score against the threshold."
    )
    near = answer("would you reject this?", _facts(score=0.55))
    assert "close to the threshold, so a second look by a person is advisable" in near


# ---------------------------------------------------------------------- prompt text and report rendering
def test_facts_text_lists_every_fact():
    facts = build_facts(make_result(rule_hits=[RuleHit("r1", "e1")], warnings=["w1"]), "bottle", process_note="cast")
    text = facts_text(facts)
    assert "- verdict: anomalous; image score 0.8000 against the threshold 0.5000 (default threshold)" in text
    assert "- region 1: top left, box (30, 20)-(70, 50) px, 2.00 % of the image, peak 0.9000" in text
    assert '- rule "r1" fired: e1' in text
    assert "- warning: w1" in text
    assert text.endswith("cast")


def test_report_text_leads_with_the_detector_and_states_disagreement():
    facts = _facts()
    agree = report_text(AnomalyReport(**GOOD_REPORT), facts)
    assert agree == (
        "The bottle is anomalous (detector score 0.8000, threshold 0.5000). Defect: scratch at the top "
        "left, severity minor. A thin bright line crosses the glass near the rim."
    )
    disagree = report_text(AnomalyReport(**{**GOOD_REPORT, "model_says_anomalous": False, "confidence": 0.3}), facts)
    assert disagree.endswith("judges the bottle normal (confidence 0.30); the detector's verdict stands.")


def test_import_explain_is_light():
    import subprocess
    import sys

    heavy = "['torch', 'transformers', 'openai', 'pydantic', 'open_clip']"
    for modules, allowed in (("vlad.explain", []), ("vlad.cli.chat", ["pydantic"])):  # the CLI loads the rules schema
        code = f"import json, sys, {modules}\nprint(json.dumps([m for m in {heavy} if m in sys.modules]))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == allowed, modules
