"""Near-duplicate judgement shared by the de-duplication, the leakage check and the augmentation's filter: the
MinHash of a text's word 3-grams (datasketch)."""
from __future__ import annotations

import re


def _shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text)
    if len(words) < 3:
        return set(words) or {text}
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def minhash(text: str, lower: bool = True):
    """The MinHash (128 permutations, datasketch) of a text's word 3-grams (lower-cased unless `lower` is False):
    what near duplicates are judged by."""
    from datasketch import MinHash

    mh = MinHash(num_perm=128, seed=1)
    mh.update_batch([s.encode() for s in _shingles(text.lower() if lower else text)])
    return mh
