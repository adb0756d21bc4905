"""What a training artifact shows people: the loss curve, the token-length histogram and the model card."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(log_history: list[dict], path: Path) -> None:
    plt = _plt()
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    key = lambda h: "eval_loss" if "eval_loss" in h else "eval_validation_loss"  # noqa: E731 (a curriculum's)
    val = [(h["step"], h[key(h)]) for h in log_history if key(h) in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)", marker=".")
    if val:
        ax.plot(*zip(*val), label="validation loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def length_histogram(lengths: dict[str, list[int]], max_len: int, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=40, alpha=0.5, label=f"{name} (n={len(values)})")
    ax.axvline(max_len, color="red", linestyle="--", label=f"max_seq_len={max_len}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curriculum(manifest: dict) -> str:
    cur = manifest.get("curriculum")
    if not cur:
        return ""
    return f"""## Curriculum

{len(cur['stages'])} stages under one learning-rate schedule; after each, the domain validation set and the general
held-out set (forgetting) were evaluated. Plot: `curriculum.png`.

{cur['table']}

"""


def model_card(manifest: dict, table_md: str) -> str:
    cfg = manifest["config"]
    files = "\n".join(f"- `{k}/`: {v}" for k, v in manifest["outputs"].items())
    data = "\n".join(f"- `{d['path']}` ({d['split']}, sha256 {d['sha256'][:12]}…, {d['rows_out']} rows used)"
                     for d in manifest["datasets"])
    t = manifest["training"]
    return f"""# Fine-tuned model `{manifest['run_id']}`

Base model: `{manifest['base_model']['name']}` · method: **{cfg['method']['name']}** · trainable parameters:
{t['parameters']['trainable']:,} of {t['parameters']['total']:,} ({t['parameters']['trainable_pct']}%).

## Evaluation (held-out test split)

{table_md}

## Training

{t['steps']} optimizer steps, {t['tokens']:,} tokens at {t['tokens_per_s']} tokens/s, final train loss
{t['final_train_loss']}, peak RSS {t['peak_rss_mb']} MB. Loss curve: `loss_curve.png`.

{_curriculum(manifest)}## Data

{data}

Data report: `data_report.md` (every dropped row with its reason).

## Files

{files}

Resolved config: `config.yaml`. Lineage and measurements: `manifest.json`.
"""
