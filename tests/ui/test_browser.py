"""End to end in a real browser: Debian's Chromium driven by Playwright against the app on 127.0.0.1.

Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = os.environ.get("VLAD_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_url():
    from webui.app import build_app, launch
    from webui.service import InspectorService

    demo = build_app(InspectorService(backbone="random:tiny", device="cpu", max_upload_mb=1))
    _, url, _ = launch(demo, port=None, block=False)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (make test does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.locator("#input textarea").wait_for(timeout=30_000)
    return page


def _send(page, *, file=None, text=""):
    if file is not None:
        page.locator("#input input[type=file]").set_input_files(str(file))
        page.locator("#input img, #input .thumbnail-item").first.wait_for(timeout=30_000)
    box = page.locator("#input textarea")
    box.fill(text)
    box.press("Enter")


def _chat_text(page):
    return page.locator("#chat").inner_text()


def _shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_upload_see_verdict_and_ask(browser, app_url, uploads):
    page = _open(browser, app_url)
    assert "random weights" in page.locator("#status").inner_text()
    page.locator("#product textarea").fill("bottle")
    _send(page, file=uploads["bad"])
    page.wait_for_function(
        "() => /NORMAL|ANOMALOUS/.test(document.querySelector('#verdict')?.innerText || '')", timeout=90_000
    )
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('bottle:')", timeout=60_000)
    _shot(page, "ui-1-verdict")
    _send(page, text="how big is it?")
    page.wait_for_function(
        "() => { const t = document.querySelector('#chat').innerText; "
        "return /% of the image|no area|No area/.test(t) }",
        timeout=60_000,
    )
    _shot(page, "ui-2-follow-up")
    assert "Traceback" not in _chat_text(page)


def test_corrupt_and_oversized_uploads_show_messages(browser, app_url, uploads):
    page = _open(browser, app_url)
    _send(page, file=uploads["corrupt"])
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('corrupt.png')", timeout=60_000)
    _send(page, file=uploads["big"])
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('upload limit')", timeout=60_000)
    _shot(page, "ui-3-bad-uploads")
    text = _chat_text(page)
    assert "Traceback" not in text
    assert "⚠️" in text


def test_two_sessions_do_not_share_state(browser, app_url, uploads):
    a, b = _open(browser, app_url), _open(browser, app_url)
    a.locator("#product textarea").fill("bottle")
    b.locator("#product textarea").fill("screw")
    a.locator("#rules textarea").fill("ignore colour")
    b.locator("#rules textarea").fill("a scratch is a defect")
    a.wait_for_function("() => document.querySelector('#rules-parsed').innerText.includes('I understood')")
    b.wait_for_function("() => document.querySelector('#rules-parsed').innerText.includes('I understood')")
    _send(a, file=uploads["bad"])
    _send(b, file=uploads["good"])
    for page, name in ((a, "bottle"), (b, "screw")):
        page.wait_for_function(f"() => document.querySelector('#chat').innerText.includes('{name}:')", timeout=90_000)
    assert "ignore colour" in a.locator("#verdict").inner_text()
    assert "a scratch is a defect" in b.locator("#verdict").inner_text()
    assert "scratch" not in a.locator("#verdict").inner_text()
    assert "colour" not in b.locator("#verdict").inner_text()
    _send(a, text="where is it?")
    a.wait_for_function("() => document.querySelectorAll('#chat .message-row, #chat [data-testid=bot]').length > 0")
    assert "screw" not in _chat_text(a)
    assert "bottle" not in _chat_text(b)
    _shot(a, "ui-4-session-a")
    _shot(b, "ui-5-session-b")
