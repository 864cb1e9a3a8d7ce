"""The web page `llava-gguf serve` shows at /, in a real browser: Playwright drives Debian's chromium (headless,
through `executable_path`: Playwright's own browser download cannot be reached) against a real server process
with the shipped model. The page's answers must equal the API's greedy answers for the same conversation (the
official `openai` client on the same server), its stats must show time to first token and cached tokens, Stop
must end a running answer (and the server free its sequence), and a server with an API key must ask for it.
A screenshot is saved as test-results/serve-page.png."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from llava_gguf.demo import shapes
from support import serve_process

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "test-results" / "serve-page.png"
MAX_TOKENS = 48  # a caption of the shipped model fits
KEY = "page-test-key-1234"
TIMEOUT_MS = 20_000  # any one wait in the page; the shipped model answers in well under a second
# A JSON schema the Stop test adds to the page's request: the shipped model ends every answer within a few
# tokens, so only a grammar that demands hundreds of items keeps it generating long enough to be stopped.
LONG_SCHEMA = {"type": "object", "required": ["items"],
               "properties": {"items": {"type": "array", "items": {"type": "integer"}, "minItems": 300}}}


def chromium() -> str:
    path = os.environ.get("LLAVA_GGUF_CHROMIUM") or shutil.which("chromium")
    if not path or not Path(path).exists():
        pytest.fail("chromium is missing: the set-up installs Debian's `chromium` package (or set LLAVA_GGUF_CHROMIUM "
                    "to a Chromium binary)")
    return path


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, timeout=30_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(shipped_gguf):
    with serve_process(shipped_gguf, "--parallel", "2") as url:
        yield url


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, str, str]:
    """A test scene as a PNG file, its data: URL (what the page's FileReader makes of it) and a question."""
    sc = shapes.scene("test", 11)
    path = tmp_path_factory.mktemp("page") / "scene.png"
    sc.image().save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return path, url, sc.questions()[0].text


@pytest.fixture
def page(browser):
    """A fresh page; fails the test if the page threw or the Content-Security-Policy blocked anything."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield pg
        assert problems == []
    finally:
        context.close()


def open_page(pg: Page, url: str, *, temperature: str = "0", max_tokens: int = MAX_TOKENS) -> None:
    response = pg.goto(url + "/")
    # served under its Content-Security-Policy, so the `page` fixture's check for violations means something
    assert "default-src 'none'" in response.headers["content-security-policy"]
    expect(pg.locator("#status")).to_have_attribute("data-state", "ok")
    pg.click("#settings summary")
    pg.fill("#temperature", temperature)
    pg.fill("#max-tokens", str(max_tokens))


def ask(pg: Page, question: str, *, images: tuple[Path, ...] = (), state: str = "done"):
    """Attach `images`, ask `question` (Enter), wait for the new answer to reach `state`; returns it."""
    n = pg.locator(".answer").count()
    if images:
        pg.set_input_files("#image-input", [str(p) for p in images])
        expect(pg.locator("#attachments img")).to_have_count(len(images))
    pg.fill("#prompt", question)
    pg.press("#prompt", "Enter")
    answer = pg.locator(".answer").nth(n)
    expect(answer).to_have_attribute("data-state", state)
    return answer


def client(url: str, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "unused", timeout=30, max_retries=0)


def greedy(url: str, messages: list[dict], key: str | None = None) -> tuple[str, object]:
    r = client(url, key).chat.completions.create(model=model_alias(url), messages=messages, temperature=0,
                                                 max_tokens=MAX_TOKENS)
    return r.choices[0].message.content, r.usage


def model_alias(url: str) -> str:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)["model"]


def user_turn(image_url: str, text: str) -> dict:
    # the page's order: the images, then the question
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def stats(pg: Page) -> dict[str, int]:
    s = pg.locator("#stats")
    return {"ttft_ms": int(s.get_attribute("data-ttft-ms")), "prompt": int(s.get_attribute("data-prompt-tokens")),
            "cached": int(s.get_attribute("data-cached-tokens"))}


def test_page_answers_as_the_api_does_and_keeps_the_conversation(server, page, scene):
    png, image_url, question = scene
    open_page(page, server)
    assert not page.is_visible("#api-key")  # this server needs no key

    first = ask(page, shapes.DESCRIBE, images=(png,))  # a caption: several tokens, so a rate
    first_text = first.text_content()
    text = page.text_content("#stats")
    assert re.search(r"first token [\d.]+ m?s", text) and re.search(r"\d+\.\d tokens/s", text) and "cached" in text, text
    first_stats = stats(page)
    assert first_stats["ttft_ms"] >= 0 and first_stats["prompt"] > 0
    # the image went with the question, and shows in the conversation
    expect(page.locator("#messages .user img")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)

    follow_up = question
    second = ask(page, follow_up)
    second_stats = stats(page)
    # the whole first turn (image rows included) came from the cache: only the follow-up was decoded
    assert second_stats["cached"] >= first_stats["prompt"], (first_stats, second_stats)
    assert f"cached {second_stats['cached']}" in page.text_content("#stats")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))

    # the same conversation through the API, greedy: the same answers
    history = [user_turn(image_url, shapes.DESCRIBE)]
    expected_first, _ = greedy(server, history)
    assert first_text == expected_first
    history += [{"role": "assistant", "content": first_text}, {"role": "user", "content": follow_up}]
    expected_second, _ = greedy(server, history)
    assert second.text_content() == expected_second

    page.click("#new-chat")
    expect(page.locator("#messages .answer")).to_have_count(0)
    assert page.text_content("#stats") == ""


def test_images_can_be_dropped_pasted_and_removed(server, page, scene):
    png, image_url, question = scene
    open_page(page, server)
    page.set_input_files("#image-input", str(png))
    b64 = image_url.split(",", 1)[1]
    # a file dropped on the page and one pasted, as the browser hands them over (DataTransfer)
    page.evaluate("""([b64]) => {
        const file = (name) => new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"});
        const drop = new DataTransfer(); drop.items.add(file("dropped.png"));
        document.querySelector("#prompt").dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true,
                                                                               cancelable: true}));
        const paste = new DataTransfer(); paste.items.add(file("pasted.png"));
        document.querySelector("#prompt").dispatchEvent(new ClipboardEvent("paste", {clipboardData: paste,
                                                                                   bubbles: true, cancelable: true}));
    }""", [b64])
    expect(page.locator("#attachments img")).to_have_count(3)
    page.click("#attachments button >> nth=0")
    expect(page.locator("#attachments img")).to_have_count(2)

    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    assert page.input_value("#prompt") == "first line\n"
    expect(page.locator(".answer")).to_have_count(0)

    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, question)
    body = sent.value.post_data_json
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert all(p["image_url"]["url"] == image_url for p in parts[:2])
    assert body["temperature"] == 0 and body["max_tokens"] == MAX_TOKENS and body["stream"] is True


def slots_busy(url: str) -> tuple[int, int]:
    """From /metrics: sequences not idle, and requests cancelled so far."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    busy = sum(1 for m in re.finditer(r'llava_gguf_slot_state\{slot="\d+",state="(\w+)"\} 1', text)
               if m.group(1) != "idle")
    cancelled = re.search(r'llava_gguf_requests_total\{outcome="cancelled"\} (\d+)', text)
    return busy, int(cancelled.group(1)) if cancelled else 0


def test_stop_ends_a_running_answer_and_keeps_it(server, page, scene):
    png, _, _ = scene
    open_page(page, server, max_tokens=1000)

    def long_answer(route):
        body = route.request.post_data_json
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG_SCHEMA}}
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", long_answer)
    answer = ask(page, "Describe the image.", images=(png,), state="streaming")
    expect(answer).to_have_text(re.compile(r"\S"))  # it has started
    expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    partial = answer.text_content()
    assert partial.startswith("{") and len(partial) < 2000
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    assert "stopped" in page.text_content("#stats")

    # the server saw the disconnect: the request counts as cancelled and no sequence stays busy
    deadline = time.time() + 10
    while slots_busy(server)[0] and time.time() < deadline:
        time.sleep(0.1)
    busy, cancelled = slots_busy(server)
    assert busy == 0 and cancelled >= 1

    # the conversation goes on, with the partial answer as the assistant's turn
    page.unroute("**/v1/chat/completions")
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "How many shapes are there?")
    messages = sent.value.post_data_json["messages"]
    assert messages[-2] == {"role": "assistant", "content": partial}
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]


def test_a_server_with_an_api_key_gets_it_from_the_page(shipped_gguf, page, scene):
    png, image_url, question = scene
    with serve_process(shipped_gguf, "--parallel", "1", "--api-key", KEY) as url:
        open_page(page, url)
        expect(page.locator("#api-key")).to_be_visible()
        refused = ask(page, question, images=(png,), state="error")
        assert "key" in refused.text_content().lower()
        expect(page.locator("#api-key")).to_be_focused()

        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")  # the refused question is sent again, with the key
        expect(refused).to_have_attribute("data-state", "done")
        expected, _ = greedy(url, [user_turn(image_url, question)], key=KEY)
        assert refused.text_content() == expected

        # kept for the browser tab's session
        page.reload()
        expect(page.locator("#api-key")).to_have_value(KEY)


def test_a_refused_message_shows_the_servers_reason_and_is_not_re_sent(server, page, scene, tmp_path):
    png, _, question = scene
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"<b>not</b> a picture")
    open_page(page, server)
    refused = ask(page, "Is <b>this</b> a picture?", images=(broken,), state="error")
    expect(refused).to_contain_text("not an image")  # the server's own words
    # what was typed shows as typed: the page puts text into the page as text, never as HTML
    expect(page.locator("#messages .user .text")).to_have_text("Is <b>this</b> a picture?")
    expect(page.locator("#messages b")).to_have_count(0)

    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, question, images=(png,))
    assert len(sent.value.post_data_json["messages"]) == 1
