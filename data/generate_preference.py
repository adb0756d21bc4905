"""Build the demo's preference pairs from the ticket data: for each ticket, chosen = the correct JSON answer and
rejected = a near miss of one of five kinds (seeded, deterministic):

- wrong_category: another category, everything else right
- wrong_urgency: an adjacent urgency level, everything else right
- missing_field: category, product or urgency left out
- invalid_json: the right answer with broken JSON syntax (single quotes, a missing brace or a trailing comma)
- extra_prose: the right JSON wrapped in chatty text ("Sure! Here is ...")

    .venv/bin/python data/generate_preference.py            # --seed 1234 --train 400 --test 100 --out data/preference

Rows: {"instruction", "input", "chosen", "rejected", "rejected_kind"} (the instruction format plus the two answers;
`rejected_kind` is metadata the training pipeline ignores). Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = ["billing", "technical", "account", "shipping", "returns", "feature_request"]
URGENCY = ["low", "medium", "high", "critical"]
KINDS = ["wrong_category", "wrong_urgency", "missing_field", "invalid_json", "extra_prose"]
PREAMBLES = ["Sure! Here is the triage:", "Here's the JSON you asked for:", "Of course. Based on the ticket, "
             "this is my assessment:", "Happy to help! Triage result:"]
CODAS = ["Let me know if you need anything else.", "I hope this helps!", "Feel free to ask follow-up questions.",
         "The customer should be contacted soon."]


def dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def near_miss(answer: dict, kind: str, rng: random.Random) -> str:
    bad = dict(answer)
    if kind == "wrong_category":
        bad["category"] = rng.choice([c for c in CATEGORIES if c != answer["category"]])
        return dumps(bad)
    if kind == "wrong_urgency":
        i = URGENCY.index(answer["urgency"])
        bad["urgency"] = URGENCY[i + 1] if i == 0 or (i < len(URGENCY) - 1 and rng.random() < 0.5) else URGENCY[i - 1]
        return dumps(bad)
    if kind == "missing_field":
        del bad[rng.choice(["category", "product", "urgency"])]
        return dumps(bad)
    if kind == "invalid_json":
        text = dumps(answer)
        how = rng.randrange(3)
        if how == 0:
            return text.replace('"', "'")
        if how == 1:
            return text[:-1]
        return text[:-1] + ",}"
    return f"{rng.choice(PREAMBLES)}\n{dumps(answer)}\n{rng.choice(CODAS)}"


def pairs(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    picked = rng.sample(rows, min(n, len(rows)))
    out = []
    for i, row in enumerate(picked):
        answer = json.loads(row["output"])
        kind = KINDS[i % len(KINDS)]  # balanced kinds, in a seeded ticket order
        out.append({"instruction": row["instruction"], "input": row["input"], "chosen": dumps(answer),
                    "rejected": near_miss(answer, kind, rng), "rejected_kind": kind})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=400, help="pairs from data/tickets/train.jsonl")
    ap.add_argument("--test", type=int, default=100, help="pairs from data/tickets/test.jsonl (held-out prompts)")
    ap.add_argument("--tickets", default=str(HERE / "tickets"))
    ap.add_argument("--out", default=str(HERE / "preference"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        src = [json.loads(x) for x in (Path(args.tickets) / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        rows = pairs(src, n, rng)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        kinds = {k: sum(r["rejected_kind"] == k for r in rows) for k in KINDS}
        print(f"{out / f'{split}.jsonl'}: {len(rows)} pairs ({', '.join(f'{k} {v}' for k, v in kinds.items())})")


if __name__ == "__main__":
    main()
