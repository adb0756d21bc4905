"""`llmstack harness`: lm-evaluation-harness (lm-eval) tasks on a model folder or on a served OpenAI endpoint, offline.

Shipped tasks (evaluation/harness/tasks/, YAML + utils.py; data read from data/tickets/test.jsonl or `--data FILE`):
  tickets_triage       generate_until   the triage JSON; exact match, JSON valid, per-field accuracy
  tickets_category_mc  multiple_choice  the ticket's category among 6 (loglikelihood: acc, acc_norm)
  tickets_urgency_mc   multiple_choice  the ticket's urgency among 4 (loglikelihood: acc, acc_norm)

Model folder (`--model`): a HF folder, a training artifact (its merged model), a compress run (its recommended variant)
or one compress variant. PyTorch folders run through lm-eval's `hf` model (HFLM); ONNX variants through the same HFLM
around optimum's ORTModelForCausalLM (our ONNX Runtime path, runtimes.onnx.load_ort). Every task type works.

Endpoint (`--endpoint http://host:port/v1`): lm-eval's `local-chat-completions` model posts one chat request per
document to /v1/chat/completions. The llmstack server implements generation only: it answers `logprobs`, `echo` and
`n > 1` with 400, so loglikelihood (multiple_choice, loglikelihood_rolling) tasks need `--model`; they are refused
before any request is sent.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from core import artifacts
from core.errors import ArtifactError, ConfigError, StackError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GENERATION = "generate_until"


class HarnessError(StackError):
    """A harness run cannot start or failed (bad task, model, endpoint)."""


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


# ---------------------------------------------------------------- what to evaluate
def resolve_model(ref: str, models_dir: str = "models") -> tuple[str, Path]:
    """(kind, folder) for a model reference: kind 'pytorch' (HF folder) or 'onnx' (a folder with *.onnx).

    Accepts a HF folder, a training artifact (its merged/ model), a compress run (its recommended variant), a compress
    variant folder, or a built-in model name (models/<name>)."""
    path = Path(ref)
    if not path.exists():
        from modeling.model import BUILTIN, resolve
        if ref in BUILTIN:
            return "pytorch", Path(resolve(ref, models_dir))
        raise ArtifactError("model not found", file=path,
                            hint="pass a HF model folder, a training or compress artifact, or a built-in model name")
    if not path.is_dir():
        raise ArtifactError("not a model folder (a file was given)", file=path)
    if (path / artifacts.MANIFEST).is_file():
        manifest = artifacts.read_manifest(path)
        stage = manifest.get("stage")
        if stage == "train":
            merged = path / "merged"
            if not (merged / "config.json").is_file():
                raise ArtifactError("this training artifact has no merged model (prompt-learning methods cannot "
                                    "merge)", file=path)
            return "pytorch", merged
        if stage == "compress" and "variant" not in manifest:  # a compress run: its recommended variant
            rec = manifest.get("recommended")
            if not rec or not (path / rec).is_dir():
                variants = sorted(p.name for p in path.iterdir() if (p / artifacts.MANIFEST).is_file())
                raise ArtifactError("this compress run recommends no variant; name one", file=path,
                                    hint=f"e.g. {path / variants[0]}" if variants else None)
            path = path / rec
    if any(path.glob("*.onnx")):
        if not (path / "config.json").is_file():
            raise ArtifactError("an ONNX folder without config.json (export it with `llmstack compress`)", file=path)
        return "onnx", path
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return "pytorch", path
    raise ArtifactError("not a model folder: no config.json with *.safetensors / *.bin weights, and no *.onnx",
                        file=path, hint="pass a HF model folder, a training artifact or a compress variant")


def check_endpoint(url: str, timeout: float = 10) -> tuple[str, str]:
    """(normalised /v1 base URL, served model name); a clear error when nothing answers there."""
    import httpx

    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint must be an http(s) URL, got '{url}'", field="--endpoint",
                          hint="e.g. http://127.0.0.1:3000/v1")
    if not base.endswith("/v1"):
        base += "/v1"
    try:
        r = httpx.get(base + "/models", timeout=timeout)
    except httpx.HTTPError as exc:
        raise HarnessError(f"endpoint {base} does not answer ({type(exc).__name__}: {exc})", field="--endpoint",
                           hint="start it with `llmstack serve --model ...` and check host and port") from None
    if r.status_code != 200:
        raise HarnessError(f"endpoint {base}/models answered HTTP {r.status_code}, not an OpenAI-compatible server",
                           field="--endpoint")
    try:
        return base, r.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise HarnessError(f"endpoint {base}/models lists no model", field="--endpoint") from None


def _quiet_custom_dataset_notice(record) -> bool:
    """lm-eval warns on every task that uses `custom_dataset` (ours all do) about passing --metadata: noise here."""
    return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(data: str | None, extra: list[str] = ()):
    import logging

    from lm_eval.tasks import TaskManager
    task_log = logging.getLogger("lm_eval.api.task")
    if _quiet_custom_dataset_notice not in task_log.filters:
        task_log.addFilter(_quiet_custom_dataset_notice)
    metadata = {"data_file": str(Path(data).resolve())} if data else None
    return TaskManager(include_path=[str(TASKS_DIR), *extra], include_defaults=False, metadata=metadata,
                       verbosity="ERROR")


def select_tasks(names: list[str] | None, endpoint: bool, data: str | None):
    """(task manager, task names, {name: output_type}). Names are shipped tasks or paths to lm-eval task YAMLs /
    folders of them. Unknown names and loglikelihood tasks against an endpoint are refused here."""
    if data is not None and not Path(data).is_file():
        raise ConfigError("task data file not found", file=data, field="--data")
    extra, wanted = [], []
    for n in names or []:
        if n.endswith((".yaml", ".yml")):  # a user's own lm-eval task YAML (its folder is included)
            if not Path(n).is_file():
                raise ConfigError("task YAML not found", file=n, field="--tasks")
            from lm_eval.utils import load_yaml_config
            extra.append(str(Path(n).resolve().parent))
            wanted.append(load_yaml_config(n).get("task", Path(n).stem))
        else:
            wanted.append(n)
    tm = task_manager(data, sorted(set(extra)))
    known = set(tm.all_tasks)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
                          field="--tasks", hint=f"shipped tasks: {', '.join(shipped_tasks())}; or a path to an "
                          "lm-eval task YAML (lm-eval's own tasks need the hub and are not available offline)")
    loaded = tm.load(wanted or shipped_tasks())["tasks"]
    types = {name: t.config.output_type for name, t in loaded.items()}
    if endpoint:
        needs_ll = [n for n, t in types.items() if t != GENERATION]
        gen = [n for n, t in types.items() if t == GENERATION]
        if names and needs_ll:
            raise ConfigError(
                f"{', '.join(needs_ll)}: {', '.join(sorted({types[n] for n in needs_ll}))} tasks score per-token "
                "log-probabilities, which the llmstack server does not return (it answers logprobs/echo with 400)",
                field="--tasks", hint="run them on the model folder with --model; against --endpoint only "
                f"generate_until tasks work ({', '.join(gen) or 'none here'})")
        types = {n: t for n, t in types.items() if t == GENERATION}  # default set: the generation tasks only
    return tm, list(types), types


# ---------------------------------------------------------------- lm-eval model objects
def _hflm(kind: str, folder: Path, batch_size: int):
    import torch
    from lm_eval.models.huggingface import HFLM

    if kind == "pytorch":
        return HFLM(pretrained=str(folder), batch_size=batch_size, device="cpu", dtype="float32")

    from modeling.model import load_tokenizer
    from runtimes.onnx import load_ort

    class ORTLM(HFLM):
        """HFLM around ORTModelForCausalLM: the exported graph needs an attention mask on every forward (HFLM's
        loglikelihood batches are right-padded, so all-ones is exact for the positions it scores)."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            with torch.no_grad():
                mask = attn_mask if attn_mask is not None else torch.ones_like(inps)
                return self.model(input_ids=inps, attention_mask=mask).logits

    model = load_ort(folder, threads=torch.get_num_threads())
    return ORTLM(pretrained=model, tokenizer=load_tokenizer(str(folder)), batch_size=batch_size, device="cpu")


def _endpoint_lm(base: str, model_name: str, timeout: int):
    from lm_eval.models.openai_completions import LocalChatCompletion
    return LocalChatCompletion(base_url=base + "/chat/completions", model=model_name, tokenized_requests=False,
                               tokenizer_backend=None, num_concurrent=1, max_retries=1, timeout=timeout)


# ---------------------------------------------------------------- run
def summarize(results: dict, types: dict) -> dict:
    """lm-eval's results -> {task: {output_type, n, metrics {name: value}, stderr {name: value}}}."""
    out = {}
    for task, res in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in res.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            name = key.split(",")[0]
            if name.endswith("_stderr"):
                stderr[name[:-7]] = value if isinstance(value, (int, float)) else None
            else:
                metrics[name] = round(float(value), 4)
        out[task] = {"output_type": types.get(task), "n": results["n-samples"][task]["effective"],
                     "metrics": metrics, "stderr": {k: round(float(v), 4) for k, v in stderr.items()}}
    return out


def markdown(summary: dict) -> str:
    lines = ["| task | type | n | metric | value | stderr |", "|---|---|---|---|---|---|"]
    for task, r in summary.items():
        for m, v in r["metrics"].items():
            se = r["stderr"].get(m)
            se = "-" if se is None else f"{se:.4f}"
            lines.append(f"| {task} | {r['output_type']} | {r['n']} | {m} | {v:.4f} | {se} |")
    return "\n".join(lines)


def run(model: str | None = None, endpoint: str | None = None, tasks: list[str] | None = None,
        limit: int | None = None, out: str | None = None, data: str | None = None, batch_size: int = 8,
        threads: int = 0, timeout: int = 300) -> dict:
    if (model is None) == (endpoint is None):
        raise ConfigError("give exactly one of --model FOLDER and --endpoint URL", field="--model/--endpoint")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of documents per task, got {limit}", field="--limit")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}", field="--batch-size")
    if model is not None:  # cheap checks first: the model folder, then the tasks (imports lm-eval), then the network
        kind, folder = resolve_model(model)
        target = {"model": str(folder), "kind": kind}
    tm, names, types = select_tasks(tasks, endpoint is not None, data)
    if endpoint is not None:
        base, served = check_endpoint(endpoint)
        target = {"endpoint": base, "served_model": served}

    import lm_eval
    import torch
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(threads or os.cpu_count())
    lm = _hflm(kind, folder, batch_size) if model is not None else _endpoint_lm(base, served, timeout)
    t0 = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=tm,
                                          apply_chat_template=True, log_samples=out is not None,
                                          bootstrap_iters=100, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
    except StackError:
        raise
    except Exception as exc:  # lm-eval wraps HTTP failures in generic errors: name where it happened
        where = target.get("endpoint") or target["model"]
        raise HarnessError(f"lm-eval failed on {where}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    summary = {**target, "lm_eval": lm_eval.__version__, "limit": limit, "data": data or "data/tickets/test.jsonl",
               "seconds": round(time.perf_counter() - t0, 1), "tasks": summarize(results, types)}
    print(markdown(summary["tasks"]))
    if out:
        folder_out = Path(out)
        folder_out.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(folder_out / "results.json", summary)
        (folder_out / "results.md").write_text(markdown(summary["tasks"]) + "\n")
        for task, samples in (results.get("samples") or {}).items():
            with open(folder_out / f"samples_{task}.jsonl", "w") as f:
                for s in samples:
                    scores = {m: s.get(m) for m in s["metrics"]}
                    f.write(json.dumps({"doc_id": s["doc_id"], "target": s["target"], "response": s["filtered_resps"],
                                        "metrics": scores}, default=str) + "\n")
    return summary
