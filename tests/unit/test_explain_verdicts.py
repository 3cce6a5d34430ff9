"""LVLM verdict scoring: per-class and macro accuracy, balanced accuracy, yes-rate, unparseable rate."""

from __future__ import annotations

import pytest

from tests.helpers.explain_data import GOOD_REPORT
from vlad.errors import ConfigError
from vlad.explain.schema import AnomalyReport
from vlad.explain.verdicts import VerdictTracker


def _says(yes: bool) -> dict:
    return {**GOOD_REPORT, "model_says_anomalous": yes}


def test_always_yes_looks_good_on_accuracy_and_is_found_out_by_balanced_accuracy():
    t = VerdictTracker()
    for i in range(100):  # 73 anomalous, 27 normal: always-yes gets 73 % accuracy
        t.add("bottle", int(i < 73), _says(True))
    s = t.summary()
    c = s["per_class"]["bottle"]
    assert c["accuracy"] == pytest.approx(0.73)
    assert c["always_yes_accuracy"] == pytest.approx(0.73)
    assert c["balanced_accuracy"] == pytest.approx(0.5)
    assert c["yes_rate"] == 1.0
    assert s["balanced_accuracy"] == pytest.approx(0.5)
    assert s["unparseable_rate"] == 0.0


def test_counts_with_unparseable_replies():
    t = VerdictTracker()
    # screw: 2 anomalous (one caught, one unparseable), 2 normal (one right, one false alarm)
    t.add("screw", 1, _says(True))
    t.add("screw", 1, None)
    t.add("screw", 0, AnomalyReport(**_says(False)))
    t.add("screw", 0, _says(True))
    # bottle: only normal images, both right
    t.add("bottle", 0, _says(False))
    t.add("bottle", False, _says(False))
    s = t.summary()
    screw, bottle = s["per_class"]["screw"], s["per_class"]["bottle"]
    assert screw["accuracy"] == pytest.approx(0.5)  # the unparseable reply counts as wrong
    assert screw["true_positive_rate"] == pytest.approx(0.5)
    assert screw["true_negative_rate"] == pytest.approx(0.5)
    assert screw["balanced_accuracy"] == pytest.approx(0.5)
    assert screw["yes_rate"] == pytest.approx(2 / 3)  # of the parseable replies
    assert screw["unparseable_rate"] == pytest.approx(0.25)
    assert bottle["accuracy"] == 1.0
    assert bottle["balanced_accuracy"] is None
    assert bottle["true_positive_rate"] is None
    assert s["macro_accuracy"] == pytest.approx(0.75)
    assert s["macro_balanced_accuracy"] == pytest.approx(0.5)  # bottle has no anomalous images: left out
    assert s["overall"]["n"] == len(t) == 6
    assert s["balanced_accuracy"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert s["unparseable_rate"] == pytest.approx(1 / 6)
    table = t.format_table()
    assert "screw" in table
    assert "pooled" in table
    assert "macro" in table
    assert "50.0" in table


def test_empty_tracker_and_bad_labels():
    s = VerdictTracker().summary()
    assert s["per_class"] == {}
    assert s["macro_accuracy"] is None
    assert s["yes_rate"] is None
    with pytest.raises(ConfigError, match="label must be 0/1"):
        VerdictTracker().add("bottle", 2, None)
