"""``vlad rules check`` and the ``--rules`` option helpers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from vlad.cli.rules import add_rules_option, load_rules_arg, register
from vlad.errors import ConfigError
from vlad.rules import RuleSet, save_rules

# Ten representative phrasings and the structured rule each must become (the fields that matter).
TEN = [
    (
        "scratches on the label are acceptable",
        {"kind": "acceptable", "concept": "scratches", "where": {"positions": [], "box": None, "object": "label"}},
    ),
    (
        "any missing screw is a defect",
        {"kind": "defect", "concept": "missing screw", "severity": "major", "min_size": None, "unit": None},
    ),
    (
        "a bent pin is critical",
        {"kind": "defect", "concept": "bent pin", "severity": "critical", "min_size": None, "unit": None},
    ),
    ("ignore colour variation between batches", {"kind": "ignore_concept", "concept": "colour"}),
    ("focus on cracks", {"kind": "focus_concept", "concept": "cracks"}),
    (
        "dents smaller than 1 % of the part are fine",
        {"kind": "min_size", "value": 1.0, "unit": "percent_object", "concept": "dents"},
    ),
    ("ignore anything under 50 pixels", {"kind": "min_size", "value": 50.0, "unit": "pixels", "concept": None}),
    ("only the upper half matters", {"kind": "region", "mode": "only", "positions": ["top half"], "box": None}),
    (
        "ignore the bottom right corner",
        {"kind": "region", "mode": "ignore", "positions": ["bottom right"], "box": None},
    ),
    ("a screw must be present", {"kind": "required_object", "object": "screw", "min_count": 1}),
]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="vlad")
    handlers = register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = handlers[args.command](args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("text", "expected"), TEN, ids=[t for t, _ in TEN])
def test_ten_phrasings_round_trip_into_structured_rules(text, expected, capsys, tmp_path):
    code, out, _ = run(["rules", "check", "--format", "json", text], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert data["not_understood"] == []
    assert data["contradictions"] == []
    (rule,) = data["rules"]["rules"]
    assert rule == {**expected, "text": text}
    assert data["understood"][0].startswith("I understood: ")
    assert f'(from "{text}")' in data["understood"][0]
    # the structured rules saved as a file read back the same
    path = save_rules(RuleSet.model_validate(data["rules"]), tmp_path / "rules.yaml")
    code, again, _ = run(["rules", "check", "--format", "json", str(path)], capsys)
    assert code == 0
    assert json.loads(again)["rules"] == data["rules"]


def test_the_table_output_and_what_is_not_understood(capsys):
    texts = [t for t, _ in TEN] + ["the moon is made of cheese", "dents smaller than 300 % are fine"]
    code, out, err = run(["rules", "check", *texts], capsys)
    assert code == 1
    assert err == ""
    assert out.count("I understood: ") == 10
    assert "kind" in out
    assert "settings" in out
    assert "your words" in out
    assert "required_object  object=screw min_count=1" in out
    assert "Not understood:" in out
    assert "'the moon is made of cheese': no rule pattern matches" in out
    assert "'dents smaller than 300 % are fine': size 300 % is out of range" in out
    assert "10 rule(s) understood; some rules need attention." in out


def test_contradictions_fail_the_check_and_name_both_rules(capsys):
    code, out, _ = run(["rules", "check", "scratches are fine; scratches are critical"], capsys)
    assert code == 1
    assert 'Contradictions:\n  - "scratches are fine" contradicts "scratches are critical"' in out


def test_usage_errors_exit_2(capsys, tmp_path):
    code, out, err = run(["rules", "check", "  "], capsys)
    assert code == 2
    assert out == ""
    assert "vlad rules check: error: no rules given" in err
    code, _, err = run(["rules", "check", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert "does not exist" in err
    (tmp_path / "bad.yaml").write_text("rules: [{kind: defect, concept: x, colour: red}]\n")
    code, _, err = run(["rules", "check", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2
    assert "rules.0.colour: unknown key" in err
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        run(["rules", "check"], capsys)
    assert info.value.code == 2


def test_a_text_file_of_rules(capsys, tmp_path):
    (tmp_path / "rules.txt").write_text("- scratches are fine\n- fail only on critical defects\n")
    code, out, _ = run(["rules", "check", "--format", "json", str(tmp_path / "rules.txt")], capsys)
    data = json.loads(out)
    assert code == 0
    assert data["rules"]["policy"]["fail_at"] == "critical"
    assert [r["kind"] for r in data["rules"]["rules"]] == ["acceptable"]


def test_the_rules_option_and_its_loader(tmp_path):
    parser = argparse.ArgumentParser()
    add_rules_option(parser)
    assert parser.parse_args([]).rules is None
    value = parser.parse_args(["--rules", "a bent pin is critical; ignore colour"]).rules
    ruleset = load_rules_arg(value)
    assert [r.kind for r in ruleset.rules] == ["defect", "ignore_concept"]
    assert load_rules_arg(None) == RuleSet()
    assert load_rules_arg(ruleset) is ruleset
    save_rules(ruleset, tmp_path / "r.json")
    assert load_rules_arg(str(tmp_path / "r.json")) == ruleset
    with pytest.raises(ConfigError, match=r"--rules: 'the moon is made of cheese': no rule pattern .* \(and 1 more\)"):
        load_rules_arg("the moon is made of cheese\nscratches are fine; scratches are critical")
    with pytest.raises(ConfigError, match="no rules given"):
        load_rules_arg("")


def test_the_command_runs_on_its_own_without_torch():
    code = (
        "import sys\nimport vlad.rules, vlad.rules.lvlm\nfrom vlad.cli.rules import main\n"
        "rc = main(['rules', 'check', 'a bent pin is critical'])\n"
        "print('HEAVY', [m for m in ('torch', 'open_clip', 'openai', 'transformers') if m in sys.modules])\n"
        "sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'I understood: "bent pin" is a critical defect' in out.stdout
    assert "HEAVY []" in out.stdout


FACTORY_ECHO = [
    (
        "ignore anything within 10 pixels of the border",
        "regions lying within 10 pixels of the image border are ignored",
    ),
    (
        "ignore the edges",
        "regions lying within a band of 5% of the image's shorter side along the image border are ignored",
    ),
    (
        "holes bigger than 2 % of the image are critical",
        '"holes" regions of at least 2% of the image are a critical defect',
    ),
    ("reject any stain larger than 5 mm", '"stain" regions of at least 5 mm (longest side) are a major defect'),
    ("don't flag lint", '"lint" is acceptable'),
    ("ignore specks under 1 %", "regions smaller than 1% of the image are ignored"),
]


@pytest.mark.parametrize(("text", "said"), FACTORY_ECHO, ids=[t for t, _ in FACTORY_ECHO])
def test_factory_phrasings_echo_through_the_check(text, said, capsys):
    code, out, _ = run(["rules", "check", text], capsys)
    assert code == 0, out
    assert f'I understood: {said}  (from "{text}")' in out


def _shown(out: str) -> tuple[int, int, int]:
    """("I understood" lines, table rows, the N of "N rule(s) understood") of a table output."""
    lines = out.splitlines()
    said = sum(line.startswith("I understood: ") for line in lines)
    rows = 0
    if "#  kind" in out:
        start = next(i for i, line in enumerate(lines) if line.startswith("#  kind")) + 2
        rows = next((i for i, line in enumerate(lines[start:]) if not line.strip()), len(lines) - start)
    count = int(next(line for line in lines if "rule(s) understood" in line).split()[0])
    return said, rows, count


@pytest.mark.parametrize(
    "texts",
    [
        ["ignore colour and lighting"],
        ["fail only on major defects; fail only on critical defects"],
        ["fail only on major defects", "only major defects fail"],
        ["reject any stain larger than 5 mm", "12 pixels per mm", "scratches are fine, dents are critical"],
        ["ignore the edges", "the moon is made of cheese"],
    ],
)
def test_the_counts_match_what_the_check_shows(texts, capsys):
    _, out, _ = run(["rules", "check", *texts], capsys)
    said, rows, count = _shown(out)
    assert said == rows == count, out


def test_the_counts_match_for_a_rules_file_with_a_camera_scale(capsys, tmp_path):
    (tmp_path / "r.yaml").write_text(
        "rules: [{kind: defect, concept: stain, min_size: 5, unit: mm}]\npx_per_mm: 12\npolicy: {fail_at: major}\n"
    )
    code, out, _ = run(["rules", "check", str(tmp_path / "r.yaml")], capsys)
    assert code == 0, out
    assert _shown(out) == (3, 3, 3)
    assert "px_per_mm=12" in out
