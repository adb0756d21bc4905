"""The compress run's report: the per-variant table (report.md / report.json), the bar chart (report.png) and the
frontier plot of the pruned variants (frontier.png: task score against decode speed and size)."""
from __future__ import annotations

from pathlib import Path


def task_score(measured: dict, json_fields: list[str]) -> float:
    """The gated task metric: exact match of the scored JSON fields, else ROUGE-L."""
    return measured["task"]["exact_match" if json_fields else "rougeL"]


def agreement(preds: list[str], ref_preds: list[str]) -> float:
    """Fraction of greedy generations identical to the input model's."""
    return round(sum(a == b for a, b in zip(preds, ref_preds)) / max(len(ref_preds), 1), 4)


REPORT_COLUMNS = [("size (MB)", "size_mb", "{:.0f}"), ("x smaller", "x_smaller", "{:.2f}"),
                  ("params (M)", "params_m", "{:.1f}"), ("load peak RSS (MB)", "load_peak_rss_mb", "{:.0f}"),
                  ("prefill (ms)", "prefill_ms", "{:.0f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
                  ("spread", "decode_spread", "±{:.0%}"), ("batched tok/s", "batch_decode_tokens_per_s", "{:.1f}"),
                  ("x decode", "x_decode", "{:.2f}"), ("perplexity", "perplexity", "{:.3f}"),
                  ("task", "task_score", "{:.3f}"), ("agreement", "agreement", "{:.2f}")]


def markdown(rows: list[dict], recommended: str | None, metric: str) -> str:
    head = "| variant | " + " | ".join(c[0] for c in REPORT_COLUMNS) + " | gate |"
    lines = [head, "|" + "---|" * (len(REPORT_COLUMNS) + 2)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | " + " | ".join("-" for _ in REPORT_COLUMNS) + f" | skipped: {r['skipped']} |")
            continue
        cells = [f.format(r[k]) if r.get(k) is not None else "-" for _, k, f in REPORT_COLUMNS]
        verdict = "input model" if r["name"] == "reference" else ("fit" if r["fit"] else f"UNFIT (drop {r['drop']:+.3f})")
        name = f"**{r['name']}**" if r["name"] == recommended else r["name"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    lines.append("")
    lines.append(f"task = {metric} on the test rows; agreement = greedy outputs identical to the input model's; "
                 f"batched = decode tokens/s of `measure.batch` identical requests at once; "
                 f"x = ratio to the input model (PyTorch fp32). Recommended: {recommended or 'none (no variant fit)'}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, metric: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    names = [r["name"] for r in rows]
    colors = ["#777777" if r["name"] == "reference" else ("#2a9d8f" if r["fit"] else "#e76f51") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(axes, [("size_mb", "size on disk (MB)"), ("decode_tokens_per_s", "decode tokens/s, batch 1"),
                                       ("task_score", f"task: {metric}")]):
        ax.bar(names, [r[key] or 0 for r in rows], color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for i, r in enumerate(rows):
            value = r[key] or 0
            ax.annotate(f"{value:.2f}" if key == "task_score" else f"{value:.0f}", (i, value), ha="center",
                        va="bottom", fontsize=8)
    fig.suptitle("compression variants (grey: input model, green: fit, red: unfit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def summary(m: dict, ref: dict, json_fields: list[str]) -> dict:
    """The report row of a measured variant (ratios against the input model `ref`)."""
    return {"size_mb": m["size_mb"], "x_smaller": round(ref["size_mb"] / m["size_mb"], 2),
            "params_m": m.get("params_m"), "load_peak_rss_mb": m["load_peak_rss_mb"], "prefill_ms": m["prefill_ms"],
            "decode_tokens_per_s": m["decode_tokens_per_s"], "decode_spread": m.get("decode_spread"),
            "batch_decode_tokens_per_s": m.get("batch_decode_tokens_per_s"),
            "x_decode": (round(m["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 2)
                         if ref.get("decode_tokens_per_s") else None),  # the fast path does not time the input
            "perplexity": m["perplexity"], "task_score": task_score(m, json_fields),
            "agreement": agreement(m["predictions"], ref["predictions"]) if "predictions" in m else None}


def frontier_plot(rows: list[dict], path: Path, metric: str, floor: float) -> None:
    """Task score against decode tokens/s and against size, every measured variant a labelled point (pruned ones in
    their own colour), with the quality gate's floor as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "decode_tokens_per_s", "decode tokens/s, batch 1 (higher is better)"),
                           (axes[1], "size_mb", "size on disk, MB (lower is better)")):
        xs = [r[key] for r in rows]
        span = (max(xs) - min(xs)) or 1.0
        placed: list[tuple[float, float]] = []
        for r in rows:
            pruned = (r.get("params_m") or 0) < (rows[0].get("params_m") or 0) - 0.01
            color = "#777777" if r["name"] == "reference" else ("#264653" if pruned else "#2a9d8f")
            ax.scatter(r[key], r["task_score"], s=60, color=color, edgecolor="black" if r.get("fit") else "none",
                       zorder=3)
            near = sum(abs(x - r[key]) < 0.06 * span and abs(y - r["task_score"]) < 0.02 for x, y in placed)
            placed.append((r[key], r["task_score"]))  # labels of points on top of each other go one under another
            ax.annotate(r["name"], (r[key], r["task_score"]), textcoords="offset points", xytext=(5, 5 - 11 * near),
                        fontsize=8)
        ax.axhline(floor, color="#e76f51", linestyle="--", linewidth=1, label=f"gate: {metric} >= {floor:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"task: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("compression frontier (dark: pruned, teal: quantized only, grey: input model; outlined: fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
