"""Training throughput: our trainer vs a plain TRL SFTTrainer + peft baseline, in one run.

Same base model, same training rows (our data pipeline's output, so both see identical examples), same LoRA config,
same effective batch, steps, LR schedule and seed. Each trainer runs in its own child process so peak RSS is its own.
Reported per trainer: real (non-padding) tokens/s over the timed steps, peak RSS, final training loss and the
validation answer-token loss after training (the same function scores both). Writes JSON and a Markdown table.

    python benchmarks/bench_train.py [--steps 30] [--repeats 1] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(args, attn: str | None = None):
    import torch

    from chatdata import pipeline as data_mod
    from core.config import load
    from modeling.model import load_model, load_tokenizer, resolve
    from training.config import TrainConfig

    torch.set_num_threads(args.threads or os.cpu_count())
    cfg = load(TrainConfig, args.config, [f"train.max_steps={args.steps}", "train.save_steps=100000",
                                          f"method.lora_r={args.lora_r}", f"method.lora_alpha={2 * args.lora_r}",
                                          f"train.batch_size={args.batch_size}", "train.eval_steps=0",
                                          "train.logging_steps=1", "method.lora_layers=0",
                                          "method.target_modules=all-linear"])
    path = resolve(cfg.model.name_or_path, cfg.model.models_dir)
    tok = load_tokenizer(path)
    prepared = data_mod.prepare(cfg.data, tok, cfg.train.seed)
    model = load_model(path, cfg.model.dtype, attn or cfg.model.attn_implementation)
    return cfg, tok, prepared, model


class StepTimer:
    """Times optimizer steps only (no data preparation, no model loading, no evaluation)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            seconds, _t = 0.0, 0.0

            def on_step_begin(self, *a, **k):
                self._t = time.perf_counter()

            def on_step_end(self, *a, **k):
                self.seconds += time.perf_counter() - self._t
        return _T()


def final_loss(log_history: list[dict], last: int = 5) -> float:
    """Mean training loss of the last `last` logged steps (logging_steps=1): one step's loss is too noisy."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    if not losses:
        raise SystemExit("the trainer logged no training loss")
    return round(statistics.mean(losses[-last:]), 4)


def child_ours(args) -> dict:
    from evaluation.quality import loss_and_perplexity
    from training import methods
    from training.sft import recipe as sft

    cfg, tok, prepared, model = _setup(args)
    model = methods.apply(model, cfg.method, args.steps)
    with tempfile.TemporaryDirectory() as work:
        trainer, progress = sft.build_trainer(cfg, model, tok, prepared, Path(work), pack=cfg.train.packing, fast=True)
        trainer.train()
    val = loss_and_perplexity(model, prepared.validation, tok.pad_token_id, cfg.data.max_seq_len, fast=True)
    return {"tokens": trainer.tokens_seen, "step_seconds": progress.step_time,
            "final_train_loss": final_loss(trainer.state.log_history),
            "validation_loss": val["loss"]}


def child_trl(args) -> dict:
    import peft
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from evaluation.quality import loss_and_perplexity

    cfg, tok, prepared, model = _setup(args, attn="sdpa")  # transformers' stock attention: a plain baseline
    rows = [{"prompt": e.prompt_messages(), "completion": [{"role": "assistant", "content": e.reference()}]}
            for e in prepared.train]
    t = cfg.train
    sft_args = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=1,
        learning_rate=t.lr, max_steps=args.steps, warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.scheduler == "cosine_with_min_lr" else {}, logging_steps=t.logging_steps, save_strategy="no",
        report_to=[], use_cpu=True, max_length=cfg.data.max_seq_len, seed=t.seed, data_seed=t.seed,
        dataloader_num_workers=0, disable_tqdm=False,
        # TRL's SFTConfig turns gradient checkpointing on by default; ours does not checkpoint, so neither does the
        # baseline (like for like: per-token compute and memory without recomputation).
        gradient_checkpointing=False,
        # TRL also defaults to bf16 autocast; this CPU has no bf16 units (torch falls back to its reference gemm, ~50x
        # slower) and our trainer runs fp32, so the baseline runs fp32 too.
        bf16=False, fp16=False)
    lora = peft.LoraConfig(r=cfg.method.lora_r, lora_alpha=cfg.method.lora_alpha, lora_dropout=cfg.method.lora_dropout,
                           target_modules=cfg.method.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    val = loss_and_perplexity(trainer.model, prepared.validation, tok.pad_token_id, cfg.data.max_seq_len, fast=True)
    return {"tokens": int(trainer._total_train_tokens), "step_seconds": timer.seconds,
            "final_train_loss": final_loss(trainer.state.log_history), "validation_loss": val["loss"]}


def run_child(role: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--steps", str(args.steps), "--config", args.config,
           "--lora-r", str(args.lora_r), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # stderr (progress) passes through
    if proc.returncode != 0:
        raise SystemExit(f"{role} run failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["tokens_per_s"] = round(result["tokens"] / result["step_seconds"], 1)
    return result


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per trainer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step, both trainers (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, alpha = 2r, all-linear (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per trainer; medians reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--config", default="configs/train.yaml", help="data, model and schedule come from this config")
    p.add_argument("--out", default="benchmarks/results", help="folder for train.json and train.md")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from core.log import setup
        setup()
        result = (child_ours if args.child == "ours" else child_trl)(args)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return
    runs = {"ours": [], "trl": []}
    for i in range(args.repeats):
        for role in ("trl", "ours") if i % 2 == 0 else ("ours", "trl"):
            print(f"[{i + 1}/{args.repeats}] {role} ...", file=sys.stderr, flush=True)
            runs[role].append(run_child(role, args))
            print(f"    {runs[role][-1]}", file=sys.stderr)
    med = {r: {k: statistics.median(x[k] for x in v) for k in v[0]} for r, v in runs.items()}
    ratio = {"tokens_per_s": round(med["ours"]["tokens_per_s"] / med["trl"]["tokens_per_s"], 3),
             "peak_rss": round(med["ours"]["peak_rss_mb"] / med["trl"]["peak_rss_mb"], 3),
             "validation_loss": round(med["ours"]["validation_loss"] / med["trl"]["validation_loss"], 3)}
    import torch
    import transformers
    import trl
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
              "batch_size": args.batch_size, "lora_r": args.lora_r, "repeats": args.repeats,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
              "runs": runs, "median": med, "ratio_ours_over_trl": ratio}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("tokens/s (real tokens, timed steps)", "tokens_per_s", "{:.1f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
            ("final train loss (mean of last 5 steps)", "final_train_loss", "{:.4f}"), ("validation answer loss", "validation_loss", "{:.4f}"),
            ("tokens trained", "tokens", "{:.0f}")]
    md = [f"Machine: {report['machine']}. {args.steps} steps x {args.batch_size} examples, LoRA r={args.lora_r} "
          f"all-linear, median of {args.repeats} run(s) each, {report['date']}.", "",
          "| | ours | TRL SFTTrainer + peft | ours / TRL |", "|---|---|---|---|"]
    for name, key, f in rows:
        o, b = med["ours"][key], med["trl"][key]
        md.append(f"| {name} | {f.format(o)} | {f.format(b)} | {o / b:.2f} |")
    (out / "train.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
