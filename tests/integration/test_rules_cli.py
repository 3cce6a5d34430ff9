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
    ("any missing screw is a defect", {"kind": "defect", "concept": "missing screw", "severity": "major"}),
    ("a bent pin is critical", {"kind": "defect", "concept": "bent pin", "severity": "critical"}),
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
