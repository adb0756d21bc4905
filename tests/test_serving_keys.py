"""Named API keys (serving/keys.py, `llmstack keys`): against `llmstack serve` on the tiny model, started the way
users start it, with the openai SDK as the client: the right key name counted in /metrics (never the key), per-key
request and token limits answered 429 with Retry-After while another key's limit is untouched, one audit line per
request, and a revoked key refused as soon as the file changes."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import run_cli
from serving_fixtures import metric_sum, start_server, stop_server

from core.errors import ConfigError
from serving.keys import Key, Limiter, read_keys

CHAT = "/v1/chat/completions"


def add(keys_file, name, *limits) -> str:
    r = run_cli(["keys", "add", name, "--file", str(keys_file), *limits])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def ask(base: str, key: str, text: str = "my parcel is late") -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=4,
                                          temperature=0)


def test_named_keys_limits_metrics_audit_and_revocation(tiny_model_dir, tmp_path):
    keys_file, audit = tmp_path / "keys.yaml", tmp_path / "audit.jsonl"
    a = add(keys_file, "team-a", "--requests-per-min", "3")
    b = add(keys_file, "team-b")
    c = add(keys_file, "team-c", "--tokens-per-min", "20")
    assert a not in keys_file.read_text() and len({a, b, c}) == 3  # only hashes on disk
    proc, base, log = start_server(tiny_model_dir, [f"auth.keys_file={keys_file}", f"auth.audit_log={audit}"],
                                   log_path=tmp_path / "serve.log", BENTOML_HOME=str(tmp_path / "bentoml"))
    try:
        used = {"team-a": [ask(base, a).usage for _ in range(3)]}
        with pytest.raises(openai.RateLimitError) as limited:
            ask(base, a)
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
        assert "team-a" in limited.value.message and "requests_per_min" in limited.value.message
        used["team-b"] = [ask(base, b).usage]           # another key: its own (absent) limit, untouched by team-a's
        used["team-c"] = [ask(base, c).usage]           # > 20 tokens: the next one waits
        with pytest.raises(openai.RateLimitError):
            ask(base, c)
        with pytest.raises(openai.AuthenticationError):
            ask(base, "sk-not-a-key")
        for i in range(3):                              # made-up paths: one "other" series, not one per path
            assert httpx.get(f"{base}/v1/x{i}", headers={"Authorization": f"Bearer {b}"}).status_code == 404

        metrics = httpx.get(base + "/metrics", timeout=10).text
        for secret in (a, b, c):
            assert secret not in metrics
        assert metric_sum(metrics, "llm_key_requests_total", key_name="team-a", route=CHAT, status="200") == 3
        assert metric_sum(metrics, "llm_key_requests_total", key_name="team-a", route=CHAT, status="429") == 1
        assert metric_sum(metrics, "llm_key_requests_total", key_name="team-b", route=CHAT, status="200") == 1
        assert metric_sum(metrics, "llm_key_rate_limited_total", key_name="team-c", limit="tokens_per_min") == 1
        assert metric_sum(metrics, "llm_key_requests_total", key_name="team-b", route="other", status="404") == 3
        assert 'route="/v1/x0"' not in metrics       # (BentoML's own bentoml_* series do label raw paths)
        for name, usages in used.items():
            for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
                assert metric_sum(metrics, "llm_key_tokens_total", key_name=name, kind=kind) == \
                    sum(getattr(u, field) for u in usages)

        lines = [json.loads(x) for x in audit.read_text().splitlines()]
        assert [(x["key"], x["status"]) for x in lines] == [("team-a", 200)] * 3 + [
            ("team-a", 429), ("team-b", 200), ("team-c", 200), ("team-c", 429), (None, 401)] + [("team-b", 404)] * 3
        assert [x["completion_tokens"] for x in lines[:3]] == [u.completion_tokens for u in used["team-a"]]
        assert all(x["route"] == CHAT and x["seconds"] >= 0 for x in lines[:8])
        assert [x["route"] for x in lines[8:]] == ["/v1/x0", "/v1/x1", "/v1/x2"]  # the audit keeps the real path
        assert "parcel" not in audit.read_text()        # no prompt text in the audit trail

        r = run_cli(["keys", "revoke", "team-b", "--file", str(keys_file)])
        assert r.returncode == 0, r.stderr
        deadline = time.time() + 10
        while time.time() < deadline:                   # re-read within a second of the change
            try:
                ask(base, b)
            except openai.AuthenticationError:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the revoked key was still accepted 10 s after the keys file changed")
        d = add(keys_file, "team-d")                    # a key added while the server runs: no restart needed
        time.sleep(1.2)
        assert ask(base, d).choices
    finally:
        stop_server(proc)
    assert "3 named keys from" in Path(log).read_text()


def test_a_bad_keys_file_is_refused_before_the_server_starts(tmp_path, tiny_model_dir):
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  team-a: {sha256: abc}\n")
    r = run_cli(["serve", "--model", str(tiny_model_dir), f"auth.keys_file={bad}"], timeout=120)
    assert r.returncode == 2
    assert "keys.yaml:2:" in r.stderr and "keys.team-a" in r.stderr and "sha256" in r.stderr
    with pytest.raises(ConfigError) as err:
        bad.write_text("keys:\n  x: {sha256: " + "a" * 64 + ", requests_per_min: 0}\n")
        read_keys(bad)
    assert err.value.field == "keys.x" and "requests_per_min" in str(err.value)


def test_the_sliding_window_frees_requests_and_tokens_as_they_age():
    limiter, key = Limiter(), Key("k", "0" * 64, requests_per_min=2, tokens_per_min=100)
    assert limiter.admit(key, now=0) is None and limiter.admit(key, now=10) is None
    assert limiter.admit(key, now=20) == ("requests_per_min", 40)   # the first leaves the window at 60
    assert limiter.admit(key, now=60.5) is None                     # it has
    limiter.spend("k", 150, now=61)
    hit = limiter.admit(Key("k", "0" * 64, tokens_per_min=100), now=62)
    assert hit == ("tokens_per_min", 59)
    assert re.fullmatch(r"\d+", str(hit[1]))
