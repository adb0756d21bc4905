"""Next-token sampling: greedy, temperature and nucleus (top-p), with the token's log-probability."""
from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, params, rng: np.random.Generator) -> tuple[int, float]:
    """Next token (greedy at temperature 0, else temperature + nucleus sampling) and its log-probability under the
    model's unscaled distribution (a confidence signal for monitoring). float32 throughout and no full-vocabulary
    sort: this runs once per row per decode step."""
    logits = np.asarray(logits, dtype=np.float32)
    top = float(logits.max())
    logz = top + float(np.log(np.exp(logits - top).sum(dtype=np.float64)))
    temperature = np.float32(params.temperature)
    if temperature == 0:  # also a positive temperature under float32's range (1e-50): 0/0 would be NaN
        tok = int(np.argmax(logits))
        return tok, float(logits[tok]) - logz
    with np.errstate(over="ignore"):  # a tiny temperature sends unlikely tokens to -inf: probability 0
        p = np.exp((logits - top) / temperature)
    p /= p.sum(dtype=np.float64)
    if params.top_p < 1.0:
        keep = _nucleus(p, params.top_p)
        q = p[keep] / p[keep].sum(dtype=np.float64)
        tok = int(keep[rng.choice(len(keep), p=q)])
    else:
        tok = int(rng.choice(len(p), p=p))
    return tok, float(logits[tok]) - logz


def _nucleus(p: np.ndarray, top_p: float, first: int = 256) -> np.ndarray:
    """Indices of the smallest set of most probable tokens whose mass reaches top_p (ties broken by index). Sorts
    only the `first` most probable candidates unless they do not reach top_p."""
    n = len(p)
    k = min(first, n)
    while True:
        if k < n:
            cand = np.argpartition(-p, k - 1)[:k]
            order = cand[np.lexsort((cand, -p[cand]))]
        else:
            order = np.argsort(-p)
        cum = np.cumsum(p[order], dtype=np.float64)
        if cum[-1] >= top_p or k == n:
            return order[:int(np.searchsorted(cum, top_p)) + 1]
        k = n if k * 8 > n // 4 else k * 8  # a flat distribution: one full sort beats more partitions
