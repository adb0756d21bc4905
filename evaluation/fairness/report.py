"""The reports of the fairness checks (evaluation/fairness/check.py): fairness.md (flip rates, per-group accuracy, group
metrics, flip examples), fairness.png (flip rate per attribute and field against the threshold), fairness.json, and
the `fairness` entry a training artifact's manifest gets."""
from __future__ import annotations

from pathlib import Path

from core import artifacts

FILES = ("fairness.json", "fairness.md", "fairness.png")


def summary(result: dict) -> dict:
    """What the manifest records: flip rates, group-metric differences, the verdict (no variants, no examples)."""
    gm = result["group_metrics"]
    diffs = lambda g: {k: g[k] for k in ("demographic_parity_difference", "equal_opportunity_difference",  # noqa
                                         "equalized_odds_difference")}
    return {"flagged": result["flagged"], "reasons": result["reasons"], "thresholds": result["thresholds"],
            "flip_rate": {a: m["flip_rate"] for a, m in result["flips"].items()},
            "group_metrics": {a: {f: diffs(g) for f, g in by.items()} for a, by in gm["probes"].items()}
            | ({"table": {f: diffs(g) for f, g in gm["table"].items()}} if "table" in gm else {}),
            "probes": {a: m["probes"] for a, m in result["flips"].items()}, "distinct_messages": result["distinct_messages"],
            "files": list(FILES), "measured_at": result.get("measured_at")}


# ---------------------------------------------------------------- reports
def markdown(result: dict) -> str:
    fields = result["fields"]
    out = [f"# Fairness checks: {result.get('model', '')}", "",
           f"**{'FLAGGED' if result['flagged'] else 'not flagged'}** against the thresholds "
           + ", ".join(f"{k} {v}" for k, v in result["thresholds"].items()) + "."]
    out += [f"- {r}" for r in result["reasons"]]
    out += ["", "## Counterfactual flip rates", "",
            f"Probes: `{result['probes_file']}`, terms: `{result['terms_file']}`. A probe flips when its "
            "counterfactual variants (the same message with another group's terms) do not all get the same value; "
            "greedy decoding, so every flip is a real difference.", "",
            "| attribute | probes | variants | " + " | ".join(f"flip: {f}" for f in fields)
            + " | flip: any | pairwise: any | group deviating most |",
            "|---|---|---|" + "---|" * (len(fields) + 3)]
    for a, m in result["flips"].items():
        worst = max(m["group_deviation"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        worst_text = f"{worst[0]} ({worst[1]:.3f})" if worst[1] else "-"
        out.append(f"| {a} | {m['probes']} | {m['variants']} | "
                   + " | ".join(f"{m['flip_rate'][f]:.3f}" for f in fields)
                   + f" | {m['flip_rate']['any']:.3f} | {m['pairwise_flip_rate']['any']:.3f} | "
                   f"{worst_text} |")
    out += ["", "Accuracy per group on the probes (reference = the scenario's labels):", ""]
    out += ["| attribute | group | " + " | ".join(fields) + " | deviates from the majority |",
            "|---|---|" + "---|" * (len(fields) + 1)]
    for a, m in result["flips"].items():
        for g in m["groups"]:
            accs = " | ".join("-" if m["accuracy"][g][f] is None else f"{m['accuracy'][g][f]:.3f}" for f in fields)
            out.append(f"| {a} | {g} | {accs} | {m['group_deviation'][g]:.3f} |")
    out += ["", "## Group metrics (one-vs-rest)", "",
            "Positive class per field: " + "; ".join(f"{f} in {{{', '.join(p)}}}"
                                                     for f, p in result["positive"].items()) + ".", "",
            "| data | field | demographic parity diff | equal opportunity diff | equalized odds diff |",
            "|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    gm = result["group_metrics"]
    for a, by in gm["probes"].items():
        for f, g in by.items():
            out.append(f"| probes: {a} | {f} | {fmt(g['demographic_parity_difference'])} | "
                       f"{fmt(g['equal_opportunity_difference'])} | {fmt(g['equalized_odds_difference'])} |")
    for f, g in gm.get("table", {}).items():
        out.append(f"| {gm['table_file']} ({gm['table_group_column']}) | {f} | "
                   f"{fmt(g['demographic_parity_difference'])} | {fmt(g['equal_opportunity_difference'])} | "
                   f"{fmt(g['equalized_odds_difference'])} |")
    out += ["", "## Flip examples", ""]
    for a, m in result["flips"].items():
        for ex in m["examples"]:
            out.append(f"- **{a} / {ex['probe']}** ({', '.join(ex['fields'])}; reference "
                       + ", ".join(f"{k}={v}" for k, v in ex["reference"].items()) + "): "
                       + "; ".join(f"{v['group']} ({', '.join(v['terms'].values())}) -> "
                                   + ", ".join(str(v[f]) for f in ex["fields"]) for v in ex["variants"]))
    if not any(m["examples"] for m in result["flips"].values()):
        out.append("No flips.")
    out += ["", "Flip rates measure sensitivity to the swapped terms on these templates only: a low rate does not "
            "prove the model is fair on real traffic, and a flip says the output depends on the term, not which "
            "answer is right (see the accuracy table). See docs/fairness.md.", ""]
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = list(result["flips"])
    keys = result["fields"] + ["any"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([x + i * width for x in range(len(attrs))], [result["flips"][a]["flip_rate"][k] for a in attrs],
               width, label=k)
    ax.axhline(result["thresholds"]["max_flip_rate"], color="red", linestyle="--", linewidth=1,
               label=f"max flip rate {result['thresholds']['max_flip_rate']}")
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(attrs))], attrs)
    ax.set_ylabel("flip rate (share of probes)")
    ax.set_ylim(0, max(0.05, *(result["flips"][a]["flip_rate"]["any"] for a in attrs), 
                       result["thresholds"]["max_flip_rate"]) * 1.15)
    ax.set_title("Counterfactual flip rate per attribute and field")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(out / "fairness.json", result)
    (out / "fairness.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "fairness.png")


def record_in_manifest(artifact: Path, result: dict, out: Path) -> None:
    """Add (or replace) the `fairness` entry of a training artifact's manifest (atomic rewrite)."""
    m = artifacts.read_manifest(artifact)
    entry = summary(result)
    entry["files"] = [str((out / f).resolve()) if out.resolve() != artifact.resolve() else f for f in FILES]
    m["fairness"] = entry
    artifacts.write_json(artifact / artifacts.MANIFEST, m)
