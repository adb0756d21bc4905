"""The real server, started the way users start it (`llmstack serve`, which runs `bentoml serve`), on the tiny ONNX
model: health routes, the openai client (streaming included), /metrics counters, the API key, and an overload burst
that gets 429s for the excess and correct answers for the rest — no crash, no hang."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serving_fixtures import metric_sum, start_server, stop_server

KEY = "server-test-key"


@pytest.fixture(scope="module")
def server(tiny_onnx_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    log, secret = folder / "serve.log", folder / "api_key"
    secret.write_text(KEY + "\n")  # the key as a mounted secret file (compose / Kubernetes), trailing newline and all
    proc, base, _ = start_server(tiny_onnx_dir, ["limits.max_running=2", "limits.max_waiting=2",
                                                 "limits.max_tokens=300"], log_path=log,
                                 LLMSTACK_API_KEY_FILE=str(secret))
    yield base, proc, log
    if not stop_server(proc):
        pytest.fail("server did not stop within 30 s of SIGTERM")


def test_health_routes_are_open_and_api_needs_the_key(server):
    base, _, _ = server
    for route in ("/livez", "/healthz", "/readyz", "/metrics"):
        assert httpx.get(base + route).status_code == 200, route
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_openai_client_against_the_real_server_and_metrics_move(server):
    from openai import OpenAI
    base, _, _ = server
    oai = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    before = httpx.get(base + "/metrics").text
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where is my parcel?"}],
                                    max_tokens=6, temperature=0)
    chunks = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage.completion_tokens
    after = httpx.get(base + "/metrics").text
    gen = "llm_generation_tokens_total"
    assert metric_sum(after, gen) - metric_sum(before, gen) == r.usage.completion_tokens + streamed
    prompt = "llm_prompt_tokens_total"
    assert metric_sum(after, prompt) - metric_sum(before, prompt) == r.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
    ok = 'llm_requests_total'
    assert metric_sum(after, ok, status="success") - metric_sum(before, ok, status="success") == 2
    assert metric_sum(after, "llm_time_to_first_token_seconds_count") - \
        metric_sum(before, "llm_time_to_first_token_seconds_count") == 2
    assert "bentoml_service_request_total" in after  # BentoML's own series stay
    assert metric_sum(after, "llm_model_info", model="tiny", backend="onnxruntime") == 1


def test_overload_burst_gets_429_for_the_excess_and_answers_for_the_rest(server):
    base, proc, _ = server
    n = 10  # limits: 2 running + 2 waiting

    async def one(client, i):
        body = {"model": "tiny", "prompt": f"ticket {i}", "max_tokens": 300, "temperature": 0}
        return await client.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    results = asyncio.run(burst())
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 4 and codes.count(429) >= 1, codes
    for r in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
        else:
            body = r.json()
            assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"] in ("length",
                                                                                                       "stop")
    assert proc.poll() is None
    metrics = httpx.get(base + "/metrics").text
    assert metric_sum(metrics, "llm_requests_total", status="rejected") == codes.count(429)
    assert metric_sum(metrics, "llm_requests_running") == 0 and metric_sum(metrics, "llm_requests_waiting") == 0


def test_a_client_that_disconnects_cancels_its_generation(server):
    base, proc, _ = server
    before = metric_sum(httpx.get(base + "/metrics").text, "llm_requests_total", status="cancelled")
    body = {"model": "tiny", "prompt": "long story", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert any(x.startswith("data: ") for x in got)
    deadline = time.time() + 20
    while time.time() < deadline:
        text = httpx.get(base + "/metrics").text
        if metric_sum(text, "llm_requests_total", status="cancelled") == before + 1:
            break
        time.sleep(0.2)
    assert metric_sum(text, "llm_requests_total", status="cancelled") == before + 1
    assert metric_sum(text, "llm_generation_tokens_total") > 0 and metric_sum(text, "llm_requests_running") == 0
    assert proc.poll() is None
