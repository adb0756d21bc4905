"""Training throughput: our trainer vs TRL's SFTTrainer + peft at its best, every configuration in one run.

TRL runs as it comes (`padded`: each batch padded to its longest row), with `packing=True` (best-fit-decreasing bins
of max_length tokens, which TRL trains padding-free), with `padding_free=True` (a batch's rows flattened into one
sequence) and, where Liger is usable (a CUDA GPU and the liger_kernel package), with `use_liger_kernel=True` on top
of the fastest of those. Same base model, same training rows (our data pipeline's output, so all see identical
examples), LoRA r=8 all-linear, same steps, LR schedule and seed. TRL's packing puts whole bins in a batch, so its
batch size is the number of bins that hold about `--batch-size` examples' tokens (the tokens per step stay alike).

Each trainer runs in its own child process, so peak RSS is its own. Reported per configuration: real (non-padding)
tokens/s over the timed optimizer steps, peak RSS (and peak GPU memory on CUDA), final training loss and the
validation answer-token loss after training (the same function scores all). Padding-free and packed runs are checked
for isolation (a flattened batch's logits against each sequence run alone); a configuration whose sequences see each
other is reported as incorrect, without a speed. The headline ratio is ours against the fastest correct TRL
configuration. Writes JSON and a Markdown table.

    python benchmarks/bench_train.py [--steps 20] [--repeats 1] [--precision auto] [--out benchmarks/results]
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
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# TRL configurations: name -> (SFTConfig overrides, label in the table)
TRL_CONFIGS = {
    "trl-padded": ({}, "TRL as it comes (padded batches)"),
    "trl-packing": ({"packing": True}, "TRL `packing=True` (BFD bins, padding-free)"),
    "trl-padding-free": ({"padding_free": True}, "TRL `padding_free=True`"),
    "trl-liger": ({"use_liger_kernel": True}, "TRL `use_liger_kernel=True` (on the fastest of the above)"),
}
# Largest logit difference between a flattened batch and its sequences run alone that still counts as isolated
# (fp32 reorderings give ~1e-5; a sequence attending to its neighbour moves logits by ~0.1 and more).
ISOLATION_TOL = 1e-3
TARGET = {"tokens_per_s": 1.5, "peak_rss": 1.0, "validation_loss_tolerance": 0.02}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def _setup(args, attn: str | None = None, extra: list[str] = ()):
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
                                          "method.target_modules=all-linear", *extra])
    path = resolve(cfg.model.name_or_path, cfg.model.models_dir)
    tok = load_tokenizer(path)
    prepared = data_mod.prepare(cfg.data, tok, cfg.train.seed)
    model = load_model(path, cfg.model.dtype, attn or cfg.model.attn_implementation)
    return cfg, tok, prepared, model


def precision(requested: str) -> str:
    """bf16 autocast where the GPU has it (auto), else fp32: our CPU recipe trains fp32 (many of these CPUs have no
    bf16 units, where torch falls back to a reference gemm ~50x slower), so a CPU run is fp32 for every trainer."""
    if requested != "auto":
        return requested
    import torch
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


class StepTimer:
    """Times optimizer steps only (no data preparation, no model loading, no evaluation)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            seconds, _t = 0.0, 0.0

            def on_step_begin(self, *a, **k):
                _sync()
                self._t = time.perf_counter()

            def on_step_end(self, *a, **k):
                _sync()
                self.seconds += time.perf_counter() - self._t
        return _T()


def _sync() -> None:
    """GPU kernels run asynchronously: a step's time ends when its kernels have."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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

    prec = precision(args.precision)
    cfg, tok, prepared, model = _setup(args, extra=["train.mixed_precision=bf16"] if prec == "bf16" else [])
    model = methods.apply(model, cfg.method, args.steps)
    with tempfile.TemporaryDirectory() as work:
        trainer, progress = sft.build_trainer(cfg, model, tok, prepared, Path(work), pack=cfg.train.packing, fast=True)
        trainer.train()
    val = loss_and_perplexity(model, prepared.validation, tok.pad_token_id, cfg.data.max_seq_len, fast=True)
    return {"tokens": trainer.tokens_seen, "step_seconds": progress.step_time, "examples_per_step": args.batch_size,
            "precision": prec, "final_train_loss": final_loss(trainer.state.log_history),
            "validation_loss": val["loss"]}


def packed_batch_size(lengths: list[int], batch_size: int, max_length: int) -> int:
    """Bins of max_length tokens per step that hold about `batch_size` examples' tokens (BFD fills bins almost
    completely), so a packed step trains on as many tokens as a padded one."""
    mean = sum(lengths) / len(lengths)
    return max(1, round(batch_size * mean / max_length))


def isolation_error(model, collator, features: list[dict]) -> float:
    """Largest logit difference between a flattened (padding-free) batch and each of its sequences run alone: ~0
    when the attention keeps packed sequences apart, large when they see each other."""
    import torch

    batch = collator(features)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    model.eval()
    worst = 0.0
    with torch.no_grad():
        # use_cache=False as TRL's compute_loss passes it: with a cache transformers builds a plain causal mask and
        # ignores the sequence boundaries in position_ids
        flat = model(**inputs, use_cache=False).logits[0].float()
        starts = batch["cu_seq_lens_q"].tolist()
        if len(starts) < 3:
            raise SystemExit("isolation check: the batch holds one sequence, nothing to keep apart")
        for a, b in zip(starts[:-1], starts[1:]):
            alone = model(input_ids=inputs["input_ids"][:, a:b], use_cache=False).logits[0].float()
            worst = max(worst, float((flat[a:b] - alone).abs().max()))
    return worst


def child_trl(args) -> dict:
    import peft
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from evaluation.quality import loss_and_perplexity

    overrides = dict(TRL_CONFIGS[args.child_config][0])
    for name in args.on_top or []:
        overrides.update(TRL_CONFIGS[name][0])
    prec = precision(args.precision)
    cfg, tok, prepared, model = _setup(args, attn="sdpa")  # transformers' stock attention
    rows = [{"prompt": e.prompt_messages(), "completion": [{"role": "assistant", "content": e.reference()}]}
            for e in prepared.train]
    t = cfg.train
    batch_size, max_length = t.batch_size, cfg.data.max_seq_len
    if overrides.get("packing"):
        batch_size = packed_batch_size([len(e.input_ids) for e in prepared.train], t.batch_size, max_length)
    elif overrides.get("padding_free"):
        # TRL refuses padding_free without packing when max_length is set (it could not truncate a flattened row);
        # every row is already cut to data.max_seq_len by our pipeline, so nothing needs truncating
        max_length = None
    sft_args = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        learning_rate=t.lr, max_steps=args.steps, warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.scheduler == "cosine_with_min_lr" else {},
        logging_steps=t.logging_steps, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        max_length=max_length, seed=t.seed, data_seed=t.seed, dataloader_num_workers=0, disable_tqdm=False,
        # TRL's SFTConfig turns gradient checkpointing on by default; ours does not checkpoint, so neither does the
        # baseline (like for like: per-token compute and memory without recomputation).
        gradient_checkpointing=False,
        # TRL defaults to bf16 autocast; every trainer here runs the same precision (fp32 on CPU, see precision()).
        bf16=prec == "bf16", fp16=False, **overrides)
    lora = peft.LoraConfig(r=cfg.method.lora_r, lora_alpha=cfg.method.lora_alpha, lora_dropout=cfg.method.lora_dropout,
                           target_modules=cfg.method.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    val = loss_and_perplexity(trainer.model, prepared.validation, tok.pad_token_id, cfg.data.max_seq_len, fast=True)
    result = {"tokens": int(trainer._total_train_tokens), "step_seconds": timer.seconds,
              "examples_per_step": round(batch_size * len(rows) / len(trainer.train_dataset), 2), "precision": prec,
              "per_device_batch": batch_size, "final_train_loss": final_loss(trainer.state.log_history),
              "validation_loss": val["loss"]}
    if trainer.padding_free:
        if overrides.get("packing"):  # one bin holds several sequences (the first bins hold the longest, alone)
            data = trainer.train_dataset
            features = [next(data[i] for i in range(len(data)) if len(data[i]["seq_lengths"]) > 1)]
        else:
            features = [trainer.train_dataset[i] for i in range(min(4, len(trainer.train_dataset)))]
        result["isolation_max_logit_diff"] = isolation_error(trainer.model, trainer.data_collator, features)
    return result


def liger_unusable() -> str | None:
    """Why TRL's Liger kernels cannot run here, or None when they can (Triton kernels: CUDA only)."""
    import torch
    if not torch.cuda.is_available():
        return "skipped: Liger's kernels are Triton GPU kernels and this machine has no CUDA GPU"
    if find_spec("liger_kernel") is None:
        return "skipped: the liger-kernel package is not installed (it is in the gpu extra: pip install '.[gpu]')"
    return None


def run_child(role: str, args, config: str | None = None, on_top: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--steps", str(args.steps), "--config", args.config,
           "--lora-r", str(args.lora_r), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--precision", args.precision]
    if config:
        cmd += ["--child-config", config, *(["--on-top", *on_top] if on_top else [])]
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # stderr (progress) passes through
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/bench_train.py: the {config or role} run failed (exit {proc.returncode}); "
                         "its traceback is above")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["tokens_per_s"] = round(result["tokens"] / result["step_seconds"], 1)
    return result


def machine_info() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.processor())
    flags = sorted({f for ln in info.splitlines() if ln.startswith("flags") for f in ln.split() if f in CPU_FLAGS})
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem), "cpu_flags": flags,
           "os": f"{platform.system()} {platform.machine()}"}
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return out


def describe(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, CPU flags "
            f"{' '.join(m['cpu_flags']) or 'none of ' + ' '.join(CPU_FLAGS)}{gpu}")


def machine() -> str:
    """The machine in one line (CPU, cores, memory, CPU flags, GPU): the other benchmarks' reports quote it."""
    return describe(machine_info())


def correct(result: dict) -> bool:
    return result.get("isolation_max_logit_diff", 0.0) <= ISOLATION_TOL


def verdict(ratio: dict) -> dict:
    met = {"tokens_per_s": ratio["tokens_per_s"] >= TARGET["tokens_per_s"],
           "peak_rss": ratio["peak_rss"] <= TARGET["peak_rss"],
           "validation_loss": abs(ratio["validation_loss"] - 1) <= TARGET["validation_loss_tolerance"]}
    return {**met, "all": all(met.values())}


ROWS = [("tokens/s (real tokens, timed steps)", "tokens_per_s", "{:.1f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak GPU memory (MB)", "peak_gpu_mb", "{:.0f}"),
        ("final train loss (mean of last 5 steps)", "final_train_loss", "{:.4f}"),
        ("validation answer loss", "validation_loss", "{:.4f}"), ("tokens trained", "tokens", "{:.0f}"),
        ("examples per step", "examples_per_step", "{:.1f}"),
        ("isolation: max logit diff, flattened vs alone", "isolation_max_logit_diff", "{:.1e}")]


def markdown(report: dict) -> str:
    med, names, fastest = report["median"], report["configs"], report["fastest_trl"]
    cols = ["ours"] + [n for n in names if n != "ours"]
    ratio, met = report["ratio_ours_over_fastest_trl"], report["target_met"]
    md = [f"Machine: {describe(report['machine'])}. {report['steps']} steps x {report['batch_size']} examples, LoRA "
          f"r={report['lora_r']} all-linear, {report['precision']}, median of {report['repeats']} run(s) each, "
          f"{report['date']}.", "",
          "| | " + " | ".join(TRL_CONFIGS[c][1] if c in TRL_CONFIGS else c for c in cols) + " |",
          "|---" * (len(cols) + 1) + "|"]
    for label, key, f in ROWS:
        if not any(key in med.get(c, {}) for c in cols):
            continue
        cells = []
        for c in cols:
            if c in report["skipped"]:
                cells.append(report["skipped"][c] if key == "tokens_per_s" else "")
            elif key == "tokens_per_s" and not correct(med[c]):
                cells.append("incorrect: packed sequences attend to each other")
            else:
                cells.append(f.format(med[c][key]) if key in med[c] else "")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    if fastest:
        yes = {True: "met", False: "not met"}
        md += ["", f"Fastest TRL configuration: {TRL_CONFIGS[fastest][1]}. Ours / it: **{ratio['tokens_per_s']:.2f}x "
                   f"tokens/s** (target >= {TARGET['tokens_per_s']}x: {yes[met['tokens_per_s']]}), "
                   f"{ratio['peak_rss']:.2f}x peak RSS (target <= 1: {yes[met['peak_rss']]}), "
                   f"{ratio['validation_loss']:.3f}x validation loss (target within +-2%: "
                   f"{yes[met['validation_loss']]}). Target {yes[met['all']]}."]
    return "\n".join(md) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per trainer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step, every trainer (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, alpha = 2r, all-linear (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per configuration; medians reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast for every trainer; auto: bf16 on a CUDA GPU that has it, else fp32")
    p.add_argument("--trl", default="trl-padded,trl-packing,trl-padding-free,trl-liger",
                   help="TRL configurations to run, comma-separated (default: all)")
    p.add_argument("--config", default="configs/train.yaml", help="data, model and schedule come from this config")
    p.add_argument("--out", default="benchmarks/results", help="folder for <name>.json and <name>.md")
    p.add_argument("--name", default="train", help="result file stem (default: %(default)s)")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--child-config", choices=list(TRL_CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--on-top", nargs="*", choices=list(TRL_CONFIGS), help=argparse.SUPPRESS)
    return p.parse_args()


def child_main(args) -> None:
    """One trainer in this process: its measurements as one JSON line on stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from core.log import setup
    setup()
    result = (child_ours if args.child == "ours" else child_trl)(args)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    import torch
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))


def median_of(runs: list[dict]) -> dict:
    """Per key, the median over repeated runs (text fields: the first run's)."""
    return {k: runs[0][k] if isinstance(runs[0][k], str) else statistics.median(x[k] for x in runs) for k in runs[0]}


def fastest_of(med: dict, names) -> str | None:
    """The configuration with the most tokens/s among those whose sequences stayed isolated."""
    ok = [c for c in names if c in med and correct(med[c])]
    return max(ok, key=lambda c: med[c]["tokens_per_s"]) if ok else None


def run_all(args, wanted: list[str], skipped: dict) -> tuple[dict, dict, list[str]]:
    """Ours and the TRL configurations, alternating over the repeats; Liger then on top of the fastest TRL one.
    Returns (runs, medians, what Liger ran on top of)."""
    base = [c for c in wanted if c != "trl-liger"]
    runs: dict[str, list[dict]] = {c: [] for c in ["ours", *base]}
    for i in range(args.repeats):
        for c in (["ours", *base] if i % 2 else [*base, "ours"]):
            print(f"[{i + 1}/{args.repeats}] {c} ...", file=sys.stderr, flush=True)
            runs[c].append(run_child("ours", args) if c == "ours" else run_child("trl", args, c))
            print(f"    {runs[c][-1]}", file=sys.stderr)
    med = {c: median_of(v) for c, v in runs.items()}
    on_top: list[str] = []
    if "trl-liger" in wanted and "trl-liger" not in skipped:
        on_top = [c for c in [fastest_of(med, base)] if c and c != "trl-padded"]
        runs["trl-liger"] = []
        for i in range(args.repeats):
            print(f"[{i + 1}/{args.repeats}] trl-liger on {on_top or 'trl-padded'} ...", file=sys.stderr, flush=True)
            runs["trl-liger"].append(run_child("trl", args, "trl-liger", on_top))
        med["trl-liger"] = median_of(runs["trl-liger"])
    return runs, med, on_top


def headline(med: dict) -> tuple[str | None, dict, dict]:
    """(the fastest TRL configuration, ours / it for tokens/s, peak RSS and validation loss, the target verdict)."""
    fastest = fastest_of(med, [c for c in med if c != "ours"])
    if not fastest:
        return None, {}, {}
    o, b = med["ours"], med[fastest]
    ratio = {"tokens_per_s": round(o["tokens_per_s"] / b["tokens_per_s"], 3),
             "peak_rss": round(o["peak_rss_mb"] / b["peak_rss_mb"], 3),
             "validation_loss": round(o["validation_loss"] / b["validation_loss"], 3)}
    return fastest, ratio, verdict(ratio)


def main() -> None:
    args = parse_args()
    if args.child:
        return child_main(args)
    wanted = [c.strip() for c in args.trl.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in TRL_CONFIGS]
    if unknown:
        raise SystemExit(f"--trl: unknown configuration(s) {', '.join(unknown)} (known: {', '.join(TRL_CONFIGS)})")
    skipped = {}
    if "trl-liger" in wanted and (why := liger_unusable()):
        skipped["trl-liger"] = why
    runs, med, on_top = run_all(args, wanted, skipped)
    fastest, ratio, met = headline(med)
    import torch
    import transformers
    import trl
    report = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
              "batch_size": args.batch_size, "lora_r": args.lora_r, "repeats": args.repeats,
              "precision": med["ours"]["precision"], "configs": list(med) + list(skipped),
              "liger_on_top_of": on_top or None, "isolation_tolerance": ISOLATION_TOL,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
              "runs": runs, "median": med, "skipped": skipped, "fastest_trl": fastest,
              "ratio_ours_over_fastest_trl": ratio, "target": TARGET, "target_met": met}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
