"""KV caches for the engine: the running batch's shared, left-padded cache and the prefix cache across requests.

Caches are lists of numpy arrays [k0, v0, k1, v1, ...], each (batch, kv_heads, length, head_dim).
"""
from __future__ import annotations

import collections

import numpy as np


class Batch:
    """The running sequences with their shared, left-padded KV cache."""

    def __init__(self):
        self.reqs: list = []
        self.past: list[np.ndarray] | None = None
        self.mask: np.ndarray | None = None  # (B, L) int64, 1 = real token
        self.next_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.reqs)

    def add(self, req, past: list[np.ndarray], next_id: int) -> None:
        length = past[0].shape[2]
        mask = np.ones((1, length), dtype=np.int64)
        if self.past is None:
            self.past, self.mask = past, mask
        else:
            width = max(length, self.mask.shape[1])
            self.past = [np.concatenate([_pad_left(a, width), _pad_left(b, width)], axis=0)
                         for a, b in zip(self.past, past)]
            self.mask = np.concatenate([_pad_left_2d(self.mask, width), _pad_left_2d(mask, width)], axis=0)
        self.reqs.append(req)
        self.next_ids.append(next_id)

    def keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.reqs):
            return
        if not rows:
            self.__init__()
            return
        idx = np.asarray(rows)
        self.reqs = [self.reqs[i] for i in rows]
        self.next_ids = [self.next_ids[i] for i in rows]
        self.mask = self.mask[idx]
        lead = int(np.argmax(self.mask.any(axis=0)))  # columns that are padding in every row
        self.mask = self.mask[:, lead:]
        self.past = [np.ascontiguousarray(a[idx, :, lead:]) for a in self.past]


def _pad_left(a: np.ndarray, width: int) -> np.ndarray:
    n = width - a.shape[2]
    if n == 0:
        return a
    pad = np.zeros(a.shape[:2] + (n,) + a.shape[3:], dtype=a.dtype)
    return np.concatenate([pad, a], axis=2)


def _pad_left_2d(m: np.ndarray, width: int) -> np.ndarray:
    n = width - m.shape[1]
    return m if n == 0 else np.concatenate([np.zeros((m.shape[0], n), dtype=m.dtype), m], axis=1)


class PrefixCache:
    """Automatic prefix caching (as vLLM's): the KV cache of prompt blocks (`block` tokens each), keyed by a hash
    chained over the blocks before them, so a new prompt that starts like an earlier one (the same system prompt, a
    conversation's earlier turns) only prefills what is new. Least recently used blocks go first beyond `max_bytes`.
    Reuse is exact: a causal model's keys and values for a prefix do not depend on what follows it."""

    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()
        self.bytes = 0

    def _hashes(self, ids: list[int], n_blocks: int):
        h = 0
        for b in range(n_blocks):
            h = hash((h, tuple(ids[b * self.block:(b + 1) * self.block])))
            yield b, h

    def lookup(self, ids: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """(number of leading prompt tokens whose KV is cached, that KV); at least one token is left to run."""
        found = []
        for _, h in self._hashes(ids, (len(ids) - 1) // self.block):
            entry = self.blocks.get(h)
            if entry is None:
                break
            self.blocks.move_to_end(h)
            found.append(entry)
        if not found:
            return 0, None
        return len(found) * self.block, [np.concatenate([f[j] for f in found], axis=2) for j in range(len(found[0]))]

    def store(self, ids: list[int], past: list[np.ndarray]) -> None:
        """Keep the complete blocks of a prompt whose KV (batch 1, covering exactly `ids`) was just computed."""
        for b, h in self._hashes(ids, len(ids) // self.block):
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            entry = [np.ascontiguousarray(a[:, :, b * self.block:(b + 1) * self.block]) for a in past]
            self.blocks[h] = entry
            self.bytes += sum(e.nbytes for e in entry)
        while self.bytes > self.max_bytes and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= sum(e.nbytes for e in old)
