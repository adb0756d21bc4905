"""One retraining cycle on the drift demo's German tickets, measured (issue 23): `make bench-retrain`.

1. `llmstack serve` on the served model (artifacts/compress/latest) with the request log on; the first 60 German
   tickets of data/drift/language.jsonl and 60 in-distribution tickets arrive through the openai client.
2. `llmstack log export --drifted-only`: the requests outside the training traffic's profile; a reviewer (scripted
   here: the ticket generator's reference answers, data/drift/language_labeled.jsonl) corrects each answer of the
   German traffic and rejects the rest (the held-out tickets asked to measure "before" are in the log too: rejected,
   so they are never trained on).
3. `llmstack retrain --promote` with the review file, the other 60 German tickets (never sent, never trained on) as
   the drifted evaluation rows, and the served training run's test split as the held-out rows: the candidate, the
   comparison, the rule, the swap of the running service.
4. After the swap, the running service answers the 60 held-out German tickets again: the exact match a client sees.

Writes benchmarks/results/retrain.{json,md}; artifacts under artifacts/retrain/ (not committed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_data import cpu  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DRIFT = ROOT / "data" / "drift"
KEY = "bench-retrain-key"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def cli(*args: str, env: dict) -> str:
    cmd = [sys.executable, "-m", "llmstack", *args]
    print("$ llmstack", " ".join(args), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    print(out.stdout[-3000:], flush=True)
    if out.returncode != 0:
        raise SystemExit(f"llmstack {args[0]} failed (exit {out.returncode})")
    return out.stdout


def start(served: str, port: int, log_file: Path, env: dict) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "llmstack", "serve", "--model", served, "--port", str(port),
           "monitoring.request_log.enabled=true", f"monitoring.request_log.path={log_file}", "registry.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not become ready")


def ask(base: str, prompts: list[str], model: str) -> list[dict]:
    """Greedy answers from the running service at concurrency 8: (text, the model that answered). `model`: the
    first model's id, which stays the served model's alias across swaps."""
    from openai import OpenAI

    oai = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=2, timeout=300)

    def one(p: str) -> dict:
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=64,
                                        temperature=0)
        return {"text": r.choices[0].message.content, "model": r.model}
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def exact_match(answers: list[dict], references: list[str]) -> float:
    from evaluation.metrics import json_metrics
    return json_metrics([a["text"] for a in answers], references, ["category", "product", "urgency"])["exact_match"]


def rewrite() -> None:
    """benchmarks/results/retrain.md again from retrain.json (after a change of the table's wording)."""
    (RESULTS / "retrain.md").write_text(markdown(json.loads((RESULTS / "retrain.json").read_text())))


def reviewed(export: Path, traffic: set[str], answers: dict[str, str]) -> tuple[Path, list[dict], int]:
    """The scripted reviewer: the reference answer for each German ticket sent as traffic; the held-out ones (asked
    to measure "before", so in the log too) and everything else rejected. (review file, rows, corrected rows)"""
    rows, corrected = read_jsonl(export), 0
    for r in rows:
        prompt = r["messages"][0]["content"]
        if prompt in traffic:
            r["messages"][-1]["content"], r["review"] = answers[prompt], "corrected"
            corrected += 1
        else:
            r["review"] = "rejected"
    review = export.with_name("review.jsonl")
    review.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return review, rows, corrected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--served", default="artifacts/compress/latest", help="what is served (default: %(default)s)")
    ap.add_argument("--port", type=int, default=3107)
    ap.add_argument("--traffic", type=int, default=60, help="German tickets sent (the rest are held out)")
    ap.add_argument("--markdown-only", action="store_true", help="only rewrite retrain.md from retrain.json")
    ap.add_argument("overrides", nargs="*", help="retrain overrides, e.g. training.traffic_weight=3")
    args = ap.parse_args()
    if args.markdown_only:
        return rewrite()
    env = dict(os.environ, LLMSTACK_API_KEY=KEY, PYTHONPATH=str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    labelled = read_jsonl(DRIFT / "language_labeled.jsonl")
    prompts = [f"{r['instruction']}\n\n{r['input']}" for r in labelled]
    answers = dict(zip(prompts, (r["output"] for r in labelled)))
    sent, held = prompts[:args.traffic], labelled[args.traffic:]
    held_file = work / "german_heldout.jsonl"
    held_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held), encoding="utf-8")
    english = [r["messages"][0]["content"] for r in read_jsonl(DRIFT / "in_distribution.jsonl")[:60]]
    base = f"http://127.0.0.1:{args.port}"
    t0 = time.time()
    proc = start(args.served, args.port, work / "requests.sqlite", env)
    try:
        import httpx
        name = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        before = ask(base, [f"{r['instruction']}\n\n{r['input']}" for r in held], name)
        ask(base, sent + english, name)
        time.sleep(2)  # the monitor writes the log off the request path
        export = work / "drifted.jsonl"
        cli("log", "export", "--log", str(work / "requests.sqlite"), "--model", args.served, "--drifted-only",
            "--out", str(export), env=env)
        review, rows, german_rows = reviewed(export, set(sent), answers)
        cli("retrain", "--config", "configs/retrain.yaml", "--promote", "traffic.select=review",
            f"traffic.review={review}", f"evaluate.drifted={held_file}", f"service.url={base}", *args.overrides,
            env=env)
        after = ask(base, [f"{r['instruction']}\n\n{r['input']}" for r in held], name)
    finally:
        proc.terminate()
        proc.wait(60)
    record = json.loads((ROOT / "artifacts/retrain/latest/manifest.json").read_text())
    refs = [r["output"] for r in held]
    result = {"machine": cpu(), "date": time.strftime("%Y-%m-%d"), "served": args.served,
              "traffic": {"german_sent": len(sent), "english_sent": len(english), "exported_drifted": len(rows),
                          "german_in_export": german_rows, "reviewed_rows_trained": record["traffic"]["train_rows"]},
              "overrides": args.overrides, "evaluation": record["evaluation"], "decision": record["decision"],
              "promoted": record.get("promoted"),
              "service": {"german_heldout_exact_match_before": exact_match(before, refs),
                          "german_heldout_exact_match_after": exact_match(after, refs),
                          "models_after": sorted({a["model"] for a in after})},
              "timings_s": record["timings"], "wall_s": round(time.time() - t0, 1),
              "candidate": record["candidate"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrain.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "retrain.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    ev, s = r["evaluation"], r["service"]
    m = r["machine"]
    lines = [f"Machine: {m['model']}, {m['cores']} cores, CPU flags {' '.join(m['flags'])}; {r['date']}; served "
             f"`{r['served']}`; retrain overrides: {' '.join(r['overrides']) or 'none'}.", "",
             f"Traffic: {r['traffic']['german_sent']} German + {r['traffic']['english_sent']} in-distribution tickets; "
             f"`log export --drifted-only` kept {r['traffic']['exported_drifted']} requests (the held-out German "
             "tickets asked to measure \"before\" are logged too); the scripted reviewer corrected the "
             f"{r['traffic']['german_in_export']} German traffic tickets and rejected the rest; "
             f"{r['traffic']['reviewed_rows_trained']} rows trained on beside the served model's own training rows.",
             "",
             "| exact match | served model | after one retrain cycle | change |", "|---|---|---|---|"]
    for name, label in (("held_out", "original test rows"), ("drifted", "held-out German tickets")):
        a, b = ev[name]["served"]["exact_match"], ev[name]["candidate"]["exact_match"]
        lines.append(f"| {label} ({ev[name]['served']['n']} rows, offline) | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    a, b = s["german_heldout_exact_match_before"], s["german_heldout_exact_match_after"]
    lines.append(f"| held-out German tickets through the running service | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    d = r["decision"]
    lines += ["", f"Decision: {'promote' if d['promote'] else 'keep'} ({'; '.join(d['reasons'])}); swapped: "
              f"{bool((r.get('promoted') or {}).get('swapped'))}, answering model after: "
              f"{', '.join(s['models_after'])}. Wall time {r['wall_s'] / 60:.1f} min "
              f"(retrain phases: {', '.join(f'{k} {v:.0f} s' for k, v in r['timings_s'].items())}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
