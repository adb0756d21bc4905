#!/usr/bin/env python3
"""Generate the drift demo's traffic sets, seeded and deterministic: in-distribution prompts and three shifts.

    python data/generate_drift_sets.py [--seed 7] [--out data/drift]

Each file is chat JSONL, one user message per row ({"messages": [{"role": "user", "content": ...}]}), built the way
training builds its prompts (the triage instruction, a blank line, the customer's message):
- in_distribution.jsonl: the validation split and the second half of the test split (never in the drift reference:
  training profiles the train split's prompts and the first test rows' answers)
- language.jsonl: the same task in German (another language); language_labeled.jsonl holds the same tickets row for
  row with their reference answers (instruction / input / output, as data/tickets): the German scenario sets
  category and urgency ("dringend" raises medium to high), the product is the one named, the summary is English like
  the training answers. The retraining demo trains on part of them and scores on the rest (docs/retraining.md).
- domain.jsonl: questions from another domain (cooking, travel, programming, gardening) under the same instruction
- long.jsonl: much longer prompts: a support thread of 4 to 6 earlier in-distribution messages quoted before the new
  one
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ticket_vocab import INSTRUCTION  # noqa: E402

DE_PRODUCTS = ["Nimbus R2 Router", "Aurora Cam 4K", "Pulse Watch", "Vault Backup", "Echo Lautsprecher", "Orbit App"]
PRODUCT_IDS = {"Nimbus R2 Router": ("nimbus_router", "Nimbus R2 Router"), "Aurora Cam 4K": ("aurora_camera", "Aurora Cam 4K"),
               "Pulse Watch": ("pulse_watch", "Pulse Watch"), "Vault Backup": ("vault_backup", "Vault Backup"),
               "Echo Lautsprecher": ("echo_speaker", "Echo Speaker"), "Orbit App": ("orbit_app", "Orbit App")}
DE_OPEN = ["Guten Tag,", "Hallo zusammen,", "Sehr geehrte Damen und Herren,", "Hallo Support-Team,", "Moin,"]
DE_ISSUE = [  # (German text, category, urgency, English summary)
    ("mein {p} startet seit dem letzten Update nicht mehr und zeigt nur eine rote Lampe.", "technical", "high",
     "The customer's {name} no longer starts after the last update and shows a red light."),
    ("die Rechnung für {p} wurde diesen Monat doppelt abgebucht, bitte erstatten Sie den Betrag.", "billing",
     "medium", "Customer was charged twice this month for the {name} and asks for a refund."),
    ("ich kann mich nicht mehr in mein Konto für {p} einloggen, das Passwort wird abgelehnt, obwohl es stimmt.",
     "account", "medium", "Customer cannot log in to the {name} account; the correct password is rejected."),
    ("das Paket mit meinem {p} ist seit zwei Wochen unterwegs und die Sendungsverfolgung zeigt nichts Neues.",
     "shipping", "medium", "The {name} parcel has been in transit for two weeks without tracking updates."),
    ("ich möchte meinen {p} zurückgeben, er passt leider nicht zu meinem Bedarf.", "returns", "low",
     "Customer wants to return the {name} because it does not fit their needs."),
    ("es wäre schön, wenn die {p} eine Funktion für dunkle Darstellung bekäme.", "feature_request", "low",
     "Customer suggests adding a dark mode to the {name}."),
    ("die Verbindung meines {p} bricht ständig ab, Fehlermeldung E-42 erscheint jedes Mal.", "technical", "medium",
     "The {name} keeps losing its connection with error E-42."),
    ("der Akku meiner {p} wird sehr heiß und riecht verbrannt, ich habe Angst, sie weiter zu benutzen.", "technical",
     "critical", "The {name} battery gets very hot and smells burnt; the customer is afraid to use it."),
    ("nach dem Umzug funktioniert die Einrichtung des {p} nicht mehr, das WLAN wird nicht gefunden.", "technical",
     "medium", "After moving, the {name} setup fails because the Wi-Fi network is not found."),
    ("mein Abonnement für {p} wurde ohne Nachfrage verlängert, ich möchte kündigen.", "billing", "medium",
     "The {name} subscription was renewed without asking and the customer wants to cancel."),
]
DE_DETAIL = ["Ich habe das Gerät schon neu gestartet.", "Das Problem besteht seit Montag.",
             "Mein Kollege hat dasselbe Problem.", "Bitte melden Sie sich schnell, es ist dringend.",
             "Ich habe die Anleitung gelesen, aber sie hilft nicht.", ""]
DE_CLOSE = ["Mit freundlichen Grüßen,\nAnna Schmidt", "Viele Grüße\nJonas Weber", "Danke im Voraus!\nLena",
            "Beste Grüße,\nMichael Becker", "Gruß\nSabine"]

DOMAIN = [
    "What is the best way to keep {x} fresh for a week? I usually store it in the fridge but it goes soft.",
    "Can you suggest a three-day itinerary for {y} on a small budget, with museums and good street food?",
    "My Python script raises KeyError when I read '{z}' from a dictionary loaded with json.load. How do I fix it?",
    "How often should I water {w} in a sunny balcony during summer, and does the pot size matter?",
    "I want to bake bread with {x}. How long should the dough rise, and at what oven temperature?",
    "Which train pass is cheaper for visiting {y} and two nearby towns over a long weekend?",
    "How do I sort a list of dictionaries by the '{z}' key in descending order in Python?",
    "The leaves of my {w} turn yellow from the edges. Is it too much sun or too much water?",
]
FILL = {"x": ["basil", "sourdough starter", "spinach", "fresh pasta", "rye flour", "coriander"],
        "y": ["Lisbon", "Kyoto", "Prague", "Montreal", "Seville", "Edinburgh"],
        "z": ["user_id", "timestamp", "price", "created_at", "score", "email"],
        "w": ["tomatoes", "a lemon tree", "lavender", "a fiddle leaf fig", "rosemary", "chili plants"]}


def chat(content: str) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


def prompt(message: str) -> str:
    return f"{INSTRUCTION}\n\n{message}"


def german_ticket(rng: random.Random) -> tuple[str, str]:
    """One German ticket and its reference answer (compact JSON, as the training answers are written)."""
    opener, (issue, category, urgency, summary), product = rng.choice(DE_OPEN), rng.choice(DE_ISSUE), \
        rng.choice(DE_PRODUCTS)
    detail, closer = rng.choice(DE_DETAIL), rng.choice(DE_CLOSE)
    if "dringend" in detail and urgency in ("low", "medium"):
        urgency = "high"
    pid, name = PRODUCT_IDS[product]
    message = "\n".join(x for x in (opener, issue.format(p=product), detail, closer) if x)
    answer = json.dumps({"category": category, "product": pid, "urgency": urgency,
                         "summary": summary.format(name=name)}, ensure_ascii=False)
    return message, answer


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=7, help="random seed (default: %(default)s)")
    ap.add_argument("--out", default=str(HERE / "drift"), help="output folder (default: data/drift)")
    ap.add_argument("--n", type=int, default=120, help="rows per shifted set (default: %(default)s)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tickets = HERE / "tickets"
    held_out = read(tickets / "validation.jsonl") + read(tickets / "test.jsonl")[100:]
    sets = {"in_distribution": [chat(prompt(r["input"])) for r in held_out]}
    german = [german_ticket(rng) for _ in range(args.n)]
    sets["language"] = [chat(prompt(message)) for message, _ in german]
    sets["domain"] = [chat(prompt(rng.choice(DOMAIN).format(**{k: rng.choice(v) for k, v in FILL.items()})))
                      for _ in range(args.n)]
    pool = [r["input"] for r in held_out]
    long_rows = []
    for _ in range(args.n):
        earlier = rng.sample(pool, rng.randint(4, 6))
        thread = "\n\n".join(f"--- earlier message {i + 1} ---\n{m}" for i, m in enumerate(earlier))
        long_rows.append(chat(prompt(f"{thread}\n\n--- new message ---\n{rng.choice(pool)}")))
    sets["long"] = long_rows
    sets["language_labeled"] = [{"instruction": INSTRUCTION, "input": message, "output": answer}
                                for message, answer in german]
    for name, rows in sets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{out / name}.jsonl: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
