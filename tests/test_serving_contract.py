"""The API contract, on the real server (`llmstack serve` on the tiny ONNX model, small limits): the OpenAPI documents
(BentoML's /docs.json and FastAPI's /v1/openapi.json) describe the request bodies and the OpenAI error responses,
any integer seed works, and schemathesis, fuzzing from the served /docs.json, gets no 5xx: every malformed or
out-of-range value is a 400 naming the field, and the server stays ready."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from serving import openai_schema as oa
from serving_fixtures import start_server, stop_server

KEY = "contract-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 8  # limits.max_tokens: a fuzzer's large max_tokens are 400s, never long generations
ROUTES = {"/v1/chat/completions": oa.ChatRequest, "/v1/completions": oa.CompletionRequest}
ERRORS = (400, 401, 404, 413, 429)
FUZZ_EXAMPLES = 100  # per route and generation mode (about 30 s for all four on 2 cores)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def server(tiny_onnx_dir):
    proc, base, _ = start_server(tiny_onnx_dir, [f"limits.max_tokens={MAX_TOKENS}", "limits.max_prompt_tokens=64",
                                                 "limits.max_body_bytes=8192", "server.default_max_tokens=4"],
                                 LLMSTACK_API_KEY=KEY)
    yield base
    stop_server(proc)


def _documents(base: str) -> dict[str, dict]:
    docs = {}
    for path in ("/docs.json", "/v1/openapi.json"):
        r = httpx.get(base + path, headers=AUTH)
        assert r.status_code == 200, (path, r.text)
        docs[path] = r.json()
    return docs


def _resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        node = doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


@pytest.mark.parametrize("route", ROUTES)
def test_both_documents_describe_the_body_and_the_errors(server, route):
    model = ROUTES[route]
    for name, doc in _documents(server).items():
        op = doc["paths"][route]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert op["requestBody"]["required"], name
        assert set(body["properties"]) == set(model.model_fields), name
        assert set(body["required"]) == {f for f, info in model.model_fields.items() if info.is_required()}, name
        assert "$ref" not in str(body), f"{name}: the body's nested models are inlined"
        for status in ERRORS:
            schema = _resolve(doc, op["responses"][str(status)]["content"]["application/json"]["schema"])
            detail = _resolve(doc, schema["properties"]["error"])
            assert set(detail["properties"]) == set(oa.ErrorDetail.model_fields), (name, status)
        assert {"application/json", "text/event-stream"} <= set(op["responses"]["200"]["content"]), name


def _complete(base: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": "Refund", "max_tokens": MAX_TOKENS, **body})


@pytest.mark.parametrize("seed", [-1, 2**70, -(2**70)])
def test_any_integer_seed_answers_and_repeats(server, seed):
    first, again = _complete(server, seed=seed, temperature=1.0), _complete(server, seed=seed, temperature=1.0)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] >= 1
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_seeds_map_into_the_engines_range_deterministically():
    def engine_seed(seed):
        return oa.CompletionRequest(model="m", prompt="p", seed=seed).seed
    for seed in (0, 11, oa.SEED_RANGE - 1):
        assert engine_seed(seed) == seed  # what numpy and vLLM take goes through unchanged
    for seed in (-1, -(2**70), 2**70):
        assert 0 <= engine_seed(seed) < oa.SEED_RANGE and engine_seed(seed) == engine_seed(seed)


def test_a_temperature_under_float32_range_is_greedy(server):
    tiny, greedy = _complete(server, temperature=1e-50), _complete(server, temperature=0)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("raw, param, words", [
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature", "finite number"),
    (b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p", "finite number"),
    (b'{"model": "tiny", "prompt": "x", "temperature": "0.5"}', "temperature", "valid number"),
    (b'{"model": "tiny", "prompt": "x", "seed": "7"}', "seed", "valid integer"),
    (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', "stream", "valid boolean"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', "prompt", "surrogate"),
])
def test_malformed_values_are_400s_naming_the_field(server, raw, param, words):
    r = httpx.post(server + "/v1/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.fixture(scope="module")
def api_schema(server):
    """The served /docs.json, as a client generator or a fuzzer reads it."""
    schema = schemathesis.openapi.from_url(server + "/docs.json", headers=AUTH)
    schema.config.update(base_url=server, headers=AUTH)
    rejection = schema.config.checks.negative_data_rejection  # a body over limits.max_body_bytes is rejected too
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def _naming_the_served_model(case):
    case.body["model"] = "tiny"  # a random name is a 404 before anything else; valid bodies should reach the engine
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("route", ROUTES)
def test_fuzzed_requests_get_no_server_error(api_schema, route, mode):
    """Schemathesis' bodies, valid (positive) and schema-violating (negative): no 5xx, every status and body as
    documented, every violation rejected, every 400 to a JSON object naming a field of the request."""
    strategy = api_schema[route]["POST"].as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE:
        strategy = strategy.map(_naming_the_served_model)
    statuses = []

    @given(case=strategy)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 400 and isinstance(case.body, dict):  # not for malformed JSON: no field to name
            param = response.json()["error"]["param"]
            assert param and param.split(".")[0] in ROUTES[route].model_fields, response.text

    fuzz()
    assert all(400 <= code < 500 for code in statuses) if mode == GenerationMode.NEGATIVE else 200 in statuses


def test_the_server_is_still_ready_after_the_fuzzing(server):
    assert httpx.get(server + "/readyz").status_code == 200
    r = _complete(server, temperature=0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
