"""Blind / grounded LVLM verdict statistics and the yes/no reader (vlad.explain.lvlm_eval)."""

from __future__ import annotations

import pytest
from PIL import Image

from vlad.errors import ConfigError
from vlad.explain.errors import LVLMUnavailable
from vlad.explain.lvlm_eval import BLIND_QUESTION, LVLMEvaluation, ModeTracker, parse_yes_no


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        ("Yes, there is an anomaly at the top left of the image.", True),
        ("yes", True),
        ("**Yes**.", True),
        ('"Yes"', True),
        ("No, there are no anomalies in the image.", False),
        ("No.", False),
        ("no anomaly", False),
        ("There is no anomaly in this image.", False),
        ("The part is defect-free.", False),
        ("The object looks normal.", False),
        ("I do not see any defect.", False),
        ("There is a scratch near the rim.", True),
        ("The image shows a crack on the surface.", True),
        ("An anomaly is present in the center.", True),
        ("Anomalous.", True),
        ("", None),
        (None, None),
        ("purple monkey dishwasher", None),
        ("There is a scratch, but the part looks normal.", None),
    ],
)
def test_parse_yes_no(reply, says):
    assert parse_yes_no(reply) is says


def test_blind_tracker_counts_exactly():
    t = ModeTracker("blind")
    # class a: 2 anomalous (yes, no), 2 normal (no, unparseable)
    for label, says in [(1, True), (1, False), (0, False), (0, None)]:
        t.add("a", label, says)
    t.add("b", 1, True)
    s = t.summary()
    a = s["per_class"]["a"]
    assert a["n"] == 4
    assert a["n_anomalous"] == 2
    assert a["accuracy"] == pytest.approx(2 / 4)
    assert a["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert a["yes_rate"] == pytest.approx(1 / 3)  # over the 3 parsed replies
    assert a["unparseable_rate"] == pytest.approx(1 / 4)
    assert a["unparseable"] == 1
    assert a["always_yes_accuracy"] == pytest.approx(0.5)
    assert "disagreements" not in a
    assert s["per_class"]["b"]["balanced_accuracy"] is None  # one label only
    assert s["overall"]["n"] == 5
    assert s["overall"]["accuracy"] == pytest.approx(3 / 5)
    table = t.format_table().splitlines()
    assert table[0].split()[:3] == ["LVLM", "blind", "n"]
    assert [line.split()[0] for line in table[1:]] == ["a", "b", "pooled"]
    assert table[1].split()[1:4] == ["4", "50.0", "50.0"]


def test_grounded_tracker_counts_disagreements_and_who_was_right():
    t = ModeTracker("grounded")
    rows = [  # (label, model says, detector says)
        (1, True, True),  # agree
        (1, False, True),  # disagree, detector right
        (0, True, False),  # disagree, detector right
        (0, False, True),  # disagree, model right
        (1, True, False),  # disagree, model right
        (1, None, True),  # unparseable: not a disagreement
    ]
    for label, says, detector in rows:
        t.add("x", label, says, detector)
    x = t.summary()["per_class"]["x"]
    assert x["disagreements"] == 4
    assert x["model_right"] == 2
    assert x["detector_right"] == 2
    assert x["disagreement_rate"] == pytest.approx(4 / 5)
    assert x["unparseable"] == 1
    header = t.format_table().splitlines()[0].split()
    assert header[-3:] == ["disagree", "model-ok", "detect-ok"]
    assert t.format_table().splitlines()[1].split()[-3:] == ["4", "2", "2"]
    with pytest.raises(ConfigError, match="detector's verdict"):
        t.add("x", 1, True)
    with pytest.raises(ConfigError, match="label must be 0/1"):
        t.add("x", 2, True, True)


class _Scripted:
    """A model backend whose replies are scripted; records the messages it is sent."""

    is_model = True
    spec = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []

    def complete(self, messages, *, max_tokens=512, json_schema=None):
        self.sent.append(messages)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_evaluation_both_modes_with_a_scripted_backend():
    backend = _Scripted(["Yes, there is an anomaly.", "No.", "banana", LVLMUnavailable("server down")])
    ev = LVLMEvaluation("both", backend)
    image = Image.new("RGB", (40, 30), (90, 90, 90))
    rows = [
        ev.observe("c", 1, image=image, detector=True, report={"model_says_anomalous": True}),
        ev.observe("c", 0, image=image, detector=True, report={"model_says_anomalous": False}),
        ev.observe("c", 0, image=image, detector=False, report=None),
        ev.observe("c", 1, image=image, detector=False, report={"model_says_anomalous": True}),
        ev.observe("c", 1, image=image, detector=True, report={"model_says_anomalous": True}),
    ]
    # the blind turn: the photo and the question only, no facts, no system message
    first = backend.sent[0]
    assert len(first) == 1
    assert first[0]["role"] == "user"
    assert [p["type"] for p in first[0]["content"]] == ["image_url", "text"]
    assert first[0]["content"][1]["text"] == BLIND_QUESTION
    assert [r["lvlm_blind"]["says"] for r in rows] == [True, False, None, None, None]
    assert rows[3]["lvlm_blind"]["error"] == "server down"
    assert "unavailable earlier" in rows[4]["lvlm_blind"]["error"]  # not asked again after the server went down
    assert len(backend.sent) == 4
    s = ev.summary()
    blind, grounded = s["blind"]["overall"], s["grounded"]["overall"]
    assert blind["accuracy"] == pytest.approx(2 / 5)
    assert blind["unparseable"] == 3
    assert grounded["disagreements"] == 2
    assert grounded["model_right"] == 2
    assert grounded["detector_right"] == 0
    assert rows[1]["lvlm_grounded"] == {"says": False, "detector": True}
    assert "LVLM blind" in ev.format_tables()
    assert "LVLM grounded" in ev.format_tables()


def test_evaluation_refuses_bad_modes_and_the_template():
    from vlad.explain.template import TemplateBackend

    with pytest.raises(ConfigError, match="is not one of blind, grounded, both"):
        LVLMEvaluation("deaf")
    with pytest.raises(ConfigError, match="needs a language model"):
        LVLMEvaluation("blind", TemplateBackend())
    grounded_only = LVLMEvaluation("grounded")
    assert not grounded_only.needs_image
    assert grounded_only.observe("c", 1, detector=True, report=None) == {
        "lvlm_grounded": {"says": None, "detector": True}
    }
