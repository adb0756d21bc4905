"""Drift: per-request features, the reference profile made at training time, and Evidently's default tests.

Features (one row per request):
- prompt_tokens: prompt length in tokens (the chat template applied, as the model sees it)
- output_tokens: generated tokens
- prompt_novel_token_rate: share of the prompt's tokens never seen in the reference prompts (vocabulary drift;
  another language or domain raises it)
- prompt_embedding_distance: cosine distance of the prompt's embedding to the reference centroid. The embedding is a
  signed hashed bag of words (lower-cased words and character 3-grams of words, 512 buckets, crc32: the same in
  every process, no model call, microseconds per prompt). It catches topic and language changes; it is not a
  semantic embedding (paraphrases with new words look different).
- output_logprob_mean: mean log-probability of the generated tokens under the model (confidence)
- finish_reason: stop / length / ... (categorical)

The vocabulary and the centroid come from the training prompts; the reference rows are held-out prompts (the
validation split) scored against them exactly like live ones, so a reference row never counts towards its own
vocabulary, and the reference describes unseen traffic (the demo data's held-out splits use phrasings training never
saw, which a reference made of training rows would flag as drift).

Tests, as Evidently chooses them by default (evidently.legacy.calculations.stattests.registry.get_default_stattest):
reference <= 1000 rows: numeric with > 5 distinct values: two-sample Kolmogorov-Smirnov; otherwise chi-squared
(> 2 categories) or a two-proportion Z-test (<= 2); drift when p < 0.05. Larger references: normed Wasserstein
distance (numeric) or Jensen-Shannon distance (categorical / few values); drift when >= 0.1. PSI (>= 0.1) on request.
Dataset drift when the share of drifting features is >= 0.5. scipy does the statistics.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ArtifactError

FILE = "drift_reference.json"
VERSION = 1
DIM = 512
NUMERIC = ("prompt_tokens", "output_tokens", "prompt_novel_token_rate", "prompt_embedding_distance",
           "output_logprob_mean")
CATEGORICAL = ("finish_reason",)
FEATURES = NUMERIC + CATEGORICAL
P_VALUE_METHODS = ("ks", "chisquare", "z")
_WORD = re.compile(r"\w+", re.UNICODE)


# ---------------------------------------------------------------- features
def embed(text: str, dim: int = DIM) -> np.ndarray:
    """Signed hashed bag of words and in-word character 3-grams, L2-normalised (zeros for text without words)."""
    v = np.zeros(dim, dtype=np.float64)
    for word in _WORD.findall(text.lower()):
        grams = [word] + [word[i:i + 3] for i in range(len(word) - 2)] if len(word) > 3 else [word]
        for g in grams:
            h = zlib.crc32(g.encode("utf-8"))
            v[h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    n = np.linalg.norm(v)
    return v / n if n else v


@dataclass
class Basis:
    """What prompt features are measured against: the reference vocabulary (token ids) and embedding centroid."""
    vocab: frozenset
    centroid: np.ndarray

    @classmethod
    def fit(cls, texts: list[str], ids: list[list[int]]) -> "Basis":
        vocab = frozenset(t for row in ids for t in row)
        c = np.mean([embed(t) for t in texts], axis=0) if texts else np.zeros(DIM)
        n = np.linalg.norm(c)
        return cls(vocab, c / n if n else c)

    def to_json(self) -> dict:
        return {"vocab": sorted(int(t) for t in self.vocab), "centroid": [round(float(x), 6) for x in self.centroid]}

    @classmethod
    def from_json(cls, d: dict) -> "Basis":
        return cls(frozenset(d["vocab"]), np.asarray(d["centroid"], dtype=np.float64))


def prompt_features(text: str, ids: list[int], basis: Basis) -> dict:
    novel = sum(1 for t in ids if t not in basis.vocab) / len(ids) if ids else 0.0
    e = embed(text)
    dist = 1.0 - float(e @ basis.centroid) if e.any() else 1.0
    return {"prompt_tokens": len(ids), "prompt_novel_token_rate": round(novel, 6),
            "prompt_embedding_distance": round(dist, 6)}


def output_features(n_tokens: int, logprob_sum: float | None, finish: str | None) -> dict:
    lp = round(logprob_sum / n_tokens, 6) if n_tokens and logprob_sum is not None else None
    return {"output_tokens": int(n_tokens), "output_logprob_mean": lp, "finish_reason": finish or "none"}


def prompt_text(messages_or_text) -> str:
    """The words a user sent: message contents joined (chat) or the prompt (completions)."""
    if isinstance(messages_or_text, str):
        return messages_or_text
    return "\n".join(str(m.get("content") or "") for m in messages_or_text)


# ---------------------------------------------------------------- the reference
@dataclass
class Reference:
    basis: Basis
    values: dict[str, list]  # feature -> reference values
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": VERSION, **self.meta, "embedding": {"method": "hashed words + char 3-grams, crc32",
                                                              "dim": DIM},
                "basis": self.basis.to_json(),
                "features": {f: {"kind": "numeric" if f in NUMERIC else "categorical", "values": self.values[f]}
                             for f in FEATURES}}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        path = Path(path)
        if path.is_dir():
            path = path / FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError("no drift reference here", file=path,
                                hint="training writes it (drift.enabled in the train config); re-run make train") from None
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"drift reference is not valid JSON: {exc}", file=path) from None
        if d.get("version") != VERSION:
            raise ArtifactError(f"drift reference version {d.get('version')} (this code reads {VERSION})",
                                file=path, field="version", hint="re-run make train")
        missing = [f for f in FEATURES if f not in d.get("features", {})]
        if missing:
            raise ArtifactError(f"drift reference lacks features {missing}", file=path, field="features")
        meta = {k: v for k, v in d.items() if k not in ("version", "embedding", "basis", "features")}
        return cls(Basis.from_json(d["basis"]), {f: d["features"][f]["values"] for f in FEATURES}, meta)


def build_reference(fit_prompts: list[tuple[str, list[int]]], prompts: list[tuple[str, list[int]]],
                    outputs: list[dict], meta: dict | None = None) -> Reference:
    """fit_prompts: (user text, prompt token ids) the vocabulary and the centroid are fitted on (the training
    prompts); prompts: the reference rows (held-out prompts, scored against that basis exactly like live ones);
    outputs: the model's answers on held-out prompts as dicts with n_tokens, logprob_sum, finish."""
    if not fit_prompts or len(prompts) < 2:
        raise ValueError(f"a drift reference needs training prompts and at least 2 reference prompts, got "
                         f"{len(fit_prompts)} and {len(prompts)}")
    basis = Basis.fit([t for t, _ in fit_prompts], [i for _, i in fit_prompts])
    values: dict[str, list] = {f: [] for f in FEATURES}
    for text, ids in prompts:
        for k, v in prompt_features(text, ids, basis).items():
            values[k].append(v)
    for o in outputs:
        for k, v in output_features(o["n_tokens"], o.get("logprob_sum"), o.get("finish")).items():
            if v is not None:
                values[k].append(v)
    return Reference(basis, values, dict(meta or {}, rows={f: len(v) for f, v in values.items()}))


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """(user text, prompt token ids) of chat messages, exactly as the service computes them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt_text(messages), tokenizer(text, add_special_tokens=False)["input_ids"]


def find_reference(folder: str | Path) -> Path | None:
    """The drift reference of a served model: in its folder, the folder above (a compress run holds one for its
    variants; a training artifact for its merged model), or up the manifests' parent links."""
    from core.artifacts import MANIFEST, parent_folder, read_manifest

    seen: set[Path] = set()
    todo = [Path(folder).resolve()]
    while todo and len(seen) < 16:
        f = todo.pop(0)
        for g in (f, f.parent):  # the folder itself, then the one holding it (a compress run, a training artifact)
            if g in seen:
                continue
            seen.add(g)
            if (g / FILE).is_file():
                return g / FILE
            if (g / MANIFEST).is_file():
                parent = parent_folder(read_manifest(g), g)
                if parent:
                    todo.append(parent)
    return None


# ---------------------------------------------------------------- statistics (Evidently's defaults, scipy)
def choose_method(kind: str, ref: list, method: str = "auto") -> str:
    n_unique = len(set(ref))
    if method == "psi" and kind == "numeric":
        return "psi"
    if len(ref) <= 1000:
        if kind == "numeric" and n_unique > 5:
            return "ks"
        return "chisquare" if n_unique > 2 else "z"
    if kind == "numeric" and n_unique > 5:
        return "wasserstein"
    return "jensenshannon"


def threshold(method: str) -> float:
    return 0.05 if method in P_VALUE_METHODS else 0.1


def score(method: str, ref: list, cur: list, kind: str) -> float:
    """The test's p-value (ks, chisquare, z) or distance (wasserstein, jensenshannon, psi)."""
    from scipy import spatial, stats

    if method == "ks":
        return float(stats.ks_2samp(np.asarray(ref, float), np.asarray(cur, float)).pvalue)
    if method == "wasserstein":
        r = np.asarray(ref, float)
        return float(stats.wasserstein_distance(r, np.asarray(cur, float)) / max(float(np.std(r)), 0.001))
    if method == "z":
        return _z_test(ref, cur)
    if method == "chisquare":
        keys = sorted(set(map(str, ref)) | set(map(str, cur)))
        rc = _counts(ref, keys)
        cc = _counts(cur, keys)
        expected = rc / rc.sum() * cc.sum()
        if np.any((expected == 0) & (cc > 0)):  # a category the reference never had
            return 0.0
        keep = expected > 0
        return float(stats.chisquare(cc[keep], expected[keep]).pvalue)
    r_p, c_p = _binned(ref, cur, kind)
    if method == "jensenshannon":
        return float(spatial.distance.jensenshannon(r_p, c_p))
    if method == "psi":
        return float(np.sum((c_p - r_p) * np.log(c_p / r_p)))
    raise ValueError(f"unknown drift method {method!r}")


def _counts(values: list, keys: list[str]) -> np.ndarray:
    s = [str(v) for v in values]
    return np.array([s.count(k) for k in keys], dtype=np.float64)


def _z_test(ref: list, cur: list) -> float:
    """Two-proportion Z-test on the share of the reference's most common value (Evidently's z_stat_test)."""
    from scipy import stats

    keys = sorted(set(map(str, ref)) | set(map(str, cur)))
    top = max(keys, key=lambda k: (sum(1 for v in ref if str(v) == k), k))
    n1, n2 = len(ref), len(cur)
    p1 = sum(1 for v in ref if str(v) == top) / n1
    p2 = sum(1 for v in cur if str(v) == top) / n2
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    if p in (0.0, 1.0):
        return 1.0
    z = (p1 - p2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    return float(2 * stats.norm.sf(abs(z)))


def _binned(ref: list, cur: list, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Share per bin (numeric: Sturges bins over both samples) or per category; empty bins get 1e-4 (Evidently)."""
    if kind == "numeric":
        r, c = np.asarray(ref, float), np.asarray(cur, float)
        edges = np.histogram_bin_edges(np.concatenate([r, c]), bins="sturges")
        rp = np.histogram(r, edges)[0] / len(r)
        cp = np.histogram(c, edges)[0] / len(c)
    else:
        keys = sorted(set(map(str, ref)) | set(map(str, cur)))
        rp, cp = _counts(ref, keys) / len(ref), _counts(cur, keys) / len(cur)
    return np.where(rp == 0, 1e-4, rp), np.where(cp == 0, 1e-4, cp)


def compare(reference: Reference, rows: list[dict], method: str = "auto", share: float = 0.5,
            min_rows: int = 30) -> dict:
    """Per-feature drift of `rows` (feature dicts) against the reference, and dataset drift."""
    out = []
    for f in FEATURES:
        kind = "numeric" if f in NUMERIC else "categorical"
        ref = reference.values[f]
        cur = [r[f] for r in rows if r.get(f) is not None]
        entry = {"name": f, "kind": kind, "reference_rows": len(ref), "current_rows": len(cur)}
        if len(ref) < 2 or len(cur) < min_rows:
            out.append(entry | {"method": None, "score": None, "threshold": None, "drift": None,
                                "skipped": f"needs {min_rows} current and 2 reference values"})
            continue
        m = choose_method(kind, ref, method)
        s = score(m, ref, cur, kind)
        t = threshold(m)
        drift = s < t if m in P_VALUE_METHODS else s >= t
        out.append(entry | {"method": m, "score": round(s, 6), "threshold": t, "drift": bool(drift),
                            "reference_mean": _mean(ref, kind), "current_mean": _mean(cur, kind)})
    tested = [e for e in out if e["drift"] is not None]
    drifted = sum(1 for e in tested if e["drift"])
    frac = drifted / len(tested) if tested else 0.0
    return {"features": out, "drift_share": round(frac, 4), "share_threshold": share,
            "dataset_drift": bool(tested) and frac >= share, "drifted_features": drifted,
            "tested_features": len(tested)}


def _mean(values: list, kind: str):
    if kind == "numeric":
        return round(float(np.mean(np.asarray(values, float))), 4)
    keys = sorted(set(map(str, values)))
    return {k: round(float(_counts(values, [k])[0]) / len(values), 4) for k in keys}
