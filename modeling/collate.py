"""Batches for training and loss evaluation, and the answer-only loss.

Packing: a micro-batch's examples go into as few rows as fit in `max_len` (first-fit decreasing). Each row gets
positions that restart at 0 per example and a block-diagonal causal mask, so no token attends across examples
(reset position_ids alone do not isolate examples with sdpa in transformers 4.57; the 4D mask does, exactly).

Answer-only loss: the LM head (576 x 49152 for SmolLM2, a fifth of the FLOPs) is applied only at positions whose next
token is an answer token, instead of materialising logits for the whole sequence.

Loss weights: when the features carry a per-example "weight", the batch's `loss_weights` gives each token its
example's weight and the answer loss sums weight x cross-entropy (the answer-token count, which normalises it, stays
unweighted).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """First-fit decreasing bin packing of example indices into rows of at most max_len tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def common_prefix(ids: list[list[int]], limits: list[int], min_len: int) -> int:
    """Length of the token prefix common to all sequences, at most limits[i] for each; 0 when shorter than min_len
    or when there is a single sequence."""
    if len(ids) < 2:
        return 0
    first, n = ids[0], min(limits)
    for x in ids[1:]:
        n = min(n, len(x))
        for j in range(n):
            if x[j] != first[j]:
                n = j
                break
    return n if n >= min_len else 0


def shared_prefix(ids: list[list[int]], labels: list[list[int]], min_len: int) -> int:
    """The common prefix that is safe to compute once: it ends at least one token before the first answer token of
    every example (so every predicted position lies after it)."""
    answer = [next((j for j, t in enumerate(y) if t != -100), len(y)) - 1 for y in labels]
    return common_prefix(ids, answer, min_len)


def _weights(features: list[dict]) -> torch.Tensor | None:
    """The examples' loss weights (1.0 for a feature without one), or None when no feature has a "weight"."""
    if not any("weight" in f for f in features):
        return None
    return torch.tensor([float(f.get("weight", 1.0)) for f in features], dtype=torch.float32)


class Collator:
    """Collates tokenized examples into a batch for `answer_loss`.

    pack: examples share rows (first-fit decreasing) with a block-diagonal mask and positions restarting per example.
    share_prefix: the token prefix common to the whole batch (a fixed system prompt or instruction) is returned once as
    `prefix_ids` and computed once per batch instead of once per example; every example attends to it. Exact: the
    same keys, values and positions as computing it per example.
    """

    def __init__(self, pad_id: int, max_len: int, pack: bool = True, share_prefix: bool = False,
                 min_prefix: int = 8, mask_dtype=torch.float32):
        self.pad_id, self.max_len, self.pack, self.mask_dtype = pad_id, max_len, pack, mask_dtype
        self.share_prefix, self.min_prefix = share_prefix, min_prefix

    def __call__(self, features: list[dict]) -> dict:
        ids = [list(f["input_ids"]) for f in features]
        labels = [[-100] + list(f["labels"][1:]) for f in features]  # a sequence's first token is never predicted
        n_tokens = torch.tensor(sum(len(x) for x in ids))
        p = shared_prefix(ids, labels, self.min_prefix) if self.share_prefix else 0
        if not self.pack and not p:
            batch, owner = self._padded(ids, labels, n_tokens)
        else:
            batch, owner = self._rows(ids, labels, p, n_tokens)
        weights = _weights(features)
        if weights is not None:  # each token carries its example's weight; padding (owner -1) gets 0
            batch["loss_weights"] = torch.cat([weights, torch.zeros(1)])[owner]
        return batch

    def _padded(self, ids: list[list[int]], labels: list[list[int]],
                n_tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """One example per row, right-padded; also each token's example index (-1 for padding)."""
        width = max(len(x) for x in ids)
        pad = [width - len(x) for x in ids]
        batch = {
            "input_ids": torch.tensor([x + [self.pad_id] * q for x, q in zip(ids, pad)]),
            "labels": torch.tensor([y + [-100] * q for y, q in zip(labels, pad)]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * q for x, q in zip(ids, pad)]),
            "n_tokens": n_tokens,
        }
        return batch, torch.tensor([[i] * len(x) + [-1] * q for i, (x, q) in enumerate(zip(ids, pad))])

    def _rows(self, ids: list[list[int]], labels: list[list[int]], p: int,
              n_tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Packed rows (or one example per row) with a 4D mask, less the shared prefix of p tokens; also each token's
        example index (-1 for padding)."""
        prefix, ids, labels = ids[0][:p], [x[p:] for x in ids], [y[p:] for y in labels]
        rows = _pack([len(x) for x in ids], self.max_len - p) if self.pack else [[i] for i in range(len(ids))]
        width = max(sum(len(ids[i]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id)
        lab = torch.full((len(rows), width), -100)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        owner = torch.full((len(rows), width), -1)  # the example each token belongs to; -1 = padding
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(ids[i])
                input_ids[r, at:at + n] = torch.tensor(ids[i])
                lab[r, at:at + n] = torch.tensor(labels[i])
                pos[r, at:at + n] = torch.arange(p, p + n)
                owner[r, at:at + n] = i
                at += n
        same = owner[:, :, None] == owner[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = (same & causal) & (owner[:, :, None] >= 0)
        allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no all-masked rows)
        if p:  # every token also sees the whole shared prefix
            allowed = torch.cat([torch.ones(len(rows), width, p, dtype=torch.bool), allowed], dim=2)
        mask = torch.zeros(allowed.shape, dtype=self.mask_dtype).masked_fill_(~allowed,
                                                                              torch.finfo(self.mask_dtype).min)
        batch = {"input_ids": input_ids, "labels": lab, "position_ids": pos, "attention_mask": mask[:, None],
                 "n_tokens": n_tokens}
        if p:
            batch["prefix_ids"] = torch.tensor([prefix])
        return batch, owner


def prefix_cache(decoder, prefix_ids: torch.Tensor, batch_size: int):
    """Run the shared prefix once and return a DynamicCache holding its keys/values for `batch_size` rows."""
    from transformers import DynamicCache

    out = decoder(input_ids=prefix_ids, use_cache=True).past_key_values
    cache = DynamicCache()
    for i, layer in enumerate(out.layers):
        cache.update(layer.keys.expand(batch_size, -1, -1, -1), layer.values.expand(batch_size, -1, -1, -1), i)
    return cache


def decoder_and_head(model):
    """The transformer body and the LM head of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _summed_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of the rows of `logits`, each term times its weight when there are weights."""
    if weights is None:
        return F.cross_entropy(logits, target, reduction="sum")
    return (F.cross_entropy(logits, target, reduction="none") * weights.to(logits)).sum()


def answer_loss(model, batch: dict, fast: bool = True) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens (each times its `loss_weights` entry, when the batch has them) and
    their count (unweighted).

    fast=True runs the decoder and applies the LM head only where the next token is an answer token. fast=False goes
    through the model's own forward (needed by methods that change it: prefix / prompt / p-tuning, AdaLoRA) and
    does not accept a shared prefix.
    """
    labels = batch["labels"]
    if not fast and "prefix_ids" in batch:
        raise ValueError("a batch with a shared prefix needs fast=True")
    target = labels[:, 1:]
    keep = target != -100
    n = int(keep.sum())
    weights = batch["loss_weights"][:, 1:][keep] if "loss_weights" in batch else None
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if fast:
        decoder, head = decoder_and_head(model)
        if "prefix_ids" in batch:
            kwargs["past_key_values"] = prefix_cache(decoder, batch["prefix_ids"], labels.shape[0])
        hidden = decoder(**kwargs, use_cache=False).last_hidden_state[:, :-1]
        logits = head(hidden[keep]).float()
        return _summed_ce(logits, target[keep], weights), n
    out = model(**kwargs, use_cache=False)
    logits = out.logits[:, -labels.shape[1]:][:, :-1]  # prompt-learning methods prepend virtual tokens
    return _summed_ce(logits[keep].float(), target[keep], weights), n
