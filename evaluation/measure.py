"""Measure one model variant the same way as every other, in its own process (so peak RAM is its own).

Per variant: size on disk, peak RAM on load, prefill latency for a fixed prompt, decode tokens/s at batch 1 (fixed
threads, one warm-up, median of `runs`), answer-token perplexity on the test rows, the task metric on greedy
generations (the training stage's metric: JSON fields or BLEU/ROUGE), and the generations themselves (the parent
scores agreement with the input model's).

    python -m evaluation.measure SPEC.json OUT.json      (SPEC written by `measure_in_child`)
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from core.artifacts import dir_size
from core.errors import CompressError

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(kind: str, folder: str, threads: int, file_name: str | None = None):
    """The model object for a variant: transformers for `pytorch`, optimum's ORTModelForCausalLM for `onnx`."""
    if kind == "pytorch":
        from modeling.model import load_model
        return load_model(folder, "float32", "sdpa_gqa")
    if kind == "onnx":
        from runtimes.onnx import load_ort
        return load_ort(folder, threads=threads, file_name=file_name)
    raise CompressError(f"unknown variant kind '{kind}' (pytorch or onnx; openvino is measured by its worker)")


def answer_nll(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed answer-token cross-entropy over right-padded batches through the model's own forward (PyTorch or ONNX
    Runtime). Rows go in length order (less padding); the token prefix a batch shares (system prompt, instruction)
    runs once and is handed to the rest of each row as past keys/values, positions continuing after it."""
    import torch
    import torch.nn.functional as F

    from modeling.collate import shared_prefix

    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        p = shared_prefix([r["input_ids"] for r in chunk], [r["labels"] for r in chunk], 8)
        width = max(len(r["input_ids"]) for r in chunk) - p
        ids = torch.tensor([r["input_ids"][p:] + [pad_id] * (width + p - len(r["input_ids"])) for r in chunk])
        mask = torch.tensor([[1] * (len(r["input_ids"])) + [0] * (width + p - len(r["input_ids"])) for r in chunk])
        labels = torch.tensor([r["labels"][p:] + [-100] * (width + p - len(r["labels"])) for r in chunk])
        kwargs = {}
        with torch.no_grad():
            if p:
                kwargs["past_key_values"] = _expanded_past(model, chunk[0]["input_ids"][:p], len(chunk))
                kwargs["position_ids"] = torch.arange(p, p + width).unsqueeze(0).expand(len(chunk), -1)
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        target = labels[:, 1:]
        keep = target != -100
        total += float(F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


def _expanded_past(model, prefix: list[int], n: int):
    """The past keys/values of `prefix` (one forward) repeated for n rows: a DynamicCache for PyTorch models, a
    tuple of (key, value) tuples for ONNX Runtime's."""
    import torch

    ids = torch.tensor([prefix])
    past = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    if hasattr(past, "layers"):  # transformers' DynamicCache
        from transformers import DynamicCache
        cache = DynamicCache()
        for i, layer in enumerate(past.layers):
            cache.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), i)
        return cache
    return tuple(tuple(t.expand(n, -1, -1, -1).contiguous() for t in kv) for kv in past)


def _timings(model, prompt_ids: list[int], decode_tokens: int, runs: int, pad_id: int, batch: int) -> dict:
    """Prefill latency (one forward over the prompt) and decode tokens/s at batch 1: (N-1) / (t(N) - t(1)), where
    t(n) is the time `generate` takes for n new tokens (forced: no early stop); with `batch` > 1 the same for that many
    copies of the prompt at once: batch * (N-1) / (t(N) - t(1)), from at most 2 runs. Medians after one warm-up."""
    import torch

    def gen(n: int, rows: int = 1) -> float:
        ids = torch.tensor([prompt_ids] * rows)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, num_beams=1, pad_token_id=pad_id)
        return time.perf_counter() - t0

    def prefill() -> float:
        ids = torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return time.perf_counter() - t0

    def rate(rows: int, n: int = runs) -> tuple[float, list[float], float]:
        one = [gen(1, rows) for _ in range(n)]
        full = [gen(decode_tokens, rows) for _ in range(n)]
        t1, tn = statistics.median(one), statistics.median(full)
        return (rows * (decode_tokens - 1) / max(tn - t1, 1e-9),
                [rows * (decode_tokens - 1) / max(t - t1, 1e-9) for t in full], tn)

    gen(8)  # warm-up (allocations, ORT's first-run graph work)
    pre = [prefill() for _ in range(runs)]
    median, per_run, tn = rate(1)
    out = {"prefill_ms": round(1000 * statistics.median(pre), 1), "prompt_tokens": len(prompt_ids),
           "decode_tokens_per_s": round(median, 1),
           "decode_spread": (round((max(per_run) - min(per_run)) / 2 / median, 3)  # half the range, relative
                             if runs > 1 else None),
           "generate_seconds": round(tn, 3), "runs": runs}
    if batch > 1:
        gen(8, batch)
        out.update(batch=batch, batch_decode_tokens_per_s=round(rate(batch, min(runs, 2))[0], 1))  # 2 runs: a ranking
    return out


def measure(spec: dict) -> dict:
    """Run every measurement of one variant described by `spec` (see `measure_in_child`)."""
    from chatdata.pipeline import Example
    from evaluation.quality import generate
    from modeling.model import load_tokenizer

    if spec["kind"] == "openvino":  # measured through its worker; decoded and scored here like the others
        from .measure_openvino import measure_openvino
        out = measure_openvino(spec)
        if "generated_ids" in out:
            tok = load_tokenizer(spec["folder"])
            preds = [tok.decode(ids, skip_special_tokens=True).strip() for ids in out.pop("generated_ids")]
            out.update(_task(spec, preds))
        return out
    import torch

    threads = spec["threads"] or os.cpu_count()
    torch.set_num_threads(threads)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    model = load(spec["kind"], spec["folder"], threads, spec.get("file_name"))
    out = {"load_seconds": round(time.perf_counter() - t0, 2), "load_peak_rss_mb": round(_peak_mb(), 1),
           "load_rss_delta_mb": round(_rss_mb() - rss0, 1)}
    tok = load_tokenizer(spec["folder"])
    rows = spec["rows"]
    t1 = time.perf_counter()
    out.update(_timings(model, rows[0]["prompt_ids"], spec["decode_tokens"], spec["runs"], tok.pad_token_id,
                        spec.get("batch", 0)))
    out["seconds"] = {"load": out["load_seconds"], "speed": round(time.perf_counter() - t1, 1)}
    if not spec.get("quality", True):  # the caller already has loss, task score and predictions for this model
        out["peak_rss_mb"] = round(_peak_mb(), 1)
        return out
    t2 = time.perf_counter()

    nll, n = answer_nll(model, rows, tok.pad_token_id, spec["batch_size"])
    mean = nll / max(n, 1)
    out.update({"loss": round(mean, 4), "perplexity": round(math.exp(min(mean, 50)), 3), "answer_tokens": n})
    out["seconds"]["perplexity"] = round(time.perf_counter() - t2, 1)
    t3 = time.perf_counter()
    examples = [Example(source=r["source"], messages=r["messages"]) for r in rows]
    preds = generate(model, tok, [e.prompt_messages() for e in examples], spec["max_new_tokens"], spec["batch_size"],
                     desc=f"generate {spec['name']}", share_prefix=spec["kind"] == "pytorch")
    out.update(_task(spec, preds))
    out["peak_rss_mb"] = round(_peak_mb(), 1)
    out["seconds"]["generation"] = round(time.perf_counter() - t3, 1)
    return out


def _task(spec: dict, preds: list[str]) -> dict:
    """The task metric of the greedy generations `preds` of spec's rows (the training stage's metric), with them."""
    from chatdata.pipeline import Example
    from evaluation.metrics import json_metrics, text_metrics

    refs = [Example(source=r["source"], messages=r["messages"]).reference() for r in spec["rows"]]
    fields = spec["json_fields"]
    return {"task": json_metrics(preds, refs, fields) if fields else text_metrics(preds, refs), "predictions": preds}


def spec_rows(examples, n: int, tokenizer) -> list[dict]:
    """The test rows a child needs: tokens for the loss, messages for generation, the prompt tokens for timing."""
    from chatdata.pipeline import render

    rows = []
    for e in (examples[:n] if n else examples):
        if e.messages is None:
            continue
        prompt = tokenizer(render(tokenizer, e.prompt_messages(), generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        rows.append({"source": e.source, "messages": e.messages, "input_ids": list(e.input_ids),
                     "labels": list(e.labels), "prompt_ids": prompt})
    if not rows:
        raise CompressError("no chat/instruction rows in the test data to measure the task on", field="data.test")
    return rows


def measure_in_child(name: str, kind: str, folder: Path, rows: list[dict], eval_cfg, measure_cfg, work: Path,
                     file_name: str | None = None, quality: bool = True, openvino: dict | None = None) -> dict:
    """Measure a variant in a fresh Python process; return its measurements plus the size on disk. quality=False:
    speed and memory only (no perplexity, no generation). kind: pytorch, onnx, or openvino (measured through the
    OpenVINO worker: `openvino` holds its python and inference_precision)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "kind": kind, "folder": str(folder), "file_name": file_name, "rows": rows,
            "threads": measure_cfg.threads, "decode_tokens": measure_cfg.decode_tokens, "runs": measure_cfg.runs,
            "batch": measure_cfg.batch,
            "max_new_tokens": eval_cfg.max_new_tokens, "batch_size": eval_cfg.batch_size,
            "json_fields": list(eval_cfg.json_fields), "quality": quality,
            "openvino_python": (openvino or {}).get("python"),
            "openvino_precision": (openvino or {}).get("inference_precision", "auto")}
    spec_file, out_file = work / f"{name}.spec.json", work / f"{name}.measured.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "evaluation.measure", str(spec_file), str(out_file)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise CompressError(f"measuring variant '{name}' failed (exit {proc.returncode}):\n{tail}", file=folder)
    result = json.loads(out_file.read_text())
    result["size_mb"] = round(dir_size(folder) / 2**20, 1)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core.log import setup
    setup()
    spec = json.loads(Path(argv[0]).read_text())
    result = measure(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
