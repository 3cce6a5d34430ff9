"""The app in process through gradio_client: upload and chat, sensitivity, batch, rules endpoint."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def app_url(service):
    from webui.app import build_app, launch

    demo = build_app(service)
    _, url, _ = launch(demo, port=None, block=False)
    yield url
    demo.close()


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    c = Client(app_url, verbose=False)
    yield c
    c.close()


def test_build_app_has_the_endpoints(client):
    api = client.view_api(return_format="dict", print_info=False)
    names = set(api["named_endpoints"])
    assert {"/chat", "/sensitivity", "/batch", "/rules"} <= names


def test_chat_upload_then_question(client, uploads):
    from gradio_client import handle_file

    out = client.predict(
        {"text": "", "files": [handle_file(str(uploads["bad"]))]},
        [],
        "part",
        "winclip",
        "",
        None,
        "",
        0.5,
        api_name="/chat",
    )
    box, history, verdict, slider, regions, report, product, rules = out
    assert any("part:" in str(m.get("content")) for m in history)
    assert verdict.count("NORMAL") + verdict.count("ANOMALOUS") == 1
    assert report
    assert str(report).endswith("defect_report.json")
    # the session (gr.State) remembers the image: the follow-up needs no history from the client
    out = client.predict(
        {"text": "how big is it?", "files": []}, [], "part", "winclip", "", None, "", 0.5, api_name="/chat"
    )
    answer = out[1][-1]
    assert answer["role"] == "assistant"
    assert "Drop a photo" not in str(answer["content"])
    assert "%" in str(answer["content"]) or "pixel" in str(answer["content"])


def test_batch_endpoint(client, uploads):
    from gradio_client import handle_file

    files = [handle_file(str(uploads["good"])), handle_file(str(uploads["bad"]))]
    table, gallery, downloads, status = client.predict(
        files, None, "part", "winclip", "", None, "", 0.5, api_name="/batch"
    )
    assert status.startswith("**2 image(s): ")
    assert status.split("\n")[0].endswith(" normal, 0 failed.**")
    assert [row[0] for row in table["data"]] == ["good.png", "defect.png"]
    assert len(downloads) == 2
    assert len(gallery) == 2


def test_server_files_outside_its_cache_are_not_served(app_url):
    import httpx

    for path in ("/gradio_api/file=/etc/passwd", "/file=/etc/passwd", "/gradio_api/file=" + __file__):
        r = httpx.get(app_url.rstrip("/") + path, timeout=10)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert "root:" not in r.text


def test_auth_is_required_when_set(service):
    from gradio_client import Client

    from webui.app import build_app, launch

    demo = build_app(service)
    _, url, _ = launch(demo, port=None, block=False, auth=("inspector", "s3cret"))
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - gradio_client raises its own error types
            Client(url, verbose=False)
        c = Client(url, auth=("inspector", "s3cret"), verbose=False)
        assert "/chat" in c.view_api(return_format="dict", print_info=False)["named_endpoints"]
        c.close()
    finally:
        demo.close()
