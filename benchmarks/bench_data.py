"""What data augmentation and bias mitigation change, measured (issue 21): `make bench-data`.

1. Low data: the demo task trained on 100 original rows (a seeded seventh of data/tickets/train.jsonl) without
   augmentation, with noise (char + word + casing), with paraphrases by the base model and with product names
   swapped for their synonyms; same steps, seed and test rows. Scored on the test rows and on a noisy copy of them (char_noise at strength 0.15: robustness).
2. Bias mitigation: the demo config on all 700 rows, without mitigation, with counterfactual augmentation and with
   reweighing (both from data/fairness/augment_terms.yaml, held out from the fairness probes' terms); each scored on
   the test rows and by `llmstack fairness` on the probes (flip rate, group metrics).
3. The seed spread: both baselines again with another seed (LoRA init and data order): a difference between the
   runs above smaller than this is not evidence.

Writes benchmarks/results/data.{json,md} (after each run). Every run is a real `llmstack` command; the artifacts go to
artifacts/bench-data/ (not committed)."""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("artifacts/bench-data")
RESULTS = Path("benchmarks/results")
LOW = ["data.train=[{path: data/tickets/train.jsonl, weight: 0.142857}]"]
NOISE = ("data.augment.operations=[{op: char_noise, rate: 1, seed: 1}, {op: word_noise, rate: 0.5, seed: 2}, "
         "{op: casing, rate: 0.5, seed: 3}]")
PARAPHRASE = ("data.augment.operations=[{op: paraphrase, rate: 1, seed: 4, "
              "generator: {model: base, max_new_tokens: 160, temperature: 0.7}}]")
SYNONYMS = ("data.augment.operations=[{op: synonyms, rate: 1, seed: 6, synonyms: data/tickets/product_forms.yaml}]",
            "data.augment.filter.near_dup_threshold=0.97")
CDA = "data.augment.operations=[{op: counterfactual, rate: 1, seed: 5}]"
RUNS = {  # name -> (part, overrides)
    "low-none": ("low", LOW),
    "low-noise": ("low", LOW + [NOISE]),
    "low-paraphrase": ("low", LOW + [PARAPHRASE]),
    "low-synonyms": ("low", LOW + list(SYNONYMS)),
    "full-none": ("bias", []),
    "full-counterfactual": ("bias", [CDA]),
    "full-reweigh": ("bias", ["data.reweigh.enabled=true", "data.reweigh.label_field=urgency"]),
    # the spread a different seed alone gives (LoRA init and data order): what a difference above must exceed
    "low-none-seed7": ("low", LOW + ["train.seed=7"]),
    "full-none-seed7": ("seed", ["train.seed=7"]),
}
FAIRNESS_ARGS = ["--max-probes", "9", "--max-terms", "1", "--threads", "2"]


def llmstack(*args: str) -> None:
    cmd = [sys.executable, "-m", "llmstack", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in info})
    return {"model": model.group(1) if model else platform.processor(), "flags": flags,
            "cores": len(re.findall(r"^processor", info, re.M))}


def scores(metrics: dict) -> dict:
    return {"exact_match": metrics.get("exact_match"), "json_valid": metrics.get("json_valid"),
            **{f"acc_{k}": v for k, v in (metrics.get("field_accuracy") or {}).items()}}


def one_run(name: str, part: str, overrides: list[str], noisy: Path) -> dict:
    art = OUT / name
    if not (art / "manifest.json").exists():
        # the base model's score before training is the same for every run: measured once, by `make train`
        llmstack("train", f"output.dir={OUT}", f"output.run_id={name}", "eval.before=false", *overrides)
    manifest = json.loads((art / "manifest.json").read_text())
    report = json.loads((art / "data_report.json").read_text())
    row = {"run": name, "part": part, "overrides": overrides, "train_rows": report["splits"]["train"]["n"],
           "augmentation": {k: v for k, v in (manifest.get("augmentation") or {}).items() if k != "lineage"},
           "test": scores(manifest["metrics"]["after"]), "train_seconds": manifest["timings"].get("train")}
    if part == "low":
        out = OUT / f"{name}-noisy.json"
        if not out.exists():
            llmstack("eval", str(art), f"data.test=[{{path: {noisy}}}]", "eval.max_samples=100", "--output", str(out))
        row["noisy_test"] = scores(json.loads(out.read_text())["metrics"])
    elif part == "bias":
        if not (art / "fairness.json").exists():
            llmstack("fairness", str(art), *FAIRNESS_ARGS)
        f = json.loads((art / "fairness.json").read_text())
        row["fairness"] = {"flip_rate": {a: m["flip_rate"] for a, m in f["flips"].items()},
                           "pairwise_flip_rate": {a: m["pairwise_flip_rate"] for a, m in f["flips"].items()},
                           "group_metrics": f["group_metrics"]["probes"], "flagged": f["flagged"],
                           "reasons": f["reasons"]}
    return row


def _cell(v) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['model']}, {m['cores']} cores; CPU flags {', '.join(m['flags']) or 'none of the listed'}.",
             "", "| run | train rows | exact match | category | product | urgency | noisy test: exact match | "
             "category | product | urgency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in result["runs"] if r["part"] == "low"):
        t, n = r["test"], r.get("noisy_test", {})
        lines.append(f"| {r['run']} | {r['train_rows']} | " + " | ".join(_cell(d.get(k)) for d in (t, n) for k in (
            "exact_match", "acc_category", "acc_product", "acc_urgency")) + " |")
    lines += ["", "| run | train rows | exact match | urgency | flip rate (any): gender / origin / nationality | "
              "pairwise (any) | flagged |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in result["runs"] if r["part"] in ("bias", "seed")):
        f = r.get("fairness") or {"flip_rate": {}, "pairwise_flip_rate": {}, "flagged": "-"}
        flips = " / ".join(_cell(f["flip_rate"].get(a, {}).get("any")) for a in ("gender", "origin", "nationality"))
        pair = " / ".join(_cell(f["pairwise_flip_rate"].get(a, {}).get("any"))
                          for a in ("gender", "origin", "nationality"))
        lines.append(f"| {r['run']} | {r['train_rows']} | {_cell(r['test']['exact_match'])} | "
                     f"{_cell(r['test'].get('acc_urgency'))} | {flips} | {pair} | {f['flagged']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    noisy = OUT / "test_noisy.jsonl"
    if not noisy.exists():
        llmstack("augment", "data/tickets/test.jsonl", "-o", str(noisy), "--only-new",
                 "data.augment.operations=[{op: char_noise, rate: 1, strength: 0.15, seed: 7}]",
                 "data.augment.filter.dedup=false", "data.augment.filter.same_language=false")
    rows, started = [], time.time()
    for name in args.runs.split(","):
        rows.append(one_run(name, *RUNS[name], noisy))
        result = {"machine": cpu(), "runs": rows}
        (RESULTS / "data.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "data.md").write_text(markdown(result))
    print(f"done in {time.time() - started:.0f} s; {RESULTS / 'data.json'}")


if __name__ == "__main__":
    main()
