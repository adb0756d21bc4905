#!/usr/bin/env python3
"""Generate the support-ticket triage demo dataset (alpaca instruction format), seeded and byte-for-byte deterministic.

    python data/generate_tickets.py [--seed 1234] [--out data/]

writes OUT/tickets/{train,validation,test}.jsonl.  Each row: {"instruction", "input" (customer message),
"output" (compact JSON: category, product, urgency, summary)}.  Templates live in ticket_vocab.py and
ticket_scenarios.py; data/README.md documents the labelling rules.  Standard library only, except datasketch
for the near-duplicate guard.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ticket_scenarios import FEATURES, FR_FRAMES, FR_SUMMARY, SCENARIOS  # noqa: E402
from ticket_vocab import (CATEGORIES, CHAT_CLOSERS, CHAT_GREETINGS, CITIES, CLOSERS, COLORS, COMPANIES,  # noqa: E402
                          CUES, CUES_SHORT, DETAILS, DISTRACTORS, FIRST, GREETINGS, INSTRUCTION, LAST, MARKERS, MONTHS,
                          OPENERS, PAST_ISSUES, PAST_TOPICS, PHYSICAL_ONLY, PRODUCTS, SHORT_CUE_CATS, SIG_EXTRAS,
                          SIGNOFFS, STORY, SUBJECTS, URGENCIES)

SPLITS = {"train": 700, "validation": 100, "test": 200}
# Urgency mix per category (low, medium, high, critical); feature requests are only ever low or medium.
URGENCY_WEIGHTS = {"billing": (.18, .34, .30, .18), "technical": (.12, .30, .33, .25),
                   "account": (.14, .32, .32, .22), "shipping": (.18, .36, .30, .16),
                   "returns": (.25, .38, .27, .10), "feature_request": (.58, .42, 0, 0)}
STYLES = (("email", .45), ("chat", .35), ("terse", .20))
P_TYPO, P_CAPS, P_SPACE = .15, .08, .12
MIN_WORDS, MAX_WORDS = 15, 120
TRAIN_MAX_J, CROSS_MAX_J, PIPELINE_J = 0.9, 0.7, 0.9   # guard thresholds (estimated Jaccard, num_perm=128)
SURFACE_PERIOD, CUE_PERIOD = 4, 5                        # item i is held out when i % period == period - 1
HELD_BIAS = {SURFACE_PERIOD: 0.5, CUE_PERIOD: 0.25}       # evaluation rows: chance of forcing a held-out item
MARKER_RE = {lvl: [re.compile(p, re.I) for p in pats] for lvl, pats in MARKERS.items()}
ALL_MARKERS = [r for pats in MARKER_RE.values() for r in pats]


# ---------------------------------------------------------------- template checks
def levels_in(text: str) -> set[str]:
    return {lvl for lvl, pats in MARKER_RE.items() if any(p.search(text) for p in pats)}


def lint() -> None:
    """Fail loudly if a template could make a label ambiguous (see README, 'Labelling rules')."""
    neutral = [s for sc in SCENARIOS for s in sc[5] + [sc[4]]] + FR_FRAMES
    neutral += [t for feats in FEATURES.values() for f in feats for t in f]
    for pool in (GREETINGS, CHAT_GREETINGS, OPENERS, CLOSERS, CHAT_CLOSERS, SIGNOFFS, SIG_EXTRAS, DISTRACTORS,
                 PAST_ISSUES, STORY, FIRST, LAST, COMPANIES, CITIES, list(PAST_TOPICS.values()),
                 *SUBJECTS.values(), *DETAILS.values()):
        neutral += pool
    for text in neutral:
        assert text.isascii(), text
        assert not levels_in(text), f"urgency marker in neutral template: {text!r}"
    for sc in SCENARIOS:
        for p in sc[5]:
            assert p.count("{P}") == 1 and not re.search(r"\ba \{P\}", p), (sc[0], p)
    for lvl in URGENCIES:
        cues = [c[0] for c in CUES[lvl]] + CUES_SHORT[lvl]
        train_pats = set()
        for pool in ([c[0] for c in CUES[lvl]], CUES_SHORT[lvl]):
            for i, cue in enumerate(pool):
                assert cue.isascii() and levels_in(cue) == {lvl}, (lvl, cue)
                if i % CUE_PERIOD != CUE_PERIOD - 1:
                    train_pats |= {p.pattern for p in MARKER_RE[lvl] if p.search(cue)}
        for cue in cues:   # every marker of a held-out cue is also taught by a training cue
            assert {p.pattern for p in MARKER_RE[lvl] if p.search(cue)} <= train_pats, cue
    for cat in CATEGORIES:   # every label combination the plan can ask for has training scenarios and cues
        for prod in PRODUCTS:
            for u, w in zip(URGENCIES, URGENCY_WEIGHTS[cat]):
                if w == 0 or (cat in PHYSICAL_ONLY and PRODUCTS[prod]["kind"] != "physical"):
                    continue
                assert cat == "feature_request" or any(
                    s[1] == cat and fits(prod, s[2]) and (s[3] is None or u in s[3]) for s in SCENARIOS), (cat, prod, u)
                assert any(cue_ok(c, cat, prod) for i, c in enumerate(CUES[u]) if i % CUE_PERIOD != CUE_PERIOD - 1)
    forms = [(pid, f.lower()) for pid, p in PRODUCTS.items() for f in p["forms"]]
    for pid, f in forms:
        assert not any(q != pid and (f in g or g in f) for q, g in forms), f"product form clash: {f}"


# ---------------------------------------------------------------- sampling helpers
class Picker:
    """Picks templates. Training rows never see held-out items; evaluation rows favour them (HELD_BIAS)."""

    def __init__(self, rng: random.Random, evaluation: bool):
        self.rng, self.evaluation, self.used_heldout = rng, evaluation, False

    def pick(self, items, period=SURFACE_PERIOD, keep=None):
        idx = [i for i in range(len(items)) if keep is None or keep(items[i])]
        held = [i for i in idx if i % period == period - 1]
        bias = HELD_BIAS[period]
        if not self.evaluation:
            i = self.rng.choice([i for i in idx if i % period != period - 1])
        elif held and self.rng.random() < bias:
            i = self.rng.choice(held)
        else:
            i = self.rng.choice(idx)
        self.used_heldout |= i % period == period - 1
        return items[i]


def slots(rng: random.Random, prod: str) -> dict:
    base = rng.choice([9.99, 14.99, 19.99, 29.99, 49.99, 79.0, 129.0, 199.0, 249.0])
    cur = rng.choice(["${:.2f}", "EUR {:.2f}", "{:.2f} GBP", "${:.2f}"])
    first, last = rng.choice(FIRST), rng.choice(LAST)
    c1, c2 = rng.sample(COLORS, 2)
    digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
    order = rng.choice([f"#A{digits(5)}", f"{digits(4)}-{digits(4)}", f"ORD-{digits(6)}", f"#{digits(7)}"])
    return dict(month=rng.choice(MONTHS), amount=cur.format(base * rng.choice([1.5, 2, 2.5, 3])),
                amount2=cur.format(base), order=order, code=rng.choice([f"E{digits(3)}", f"ERR-{digits(2)}"]),
                date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", days=rng.randint(4, 45),
                pct=rng.randrange(10, 95, 5), ver=f"{rng.randint(1, 6)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
                color=c1, color2=c2, city=rng.choice(CITIES), company=rng.choice(COMPANIES), last4=digits(4),
                email=f"{first.lower()}.{last.lower()}@{rng.choice(['example.com', 'mail.test', 'inbox.test'])}",
                cid=f"C-{digits(6)}", user=f"{first.lower()}{digits(2)}", n=rng.randint(2, 9), n3=digits(3),
                promo=rng.choice(["SAVE", "SPRING", "WELCOME", "VIP"]) + str(rng.randrange(10, 40, 5)),
                part=rng.choice(PRODUCTS[prod]["parts"] or ["manual"]), plan=PRODUCTS[prod]["plan"],
                name=PRODUCTS[prod]["name"], first=first, last=last)


def fits(prod: str, applies) -> bool:
    kind = PRODUCTS[prod]["kind"]
    return applies == "any" or applies == kind or (isinstance(applies, tuple) and prod in applies)


def cue_ok(cue, cat: str, prod: str) -> bool:
    _text, cats, physical = cue
    if cats is None:
        return True
    return cat in cats and (not physical or PRODUCTS[prod]["kind"] == "physical")


def cap1(s: str) -> str:
    return s[:1].upper() + s[1:]


def decap(s: str, form: str) -> str:
    return s if s.startswith(form) else s[:1].lower() + s[1:]


# ---------------------------------------------------------------- one message
def email(rng: random.Random, pk: Picker, cat: str, urg: str, sl: dict, issue: str, cue: str, distractor, past,
          detail) -> str:
    """An email: optional subject and greeting, opener and story, the issue among details (a distractor, a past
    issue), the urgency cue, closer and signature (the rng draws in the order that made the shipped data)."""
    body, long = [], rng.random() < 0.25        # a quarter of the emails are long, chatty ones
    if rng.random() < (0.8 if long else 0.3):
        body.append(pk.pick(OPENERS).format_map(sl))
    n_story = rng.choice([1, 2, 3] if long else [0, 0, 0, 1, 1, 2])
    body += [pk.pick(STORY).format_map(sl) for _ in range(n_story)]
    use_dis, dis_first = rng.random() < (0.35 if long else 0.15), rng.random() < 0.5
    if use_dis and dis_first:
        body.append(distractor())
    if rng.random() < (0.3 if long else 0.1):
        body.append(past())
    cue_first = rng.random() < 0.25
    if cue_first:
        body.append(cue)
    body.append(issue)
    body += [detail() for _ in range(rng.choice([2, 3] if long else [0, 1, 1, 1, 2]))]
    if use_dis and not dis_first:
        body.append(distractor())
    if not cue_first:
        body.append(cue)
    paras = [" ".join(body)]
    if len(body) > 3 and rng.random() < 0.5:
        k = rng.randint(1, len(body) - 1)
        paras = [" ".join(body[:k]), " ".join(body[k:])]
    if rng.random() < 0.75:
        closer = pk.pick(CLOSERS)
        if rng.random() < 0.5:
            paras[-1] += " " + closer
        else:
            paras.append(closer)
    name = sl["first"] if rng.random() < 0.5 else f"{sl['first']} {sl['last']}"
    sig = pk.pick(SIGNOFFS) + "\n" + name
    if rng.random() < 0.3:
        sig += "\n" + pk.pick(SIG_EXTRAS).format_map(sl)
    head = []
    if rng.random() < 0.35:
        subj = pk.pick(SUBJECTS[cat])
        if urg == "critical" and rng.random() < 0.5:
            subj = "URGENT - " + subj
        head.append("Subject: " + subj)
    head.append(pk.pick(GREETINGS))
    sep = rng.choice(["\n\n", "\n"])
    return "\n".join(head) + sep + sep.join(paras) + sep + sig


def compose(rng: random.Random, pk: Picker, cat: str, prod: str, urg: str):
    """Return (message, summary, protected strings) for one (category, product, urgency)."""
    info = PRODUCTS[prod]
    form = rng.choice(info["forms"])
    sl = slots(rng, prod)
    sl["P"] = form
    if cat == "feature_request":
        feat, featn = rng.choice(FEATURES[prod])
        issue = pk.pick(FR_FRAMES, CUE_PERIOD).format(P=form, feat=feat)
        summary = FR_SUMMARY.format(featn=featn, name=info["name"])
    else:
        cands = [s for s in SCENARIOS if s[1] == cat and fits(prod, s[2]) and (s[3] is None or urg in s[3])]
        sc = rng.choice(cands)
        issue = pk.pick(sc[5], CUE_PERIOD).format_map(sl)
        summary = sc[4].format_map(sl)
    style = rng.choices([s for s, _ in STYLES], [w for _, w in STYLES])[0]
    full_cues = [c[0] for c in CUES[urg]]
    keep_full = lambda text: cue_ok(CUES[urg][full_cues.index(text)], cat, prod)  # noqa: E731
    keep_short = lambda text: cat in SHORT_CUE_CATS.get(text, (cat,))  # noqa: E731
    short_ok = any(keep_short(c) for i, c in enumerate(CUES_SHORT[urg]) if i % CUE_PERIOD != CUE_PERIOD - 1)
    if style != "email" and rng.random() < 0.6 and short_ok:
        cue = pk.pick(CUES_SHORT[urg], CUE_PERIOD, keep_short)
    else:
        cue = pk.pick(full_cues, CUE_PERIOD, keep_full)
    others = [p for p in PRODUCTS if p != prod]
    q_form = rng.choice(PRODUCTS[rng.choice(others)]["forms"])
    distractor = lambda: pk.pick(DISTRACTORS).format(Q=q_form)  # noqa: E731  (lazy: only picked when used)
    past = lambda: pk.pick(PAST_ISSUES).format(  # noqa: E731
        X=PAST_TOPICS[rng.choice([c for c in CATEGORIES if c != cat])], **sl)
    detail = lambda: pk.pick(DETAILS[cat]).format_map(sl)  # noqa: E731
    protected = [form, q_form, cue]

    if style == "email":
        text = email(rng, pk, cat, urg, sl, issue, cue, distractor, past, detail)
    elif style == "chat":
        parts = []
        if rng.random() < 0.6:
            parts.append(pk.pick(CHAT_GREETINGS))
        if rng.random() < 0.12:
            parts.append(distractor())
        parts.append(decap(issue, form) if parts and rng.random() < 0.7 else issue)
        if rng.random() < 0.4:
            parts.append(detail())
        parts.append(cue)
        if rng.random() < 0.5:
            parts.append(pk.pick(CHAT_CLOSERS))
        text = " ".join(parts)
        if rng.random() < 0.3:
            text = text.replace(". ", " ").rstrip(".")
    else:  # terse
        parts = [issue, cue if cue[-1] in ".!?" else cap1(cue) + "."]
        if rng.random() < 0.3:
            parts.insert(0, pk.pick(SUBJECTS[cat]) + " -")
        if rng.random() < 0.4 or len(" ".join(parts).split()) < MIN_WORDS:
            parts.insert(-1, detail())
        text = " ".join(parts)
    lower_p = {"email": 0.05, "chat": 0.5, "terse": 0.3}[style]
    if rng.random() < lower_p:
        text = text.lower()
    return text, summary, protected


def protected_spans(text: str, protected: list[str]) -> list[tuple[int, int]]:
    spans = []
    low = text.lower()
    for s in protected:
        for m in re.finditer(re.escape(s.lower()), low):
            spans.append(m.span())
    for pat in ALL_MARKERS:
        spans += [m.span() for m in pat.finditer(text)]
    return spans


def free_words(text: str, spans) -> list[re.Match]:
    return [m for m in re.finditer(r"[A-Za-z]{4,}", text)
            if not any(a < m.end() and m.start() < b for a, b in spans)]


def add_noise(rng: random.Random, text: str, protected: list[str]) -> str:
    """Typos, ALL-CAPS bits and whitespace noise, never inside product names, cues or urgency markers."""
    if rng.random() < P_CAPS:
        words = free_words(text, protected_spans(text, protected))
        if words:
            m = rng.choice(words)
            text = text[:m.start()] + m.group().upper() + text[m.end():]
    if rng.random() < P_TYPO:
        for _ in range(rng.choice([1, 1, 2])):
            words = free_words(text, protected_spans(text, protected))
            if not words:
                break
            m = rng.choice(words)
            w, j = m.group(), rng.randint(1, len(m.group()) - 2)
            op = rng.choice(["swap", "drop", "double"])
            w = (w[:j] + w[j + 1] + w[j] + w[j + 2:] if op == "swap" else
                 w[:j] + w[j + 1:] if op == "drop" else w[:j] + w[j] + w[j:])
            text = text[:m.start()] + w + text[m.end():]
    if rng.random() < P_SPACE:
        spans = protected_spans(text, protected)
        gaps = [m.start() for m in re.finditer(r"(?<=\S) (?=\S)", text)
                if not any(a <= m.start() < b for a, b in spans)]
        for pos in sorted(rng.sample(gaps, min(len(gaps), rng.randint(1, 3))), reverse=True):
            text = text[:pos] + rng.choice(["  ", "   ", " \n", "\n"]) + text[pos + 1:]
    return text


# ---------------------------------------------------------------- planning and near-duplicate guard
def plan(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Balanced categories, realistic urgency mix per category, products balanced greedily (least used first)."""
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    rng.shuffle(cats)
    urg_for = {}
    for cat in CATEGORIES:
        k = cats.count(cat)
        raw = [w * k for w in URGENCY_WEIGHTS[cat]]
        counts = [int(r) for r in raw]
        for i in sorted(range(4), key=lambda i: (counts[i] - raw[i], i))[:k - sum(counts)]:
            counts[i] += 1
        pool = [u for u, c in zip(URGENCIES, counts) for _ in range(c)]
        rng.shuffle(pool)
        urg_for[cat] = pool
    used = Counter({p: 0 for p in PRODUCTS})
    rows = []
    for cat in cats:
        ok = [p for p in PRODUCTS if cat not in PHYSICAL_ONLY or PRODUCTS[p]["kind"] == "physical"]
        low = min(used[p] for p in ok)
        prod = rng.choice([p for p in ok if used[p] == low])
        used[prod] += 1
        rows.append((cat, prod, urg_for[cat].pop()))
    return rows


def shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)} or set(words) or {text}


def minhash(text: str) -> MinHash:
    m = MinHash(num_perm=128, seed=1)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


def max_sim(sig: np.ndarray, bank: list[np.ndarray]) -> float:
    return float((np.vstack(bank) == sig).mean(axis=1).max()) if bank else 0.0


def pipeline_text(row: dict) -> str:
    """The text chatdata/pipeline.py deduplicates on (Example.flat_text of an instruction row, no system prompt)."""
    return f"user: {row['instruction']}\n\n{row['input']}\nassistant: {row['output']}"


def generate(seed: int) -> tuple[dict, dict]:
    lint()
    out, stats = {}, {"heldout_rows": {}, "max_cross_j": 0.0, "max_train_j": 0.0, "retries": 0}
    train_bank, eval_bank, seen = [], [], set()
    for split, n in SPLITS.items():
        rng = random.Random(f"tickets/{seed}/{split}")
        evaluation = split != "train"
        lsh = MinHashLSH(threshold=PIPELINE_J, num_perm=128)   # replica of the training pipeline's dedup
        rows, held = [], 0
        for i, (cat, prod, urg) in enumerate(plan(rng, n)):
            for _attempt in range(500):
                pk = Picker(rng, evaluation)
                text, summary, protected = compose(rng, pk, cat, prod, urg)
                text = add_noise(rng, text, protected).strip()
                n_words = len(text.split())
                key = " ".join(text.lower().split())
                if not (MIN_WORDS <= n_words <= MAX_WORDS) or key in seen:
                    continue
                assert text.isascii() and levels_in(text) == {urg}, (urg, text)
                assert any(f.lower() in text.lower() for f in PRODUCTS[prod]["forms"]), text
                assert 6 <= len(summary.split()) <= 14, summary
                sig = minhash(text).hashvalues
                j_train = max_sim(sig, train_bank)
                if evaluation and (j_train >= CROSS_MAX_J or max_sim(sig, eval_bank) >= TRAIN_MAX_J):
                    stats["retries"] += 1
                    continue
                if not evaluation and j_train >= TRAIN_MAX_J:
                    stats["retries"] += 1
                    continue
                output = json.dumps({"category": cat, "product": prod, "urgency": urg, "summary": summary},
                                    separators=(", ", ": "), ensure_ascii=False)
                row = {"instruction": INSTRUCTION, "input": text, "output": output}
                flat = minhash(pipeline_text(row))
                if lsh.query(flat):
                    stats["retries"] += 1
                    continue
                lsh.insert(str(i), flat)
                break
            else:
                raise RuntimeError(f"could not generate a unique {split} row for {(cat, prod, urg)}")
            seen.add(key)
            (eval_bank if evaluation else train_bank).append(sig)
            if evaluation:
                stats["max_cross_j"] = max(stats["max_cross_j"], j_train)
            else:
                stats["max_train_j"] = max(stats["max_train_j"], j_train)
            held += pk.used_heldout
            rows.append(row)
        out[split] = rows
        stats["heldout_rows"][split] = held
    return out, stats


def write(out_dir: Path, data: dict) -> None:
    (out_dir / "tickets").mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        with open(out_dir / "tickets" / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def report(data: dict, stats: dict) -> None:
    for split, rows in data.items():
        labels = [json.loads(r["output"]) for r in rows]
        words = [len(r["input"].split()) for r in rows]
        print(f"\n{split}: {len(rows)} rows; message words min/median/max = "
              f"{min(words)}/{statistics.median(words):g}/{max(words)}; rows using a held-out template: "
              f"{stats['heldout_rows'][split]}")
        for field in ("category", "product", "urgency"):
            c = Counter(lab[field] for lab in labels)
            print(f"  {field:9s} " + ", ".join(f"{k}={v} ({100 * v / len(rows):.0f}%)" for k, v in sorted(c.items())))
    print(f"\nmax estimated Jaccard: validation/test vs train = {stats['max_cross_j']:.3f} "
          f"(limit < {CROSS_MAX_J}); train vs train = {stats['max_train_j']:.3f} (limit < {TRAIN_MAX_J}); "
          f"regenerated on collision: {stats['retries']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234,
                    help="random seed (default: 1234); the same seed always gives byte-identical files")
    ap.add_argument("--out", type=Path, default=HERE,
                    help="output folder (default: the folder this script is in, i.e. data/); files go to OUT/tickets/{train,validation,test}.jsonl")
    ap.add_argument("--quiet", action="store_true", help="do not print the summary (counts, label mix, lengths)")
    args = ap.parse_args(argv)
    data, stats = generate(args.seed)
    write(args.out, data)
    if not args.quiet:
        print(f"wrote {sum(map(len, data.values()))} rows to {args.out / 'tickets'}")
        report(data, stats)


if __name__ == "__main__":
    main()
