"""The one inspection pipeline (vlad.pipeline.Detector): records in order with failures accounted for, one report
schema for good and failed inputs, re-thresholding through the same rules, and no second copy of the wiring."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad.errors import ConfigError, ImageLoadError
from vlad.explain.rows import ROW_KEYS
from vlad.pipeline import Detector, InspectionRecord, rethreshold
from vlad.thresholds import Thresholds

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path, texture_set):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(texture_set["good"]).save(good)
    Image.fromarray(texture_set["bad"]).save(bad)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    return [str(good), str(broken), str(bad)]


def test_records_keep_the_input_order_and_account_for_every_input(tiny_backbone, files):
    det = Detector("winclip", backbone=tiny_backbone, overlays=True)
    records = det.inspect_many(files, "texture")
    assert [r.source for r in records] == files
    assert [r.ok for r in records] == [True, False, True]
    assert "broken.png" in records[1].error
    assert records[1].result is None
    assert records[2].overlay.size == records[2].image.size
    with pytest.raises(ImageLoadError, match="broken.png"):
        det.detect_many(files, "texture")


@pytest.mark.parametrize("explain", [None, "template"])
def test_failed_and_good_rows_have_the_same_keys(tiny_backbone, files, explain):
    det = Detector("winclip", backbone=tiny_backbone, explain=explain, rules="ignore specks under 1 %")
    good, bad_input, _ = det.inspect_many(files, "texture")
    settings = det.settings()
    rows = [r.to_row(settings, explain=explain is not None) for r in (good, bad_input)]
    assert list(rows[0]) == list(rows[1])
    assert set(ROW_KEYS) <= set(rows[0]) if explain else not set(ROW_KEYS) & set(rows[0])
    assert rows[1]["error"] is not None
    assert rows[1]["pred_score"] is None
    assert rows[0]["error"] is None
    assert rows[0]["profile"] == "paper"
    if explain:
        assert good.result.explanation.text == rows[0]["explanation"]


def test_rethreshold_goes_through_the_same_rules(tiny_backbone, texture_set):
    text = "ignore anything under 100000 pixels"
    det = Detector("winclip", backbone=tiny_backbone, rules=text, overlays=True)
    (record,) = det.inspect_many([texture_set["bad"]], "texture")
    moved = det.rethreshold(record, 1.0)
    assert Thresholds.of(moved.result) == Thresholds.of(rethreshold(record.base_result, 1.0))
    assert [h.rule for h in moved.result.rule_hits] == [h.rule for h in record.result.rule_hits]
    assert moved.result.regions == ()  # the size rule still removes every region after re-thresholding
    assert moved.overlay is not None
    det.scorer.sensitivity = 1.0
    (fresh,) = det.inspect_many([texture_set["bad"]], "texture")
    assert Thresholds.of(moved.result) == Thresholds.of(fresh.result)
    with pytest.raises(ConfigError, match="no result to re-threshold"):
        det.rethreshold(InspectionRecord("x.png", "part", error="unreadable"), 0.5)


def test_a_transductive_scorer_sees_the_whole_set_as_one_batch(tiny_backbone, texture_set):
    det = Detector("musc", backbone=tiny_backbone, batch_size=2)
    images = [texture_set["good"], texture_set["bad"], *texture_set["refs"][:4]]
    seen = []
    det.scorer.score_many = lambda batch, name, _orig=det.scorer.score_many: (
        seen.append(len(batch)) or _orig(batch, name)
    )
    records = det.inspect_many(images, "texture")
    assert seen == [6]
    assert all(r.ok for r in records)


def test_the_scorer_rules_overlay_explanation_sequence_exists_once():
    """Only vlad/pipeline.py wires the scorer's batch entry to the rules and the overlay."""
    wiring = {"score_many", "apply_rules", "configure_scorer", "render_result"}
    allowed = {
        "vlad/pipeline.py": wiring,
        "vlad/scorers/base.py": {"score_many"},  # score() is score_many([image])
        "vlad/scorers/onnx_runtime.py": {"score_many"},  # the same for an exported scorer
        "vlad/scorers/laft.py": {"score_many"},  # super() calls
        "vlad/scorers/filo.py": {"score_many"},
        "vlad/explain/evidence.py": {"render_result"},  # the overlay picture inside the LVLM's evidence
    }
    offenders = []
    for path in [*ROOT.glob("vlad/**/*.py"), *ROOT.glob("webui/**/*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name in wiring and name not in allowed.get(rel, set()):
                    offenders.append(f"{rel}:{node.lineno} {name}")
    assert offenders == []


def test_detector_takes_a_built_scorer_but_not_its_options(tiny_backbone):
    from vlad.scorers import get_scorer

    scorer = get_scorer("winclip", backbone=tiny_backbone)
    assert Detector(scorer).scorer is scorer
    with pytest.raises(ConfigError, match="pass backbone and scorer options to the scorer you built"):
        Detector(scorer, sensitivity=0.9)


def test_arrays_and_pil_images_are_inputs_too(tiny_backbone, texture_set):
    det = Detector("winclip", backbone=tiny_backbone)
    a, b = det.inspect_many([texture_set["bad"], Image.fromarray(texture_set["bad"])], "texture")
    assert a.source == "<image 0>"
    assert b.source == "<image 1>"
    np.testing.assert_array_equal(a.result.anomaly_map, b.result.anomaly_map)
    (bad,) = det.inspect_many([np.zeros((4, 4, 5), np.uint8)], "texture")
    assert "image arrays must be" in bad.error


def test_overlays_are_bounded_unless_full_res_and_come_with_a_legend(tiny_backbone):
    from vlad.viz import LEGEND_WIDTH

    wide = np.random.default_rng(0).integers(0, 256, (700, 2100, 3), dtype=np.uint8)
    (record,) = Detector("winclip", backbone=tiny_backbone, overlays=True).inspect_many([wide], "texture")
    assert record.overlay.size == (2048, 683)  # the long side bounded at 2048 px, the aspect ratio kept
    assert record.legend.width == LEGEND_WIDTH
    det = Detector("winclip", backbone=tiny_backbone, overlays=True, full_res_overlay=True)
    (record,) = det.inspect_many([wide], "texture")
    assert record.overlay.size == (2100, 700)
    moved = det.rethreshold(record, 0.9)
    assert moved.overlay.size == (2100, 700)
    assert moved.legend is not None
    (plain,) = Detector("winclip", backbone=tiny_backbone).inspect_many([wide], "texture")
    assert plain.overlay is None
    assert plain.legend is None


def test_inputs_are_decoded_at_most_a_batch_ahead_of_the_model(tiny_backbone, monkeypatch):
    """12 inputs, batches of 2: when the first record comes out, at most the first batch, the next one queued and one
    in the decoder's hands have been decoded, however long the decoder has had."""
    import time

    import vlad.pipeline as pipeline

    decoded: list[int] = []
    real = pipeline._load

    def counting(item):
        decoded.append(1)
        return real(item)

    monkeypatch.setattr(pipeline, "_load", counting)
    det = Detector("winclip", backbone=tiny_backbone, batch_size=2)
    images = [np.full((32, 32, 3), 10 * i, dtype=np.uint8) for i in range(12)]
    stream = det.iter_inspect(images, "texture")
    first = next(stream)
    time.sleep(0.5)
    assert first.index == 0
    assert len(decoded) <= 2 + 2 + 1
    rest = list(stream)
    assert [r.index for r in [first, *rest]] == list(range(12))
    assert len(decoded) == 12


def test_an_unexpected_decoding_error_reaches_the_caller(tiny_backbone, monkeypatch):
    import vlad.pipeline as pipeline

    real = pipeline._load

    def failing(item):
        if int(item[0, 0, 0]) == 30:
            raise RuntimeError("decoder crashed")
        return real(item)

    monkeypatch.setattr(pipeline, "_load", failing)
    det = Detector("winclip", backbone=tiny_backbone, batch_size=1)
    images = [np.full((32, 32, 3), 10 * i, dtype=np.uint8) for i in range(6)]
    stream = det.iter_inspect(images, "texture")
    assert [next(stream).index for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="decoder crashed"):
        next(stream)
