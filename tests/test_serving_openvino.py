"""The OpenVINO GenAI backend on the tiny model: the real worker in OpenVINO's own environment (.venv-openvino,
`make openvino-env`), driven through the service's generator and through `llmstack serve` with the openai SDK.
Greedy tokens equal transformers' generate (f32 weights and activations), stop sequences, cancellation, overload,
a worker that dies, the export cache."""
from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from serving_fixtures import collect, metric_sum, serve_cfg, start_server, stop_server

from conftest import ROOT
from serving.engine import Params
from serving.requests import Overloaded

OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
pytestmark = pytest.mark.skipif(not OV_PYTHON.exists(), reason="no OpenVINO environment (.venv-openvino): "
                                "`make openvino-env` installs it (make test does)")

PROMPTS = ["Hello there", "My order arrived broken and I want a refund, what can I do about it today?",
           "Where is my parcel?", "Cancel my subscription please, I was charged twice this month for the same plan"]
NEW = 12
EXACT = {"weight_format": "fp32", "inference_precision": "f32", "kv_cache_precision": "f32"}


def _cfg(model_dir, export_dir, **limits):
    return serve_cfg(model_dir, openvino={"python": str(OV_PYTHON), "export_dir": str(export_dir), **EXACT},
                     limits={"max_running": 4, "max_waiting": 4, **limits}, model={"backend": "openvino"})


@pytest.fixture(scope="module")
def ov_export(tiny_model_dir, tmp_path_factory):
    from serving.backends.openvino import prepare
    export_dir = tmp_path_factory.mktemp("ov-exports")
    return prepare(_cfg(tiny_model_dir, export_dir), tiny_model_dir), export_dir


def _generator(tiny_model_dir, tokenizer, export_dir, **limits):
    from prometheus_client import CollectorRegistry

    from serving.backends.openvino import OpenVinoGenerator
    from serving.metrics import Metrics
    metrics = Metrics("tiny", "openvino", registry=CollectorRegistry())
    eos = {tokenizer.eos_token_id}
    return OpenVinoGenerator(_cfg(tiny_model_dir, export_dir, **limits), tiny_model_dir, tokenizer, eos,
                             metrics).start()


def _reference(tiny_model_dir, tokenizer) -> list[str]:
    """transformers' greedy generate, one prompt at a time, as text."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
            g = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_export_is_made_once_and_reused(ov_export, tiny_model_dir):
    from serving.backends.openvino import prepare
    folder, export_dir = ov_export
    assert (folder / "openvino_model.xml").is_file() and folder.parent == export_dir
    stamp = (folder / "openvino_model.xml").stat().st_mtime_ns
    assert prepare(_cfg(tiny_model_dir, export_dir), tiny_model_dir) == folder  # no second export
    assert (folder / "openvino_model.xml").stat().st_mtime_ns == stamp
    assert prepare(_cfg(folder, export_dir), folder) == folder  # an IR folder is served as it is
    assert not list(export_dir.glob("*.tmp-*"))  # nothing half-written left behind


def test_concurrent_greedy_tokens_equal_transformers_generate(ov_export, tiny_model_dir, tokenizer):
    gen = _generator(tiny_model_dir, tokenizer, ov_export[1])

    async def together():
        return await asyncio.gather(*[collect(gen, _ids(tokenizer, p), Params(max_tokens=NEW, temperature=0,
                                                                              ignore_eos=True)) for p in PROMPTS])
    try:
        got = asyncio.run(together())
    finally:
        gen.stop()
    ref = _reference(tiny_model_dir, tokenizer)
    for i, (text, finish, n) in enumerate(got):
        assert (finish, n) == ("length", NEW), f"prompt {i}"
        assert text == ref[i], f"prompt {i}"


def test_stops_seeds_cancellation_and_overload(ov_export, tiny_model_dir, tokenizer):
    gen = _generator(tiny_model_dir, tokenizer, ov_export[1], max_running=1, max_waiting=0)
    ids = _ids(tokenizer, PROMPTS[1])

    async def scenario():
        full, _, _ = await collect(gen, ids, Params(max_tokens=NEW, temperature=0, ignore_eos=True))
        stop = full[len(full) // 2:len(full) // 2 + 3]
        cut = await collect(gen, ids, Params(max_tokens=NEW, temperature=0, stops=[stop], ignore_eos=True))
        sampled = [await collect(gen, ids, Params(max_tokens=8, temperature=1.0, seed=s)) for s in (7, 7, 3)]
        stream = gen.stream("c", ids, Params(max_tokens=200, temperature=0, ignore_eos=True))
        await stream.__anext__()  # one token, then the client goes away
        with pytest.raises(Overloaded):  # the one slot is still taken while it runs
            await gen.stream("o", ids, Params(max_tokens=4)).__anext__()
        await stream.aclose()
        after = await collect(gen, ids, Params(max_tokens=4, temperature=0))  # the slot is free again
        return full, stop, cut, sampled, after
    try:
        full, stop, cut, sampled, after = asyncio.run(scenario())
        reg = gen.metrics.requests._metrics  # noqa: SLF001 - the counter's children by label values
        finishes = {k[-1]: v._value.get() for k, v in reg.items()}  # noqa: SLF001
    finally:
        gen.stop()
    assert cut[1] == "stop" and cut[0] == full[:full.index(stop)]  # cut before the stop sequence
    assert sampled[0][0] == sampled[1][0]  # the same seed, the same text
    assert sampled[2][1] == "length" and sampled[2][2] == 8
    assert after[1] == "length" and after[2] == 4
    assert finishes.get("abort") == 1 and not gen.reqs  # the cancelled one was counted and left the worker


def test_a_dying_worker_fails_its_requests_and_the_backend(ov_export, tiny_model_dir, tokenizer):
    gen = _generator(tiny_model_dir, tokenizer, ov_export[1])

    async def scenario():
        stream = gen.stream("d", _ids(tokenizer, PROMPTS[0]), Params(max_tokens=500, temperature=0,
                                                                       ignore_eos=True))
        await stream.__anext__()
        gen.worker.proc.kill()
        last = None
        async for ev in stream:
            last = ev
        return last
    try:
        last = asyncio.run(scenario())
    finally:
        gen.stop()
    assert last.finish == "abort" and "exited" in last.error
    assert gen.ready is False  # /readyz turns red: the orchestrator restarts the service


def test_missing_environment_is_a_config_error(tiny_model_dir, tmp_path):
    from core.errors import ConfigError
    from serving.backends.openvino import prepare
    cfg = _cfg(tiny_model_dir, tmp_path)
    cfg.openvino.python = str(tmp_path / "no-such-python")
    with pytest.raises(ConfigError, match="make openvino-env"):
        prepare(cfg, tiny_model_dir)


def test_the_runtime_python_variable_runs_the_worker(ov_export, tiny_model_dir, tmp_path, monkeypatch):
    """The serving images run the worker with a runtime-only environment named by LLMSTACK_OPENVINO_PYTHON."""
    from core.errors import ConfigError
    from serving.backends.openvino import command
    ir, export_dir = ov_export
    cfg = _cfg(tiny_model_dir, export_dir)
    assert command(cfg, ir)[0] == str(OV_PYTHON)
    monkeypatch.setenv("LLMSTACK_OPENVINO_PYTHON", str(tmp_path / "runtime-python"))
    with pytest.raises(ConfigError) as err:
        command(cfg, ir)
    assert "LLMSTACK_OPENVINO_PYTHON" in str(err.value) and "runtime-python" in str(err.value)


def test_llmstack_serve_on_openvino_with_the_openai_client(ov_export, tiny_model_dir, tmp_path):
    from openai import OpenAI
    _, export_dir = ov_export
    proc, base, log = start_server(tiny_model_dir, ["model.backend=openvino", f"openvino.python={OV_PYTHON}",
                                                    f"openvino.export_dir={export_dir}",
                                                    *[f"openvino.{k}={v}" for k, v in EXACT.items()]],
                                   log_path=tmp_path / "serve.log")
    try:
        oai = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        chunks = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=5, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        plain = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, temperature=0)
        metrics = httpx.get(base + "/metrics").text
    finally:
        stopped = stop_server(proc)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens > 0
    assert text == plain.choices[0].message.content  # streamed and plain answers agree
    assert metric_sum(metrics, "llm_model_info", model="tiny", backend="openvino") == 1
    assert metric_sum(metrics, "llm_requests_total", status="success") == 2
    assert stopped, "server did not stop within 30 s of SIGTERM"
    assert not _worker_alive(export_dir)  # the worker went with the service


def _worker_alive(export_dir) -> bool:
    """Whether an OpenVINO worker serving a model from export_dir still runs (not a zombie)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "runtimes/openvino/worker.py" in cmd and str(export_dir) in cmd and state != "Z":
            return True
    return False
