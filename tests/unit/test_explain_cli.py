"""The explainer's CLI pieces: options, ``vlad chat`` (stdin scripted), ``vlad lvlm-check``, and report-row
explanations (:class:`vlad.explain.rows.RowExplainer`)."""

from __future__ import annotations

import argparse
import io
import socket
import sys

import pytest

from tests.helpers.explain_data import GOOD_REPORT, good_reply, make_image, make_result
from vlad.cli.chat import VerdictTracker, add_explain_options, explain_options, register
from vlad.errors import ConfigError
from vlad.explain.rows import ExplainOptions, RowExplainer
from vlad.resources import samples_dir


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="vlad")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = register(sub)
    add_explain_options(sub.add_parser("detect"))
    return parser, handlers


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- options
def test_options_and_defaults():
    parser, handlers = _parser()
    assert set(handlers) == {"chat", "lvlm-check"}
    d = parser.parse_args(["detect"])
    assert (d.explain, d.lvlm, d.process_note, d.lvlm_timeout, d.lvlm_max_tokens) == (
        False,
        "template",
        None,
        60.0,
        512,
    )
    d = parser.parse_args(["detect", "--explain", "--lvlm", "openai:http://h:1/v1", "--process-note", "cast"])
    assert (d.explain, d.lvlm, d.process_note) == (True, "openai:http://h:1/v1", "cast")
    c = parser.parse_args(["chat", "a.png", "--object", "bottle"])
    assert (c.image, c.object_name, c.lvlm, c.refs, c.context_tokens, c.max_image_side) == (
        "a.png",
        "bottle",
        "template",
        None,
        8192,
        512,
    )
    assert (c.scorer, c.backbone, c.device, c.sensitivity, c.batch_size) == ("winclip", None, "auto", 0.5, 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["lvlm-check"])  # --lvlm is required there
    with pytest.raises(SystemExit):
        parser.parse_args(["detect", "--lvlm-timeout", "-1"])
    with pytest.raises(ConfigError, match="is not a backend spec"):
        explain_options(argparse.Namespace(lvlm="gpt4")).check()


# ---------------------------------------------------------------------- vlad chat
CHAT_ARGS = ["--backbone", "random:tiny", "--device", "cpu", "--max-image-side", "64"]


def _chat(monkeypatch, capsys, lines: str, *extra: str) -> tuple[int, str]:
    parser, handlers = _parser()
    args = parser.parse_args(
        ["chat", str(samples_dir() / "defect_texture.png"), "--object", "tile", *CHAT_ARGS, *extra]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = handlers[args.command](args)
    return code, capsys.readouterr().out


def test_chat_three_turns_with_the_template(monkeypatch, capsys):
    code, out = _chat(
        monkeypatch, capsys, "Where is the defect?\nHow big is it?\nHow sure are you?\nexit\nnever read\n"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("vlad chat: ")
    assert "language model: template" in lines[0]
    answers = [line for line in lines if line.startswith("vlad> ")]
    assert len(answers) == 4  # the explanation, then three answers; reading stopped at "exit"
    assert answers[0].startswith("vlad> vlad's winclip scorer judges this tile")
    # the seeded random backbone flags the whole tile at the default threshold: one area, the centre
    assert answers[1] == "vlad> The anomalous area is at the center (pixels x 0-159, y 0-159)."
    assert answers[2].startswith("vlad> One area is above the pixel threshold, covering 100.00 % of the image")
    assert answers[3].startswith("vlad> The image score is")
    assert "random backbone weights" in answers[3]
    assert any(line.startswith("warning: backbone random:tiny has random weights") for line in lines)


def test_chat_three_turns_with_an_openai_server(monkeypatch, capsys, fake):
    fake.replies = [good_reply(verdict="normal"), "At the top left.", "Small.", "Quite sure."]
    code, out = _chat(monkeypatch, capsys, "where?\nhow big?\nhow sure?\n", "--lvlm", f"openai:{fake.url}")
    assert code == 0
    answers = [line for line in out.splitlines() if line.startswith("vlad> ")]
    assert answers[1:] == ["vlad> At the top left.", "vlad> Small.", "vlad> Quite sure."]
    assert "language model: openai:" in out.splitlines()[0]
    bodies = fake.chat_requests()
    assert len(bodies) == 4
    assert [b["stream"] for b in bodies] == [False, True, True, True]
    images = [
        sum(
            isinstance(m["content"], list) and sum(p["type"] == "image_url" for p in m["content"])
            for m in b["messages"]
        )
        for b in bodies
    ]
    assert images == [2, 2, 2, 2]  # photo + overlay, sent in the first user turn only
    assert [m["role"] for m in bodies[-1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]


def test_chat_with_a_dead_server_says_so_and_answers_from_facts(monkeypatch, capsys):
    code, out = _chat(
        monkeypatch,
        capsys,
        "how sure?\n",
        "--lvlm",
        f"openai:http://127.0.0.1:{_dead_port()}/v1#m",
        "--lvlm-timeout",
        "2",
    )
    assert code == 0
    assert "cannot reach the LVLM server" in out
    assert "The image score is" in out


def test_chat_with_a_missing_image_is_a_usage_error(monkeypatch, capsys, tmp_path):
    from vlad.errors import VladError

    parser, handlers = _parser()
    args = parser.parse_args(["chat", str(tmp_path / "nope.png"), "--object", "tile", *CHAT_ARGS])
    with pytest.raises(VladError, match="nope.png"):
        handlers["chat"](args)


# ---------------------------------------------------------------------- vlad lvlm-check
def test_lvlm_check(capsys, fake):
    parser, handlers = _parser()
    assert handlers["lvlm-check"](parser.parse_args(["lvlm-check", "--lvlm", "template"])) == 0
    assert "usable: yes (template)" in capsys.readouterr().out
    fake.mode = "reject_response_format"
    assert handlers["lvlm-check"](parser.parse_args(["lvlm-check", "--lvlm", f"openai:{fake.url}"])) == 0
    out = capsys.readouterr().out
    assert "reachable        yes" in out
    assert "images           yes" in out
    assert "response_format  NO" in out
    fake.mode = "no_images"
    assert handlers["lvlm-check"](parser.parse_args(["lvlm-check", "--lvlm", f"openai:{fake.url}"])) == 1
    assert "images           NO" in capsys.readouterr().out
    dead = parser.parse_args(["lvlm-check", "--lvlm", f"openai:http://127.0.0.1:{_dead_port()}/v1"])
    assert handlers["lvlm-check"](dead) == 1
    out = capsys.readouterr().out
    assert "reachable        NO" in out
    assert "usable: no" in out


# ---------------------------------------------------------------------- detect --explain rows
def _explainer(lvlm: str = "template", **kw) -> RowExplainer:
    args = argparse.Namespace(lvlm=lvlm, process_note=kw.get("note"), lvlm_timeout=kw.get("timeout", 5.0))
    return RowExplainer(explain_options(args), on_down=kw.get("on_down"))


def test_explain_options_from_the_command_line():
    args = argparse.Namespace(lvlm=None, process_note="cast", lvlm_timeout=None, lvlm_max_tokens=64)
    assert explain_options(args) == ExplainOptions("template", 60.0, 64, "cast")


def test_explain_row_with_the_template():
    row = _explainer().explain(make_image(), make_result(), "bottle")
    assert set(row) == {"explanation", "report", "lvlm", "explain_error"}
    assert row["lvlm"] == "template"
    assert row["explain_error"] is None
    assert row["explanation"].startswith("vlad's winclip scorer judges this bottle anomalous")
    assert row["report"]["verdict"] == "anomalous"
    assert row["report"]["model_says_anomalous"] is None  # no model, no opinion
    assert row["report"]["confidence"] is None


def test_explain_row_with_an_openai_server(fake):
    fake.replies = [good_reply()]
    row = _explainer(f"openai:{fake.url}", note="blow moulded").explain(make_image(), make_result(), "bottle")
    assert row["report"] == GOOD_REPORT
    assert row["explain_error"] is None
    assert row["explanation"].startswith("The bottle is anomalous")
    assert "blow moulded" in fake.chat_requests()[0]["messages"][1]["content"][-2]["text"]


def test_explain_row_never_raises_and_stops_calling_a_dead_server(monkeypatch):
    said = []
    explainer = _explainer(f"openai:http://127.0.0.1:{_dead_port()}/v1#m", on_down=said.append)
    first = explainer.explain(make_image(), make_result(), "bottle")
    assert first["report"] is None
    assert "cannot reach the LVLM server" in first["explain_error"]
    assert "judges this bottle anomalous" in first["explanation"]
    import vlad.explain.explainer as explainer_module

    monkeypatch.setattr(
        explainer_module, "explain", lambda *a, **k: pytest.fail("a dead server must not be retried per image")
    )
    second = explainer.explain(make_image(), make_result(), "bottle")
    assert "unavailable earlier in this run" in second["explain_error"]
    assert second["report"] is None
    assert len(said) == 1  # said once on the terminal, not per image
    assert "is unavailable" in said[0]
    bad_image = _explainer().explain(make_image((10, 10)), make_result(), "bottle")
    assert bad_image["report"] is None
    assert "differs from the result's map size" in bad_image["explain_error"]
    with pytest.raises(ConfigError, match="is not a backend spec"):
        _explainer("gpt4")


def test_verdict_tracker_is_exported():
    tracker = VerdictTracker()
    tracker.add("bottle", 1, GOOD_REPORT)
    assert tracker.summary()["overall"]["accuracy"] == 1.0
