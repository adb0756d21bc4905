"""Shared fixtures: the real tokenizer, a tiny random-weight model that uses it, small datasets and tiny configs.

Everything runs offline and single-threaded (the test machine has 2 cores and is shared).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Before torch / transformers / datasets are imported anywhere: no network, one thread.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["LLMSTACK_TRACKING"] = "off"  # MLflow tracking: on only in the tests that check it (tests/test_tracking.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = ROOT / "models" / "smollm2-135m-instruct"
TICKETS = ROOT / "data" / "tickets"
PY = sys.executable

# The tiny model: the real tokenizer's vocabulary, everything else minimal.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=1024)


def have_base_model() -> bool:
    return (BASE_MODEL / "tokenizer.json").is_file() and (BASE_MODEL / "config.json").is_file()


def need_base_model():
    if not have_base_model():
        pytest.skip(f"the base model folder {BASE_MODEL} is not provisioned (run `make setup`)")


# ---------------------------------------------------------------- data helpers
def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def ticket_rows(n: int, split: str = "train", start: int = 0) -> list[dict]:
    """The first rows of a demo split (alpaca rows: instruction / input / output with a JSON answer)."""
    rows = read_jsonl(TICKETS / f"{split}.jsonl")[start:start + n]
    assert len(rows) == n, f"data/tickets/{split}.jsonl has fewer than {start + n} rows"
    return rows


def write_jsonl(path: str | Path, rows) -> Path:
    """Rows are dicts (written as JSON) or strings (written verbatim: for malformed lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def count_rows(path: str | Path) -> int:
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def write_yaml(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: str | Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llmstack ARGS` in a subprocess, offline, single-threaded."""
    return subprocess.run([PY, "-m", "llmstack", *map(str, args)], cwd=str(cwd), env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_until_killed(args: list, cwd: Path, ready, log_path: Path, timeout: float = 300) -> int:
    """Start `python -m llmstack ARGS` (output to log_path), SIGKILL it as soon as `ready()` is true, and return its
    exit code (-SIGKILL when it was killed; its own code when it ended first or nothing got ready in time)."""
    import os
    import signal
    import time

    with open(log_path, "w") as out:
        proc = subprocess.Popen([PY, "-m", "llmstack", *map(str, args)], cwd=cwd, env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None and not ready():
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    return proc.returncode


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (chat template included) from the provisioned base model."""
    need_base_model()
    from modeling.model import load_tokenizer

    return load_tokenizer(str(BASE_MODEL))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A random-weight 2-layer LlamaForCausalLM with the real tokenizer's vocabulary, saved as a HF folder together
    with the real tokenizer, so it can stand in for `model.name_or_path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported to ONNX with KV cache (optimum), as a compress variant holds it."""
    from compression.export import export_onnx
    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("tiny-onnx") / "onnx")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Small ticket datasets (real rows from data/tickets): 8 train, 4 validation, 4 test."""
    folder = tmp_path_factory.mktemp("tiny-data")
    return {"train": write_jsonl(folder / "train.jsonl", ticket_rows(8, "train")),
            "validation": write_jsonl(folder / "validation.jsonl", ticket_rows(4, "validation")),
            "test": write_jsonl(folder / "test.jsonl", ticket_rows(4, "test"))}


def tiny_config_dict(model_dir: Path, data: dict[str, Path], out_dir: str | Path) -> dict:
    """A config for a seconds-long run on the tiny model."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(data["train"])}], "validation": [{"path": str(data["validation"])}],
                 "test": [{"path": str(data["test"])}], "max_seq_len": 384},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "adalora_init_r": 6, "num_virtual_tokens": 4,
                   "freeze_trainable_layers": 1},
        "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 3, "warmup_ratio": 0.0, "save_steps": 2,
                  "logging_steps": 1, "threads": 1, "seed": 42},
        "eval": {"before": False, "after": True, "max_samples": 2, "max_new_tokens": 8, "batch_size": 4,
                 "json_fields": ["category", "product", "urgency"]},
        "output": {"dir": str(out_dir)},
    }


@pytest.fixture
def tiny_yaml(tmp_path, tiny_model_dir, tiny_data):
    """Factory: write a tiny-run YAML config (with nested updates) under tmp_path and return its path."""

    def make(name: str = "tiny.yaml", out_dir: str | Path | None = None, **updates) -> Path:
        data = tiny_config_dict(tiny_model_dir, tiny_data, out_dir if out_dir is not None else tmp_path / "out")
        return write_yaml(tmp_path / name, deep_update(data, updates))

    return make


@pytest.fixture
def tiny_config(tiny_yaml):
    """Factory: a validated TrainConfig for a tiny run, loaded the way the CLI loads it (YAML + overrides)."""
    from core.config import load
    from training.config import TrainConfig

    def make(overrides: list[str] = (), name: str = "tiny.yaml", out_dir=None, **updates):
        return load(TrainConfig, tiny_yaml(name, out_dir=out_dir, **updates), list(overrides))

    return make
