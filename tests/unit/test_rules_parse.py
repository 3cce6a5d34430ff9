"""From words to rules: the deterministic parser, contradictions, and parsing through a (fake) language model."""

from __future__ import annotations

import json

import pytest

from vlad.errors import ConfigError
from vlad.rules import RuleSet, parse_rules
from vlad.rules.parse import concept_key, singular, split_clauses

# (what the user writes, the structured rules expected; "policy" stands for the verdict policy)
PHRASINGS = [
    ("scratches on the label are fine", [{"kind": "acceptable", "concept": "scratches", "where": {"object": "label"}}]),
    ("Minor discolouration is acceptable", [{"kind": "acceptable", "concept": "minor discolouration"}]),
    ("ignore colour (variation between batches)", [{"kind": "ignore_concept", "concept": "colour"}]),
    (
        "ignore color and lighting",
        [{"kind": "ignore_concept", "concept": "colour"}, {"kind": "ignore_concept", "concept": "lighting"}],
    ),
    ("focus on cracks", [{"kind": "focus_concept", "concept": "cracks"}]),
    ("a missing screw is always a defect", [{"kind": "defect", "concept": "missing screw", "severity": "major"}]),
    ("a bent pin is critical", [{"kind": "defect", "concept": "bent pin", "severity": "critical"}]),
    ("Burrs are a cosmetic defect", [{"kind": "defect", "concept": "burrs", "severity": "minor"}]),
    (
        "dents smaller than 1 % of the part are fine",
        [{"kind": "min_size", "value": 1.0, "unit": "percent_object", "concept": "dents"}],
    ),
    (
        "defects smaller than 2% of the image are fine",
        [{"kind": "min_size", "value": 2.0, "unit": "percent_image", "concept": None}],
    ),
    ("ignore anything under 50 pixels", [{"kind": "min_size", "value": 50.0, "unit": "pixels", "concept": None}]),
    ("only the upper half matters", [{"kind": "region", "mode": "only", "positions": ["top half"], "box": None}]),
    ("ignore the top left corner", [{"kind": "region", "mode": "ignore", "positions": ["top left"], "box": None}]),
    (
        "ignore the region [0.1, 0.2, 0.5, 0.6]",
        [{"kind": "region", "mode": "ignore", "positions": [], "box": [0.1, 0.2, 0.5, 0.6]}],
    ),
    ("the left side doesn't matter", [{"kind": "region", "mode": "ignore", "positions": ["left half"]}]),
    (
        "ignore the top left and top right corners",
        [{"kind": "region", "mode": "ignore", "positions": ["top left", "top right"]}],
    ),
    ("a screw must be present", [{"kind": "required_object", "object": "screw", "min_count": 1}]),
    ("each part must have two clips", [{"kind": "required_object", "object": "clip", "min_count": 2}]),
    ("reject cracked caps", [{"kind": "defect", "concept": "cracked caps", "severity": "major"}]),
    ("only critical defects fail", [{"policy": "critical"}]),
    ("there must be 2 screws", [{"kind": "required_object", "object": "screw", "min_count": 2}]),
    ("there should be at least three batteries", [{"kind": "required_object", "object": "battery", "min_count": 3}]),
    ("fail only on major defects", [{"policy": "major"}]),
    ("minor defects are acceptable", [{"policy": "major"}]),
    (
        "scratches in the top left corner are ok",
        [{"kind": "acceptable", "concept": "scratches", "where": {"positions": ["top left"]}}],
    ),
]


def _subset(actual: dict, expected: dict) -> bool:
    for key, value in expected.items():
        if isinstance(value, dict):
            if not isinstance(actual.get(key), dict) or not _subset(actual[key], value):
                return False
        elif actual.get(key) != value:
            return False
    return True


@pytest.mark.parametrize(("text", "expected"), PHRASINGS, ids=[p[0] for p in PHRASINGS])
def test_phrasings_become_the_expected_rules(text, expected):
    report = parse_rules(text)
    assert report.ok, (report.not_understood, report.contradictions)
    rules = [r.model_dump(mode="json") for r in report.rules.rules]
    want_rules = [e for e in expected if "policy" not in e]
    assert len(rules) == len(want_rules)
    for got, want in zip(rules, want_rules, strict=True):
        assert _subset(got, want), (got, want)
        assert got["text"] == text  # the user's words are kept
    policies = [e["policy"] for e in expected if "policy" in e]
    assert report.rules.policy.fail_at == (policies[0] if policies else "minor")
    assert len(report.understood) == len(expected)
    assert all(line.startswith("I understood: ") and text in line for line in report.understood)


def test_many_rules_at_once_keep_order_and_say_what_was_not_understood():
    text = (
        "scratches on the label are fine\n- a bent pin is critical; only the upper half matters. "
        "The moon is made of cheese\n\n3. there must be 2 screws\nfail only on major defects"
    )
    report = parse_rules(text)
    assert [r.kind for r in report.rules.rules] == ["acceptable", "defect", "region", "required_object"]
    assert report.rules.policy.fail_at == "major"
    assert len(report.not_understood) == 1
    assert report.not_understood[0].startswith("'The moon is made of cheese': no rule pattern matches; write e.g.")
    assert not report.ok
    assert len(report.understood) == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dents smaller than 150 % are fine", "size 150 % is out of range; use a percentage above 0 and at most 100"),
        ("defects smaller than 0% of the image are fine", "size 0 % is out of range"),
        ("ignore anything under 0 pixels", "size 0 pixels is out of range"),
        ("ignore the foo corner", "unknown position 'foo'; allowed: top left, top, top right"),
        ("only the upper quarter matters", "unknown position 'upper quarter'; allowed:"),
        ("ignore the region [0.5, 0.2, 0.1, 0.6]", "0 <= x0 < x1 <= 1"),
        ("focus on the screws", "'focus on' needs a LAFT concept; known concepts: "),
        ("defects are critical", "names no kind of defect"),
        ("everything is fine", "would accept every finding"),
        ("critical defects are fine", "critical is the highest severity"),
        ("defects bigger than lots matter", "no rule pattern matches"),
        ("regions less than 5 furlongs are fine", "looks like a size rule"),
        ("ignore scratches within 10 pixels of the border", "holds a size or distance that no rule pattern reads"),
        ("reject dents near the 5 mm hole", "holds a size or distance"),
        ("ignore anything within 0 pixels of the border", "size 0 pixels is out of range"),
        ("reject any stain larger than -5 mm", "size -5 mm is out of range"),
        ("holes larger than 2 % are fine", "looks like a size rule"),
    ],
)
def test_bad_rules_are_reported_with_reasons(text, message):
    report = parse_rules(text)
    assert not report.rules.rules
    assert len(report.not_understood) == 1
    assert report.not_understood[0].startswith(repr(text))
    assert message in report.not_understood[0]


def test_empty_rules_are_an_error():
    for text in ("", "   \n ; "):
        with pytest.raises(ConfigError, match="no rules given"):
            parse_rules(text)


def test_contradictions_name_both_rules():
    report = parse_rules("scratches are fine\nScratches are critical")
    assert len(report.contradictions) == 1
    line = report.contradictions[0]
    assert '"scratches are fine"' in line
    assert '"Scratches are critical"' in line
    assert not report.ok
    assert len(report.rules.rules) == 2  # both kept, so the user sees both

    more = parse_rules(
        "a dent is a minor defect; dents are critical\nignore colour; focus on colour\n"
        "fail only on major defects\nfail only on critical defects\nonly the top half matters; ignore the upper half"
    )
    assert len(more.contradictions) == 4
    joined = "\n".join(more.contradictions)
    for words in (
        "a dent is a minor defect",
        "dents are critical",
        "ignore colour",
        "focus on colour",
        "fail only on major defects",
        "fail only on critical defects",
        "only the top half matters",
        "ignore the upper half",
    ):
        assert f'"{words}"' in joined


def test_location_exceptions_are_not_contradictions():
    report = parse_rules("scratches on the label are fine\nscratches are critical")
    assert report.ok


@pytest.mark.parametrize(
    "text", ["scratches are fine, dents are critical", "scratches are fine and dents are critical"]
)
def test_a_clause_holding_two_rules_is_split(text):
    report = parse_rules(text)
    assert [(r.kind, r.concept) for r in report.rules.rules] == [("acceptable", "scratches"), ("defect", "dents")]
    assert [r.text for r in report.rules.rules] == ["scratches are fine", "dents are critical"]  # each part's words


def test_relative_clauses_stay_whole():
    report = parse_rules("a screw that is loose is a defect\nscratches and dents are fine")
    assert [(r.kind, r.concept) for r in report.rules.rules] == [
        ("defect", "screw that is loose"),
        ("acceptable", "scratches and dents"),
    ]


def test_helpers():
    assert split_clauses("a. b 1.5 % c; d\n- e!") == ["a", "b 1.5 % c", "d", "e"]
    assert [singular(w) for w in ("screws", "boxes", "batteries", "glass", "bus", "pin")] == [
        "screw",
        "box",
        "battery",
        "glass",
        "bus",
        "pin",
    ]
    assert concept_key("The Scratches") == concept_key("a scratch") == "scratch"


# ---------------------------------------------------------------------------------------------------- language model
LLM_RULES = {
    "rules": [
        {
            "kind": "acceptable",
            "concept": "scratches",
            "where": {"object": "label"},
            "text": "Kratzer auf dem Etikett sind ok",
        },
        {"kind": "ignore_concept", "concept": "colour", "text": "Farbe ignorieren"},
    ],
    "policy": {"fail_at": "critical", "text": "nur kritische Fehler zählen"},
}


def test_parsing_through_a_language_model(fake):
    fake.replies = [json.dumps(LLM_RULES)]
    text = "Kratzer auf dem Etikett sind ok\nFarbe ignorieren\nnur kritische Fehler zählen\nblah blah"
    report = parse_rules(text, lvlm=f"openai:{fake.url}")
    assert report.source.startswith("openai:")
    assert [r.kind for r in report.rules.rules] == ["acceptable", "ignore_concept"]
    assert report.rules.policy.fail_at == "critical"
    assert report.not_understood == ["'blah blah': no rule was made of it"]
    assert any("validated with the rule schema" in n for n in report.notes)
    body = fake.chat_requests()[-1]
    assert body["response_format"]["type"] == "json_schema"
    assert "required_object" in json.dumps(body["response_format"]["json_schema"]["schema"])
    assert body["messages"][-1]["content"] == text


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("this is not json", "sent an invalid rule set"),
        (json.dumps({"rules": [{"kind": "ignore_concept", "concept": "screws"}]}), "not a LAFT concept"),
        (json.dumps({"rules": [{"kind": "defect", "concept": "x", "colour": "red"}]}), "unknown key"),
    ],
)
def test_an_invalid_model_reply_falls_back_and_says_so(fake, reply, why):
    fake.replies = [reply]
    report = parse_rules("a bent pin is critical", lvlm=f"openai:{fake.url}")
    assert report.source == "deterministic"
    assert report.rules.rules[0].concept == "bent pin"
    assert "deterministic parser was used" in report.notes[0]
    assert why in report.notes[0]


def test_an_unreachable_model_falls_back(fake):
    fake.mode = "500"
    report = parse_rules("ignore colour", lvlm=f"openai:{fake.url}", timeout=5)
    assert report.rules.rules[0].kind == "ignore_concept"
    assert "deterministic parser was used" in report.notes[0]
    bad_spec = parse_rules("ignore colour", lvlm="carrier-pigeon:coo")
    assert "deterministic parser was used" in bad_spec.notes[0]


def test_fenced_replies_through_the_explainers_openai_client(fake):
    from vlad.explain.backends import load_backend

    fake.replies = ["```json\n" + json.dumps(LLM_RULES) + "\n```"]
    client = load_backend(f"openai:{fake.url}", timeout=5)  # the one OpenAI-compatible client
    report = parse_rules("Farbe ignorieren", lvlm=client)
    assert report.source.startswith(f"openai:{fake.url}")
    assert RuleSet.model_validate(LLM_RULES) == report.rules
    assert fake.chat_requests()[-1]["response_format"]["json_schema"]["name"] == "rule_set"


# ---------------------------------------------------------------------------------------------------- factory phrasings
FACTORY = [
    ("ignore specks under 1 %", {"kind": "min_size", "value": 1.0, "unit": "percent_image", "concept": None}),
    ("ignore anything within 10 pixels of the border", {"kind": "border", "width": 10.0, "unit": "pixels"}),
    ("ignore everything within 3 % of the image edges", {"kind": "border", "width": 3.0, "unit": "percent_side"}),
    ("ignore the edges", {"kind": "border", "width": 5.0, "unit": "percent_side"}),
    ("the border doesn't matter", {"kind": "border", "width": 5.0, "unit": "percent_side"}),
    ("ignore the left edge", {"kind": "region", "mode": "ignore", "positions": ["left"]}),
    (
        "holes bigger than 2 % of the image are critical",
        {"kind": "defect", "concept": "holes", "severity": "critical", "min_size": 2.0, "unit": "percent_image"},
    ),
    (
        "reject any stain larger than 5 mm",
        {"kind": "defect", "concept": "stain", "severity": "major", "min_size": 5.0, "unit": "mm"},
    ),
    (
        "anything larger than 5 % is critical",
        {"kind": "defect", "concept": None, "severity": "critical", "min_size": 5.0, "unit": "percent_image"},
    ),
    (
        "scratches longer than 3 mm are a minor defect",
        {"kind": "defect", "concept": "scratches", "severity": "minor", "min_size": 3.0, "unit": "mm"},
    ),
    ("ignore stains smaller than 0.5 mm", {"kind": "min_size", "value": 0.5, "unit": "mm", "concept": "stains"}),
    ("don't flag lint", {"kind": "acceptable", "concept": "lint", "where": None}),
    ("do not reject dust on the lens", {"kind": "acceptable", "concept": "dust", "where": {"object": "lens"}}),
    ("lint should not be flagged", {"kind": "acceptable", "concept": "lint"}),
    ("a bent pin is critical", {"kind": "defect", "concept": "bent pin", "min_size": None}),
]


@pytest.mark.parametrize(("text", "expected"), FACTORY, ids=[p[0] for p in FACTORY])
def test_factory_phrasings_parse(text, expected):
    report = parse_rules(text)
    assert report.ok, (report.not_understood, report.contradictions)
    (rule,) = [r.model_dump(mode="json") for r in report.rules.rules]
    assert _subset(rule, expected), rule
    assert rule["text"] == text
    (line,) = report.understood
    assert line.startswith("I understood: ")
    assert f'(from "{text}")' in line


def test_the_camera_scale_is_a_product_setting():
    report = parse_rules("reject any stain larger than 5 mm\nthe camera sees 12 pixels per mm")
    assert report.ok
    assert report.rules.px_per_mm == 12.0
    assert report.understood[-1].startswith("I understood: the photos have 12 pixels per millimetre")
    for text in ("4 px/mm", "scale: 4 pixels per millimetre", "4 pixels per millimeter"):
        assert parse_rules(text).rules.px_per_mm == 4.0
    without = parse_rules("reject any stain larger than 5 mm")
    assert without.ok
    assert any("px_per_mm" in note for note in without.notes)  # said at once, not only when a part is inspected
    bad = parse_rules("0 pixels per mm")
    assert "must be above 0" in bad.not_understood[0]


def test_sized_severities_are_not_contradictions():
    assert parse_rules("holes are minor\nholes bigger than 2 % of the image are critical").ok
    clash = parse_rules("holes bigger than 2 % are minor\nholes bigger than 2 % are critical")
    assert len(clash.contradictions) == 1
    assert not parse_rules("holes are fine\nholes bigger than 2 % are critical").ok  # acceptable would hide them all


def test_one_understood_line_per_rule_the_rule_set_keeps():
    same = parse_rules("fail only on major defects\nonly major defects fail")
    assert len(same.understood) == 1  # the rule set holds one verdict policy
    assert '"only major defects fail"' in same.understood[0]
    assert any('"fail only on major defects"' in n and "replaced" in n for n in same.notes)
    clash = parse_rules("fail only on major defects\nfail only on critical defects")
    assert len(clash.understood) == 1
    assert len(clash.contradictions) == 1


def test_a_language_model_reply_with_the_new_kinds_is_said_back_line_for_line(fake):
    reply = {
        "rules": [
            {"kind": "border", "width": 10, "unit": "pixels", "text": "ignore anything within 10 pixels of the border"},
            {"kind": "defect", "concept": "stain", "min_size": 5, "unit": "mm", "text": "reject stains over 5 mm"},
        ],
        "px_per_mm": 12,
        "px_per_mm_text": "12 pixels per mm",
    }
    fake.replies = [json.dumps(reply)]
    text = "ignore anything within 10 pixels of the border\nreject stains over 5 mm\n12 pixels per mm"
    report = parse_rules(text, lvlm=f"openai:{fake.url}")
    assert report.source.startswith("openai:")
    assert report.ok, report.not_understood
    assert report.rules.px_per_mm == 12
    assert len(report.understood) == 3
    assert report.understood[-1].endswith('(from "12 pixels per mm")')
    assert "border" in fake.chat_requests()[-1]["messages"][0]["content"]
