"""The chat playground (/playground) in real headless Chromium against `llmstack serve` on the tiny model: a message
streams into the page token by token and matches the API's own greedy answer, the metrics line shows TTFT, tokens/s
and the finish reason, an overloaded server's 429 and a keyed server's 401 come out in plain words, the key prompt
appears and works, and the conversation exports as JSON and as curl (never with the key in it)."""
from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import pytest
from browser import Browser, chromium, png_size
from serving_fixtures import metric_sum, start_server, stop_server

KEY = "playground-test-key"


def type_and_send(browser: Browser, text: str) -> None:
    browser.js(f"document.getElementById('input').value = {json.dumps(text)}; "
               "document.getElementById('send').click(); true")


def last_reply(browser: Browser) -> dict:
    browser.wait_for("(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop(); "
                     "return m && (m.dataset.done === '1' || m.dataset.error); })()", timeout=60)
    return json.loads(browser.js(
        "(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop(); const s = m.querySelector('.stats');"
        "return JSON.stringify({text: m.querySelector('.text').textContent, chunks: +(m.dataset.chunks || 0), "
        "error: m.dataset.error || null, stats: s ? {...s.dataset, line: s.textContent} : null}); })()"))


def set_field(browser: Browser, field: str, value) -> None:
    browser.js(f"document.getElementById('{field}').value = {json.dumps(str(value))}; true")


@pytest.fixture(scope="module")
def open_server(tiny_onnx_dir, tmp_path_factory):
    chromium()  # skip before starting anything
    proc, base, _ = start_server(tiny_onnx_dir, ["limits.max_running=1", "limits.max_waiting=0"],
                                 log_path=tmp_path_factory.mktemp("playground") / "serve.log")
    yield base
    stop_server(proc)


def test_a_message_streams_in_with_its_metrics_and_matches_the_api(open_server, tmp_path):
    browser = Browser(tmp_path)
    try:
        browser.open(open_server + "/playground", 1280, 820)
        browser.wait_for("document.body.dataset.ready === '1' && document.body.dataset.models === '1'")
        assert browser.js("document.getElementById('model').value") == "tiny"
        assert browser.js("document.getElementById('key-box').hidden") is True  # this server needs no key
        set_field(browser, "system", "You triage support tickets.")
        set_field(browser, "max_tokens", 24)
        type_and_send(browser, "My parcel is two weeks late, where is it?")
        reply = last_reply(browser)
        want = httpx.post(open_server + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "temperature": 0, "top_p": 1, "max_tokens": 24, "messages": [
                {"role": "system", "content": "You triage support tickets."},
                {"role": "user", "content": "My parcel is two weeks late, where is it?"}]}).json()
        assert reply["error"] is None
        assert reply["text"] == want["choices"][0]["message"]["content"]          # greedy: the same answer
        assert reply["chunks"] > 1                                                # streamed, token by token
        stats = reply["stats"]
        assert stats["finish"] == want["choices"][0]["finish_reason"]
        assert int(stats["tokens"]) == want["usage"]["completion_tokens"]
        assert float(stats["ttftMs"]) >= 0 and "TTFT" in stats["line"] and "tok/s" in stats["line"]

        browser.js("document.getElementById('as-curl').click(); true")
        curl = browser.js("document.getElementById('export').value")
        assert curl.startswith(f"curl {open_server}/v1/chat/completions") and "Authorization" not in curl
        body = json.loads(curl.split("-d '", 1)[1].rstrip("'"))
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant"]
        assert body["messages"][2]["content"] == reply["text"]                    # the conversation is kept
        browser.js("document.getElementById('as-json').click(); true")
        assert json.loads(browser.js("document.getElementById('export').value")) == body

        type_and_send(browser, "And when will it arrive?")                        # a second turn
        assert last_reply(browser)["error"] is None
        shot = tmp_path / "playground.png"
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
        assert png_size(shot) == (1280, 820)
    finally:
        browser.close()


def test_a_link_fills_the_settings_and_sends_the_first_message(open_server, tmp_path):
    browser = Browser(tmp_path)
    try:
        browser.open(open_server + "/playground?system=Be%20brief.&max_tokens=5&temperature=0&q=Where%20is%20it%3F",
                     1000, 700)
        reply = last_reply(browser)
        assert reply["error"] is None and int(reply["stats"]["tokens"]) <= 5
        assert browser.js("document.getElementById('system').value") == "Be brief."
        assert browser.js("document.querySelector('.msg.user .text').textContent") == "Where is it?"
    finally:
        browser.close()


def test_an_overloaded_server_is_said_in_plain_words(open_server, tmp_path):
    """One batch slot, no queue: while a long request holds the slot, the page's message gets 429 with Retry-After."""
    holder = threading.Thread(target=lambda: httpx.post(open_server + "/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": "hold the slot", "max_tokens": 400, "ignore_eos": True, "temperature": 0}))
    browser = Browser(tmp_path)
    try:
        browser.open(open_server + "/playground", 1000, 700)
        browser.wait_for("document.body.dataset.ready === '1'")
        holder.start()
        deadline = time.time() + 30
        while metric_sum(httpx.get(open_server + "/metrics").text, "llm_requests_running") < 1:
            assert time.time() < deadline, "the long request never started"
            time.sleep(0.1)
        type_and_send(browser, "Hello?")
        reply = last_reply(browser)
        assert reply["error"] == "busy"
        assert "busy (429)" in reply["text"] and "retry in 1 s" in reply["text"]
    finally:
        browser.close()
        holder.join(120)


def test_a_keyed_server_asks_for_the_key_and_names_a_wrong_one(tiny_onnx_dir, tmp_path):
    chromium()
    proc, base, _ = start_server(tiny_onnx_dir, log_path=tmp_path / "serve.log", LLMSTACK_API_KEY=KEY)
    browser = Browser(tmp_path)
    try:
        browser.open(base + "/playground", 1000, 700)  # the page itself is open (auth.open_routes)
        browser.wait_for("document.body.dataset.ready === '1'")
        assert browser.js("document.getElementById('key-box').hidden") is False  # /v1/models said 401
        set_field(browser, "key", "wrong")
        type_and_send(browser, "Hello?")
        reply = last_reply(browser)
        assert reply["error"] == "auth" and "refused (401)" in reply["text"]
        browser.js(f"const k = document.getElementById('key'); k.value = {json.dumps(KEY)}; "
                   "k.dispatchEvent(new Event('change')); true")
        browser.wait_for("document.body.dataset.models === '1'")
        set_field(browser, "max_tokens", 6)
        type_and_send(browser, "Hello again?")
        reply = last_reply(browser)
        assert reply["error"] is None and reply["stats"]["finish"] in ("stop", "length")
        browser.js("document.getElementById('as-curl').click(); true")
        curl = browser.js("document.getElementById('export').value")
        assert "Bearer $LLMSTACK_API_KEY" in curl and KEY not in curl            # never the key itself
    finally:
        browser.close()
        stop_server(proc)
