"""The UI's handlers as plain functions: chat turns, errors in the chat, sensitivity, batch, status line."""

from __future__ import annotations

import pytest

from vlad.errors import VladError
from webui.app import chat, resensitise, run_batch
from webui.service import InspectorService, Session

SETTINGS = ("part", "winclip", "", None, "", 0.5)


def _run(service, message, history=None, session=None, settings=SETTINGS):
    *_, last = chat(service, message, history or [], session, *settings)
    return last


def test_new_image_then_follow_up_keeps_context(service, uploads):
    _, history, session, verdict, slider, regions, report, *_ = _run(
        service, {"text": "", "files": [str(uploads["bad"])]}
    )
    assert session.inspection is not None
    assert session.inspection.product == "part"
    assert history[0]["content"]["path"] == str(uploads["bad"])
    assert history[1]["content"] == "File: defect.png"
    assert history[2]["metadata"]["title"].startswith("Working: winclip")
    assert "score" in history[2]["content"]
    assert "threshold" in history[2]["content"]
    assert history[3]["content"].startswith("**part: ")
    assert session.inspection.result.verdict.upper() in verdict
    assert slider[0].size == slider[1].size == session.inspection.image.size
    assert report.endswith("defect_report.json")
    _, history2, session2, *_ = _run(service, {"text": "where is it?", "files": []}, history, session)
    assert session2 is session
    assert len(history2) == len(history) + 3
    assert history2[-2]["metadata"]["title"].startswith("Working: winclip, score")
    assert history2[-1]["role"] == "assistant"
    assert history2[-1]["content"]
    assert "need a language model" not in history2[-1]["content"]


def test_question_without_image_asks_for_one(service):
    _, history, *_ = _run(service, {"text": "is it broken?", "files": []})
    assert "Drop a photo" in history[-1]["content"]


def test_corrupt_and_oversized_uploads_are_told_in_the_chat(uploads):
    small = InspectorService(backbone="random:tiny", device="cpu", max_upload_mb=1)
    _, history, *_ = _run(small, {"text": "", "files": [str(uploads["corrupt"])]})
    assert history[-1]["content"].startswith("⚠️")
    assert "corrupt.png" in history[-1]["content"]
    assert "Traceback" not in history[-1]["content"]
    _, history, *_ = _run(small, {"text": "", "files": [str(uploads["big"])]})
    assert "over the upload limit of 1 MB" in history[-1]["content"]


def test_unreachable_lvlm_is_announced_and_template_answers(uploads):
    svc = InspectorService(backbone="random:tiny", device="cpu", lvlm="openai:http://127.0.0.1:9/v1")
    assert svc.lvlm_problem
    assert "unreachable" in svc.status_markdown()
    assert svc.explainer() == "template"
    _, history, *_ = _run(svc, {"text": "", "files": [str(uploads["bad"])]})
    assert "openai:http://127.0.0.1:9/v1` is unreachable" in history[-1]["content"]
    assert "comes from the template explainer" in history[-1]["content"]


def test_random_backbone_warning_in_status(service):
    assert "random weights" in service.status_markdown()


def test_sensitivity_rethresholds_without_rescoring(service, uploads, monkeypatch):
    _, _, session, *_ = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    before = session.inspection.result
    scorer = session.inspection.detector.scorer
    monkeypatch.setattr(scorer, "score_many", lambda *a, **k: pytest.fail("re-thresholding must not re-score"))
    session, verdict, *_ = resensitise(service, session, 1.0)
    after = session.inspection.result
    assert after.pred_score == before.pred_score
    assert after.threshold == pytest.approx(before.threshold - 0.5 * before.score_scale)
    assert after.anomaly_map is before.anomaly_map
    assert after.explanation == before.explanation
    assert after.verdict.upper() in verdict


def test_sessions_are_isolated(service, uploads):
    a, b = Session(), Session()
    _run(
        service,
        {"text": "", "files": [str(uploads["bad"])]},
        session=a,
        settings=("bottle", "winclip", "", None, "", 0.5),
    )
    _run(
        service,
        {"text": "", "files": [str(uploads["good"])]},
        session=b,
        settings=("screw", "winclip", "", None, "", 0.5),
    )
    assert a.inspection.product == "bottle"
    assert b.inspection.product == "screw"
    assert a.folder != b.folder
    assert a.inspection.report_path != b.inspection.report_path


def test_batch_reports_every_file(service, uploads, tmp_path):
    session, table, gallery, downloads, status = run_batch(
        service, [str(uploads["good"]), str(uploads["corrupt"]), str(uploads["bad"])], None, *SETTINGS
    )
    assert [row[0] for row in table] == ["good.png", "corrupt.png", "defect.png"]
    assert table[1][1] == "error"
    assert "corrupt.png" in table[1][7]
    assert downloads[0].endswith("batch.csv")
    assert downloads[1].endswith("batch.json")
    assert len(gallery) == 2  # heat maps of the scored images


def test_rules_apply_and_are_shown(service, uploads):
    from webui.app import check_rules

    assert "I understood" in check_rules("ignore the top left corner")
    assert check_rules("the moon is made of cheese").startswith("- ❓ not understood: 'the moon is made of cheese'")
    settings = ("part", "winclip", "", None, "ignore the top left corner; a dent is a defect", 0.5)
    _, history, session, verdict, *_ = _run(service, {"text": "", "files": [str(uploads["bad"])]}, settings=settings)
    hits = {h.rule for h in session.inspection.result.rule_hits}
    assert "a dent is a defect" in hits
    assert "a dent is a defect" in verdict
    assert all(r.position != "top left" for r in session.inspection.result.regions)
    _, history, *_ = _run(service, {"text": "what rule fired?", "files": []}, history, session)
    assert "dent" in history[-1]["content"]


def test_service_builds_scorers_with_the_profile_and_adapter(tmp_path):
    from webui.service import InspectorService

    service = InspectorService(scorer="crane", backbone="random:tiny", profile="vlad")
    scorer = service.build_scorer(None, None, 0.5)
    assert scorer.profile == "vlad"
    assert scorer.layers == (1, 2, 3, 4)
    assert "**profile** `vlad`" in service.status_markdown()
    assert InspectorService(scorer="crane", backbone="random:tiny").build_scorer(None, None, 0.5).profile == "paper"
    with pytest.raises(VladError, match="unknown profile 'exact'"):
        InspectorService(scorer="crane", profile="exact")


# ---------------------------------------------------------------------- batch outputs a QA system can file
def test_batch_rows_have_the_report_schema_rule_effects_and_every_column(service, uploads):
    import csv
    import json
    from datetime import datetime

    from vlad.pipeline import InspectionRecord
    from webui.service import BATCH_CSV_COLUMNS

    paths = [str(uploads["good"]), str(uploads["corrupt"]), str(uploads["bad"])]
    run = service.batch(Session(), paths, product="bottle", rules="any hole is critical", sensitivity=0.6)
    schema = set(InspectionRecord("x", "y").to_row({}))
    extras = {"file", "sensitivity", "references", "rules", "timestamp"}
    assert [set(r) for r in run.rows] == [schema | extras] * 3  # failed rows keep every column
    good, bad_file, defect = run.rows
    assert [r["file"] for r in run.rows] == [r["path"] for r in run.rows] == ["good.png", "corrupt.png", "defect.png"]
    assert bad_file["error"]
    assert bad_file["verdict"] is None
    assert bad_file["scorer"] == "winclip"
    assert str(uploads["corrupt"].parent) not in bad_file["error"]  # the file name, not the server's path
    for r in (good, defect):
        assert (r["object"], r["scorer"], r["sensitivity"], r["rules"]) == (
            "bottle",
            "winclip",
            0.6,
            ["any hole is critical"],
        )
        assert r["threshold_source"] == "default"
        assert r["threshold"] is not None
        assert {(h["rule"], h["effect"]) for h in r["rule_hits"]} >= {("any hole is critical", "prompt added")}
        assert all(reg["severity"] in ("minor", "major", "critical") for reg in r["regions"])
        assert r["overlay"].endswith("_overlay.png")
        datetime.fromisoformat(r["timestamp"])
    with run.csv_path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(BATCH_CSV_COLUMNS)
    assert [row["file"] for row in table] == ["good.png", "corrupt.png", "defect.png"]
    assert table[1]["error"]
    assert table[1]["verdict"] == ""
    assert table[1]["scorer"] == "winclip"
    assert "any hole is critical: prompt added" in table[0]["rule_hits"]
    assert "any hole is critical" not in table[0]["verdict_changed_by"]  # a prompt added changed no verdict
    assert table[2]["n_regions"] == str(len(defect["regions"]))
    assert table[2]["region_positions"].split("; ")[0] == defect["regions"][0]["position"]
    assert json.loads(run.json_path.read_text()) == run.rows
    assert run.counts() == {
        "anomalous": sum(r["verdict"] == "anomalous" for r in run.rows),
        "normal": sum(r["verdict"] == "normal" for r in run.rows),
        "failed": 1,
    }


def test_batch_tab_shows_heat_maps_and_a_summary(service, uploads):
    from PIL import Image

    session, table, gallery, downloads, status = run_batch(
        service, [str(uploads["good"]), str(uploads["corrupt"]), str(uploads["bad"])], None, *SETTINGS
    )
    anomalous = sum(row[1] == "anomalous" for row in table)
    assert status.startswith(f"**3 image(s): {anomalous} anomalous, {2 - anomalous} normal, 1 failed.**")
    assert "Product: part" in status
    assert "scorer winclip" in status
    assert [caption.split(":")[0] for _, caption in gallery] == ["good.png", "defect.png"]
    heat = Image.open(gallery[1][0])
    assert heat.size == Image.open(uploads["bad"]).size
    assert gallery[1][0].endswith("defect_overlay.png")


# ---------------------------------------------------------------------- no stale verdicts, honest names
def test_a_failed_upload_clears_the_previous_verdict(uploads):
    small = InspectorService(backbone="random:tiny", device="cpu", max_upload_mb=1)
    *_, session, verdict, slider, regions, report, _, _ = _run(small, {"text": "", "files": [str(uploads["bad"])]})
    assert slider is not None
    assert "NORMAL" in verdict or "ANOMALOUS" in verdict
    _, history, session, verdict, slider, regions, report, *_ = _run(
        small, {"text": "", "files": [str(uploads["corrupt"])]}, [], session
    )
    assert session.inspection is None
    assert "No verdict: corrupt.png could not be inspected." in verdict
    assert "ANOMALOUS" not in verdict
    assert "NORMAL" not in verdict
    assert (slider, regions, report) == (None, None, None)
    _, history, *_ = _run(small, {"text": "where is it?", "files": []}, history, session)
    assert "Drop a photo" in history[-1]["content"]


def test_messages_name_the_users_file_never_a_server_path(uploads, tmp_path):
    small = InspectorService(backbone="random:tiny", device="cpu", max_upload_mb=1)
    _, history, *_ = _run(small, {"text": "", "files": [str(uploads["corrupt"])]})
    text = "\n".join(str(m["content"]) for m in history if isinstance(m["content"], str))
    assert "corrupt.png" in text
    assert str(uploads["corrupt"].parent) not in text


def test_the_sensitivity_moves_the_threshold_the_chat_states(service, uploads):
    _, history, session, *_ = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    before = session.inspection.result.threshold
    session, *_, history = resensitise(service, session, 0.9, history)
    after = session.inspection.result.threshold
    assert after != before
    assert f"the threshold is now {after:.4f}" in history[-1]["content"]
    _, history, *_ = _run(service, {"text": "how sure are you?", "files": []}, history, session)
    assert f"against a threshold of {after:.4f}" in history[-1]["content"]
    assert f"{before:.4f}" not in history[-1]["content"]


def test_a_guessed_product_is_said_with_how_sure(service, uploads, monkeypatch):
    import webui.service as svc

    monkeypatch.setattr(svc, "guess_product", lambda backbone, image: ("bottle", 0.62))
    _, history, session, *_ = _run(
        service, {"text": "", "files": [str(uploads["bad"])]}, settings=("", "winclip", "", None, "", 0.5)
    )
    assert session.inspection.product == "bottle"
    assert "I took this for a bottle (62 % sure); type the product if that is wrong." in history[-1]["content"]
    monkeypatch.setattr(svc, "guess_product", lambda backbone, image: ("bottle", 0.3))
    _, history, session, *_ = _run(
        service, {"text": "", "files": [str(uploads["bad"])]}, settings=("", "winclip", "", None, "", 0.5)
    )
    assert session.inspection.product == "object"
    assert "could not tell which product this is (closest: a bottle, 30 % sure)" in history[-1]["content"]


def test_guess_product_returns_the_name_and_its_probability(service, uploads):
    from PIL import Image

    from webui.service import guess_product

    name, probability = guess_product(service.build_scorer(None, None, 0.5).backbone, Image.open(uploads["good"]))
    assert isinstance(name, str)
    assert name
    assert 0.0 <= probability <= 1.0


def test_the_json_report_is_named_after_the_image(service, uploads):
    import json

    *_, report, _, _ = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    assert report.endswith("/defect_report.json")
    payload = json.loads(open(report, encoding="utf-8").read())
    assert payload["file"] == "defect.png"
    assert payload["product"] == "part"


def test_the_slider_pairs_images_of_one_size(service, uploads, monkeypatch):
    import numpy as np
    from PIL import Image

    import vlad.viz

    def with_legend(image, result, *a, **k):  # an overlay with a colour bar below the picture
        canvas = Image.new("RGB", (image.width, image.height + 20), (255, 0, 0))
        canvas.paste(image.convert("RGB"), (0, 0))
        return canvas

    monkeypatch.setattr(vlad.viz, "render_result", with_legend)
    *_, session, _, slider, _, _, _, _ = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    image, heat = slider
    assert image.size == heat.size
    w, h = session.inspection.image.size
    assert np.array_equal(np.asarray(image)[:h, :w], np.asarray(session.inspection.image))


def test_ui_images_go_through_vlads_loader(service, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import vlad.data

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 40, 40, 255)  # an opaque square on transparent pixels
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    seen = []
    real = vlad.data.load_image
    monkeypatch.setattr(vlad.data, "load_image", lambda p, *a, **k: seen.append(str(p)) or real(p, *a, **k))
    *_, session, _, slider, _, _, _, _ = _run(service, {"text": "", "files": [str(path)]})
    assert str(path) in seen
    assert np.array_equal(np.asarray(slider[0]), np.asarray(real(path)))
    run = service.batch(Session(), [str(path)], product="part")
    assert seen.count(str(path)) >= 2
    assert run.rows[0]["error"] is None


# ---------------------------------------------------------------------- the chat understands the user
def test_a_product_named_in_the_message_is_used_before_guessing(service, uploads, monkeypatch):
    import webui.service as svc

    monkeypatch.setattr(svc, "guess_product", lambda *a: pytest.fail("the user named the product"))
    out = _run(service, {"text": "it's a bottle cap", "files": [str(uploads["bad"])]}, settings=("", *SETTINGS[1:]))
    _, history, session, *_, product_box, rules_box = out
    assert session.inspection.product == "bottle cap"
    assert product_box == "bottle cap"
    assert "- I understood: the product is a bottle cap." in history[-1]["content"]
    assert history[-1]["content"].endswith(session.inspection.result.explanation.text)
    conversation = session.inspection.conversation
    _, history, session, *_, product_box, _ = _run(
        service, {"text": "The product is a tile", "files": []}, history, session
    )
    assert (session.inspection.product, product_box) == ("tile", "tile")
    assert session.inspection.conversation is conversation  # the same conversation carries on
    assert session.inspection.conversation.evidence.object_name == "tile"
    assert "Inspected defect.png again: **tile:" in history[-1]["content"]


def test_rules_typed_in_the_chat_apply_with_an_echo(service, uploads):
    _, history, session, *_ = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    conversation = session.inspection.conversation
    _, history, session, verdict, *_, rules_box = _run(
        service, {"text": "From now on, a dent is a defect. What rule fired?", "files": []}, history, session
    )
    assert rules_box == "a dent is a defect"
    echo = next(m["content"] for m in history if "I understood" in str(m["content"]))
    assert '- I understood: "dent" is a major defect' in echo
    assert "Inspected defect.png again" in echo
    assert "a dent is a defect" in {h.rule for h in session.inspection.result.rule_hits}
    assert "a dent is a defect" in verdict
    assert session.inspection.conversation is conversation
    assert "a dent is a defect" in history[-1]["content"]  # the question after the rule is answered from new facts
    _, history, session, *_ = _run(
        service,
        {"text": "", "files": [str(uploads["good"])]},
        history,
        session,
        settings=("part", "winclip", "", None, rules_box, 0.5),
    )
    assert "a dent is a defect" in {h.rule for h in session.inspection.result.rule_hits}  # from now on


def test_kind_and_decision_questions_are_answered_from_the_facts(service, uploads):
    _, history, session, *_ = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    _, history, *_ = _run(service, {"text": "is it a hole?", "files": []}, history, session)
    assert history[-1]["content"].startswith(("Yes, most likely", "Probably not a hole", "No hole", "I cannot tell"))
    _, history, *_ = _run(service, {"text": "would you reject this?", "files": []}, history, session)
    verdict = session.inspection.result.verdict
    assert history[-1]["content"].startswith("I would reject it" if verdict == "anomalous" else "I would accept it")


def test_a_bounded_overlay_gets_the_image_scaled_down_to_it():
    from PIL import Image

    from webui.app import slider_pair

    image = Image.new("RGB", (4200, 2100), (10, 20, 30))
    overlay = Image.new("RGB", (2048, 1024), (200, 0, 0))  # large inputs are drawn at a bounded size
    left, right = slider_pair(image, overlay)
    assert left.size == right.size == (2048, 1024)
    assert left.getpixel((100, 100)) == (10, 20, 30)


def test_re_thresholded_regions_keep_the_defect_type_of_the_region_they_overlap():
    from webui.service import _carry_phrases

    old = [{"bbox": [0, 0, 10, 10], "defect_type": "a hole"}, {"bbox": [20, 20, 30, 30], "defect_type": "a scratch"}]
    new = [{"bbox": [2, 2, 12, 12]}, {"bbox": [18, 18, 40, 40]}, {"bbox": [50, 50, 60, 60]}]
    _carry_phrases(new, old)
    assert [r.get("defect_type") for r in new] == ["a hole", "a scratch", None]
