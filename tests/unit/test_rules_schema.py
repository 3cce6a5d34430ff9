"""The rule model: strict validation, YAML/JSON round trips, product profiles."""

from __future__ import annotations

import json

import pytest

from vlad.errors import ConfigError
from vlad.rules import (
    AcceptableRule,
    Area,
    DefectRule,
    FocusConceptRule,
    IgnoreConceptRule,
    MinSizeRule,
    ProductProfile,
    RegionRule,
    RequiredObjectRule,
    RuleSet,
    VerdictPolicy,
    load_profile,
    load_rules,
    save_profile,
    save_rules,
)
from vlad.rules.schema import area_box, canonical_area, severity_rank


def full_ruleset() -> RuleSet:
    return RuleSet(
        rules=[
            DefectRule(concept="bent pin", severity="critical", text="a bent pin is critical"),
            AcceptableRule(concept="scratches", where=Area(object="label"), text="scratches on the label are fine"),
            AcceptableRule(concept="dust", where=Area(positions=["upper-left"], box=[0.5, 0.5, 1.0, 1.0])),
            IgnoreConceptRule(concept="color", text="ignore color"),
            FocusConceptRule(concept="crack", text="focus on cracks"),
            MinSizeRule(value=1, unit="percent_object", concept="dents", text="dents smaller than 1 % are fine"),
            MinSizeRule(value=50, unit="pixels"),
            RegionRule(mode="only", positions=["upper half"], text="only the upper half matters"),
            RegionRule(mode="ignore", box=[0.0, 0.0, 0.25, 0.25]),
            RequiredObjectRule(object="screw", min_count=2, text="there must be 2 screws"),
        ],
        policy=VerdictPolicy(fail_at="major", text="fail only on major defects"),
    )


def test_values_are_normalised():
    rs = full_ruleset()
    assert RuleSet().is_empty
    assert not rs.is_empty
    assert not RuleSet(policy=VerdictPolicy(fail_at="critical")).is_empty
    assert rs.rules[2].where.positions == ["top left"]
    assert rs.rules[3].concept == "colour"  # LAFT alias -> canonical name
    assert rs.rules[4].concept == "cracks"
    assert rs.rules[7].positions == ["top half"]
    assert canonical_area("Lower-Right") == "bottom right"
    assert canonical_area("centre") == "center"
    assert canonical_area("upside") is None
    assert area_box("top half") == (0.0, 0.0, 1.0, 0.5)
    assert [severity_rank(s) for s in ("minor", "major", "critical")] == [0, 1, 2]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_ruleset_file_round_trip(tmp_path, suffix):
    rs = full_ruleset()
    path = save_rules(rs, tmp_path / f"rules{suffix}")
    assert load_rules(path) == rs
    if suffix == ".json":
        assert json.loads(path.read_text())["policy"]["fail_at"] == "major"


def test_ruleset_text_round_trip_and_bare_list():
    rs = full_ruleset()
    assert RuleSet.from_text(rs.to_yaml()) == rs
    assert RuleSet.from_text(rs.to_json()) == rs
    bare = RuleSet.from_text("- {kind: defect, concept: crack}\n- {kind: required_object, object: cap}")
    assert [r.kind for r in bare.rules] == ["defect", "required_object"]
    assert bare.rules[0].severity == "major"
    assert bare.rules[1].min_count == 1
    assert bare.rules[0].label == '"crack" is a major defect'  # no text: the description stands in


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rules: [{kind: defect, concept: x, colour: red}]", r"rules\.0\.colour: unknown key"),
        ("rules: [{kind: smell, concept: x}]", "unknown rule kind; allowed kinds: defect, acceptable"),
        ("rules: [{kind: min_size, value: 150}]", "size 150 % is out of range"),
        ("rules: [{kind: min_size, value: 0, unit: pixels}]", "size 0 pixels is out of range"),
        ("rules: [{kind: min_size, value: -2}]", "out of range"),
        ("rules: [{kind: region, mode: only, positions: [upside]}]", "unknown position 'upside'; allowed: top left"),
        ("rules: [{kind: region, mode: ignore}]", "needs positions or a box"),
        ("rules: [{kind: region, mode: ignore, box: [0.5, 0, 0.2, 1]}]", "0 <= x0 < x1 <= 1"),
        ("rules: [{kind: ignore_concept, concept: screws}]", "'screws' is not a LAFT concept; known concepts: "),
        ("rules: [{kind: defect, concept: x, severity: fatal}]", "severity"),
        ("rules: [{kind: required_object, object: screw, min_count: 0}]", "min_count"),
        ("rules: [{kind: acceptable, concept: '  '}]", "must name something"),
        ("policy: {fail_at: major}\npolcy: 1", "polcy: unknown key"),
        ("rules: [oops", "not valid YAML/JSON"),
    ],
)
def test_invalid_rules_give_one_line_errors(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        RuleSet.from_text(text, where="my.yaml")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("my.yaml")


def test_profile_round_trip(tmp_path):
    profile = ProductProfile(
        product="pcb",
        rules=full_ruleset(),
        references=["good/1.png", "/abs/2.png"],
        threshold=0.42,
        scorer="crane",
        backbone="random:tiny",
    )
    for name in ("pcb.yaml", "sub/pcb.json"):
        path = save_profile(profile, tmp_path / name)
        loaded = load_profile(path)
        assert loaded == profile
        assert loaded.rules.rules[0].text == "a bent pin is critical"
    paths = profile.reference_paths(tmp_path)
    assert paths[0] == tmp_path / "good/1.png"
    assert str(paths[1]) == "/abs/2.png"
    assert load_rules(tmp_path / "pcb.yaml") == profile.rules  # a profile file also serves as a rules file


def test_profile_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"must end in \.yaml, \.yml, \.json"):
        load_profile(tmp_path / "profile.toml")
    (tmp_path / "bad.yaml").write_text("product: pcb\nthreshold: .nan\n")
    with pytest.raises(ConfigError, match="threshold"):
        load_profile(tmp_path / "bad.yaml")
    (tmp_path / "extra.yaml").write_text("product: pcb\nreferenses: []\n")
    with pytest.raises(ConfigError, match="referenses: unknown key"):
        load_profile(tmp_path / "extra.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_rules(tmp_path / "empty.yaml")


def test_json_schema_is_available_for_language_models():
    schema = RuleSet.model_json_schema()
    text = json.dumps(schema)
    for kind in ("defect", "acceptable", "ignore_concept", "focus_concept", "min_size", "region", "required_object"):
        assert f'"{kind}"' in text
    assert schema["additionalProperties"] is False


def test_the_camera_scale_is_a_product_setting(tmp_path):
    stain = DefectRule(concept="stain", min_size=5, unit="mm", text="reject any stain larger than 5 mm")
    assert DefectRule(concept="holes", min_size=2).unit == "percent_image"  # a size without a unit is % of the image
    profile = ProductProfile(product="bottle", rules=RuleSet(rules=[stain]), px_per_mm=12)
    path = save_profile(profile, tmp_path / "bottle.yaml")
    assert load_profile(path) == profile
    assert load_rules(path).px_per_mm == 12  # --rules bottle.yaml carries the product's scale to the rules
    assert load_rules(path).rules == [stain]
    with pytest.raises(ValueError, match="px_per_mm is 12 for the product but 10 in its rules"):
        ProductProfile(product="bottle", rules=RuleSet(px_per_mm=10), px_per_mm=12)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="px_per_mm"):
            RuleSet(px_per_mm=bad)
    with pytest.raises(ValueError, match="needs a concept, or a min_size"):
        DefectRule()
    with pytest.raises(ValueError, match="needs a min_size"):
        DefectRule(concept="holes", unit="mm")
    assert "border" in json.dumps(RuleSet.model_json_schema())
    assert "px_per_mm" in RuleSet.model_json_schema()["properties"]
