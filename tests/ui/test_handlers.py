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
    _, history, session, verdict, slider, regions, report = _run(service, {"text": "", "files": [str(uploads["bad"])]})
    assert session.inspection is not None
    assert session.inspection.product == "part"
    assert history[0]["content"] == {"path": str(uploads["bad"])}
    assert history[1]["metadata"]["title"].startswith("Working: winclip")
    assert "score" in history[1]["content"]
    assert "threshold" in history[1]["content"]
    assert history[2]["content"].startswith("**part: ")
    assert session.inspection.result.verdict.upper() in verdict
    assert slider[0].size == slider[1].size == session.inspection.image.size
    assert report.endswith("report.json")
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
    assert "corrupt.png" in table[1][6]
    assert status == "2 of 3 images scored."
    assert downloads[0].endswith("batch.csv")
    assert downloads[1].endswith("batch.json")
    assert len(gallery) == 3


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
