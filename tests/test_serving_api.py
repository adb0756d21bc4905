"""The OpenAI-compatible API in-process (FastAPI TestClient) on the tiny ONNX model: the official openai client works
unchanged (streaming included), usage and metrics agree, and every kind of bad input gets its status and a message
naming the field."""
from __future__ import annotations

import json

import pytest
from serving_fixtures import make_state, sample_value

from serving.api import Guard, build_app
from serving.runtime import close_state

KEY = "test-key-123"


@pytest.fixture(scope="module")
def state(tiny_onnx_dir):
    st = make_state(tiny_onnx_dir, limits={"max_prompt_tokens": 64, "max_tokens": 40, "max_body_bytes": 4096})
    yield st
    close_state(st)


@pytest.fixture(scope="module")
def client(state):
    from fastapi.testclient import TestClient
    app = build_app(state)
    app.add_middleware(Guard, api_key=KEY, open_routes=["/livez"], max_body_bytes=4096)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def oai(client):
    from openai import OpenAI
    return OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def test_openai_client_chat_completions_and_models(oai, state):
    name = state.model_name
    assert [m.id for m in oai.models.list().data] == [name]
    before = sample_value(state.registry, "llm_generation_tokens_total", model=name, adapter="", backend="onnxruntime")
    r = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Where is my parcel?"}],
                                    max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.model == name
    assert r.choices[0].finish_reason in ("length", "stop") and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    after = sample_value(state.registry, "llm_generation_tokens_total", model=name, adapter="", backend="onnxruntime")
    assert after - before == r.usage.completion_tokens

    # greedy is deterministic: the same request gives the same text, streamed or not
    stream = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Where is my parcel?"}],
                                         max_tokens=7, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices

    c = oai.completions.create(model=name, prompt="The parcel", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.usage.completion_tokens <= 5
    streamed = "".join(x.choices[0].text for x in oai.completions.create(
        model=name, prompt="The parcel", max_tokens=5, temperature=0, stream=True) if x.choices)
    assert streamed == c.choices[0].text


def test_seeded_sampling_repeats_and_stop_is_honoured(oai, state):
    kw = dict(model=state.model_name, prompt="Refund", max_tokens=12, temperature=1.0, seed=11)
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    full = oai.completions.create(model=state.model_name, prompt="Refund", max_tokens=12, temperature=0)
    text = full.choices[0].text
    if len(text) > 4:
        stop = text[2:4]
        cut = oai.completions.create(model=state.model_name, prompt="Refund", max_tokens=12, temperature=0, stop=stop)
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(stop)]


def _chat(name="x", **extra):
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "malformed JSON"),
    (b"[1, 2]", 400, None, "must be an object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "Field required"),
    ("MODEL", 400, "temperature", "temperature"),
    ("MODEL_MSG", 400, "messages.0.role", "messages.0.role"),
    ("MODEL_N", 400, "n", "n"),
    ("MODEL_TOOLS", 400, "tools", "tool calls are not supported"),
    ("MODEL_MAXTOK", 400, "max_tokens", "more than this server allows (40)"),
    ("MODEL_LONG", 400, "messages", "more than the limit of 64"),
    (_chat("no-such-model"), 404, "model", "'no-such-model' does not exist"),
])
def test_bad_requests_get_status_and_field(client, state, body, status, param, words):
    name = state.model_name
    bodies = {"MODEL": _chat(name, temperature="hot"), "MODEL_MSG": {"model": name, "messages": [{"role": "robot",
                                                                                                "content": "x"}]},
              "MODEL_N": _chat(name, n=3), "MODEL_TOOLS": _chat(name, tools=[{"type": "function"}]),
              "MODEL_MAXTOK": _chat(name, max_tokens=41),
              "MODEL_LONG": {"model": name, "messages": [{"role": "user", "content": "refund " * 80}]}}
    body = bodies.get(body, body) if isinstance(body, str) else body
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"]


def test_api_key_and_body_size(client, state):
    from fastapi.testclient import TestClient
    bare = TestClient(client.app)
    r = bare.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = bare.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    assert bare.get("/livez").status_code != 401  # open route (404 here: BentoML adds it in the real server)
    r = client.post("/v1/chat/completions", json=_chat(state.model_name, user="x" * 5000))
    assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["error"]["message"]


def test_api_key_from_the_variable_or_a_secret_file(tmp_path):
    from core.errors import ConfigError
    from serving.config import AuthCfg
    auth, secret = AuthCfg(), tmp_path / "key"
    secret.write_text("from-file\n")
    assert auth.api_key({}) is None
    assert auth.api_key({"LLMSTACK_API_KEY_FILE": str(secret)}) == "from-file"
    assert auth.api_key({"LLMSTACK_API_KEY": "from-env", "LLMSTACK_API_KEY_FILE": str(secret)}) == "from-env"
    # a secret that failed to mount must not silently open the API
    with pytest.raises(ConfigError) as e:
        auth.api_key({"LLMSTACK_API_KEY_FILE": str(tmp_path / "missing")})
    assert e.value.field == "LLMSTACK_API_KEY_FILE" and "missing" in str(e.value.file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        auth.api_key({"LLMSTACK_API_KEY_FILE": str(tmp_path / "empty")})
