"""The exploratory part of the data report: what a practitioner looks at before training.

- label fields: for JSON answers, every field whose values look like labels (in at least half the rows, at most
  MAX_LABELS distinct values and at most one per two rows): its value counts per split and how far each split's distribution is from training's
  (total variation distance, 0: the same mix, 1: disjoint);
- the most common word bigrams and trigrams of the training prompts (not those of a shared instruction);
- leakage: validation or test rows whose prompt is also in the training split, exactly or as a near duplicate (MinHash
  LSH on word 3-grams, like the pipeline's de-duplication);
- personal data in the rows (chatdata/pii.py: e-mails, card numbers, phone numbers, IPs): counts per split and the
  rows, never the values.
Token lengths per split are the data report's own table (pipeline.length_stats)."""
from __future__ import annotations

import json
import re
from collections import Counter

from . import pii
from .files import Example
from .similarity import minhash

MAX_LABELS = 32
TOP_NGRAMS = 15
SPLITS = ("train", "validation", "test")


def prompt_text(ex: Example) -> str:
    """What a model is asked: the messages before the last answer (raw text rows: the whole text)."""
    if ex.messages is None:
        return ex.text
    return "\n".join(m["content"] for m in ex.prompt_messages())


def _answer_fields(ex: Example) -> dict | None:
    if ex.messages is None:
        return None
    try:
        value = json.loads(ex.reference())
    except (ValueError, IndexError):
        return None
    return value if isinstance(value, dict) else None


def label_fields(splits: dict[str, list[Example]]) -> dict:
    """{field: {"splits": {split: {value: count}}, "distance": {split: TV distance to train}}} for label-like fields."""
    parsed = {s: [f for f in (_answer_fields(ex) for ex in rows) if f is not None] for s, rows in splits.items()}
    total = sum(len(rows) for rows in splits.values())
    counts: dict[str, dict[str, Counter]] = {}
    for split, rows in parsed.items():
        for row in rows:
            for key, value in row.items():
                if isinstance(value, (str, int, bool)) and not isinstance(value, float):
                    counts.setdefault(key, {s: Counter() for s in splits})[split][str(value)] += 1
    out = {}
    for key, by_split in counts.items():
        values = set().union(*by_split.values())
        n = sum(sum(c.values()) for c in by_split.values())
        if len(values) > min(MAX_LABELS, n / 2) or n < total / 2:  # free text (values rarely repeat) or a rare key
            continue
        train = _shares(by_split.get("train", Counter()))
        out[key] = {"splits": {s: dict(sorted(c.items())) for s, c in by_split.items()},
                    "distance": {s: round(_tv(train, _shares(c)), 4) for s, c in by_split.items()
                                 if s != "train" and c and train}}
    return out


def _shares(c: Counter) -> dict[str, float]:
    n = sum(c.values())
    return {k: v / n for k, v in c.items()} if n else {}


def _tv(a: dict[str, float], b: dict[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def top_ngrams(rows: list[Example], n: int, top: int = TOP_NGRAMS) -> list[tuple[str, int]]:
    """The most common word n-grams of the prompts, leaving out those in more than half the rows (a shared
    instruction or template: every row says it)."""
    counts: Counter = Counter()
    rows_with: Counter = Counter()
    for ex in rows:
        words = re.findall(r"\w+", prompt_text(ex).lower())
        grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        counts.update(grams)
        rows_with.update(set(grams))
    return [(g, c) for g, c in counts.most_common() if rows_with[g] <= len(rows) / 2][:top]


def leakage(splits: dict[str, list[Example]], threshold: float) -> list[dict]:
    """Validation / test rows whose prompt is in the training split: exact (same text) or near (estimated Jaccard
    similarity of word 3-grams >= threshold); each with the training row it matches."""
    from datasketch import MinHashLSH


    train = splits.get("train", [])
    exact = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    hashes = []
    for i, ex in enumerate(train):
        text = prompt_text(ex)
        exact.setdefault(text, ex.source)
        hashes.append(minhash(text))
        lsh.insert(str(i), hashes[-1])
    found = []
    for split in ("validation", "test"):
        for ex in splits.get(split, []):
            text = prompt_text(ex)
            if text in exact:
                found.append({"split": split, "row": ex.source, "train_row": exact[text], "kind": "exact",
                              "similarity": 1.0})
                continue
            mh = minhash(text)
            hits = lsh.query(mh)
            if hits:
                best = max(hits, key=lambda h: mh.jaccard(hashes[int(h)]))
                found.append({"split": split, "row": ex.source, "train_row": train[int(best)].source, "kind": "near",
                              "similarity": round(mh.jaccard(hashes[int(best)]), 3)})
    return found


def personal_data(splits: dict[str, list[Example]]) -> dict:
    """{"counts": {split: {kind: rows}}, "rows": [{split, row, kinds}]}: rows holding personal data, not the data."""
    counts = {s: Counter() for s in splits}
    rows = []
    for split, examples in splits.items():
        for ex in examples:
            found = pii.kinds(ex.flat_text())
            if found:
                counts[split].update(found)
                rows.append({"split": split, "row": ex.source, "kinds": found})
    return {"counts": {s: dict(c) for s, c in counts.items()}, "rows": rows}


def explore(splits: dict[str, list[Example]], near_threshold: float) -> dict:
    train = splits.get("train", [])
    return {"fields": label_fields(splits), "ngrams": {"bigrams": top_ngrams(train, 2), "trigrams": top_ngrams(train, 3)},
            "leakage": leakage(splits, near_threshold), "pii": personal_data(splits)}


def markdown(eda: dict) -> list[str]:
    """The exploratory sections of data_report.md."""
    lines = []
    for key, f in eda["fields"].items():
        splits = [s for s, c in f["splits"].items() if c]
        values = sorted(set().union(*(f["splits"][s] for s in splits)))
        lines += ["", f"## Field `{key}`", "", "| value | " + " | ".join(splits) + " |",
                  "|---|" + "---|" * len(splits)]
        for v in values:
            cells = []
            for s in splits:
                n = sum(f["splits"][s].values())
                c = f["splits"][s].get(v, 0)
                cells.append(f"{c} ({c / n:.0%})")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        if f["distance"]:
            lines.append("\nDistance from the training mix (total variation): " + ", ".join(
                f"{s} {d:.3f}" for s, d in f["distance"].items()))
    for name in ("bigrams", "trigrams"):
        if eda["ngrams"][name]:
            lines += ["", f"## Most common prompt {name} (train)", "",
                      ", ".join(f"`{g}` {c}" for g, c in eda["ngrams"][name])]
    leaks = eda["leakage"]
    lines += ["", f"## Leakage: {len(leaks)} validation / test rows also in the training split", ""]
    lines += [f"- {x['row']} [{x['split']}] {x['kind']} duplicate ({x['similarity']:.2f}) of {x['train_row']}"
              for x in leaks[:50]]
    found = eda["pii"]
    total = sum(sum(c.values()) for c in found["counts"].values())
    lines += ["", f"## Personal data: {len(found['rows'])} rows", ""]
    if total:
        lines += ["| split | " + " | ".join(pii.PATTERNS) + " |", "|---|" + "---|" * len(pii.PATTERNS)]
        lines += [f"| {s} | " + " | ".join(str(c.get(k, 0)) for k in pii.PATTERNS) + " |"
                  for s, c in found["counts"].items()]
        lines += [""] + [f"- {r['row']} [{r['split']}]: {', '.join(r['kinds'])}" for r in found["rows"][:20]]
    return lines


def plot(eda: dict, path) -> bool:
    """Value shares of each label field per split (one panel per field); False when there is no label field."""
    fields = eda["fields"]
    if not fields:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(fields), 1, figsize=(9, 2.6 * len(fields)), squeeze=False)
    for ax, (key, f) in zip(axes[:, 0], fields.items()):
        splits = [s for s, c in f["splits"].items() if c]
        values = sorted(set().union(*(f["splits"][s] for s in splits)))
        width = 0.8 / max(len(splits), 1)
        for i, s in enumerate(splits):
            n = sum(f["splits"][s].values())
            ax.bar([j + i * width for j in range(len(values))], [f["splits"][s].get(v, 0) / n for v in values],
                   width, label=s)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(values))], values, rotation=20, fontsize=8)
        ax.set_ylabel("share")
        ax.set_title(f"{key}: value shares per split", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
