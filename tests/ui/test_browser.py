"""End to end in a real browser: Debian's Chromium driven by Playwright against the app on 127.0.0.1.

Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import os
import re
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


def _open(browser, url, width=1400, height=1000):
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
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


def _wait_chat(page, text, timeout=60_000):
    page.wait_for_function("t => document.querySelector('#chat').innerText.includes(t)", arg=text, timeout=timeout)


def _wait_verdict(page):
    page.wait_for_function(
        "() => /NORMAL|ANOMALOUS/.test(document.querySelector('#verdict')?.innerText || '')", timeout=90_000
    )


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


def test_setup_is_above_the_fold_and_the_chat_box_is_labelled(browser, app_url):
    page = _open(browser, app_url, 1440, 900)
    for element in ("#product", "#rules", "#refs"):
        box = page.locator(element).bounding_box()
        assert box is not None, element
        assert box["y"] + box["height"] <= 900, f"{element} is below the fold at 1440 x 900"
    label = page.locator("#input").get_by_text("Your message: drop a photo of a part, or ask about the current one")
    assert label.is_visible()
    _shot(page, "ui-6-first-screen")


def test_a_failed_upload_clears_the_verdict_and_messages_name_the_file(browser, app_url, uploads):
    page = _open(browser, app_url)
    page.locator("#product textarea").fill("bottle")
    _send(page, file=uploads["bad"])
    _wait_verdict(page)
    assert page.locator("#slider img").count() > 0
    _send(page, file=uploads["corrupt"])
    page.wait_for_function(
        "() => document.querySelector('#verdict').innerText.includes('No verdict: corrupt.png')", timeout=60_000
    )
    assert not any(word in page.locator("#verdict").inner_text() for word in ("NORMAL", "ANOMALOUS"))
    assert page.locator("#slider img").count() == 0
    assert page.locator("#regions img").count() == 0
    text = _chat_text(page)
    assert "File: defect.png" in text
    assert "corrupt.png" in text
    assert str(uploads["corrupt"].parent) not in text
    assert "/tmp/" not in text
    _shot(page, "ui-7-failed-upload")


def test_the_sensitivity_slider_moves_the_threshold_the_chat_states(browser, app_url, uploads):
    page = _open(browser, app_url)
    page.locator("#product textarea").fill("bottle")
    _send(page, file=uploads["bad"])
    _wait_verdict(page)
    before = re.search(r"threshold (\d+\.\d{4})", page.locator("#verdict").inner_text()).group(1)
    track = page.locator("#sensitivity input[type=range]").bounding_box()
    page.mouse.click(track["x"] + 0.8 * track["width"], track["y"] + track["height"] / 2)
    _wait_chat(page, "the threshold is now")
    page.wait_for_function(
        "b => !document.querySelector('#verdict').innerText.includes('threshold ' + b)", arg=before, timeout=30_000
    )
    after = re.search(r"threshold (\d+\.\d{4})", page.locator("#verdict").inner_text()).group(1)
    assert f"the threshold is now {after}" in _chat_text(page)
    _send(page, text="how sure are you?")
    _wait_chat(page, "against a threshold of")
    answer = _chat_text(page).rsplit("how sure are you?", 1)[1]
    assert f"against a threshold of {after}" in answer
    _shot(page, "ui-8-sensitivity")


def test_a_guessed_product_is_said_and_the_report_is_named_after_the_image(browser, app_url, uploads):
    page = _open(browser, app_url)
    _send(page, file=uploads["bad"])
    _wait_verdict(page)
    _wait_chat(page, "% sure")
    assert re.search(r"(I took this for an? [a-z ]+|closest: an? [a-z ]+, )\(?\d+ % sure", _chat_text(page))
    assert "defect_report" in page.locator("#report").inner_text()


def test_the_chat_understands_products_rules_and_questions(browser, app_url, uploads):
    page = _open(browser, app_url)
    _send(page, file=uploads["bad"], text="it's a bottle cap")
    _wait_verdict(page)
    _wait_chat(page, "bottle cap:")
    assert page.locator("#product textarea").input_value() == "bottle cap"
    _send(page, text="From now on, a dent is a defect. Would you reject this?")
    _wait_chat(page, "I would")
    text = _chat_text(page)
    assert 'I understood: "dent" is a major defect' in text
    assert "a dent is a defect" in page.locator("#rules textarea").input_value()
    page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('a dent is a defect')")
    _send(page, text="is it a hole?")
    page.wait_for_function(
        "() => /Yes, most likely|Probably not a hole|No hole|I cannot tell/.test("
        "document.querySelector('#chat').innerText)",
        timeout=60_000,
    )
    assert "needs a language model" not in _chat_text(page)
    _shot(page, "ui-9-understanding")


def test_the_batch_tab_has_its_own_settings_heat_maps_and_a_summary(browser, app_url, uploads):
    page = _open(browser, app_url)
    page.get_by_role("tab", name="Batch").click()
    assert "its own product, rules, references and sensitivity" in page.locator("#batch-note").inner_text()
    page.locator("#batch-product textarea").fill("bottle")
    page.locator("#batch-rules textarea").fill("any hole is critical")
    page.locator("#batch-files input[type=file]").set_input_files(
        [str(uploads["good"]), str(uploads["bad"]), str(uploads["corrupt"])]
    )
    page.wait_for_function("() => document.querySelector('#batch-files').innerText.includes('corrupt')", timeout=60_000)
    page.get_by_role("button", name="Inspect all").click()
    page.wait_for_function(
        "() => (document.querySelector('#batch-status')?.innerText || '').includes('failed')", timeout=90_000
    )
    status = page.locator("#batch-status").inner_text()
    assert re.search(r"3 image\(s\): \d anomalous, \d normal, 1 failed\.", status)
    assert "Product: bottle" in status
    assert "any hole is critical → prompt added" in page.locator("#batch-table").inner_text()
    page.wait_for_function("() => document.querySelectorAll('#batch-gallery img').length >= 2", timeout=30_000)
    _shot(page, "ui-10-batch")
