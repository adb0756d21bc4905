"""Zero-downtime model swaps (serving/swap.py, POST /admin/reload, `llmstack reload`): in process, a request in
flight finishes on the old model while new ones go to the new one, a failing load leaves the old model serving, only
admin keys may swap; against a real `llmstack serve`, closed-loop clients at concurrency 8 run across a swap with no
failed request, every answer is the greedy answer of the model its response names, and /metrics follows the swap."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from serving_fixtures import collect, make_state, metric_sum, sample_value, start_server, stop_server

from serving.api import Guard, build_app
from serving.engine import Params
from serving.runtime import close_state
from serving.swap import Swapper

KEY = "swap-test-key"
PROMPTS = ["Where is my parcel?", "Refund my order", "The router is down", "Change my password"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """Another random tiny model (other seed, wider initialisation): its greedy answers differ from tiny_model_dir's
    (which answers newlines) and from prompt to prompt."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model-b")
    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 1.0
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_answers(folder) -> dict[str, str]:
    """The model's greedy chat answers to PROMPTS, from the engine alone (no HTTP, no batching)."""
    st = make_state(folder, backend="transformers")
    try:
        out = {}
        for p in PROMPTS:
            text = st.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True)
            ids = st.tok(text, add_special_tokens=False)["input_ids"]
            out[p] = asyncio.run(collect(st.gen, ids, Params(max_tokens=MAX_TOKENS, temperature=0)))[0]
        return out
    finally:
        close_state(st)


def test_swap_in_process_old_request_finishes_on_old_model_and_a_bad_load_changes_nothing(
        tiny_model_dir, second_model_dir, tmp_path):
    state = make_state(tiny_model_dir, backend="transformers")
    first = state.model_name
    app = build_app(state)
    app.state.swapper = Swapper(app, state.cfg, state.registry)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=120) as c:
            r = await c.post("/admin/reload", json={"model": str(tmp_path / "missing")})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "model" and "model path does not exist" in err["message"]
            assert f"still serving '{first}'" in err["message"]
            r = await c.post("/admin/reload", json={"path": str(second_model_dir)})
            assert r.status_code == 400 and "model" in r.json()["error"]["message"]
            assert app.state.llm is state and state.gen.ready  # nothing changed

            long = asyncio.create_task(c.post("/v1/completions", json={
                "model": first, "prompt": "Refund", "max_tokens": 40, "temperature": 0, "ignore_eos": True}))
            while state.inflight == 0:
                await asyncio.sleep(0.01)
            r = await c.post("/admin/reload", json={"model": str(second_model_dir), "name": "tiny-b",
                                                    "backend": "transformers"})
            assert r.status_code == 200, r.text
            rec = r.json()
            assert rec["previous"] == first and rec["model"] == "tiny-b" and rec["alias"] == first
            assert rec["requests_held_by_previous"] == 1 and rec["drained"] is True
            old = (await long).json()
            assert old["model"] == first and old["usage"]["completion_tokens"] == 40  # finished on the old model
            assert not state.gen.ready  # then freed

            r = await c.post("/v1/completions", json={"model": first, "prompt": "Refund", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == "tiny-b"  # the old name reaches the new model
            assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["tiny-b", first]
            r = await c.post("/admin/reload", json={"model": str(tiny_model_dir), "backend": "transformers"})
            assert r.status_code == 200 and r.json()["model"] not in (first, "tiny-b")  # an id never used before
    try:
        asyncio.run(scenario())
        reg = state.registry
        assert sample_value(reg, "llm_model_info", model=first, adapter="", backend="transformers",
                            backend_format="transformers", stage="", run_id="", variant="") == 0
        assert sample_value(reg, "llm_requests_total", model="tiny-b", adapter="", backend="transformers",
                            status="success", finish_reason="length") == 1
    finally:
        close_state(app.state.llm)


def test_only_admin_keys_may_swap(tmp_path, tiny_model_dir):
    from fastapi.testclient import TestClient

    from serving.keys import add_key

    keys = tmp_path / "keys.yaml"
    user, admin = add_key(keys, "app"), add_key(keys, "ops", admin=True)
    app = build_app(None)
    app.add_middleware(Guard, keys_file=str(keys))
    with TestClient(app) as c:
        body = {"model": str(tiny_model_dir)}
        r = c.post("/admin/reload", json=body, headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin" and "'app'" in r.text
        r = c.post("/admin/reload", json=body, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 501 and "llmstack serve" in r.json()["error"]["message"]  # past the key check


def test_swap_under_load_on_a_real_server(tiny_model_dir, second_model_dir, tmp_path):
    expected = {"tiny": greedy_answers(tiny_model_dir), "tiny-b": greedy_answers(second_model_dir)}
    assert all(expected["tiny"][p] != expected["tiny-b"][p] for p in PROMPTS)
    assert len(set(expected["tiny-b"].values())) > 1
    proc, base, log_path = start_server(tiny_model_dir, ["limits.max_running=8", "registry.enabled=false"],
                                        LLMSTACK_API_KEY=KEY)
    from openai import OpenAI

    results: list[dict] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        oai = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        i = worker
        while not stop.is_set():
            prompt, t0 = PROMPTS[i % len(PROMPTS)], time.time()
            try:
                kw = dict(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
                          temperature=0)
                if i % 2:
                    chunks = list(oai.chat.completions.create(stream=True, **kw))
                    models = {c.model for c in chunks}
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    r = oai.chat.completions.create(**kw)
                    models, text = {r.model}, r.choices[0].message.content
                results.append({"prompt": prompt, "models": models, "text": text, "start": t0, "end": time.time()})
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                results.append({"prompt": prompt, "error": repr(exc), "start": t0, "end": time.time()})
            i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    try:
        for t in threads:
            t.start()
        while len(results) < 24:
            time.sleep(0.1)
        before = len(results)
        out = _reload(second_model_dir, base)
        swapped_at = time.time()
        assert out.returncode == 0, out.stdout + out.stderr
        assert "now serving 'tiny-b'" in out.stdout and "'tiny'" in out.stdout
        n_after = len(results)
        while len(results) < n_after + 24:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(60)
        failed = [r for r in results if "error" in r]
        assert not failed, failed[:3]
        assert len(results) > before
        for r in results:
            assert len(r["models"]) == 1, r  # one model per answer, streamed chunks included
            (model,) = r["models"]
            assert r["text"] == expected[model][r["prompt"]], (model, r)
        by_model = {m: sum(1 for r in results if m in r["models"]) for m in expected}
        assert by_model["tiny"] > 0 and by_model["tiny-b"] > 0
        assert all(r["models"] == {"tiny-b"} for r in results if r["start"] > swapped_at)

        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert metric_sum(metrics, "llm_model_info", model="tiny-b") == 1
        assert metric_sum(metrics, "llm_model_info", model="tiny") == 0
        assert metric_sum(metrics, "llm_requests_total", model="tiny-b", status="success") >= by_model["tiny-b"]

        bad = _reload(tmp_path / "missing", base)  # a failing load: exit 2, the server's reason, still serving
        assert bad.returncode == 2 and "HTTP 400" in bad.stderr and "still serving 'tiny-b'" in bad.stderr
        r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny-b"
    finally:
        stop.set()
        stop_server(proc)
    server_log = open(log_path).read()
    assert "model swapped: 'tiny' -> 'tiny-b'" in server_log  # the event is in the server log


def _reload(model, base):
    """`llmstack reload` as a user runs it, with the server's key in the environment."""
    import subprocess

    from conftest import PY, ROOT, cli_env

    return subprocess.run([PY, "-m", "llmstack", "reload", "--model", str(model), "--name", "tiny-b", "--url", base,
                           "--config", str(ROOT / "configs/serve.yaml")], cwd=ROOT, env=cli_env(LLMSTACK_API_KEY=KEY),
                          capture_output=True, text=True, timeout=300)
