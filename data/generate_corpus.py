#!/usr/bin/env python3
"""Generate the domain corpus for continued pre-training, seeded and byte-for-byte deterministic.

    python data/generate_corpus.py [--seed 1234] [--out data/]

writes OUT/corpus/domain.jsonl: 60 raw-text documents {"text": ...} of 80-300 words about the same fictional
products as the ticket dataset: quick-start guides, troubleshooting guides, product overviews, care/security
notes, FAQs and release notes for each of the six products (36), plus warranty, returns, refund, shipping,
privacy, billing, account and support-priority policies (24).  Standard library only.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus_content import POLICIES, PRODUCT_FACTS  # noqa: E402

MIN_WORDS, MAX_WORDS = 80, 300
MAX_J = 0.5                 # max word 3-gram Jaccard between any two documents
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INTROS = ["The {name} is {what}.", "This page covers the {name} ({alias}), {what}.",
          "{alias} is the model number of the {name}, {what}.", "Applies to: {name} ({alias})."]
HELP_LINES = ["If none of these steps help, contact support and mention the model number {alias}.",
              "Still stuck? Open a ticket and include the error code and your order number.",
              "Most problems are solved by restarting the device and installing the latest update.",
              "Before contacting support, note what the status light or the app shows.",
              "Support can see your device status only if you share the device ID from the app."]
DIGITAL = {"vault_backup", "orbit_app"}


def words(text: str) -> int:
    return len(text.split())


def lc(s: str) -> str:
    return s[:1].lower() + s[1:]


def quick_start(rng, pid, f):
    lines = [f"{f['name']} quick start guide", rng.choice(INTROS).format(**f, alias=rng.choice(f["aliases"])), ""]
    lines += [f"{i}. {step}" for i, step in enumerate(f["setup"], 1)]
    lines += ["", rng.choice(["Setup usually takes about ten minutes.", "You can repeat these steps after a factory reset.",
                              "Keep your order number handy in case you need support during setup."])]
    if rng.random() < 0.5:
        lines += ["", "If something goes wrong during setup:"]
        lines += [f"- {sym}: {fix}" for sym, fix in rng.sample(f["problems"], 2)]
    return lines


def troubleshooting(rng, pid, f):
    alias = rng.choice(f["aliases"])
    lines = [rng.choice([f"Troubleshooting the {f['name']}", f"{alias} troubleshooting guide",
                         f"Common {f['name']} problems and fixes"]), ""]
    for sym, fix in rng.sample(f["problems"], rng.randint(4, 5)):
        lines.append(rng.choice([f"{sym}: {fix[:1].upper()}{fix[1:]}", f"Problem: {sym}. Solution: {fix}",
                                 f"If {lc(sym)}, {fix}"]))
    lines += [""] + [h.format(alias=alias) for h in rng.sample(HELP_LINES, rng.randint(1, 3))]
    return lines


def overview(rng, pid, f):
    alias = rng.choice(f["aliases"])
    feats = rng.sample(f["features"], len(f["features"]))
    lines = [rng.choice([f"{f['name']} at a glance", f"About the {alias}", f"{f['name']} product overview"]),
             rng.choice(INTROS).format(**f, alias=alias),
             "Highlights: " + ", ".join(feats[:-1]) + " and " + feats[-1] + ".",
             rng.choice(["It is designed to be set up in minutes and updated automatically.",
                         "Updates are installed automatically overnight, so new features arrive without any effort.",
                         "Everything is managed from one place, the companion app or the web dashboard."]),
             "Good to know: " + " ".join(rng.sample(f["care"], 2))]
    if pid not in DIGITAL:
        lines.append("The hardware is covered by a two-year limited warranty and can be returned within 30 days "
                     "of delivery.")
    else:
        lines.append("Plans renew monthly or yearly and can be cancelled at any time from the billing page.")
    return lines


def care(rng, pid, f):
    title = f"Security tips for {f['name']}" if pid in DIGITAL else f"Care and safety for the {f['name']}"
    lines = [title, rng.choice(INTROS).format(**f, alias=rng.choice(f["aliases"])), ""]
    lines += [f"- {c}" for c in f["care"]]
    if pid in DIGITAL:
        extra = ["Use a unique password that you do not use anywhere else.",
                 "We will never ask for your password or encryption key by email or chat.",
                 "If you see a sign-in you do not recognise, change your password and contact support.",
                 "Deleting your account removes your data within 30 days."]
    else:
        extra = ["If the device overheats, smells of burning, sparks or has a swollen battery, unplug it, stop "
                 "using it and contact support; this is handled as a safety issue.",
                 "Do not open the case; there are no user-serviceable parts inside.",
                 "Recycle the device and its battery at an electronics collection point.",
                 "Clean the device with a soft, dry cloth only."]
    lines += [f"- {c}" for c in rng.sample(extra, 3)]
    return lines


def faq(rng, pid, f):
    alias = rng.choice(f["aliases"])
    lines = [rng.choice([f"{f['name']} FAQ", f"Frequently asked questions: {alias}"]), ""]
    for feat in rng.sample(f["features"], 2):
        lines += [f"Q: Does the {alias} have {feat.replace('the optional ', '')}?", f"A: Yes, it comes with {feat}."]
    for sym, fix in rng.sample(f["problems"], 2):
        lines += [f"Q: What should I do if {lc(sym)}?", f"A: {fix[:1].upper()}{fix[1:]}"]
    lines += ["Q: How do I contact support?",
              f"A: Open a ticket from the help centre and mention {alias} and your order number if you have one."]
    return lines


def release_notes(rng, pid, f):
    ver = f"{rng.randint(2, 5)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}"
    kind = "version" if pid in DIGITAL else "firmware"
    lines = [f"{f['name']} {kind} {ver} release notes",
             f"Released in {rng.choice(MONTHS)}. The update installs automatically; you can also start it from "
             "the settings page.", ""]
    items = [f"- Fixed: {lc(sym)} in some situations." for sym, _ in rng.sample(f["problems"], 3)]
    items += [f"- Improved support for {rng.choice(f['features'])}.", "- Improved stability and battery use.",
              "- Updated security certificates.", "- Faster start-up after a restart."]
    lines += rng.sample(items, rng.randint(5, 7))
    lines += ["", "If the update fails, restart the device or app and try again; your settings are kept."]
    return lines


PRODUCT_DOCS = [quick_start, troubleshooting, overview, care, faq, release_notes]


def policy(rng, topic, title):  # noqa: D103  (5-8 sentences of the topic's pool, in pool order)
    _titles, pool = POLICIES[topic]
    n = rng.randint(5, 8)
    chosen = sorted(rng.sample(range(len(pool)), n))
    lines = [title, f"Last updated: {rng.choice(MONTHS)} 2024", ""]
    if rng.random() < 0.5:
        lines += [" ".join(pool[i] for i in chosen)]
    else:
        lines += [f"- {pool[i]}" for i in chosen]
    return lines


def shingles(text: str) -> set[str]:
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + 3]) for i in range(len(w) - 2)}


def build(seed: int) -> list[dict]:
    """All documents; each is re-drawn until it is 80-300 words and its word 3-gram Jaccard with every earlier
    document is below MAX_J (so the training pipeline's near-duplicate filter keeps all of them)."""
    rng = random.Random(f"corpus/{seed}")
    jobs = [(fn, (pid, facts)) for pid, facts in PRODUCT_FACTS.items() for fn in PRODUCT_DOCS]
    jobs += [(policy, (topic, title)) for topic, (titles, _pool) in POLICIES.items() for title in titles]
    docs, sets = [], []
    for fn, args in jobs:
        for _ in range(200):
            d = "\n".join(fn(rng, *args))
            s = shingles(d)
            if (d.isascii() and MIN_WORDS <= words(d) <= MAX_WORDS
                    and all(len(s & t) / len(s | t) < MAX_J for t in sets)):
                break
        else:
            raise RuntimeError(f"could not draw a distinct document for {fn.__name__}{args[:1]}")
        docs.append(d)
        sets.append(s)
    rng.shuffle(docs)
    return [{"text": d} for d in docs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234,
                    help="random seed (default: 1234); the same seed always gives a byte-identical file")
    ap.add_argument("--out", type=Path, default=HERE,
                    help="output folder (default: the folder this script is in, i.e. data/); the file goes to OUT/corpus/domain.jsonl")
    ap.add_argument("--quiet", action="store_true", help="do not print the summary")
    args = ap.parse_args(argv)
    docs = build(args.seed)
    path = args.out / "corpus" / "domain.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    if not args.quiet:
        n = [words(d["text"]) for d in docs]
        print(f"wrote {len(docs)} documents to {path}; words min/median/max = "
              f"{min(n)}/{statistics.median(n):g}/{max(n)}")


if __name__ == "__main__":
    main()
