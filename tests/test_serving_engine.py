"""The continuous-batching engine on the tiny model: batched decoding (sequences joining mid-flight, left-padded KV
caches) gives the same greedy tokens as transformers' own generate; limits, stops, cancellation, failures."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from serving_fixtures import collect
from serving.engine import Engine, EngineGenerator, Overloaded, Params, Request
from serving.sampling import sample

PROMPTS = ["Hello there", "My order arrived broken and I want a refund, what can I do about it today?",
           "Where is my parcel?", "Cancel my subscription please, I was charged twice this month for the same plan"]
NEW = 12


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


SYSTEM = "You are a support assistant. Answer with one JSON object holding the category, product and urgency. "


def _prompts(shared: bool) -> list[str]:
    return [SYSTEM + p if shared else p for p in PROMPTS]


def _reference(tiny_model_dir, tokenizer, prompts) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time: an independent implementation to match."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([_ids(tokenizer, p)])
            g = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(g[0, ids.shape[1]:].tolist())
    return out


def _backend(kind: str, tiny_model_dir, onnx_dir):
    if kind == "onnxruntime":
        from serving.backends.onnx import OnnxBackend
        return OnnxBackend(onnx_dir, threads=1)
    from serving.backends.hf import HFBackend
    return HFBackend(tiny_model_dir, threads=1)


async def _staggered(engine: Engine, tokenizer, prompts) -> list[Request]:
    """Submit the prompts one after another while earlier ones are mid-generation, so rows join a running batch
    with a different cache length (left padding both ways) and leave it at different times."""
    loop = asyncio.get_running_loop()
    reqs = []
    for i, p in enumerate(prompts):
        r = Request(f"r{i}", _ids(tokenizer, p), Params(max_tokens=NEW - i, temperature=0), loop, {})
        engine.submit(r)
        reqs.append(r)
        while len(r.generated) < 2 and r.finish is None:  # let it run a few steps before the next one joins
            await asyncio.sleep(0.005)
    for r in reqs:
        while (await r.events.get()).finish is None:
            pass
    return reqs


@pytest.mark.parametrize("kind, shared", [("transformers", False), ("onnxruntime", False), ("transformers", True),
                                          ("onnxruntime", True)])
def test_batched_greedy_tokens_equal_transformers_generate(kind, shared, tiny_model_dir, tiny_onnx_dir, tokenizer):
    """With `shared`, the prompts start with the same system prompt: all but the first reuse its KV from the prefix
    cache and prefill only their own tokens."""
    prompts = _prompts(shared)
    engine = Engine(_backend(kind, tiny_model_dir, tiny_onnx_dir), tokenizer, eos_ids=set(), max_running=4,
                    prefix_cache_mb=64 if shared else 0).start()
    try:
        reqs = asyncio.run(_staggered(engine, tokenizer, prompts))
    finally:
        engine.stop()
    ref = _reference(tiny_model_dir, tokenizer, prompts)
    for i, r in enumerate(reqs):
        assert r.finish == "length"
        assert r.generated == ref[i][:NEW - i], f"prompt {i}"
    assert engine.steps < sum(NEW - i for i in range(len(PROMPTS)))  # decode steps were shared
    cached = [r.cached_tokens for r in reqs]
    if shared:
        system = len(_ids(tokenizer, SYSTEM))
        assert cached[0] == 0 and all(system - 16 < c <= system for c in cached[1:]), cached
    else:
        assert cached == [0] * len(reqs)


def test_stop_sequence_cuts_text_and_eos_finishes(tiny_model_dir, tokenizer):
    from serving.backends.hf import HFBackend
    backend = HFBackend(tiny_model_dir, threads=1)
    ids = _ids(tokenizer, PROMPTS[1])
    full = Engine(backend, tokenizer, eos_ids=set()).start()
    try:
        gen = EngineGenerator(full)
        text, finish, n = asyncio.run(collect(gen, ids, Params(max_tokens=10, temperature=0)))
        assert finish == "length" and n == 10 and text
        stop = text[3:6]
        cut, finish2, _ = asyncio.run(collect(gen, ids, Params(max_tokens=10, temperature=0, stops=[stop])))
        assert finish2 == "stop" and cut == text[:text.find(stop)] and stop not in cut
    finally:
        full.stop()
    n_ids = len(ids)
    logits, _ = backend.forward(np.array([ids]), np.ones((1, n_ids), np.int64), np.arange(n_ids)[None], None)
    first_tok = int(np.argmax(logits[0]))
    eos = Engine(backend, tokenizer, eos_ids={first_tok}).start()  # the first token it will pick is "EOS"
    try:
        text3, finish3, n3 = asyncio.run(collect(EngineGenerator(eos), ids, Params(max_tokens=10, temperature=0)))
    finally:
        eos.stop()
    assert (text3, finish3, n3) == ("", "stop", 0)


def test_seeded_sampling_is_reproducible_and_top_p_narrows():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    p = Params(max_tokens=1, temperature=1.0, top_p=1.0, seed=7)
    a = [sample(logits, p, np.random.default_rng(7))[0] for _ in range(5)]
    assert a == [sample(logits, p, np.random.default_rng(7))[0] for _ in range(5)]
    narrow = Params(max_tokens=1, temperature=1.0, top_p=1e-6)
    rng = np.random.default_rng(1)
    assert {sample(logits, narrow, rng)[0] for _ in range(20)} == {int(np.argmax(logits))}
    tok, lp = sample(logits, Params(max_tokens=1, temperature=0), rng)
    expected = logits[tok] - np.log(np.exp(logits.astype(np.float64)).sum())
    assert tok == int(np.argmax(logits)) and lp == pytest.approx(expected, abs=1e-6)


class _Slow:
    """A backend wrapper that sleeps per forward, so tests can catch requests mid-flight."""

    def __init__(self, inner, delay=0.05, fail_on: int | None = None):
        self.inner, self.delay, self.fail_on, self.name = inner, delay, fail_on, "slow"

    def forward(self, ids, mask, pos, past, **kw):
        import time
        time.sleep(self.delay)
        if self.fail_on is not None and ids.shape[1] > 1 and int(ids[0, 0]) == self.fail_on:
            raise RuntimeError("boom")
        return self.inner.forward(ids, mask, pos, past, **kw)


def test_overload_cancel_and_a_failing_request_leave_the_engine_running(tiny_model_dir, tokenizer):
    from serving.backends.hf import HFBackend
    bad_first = _ids(tokenizer, "poison")[0]
    engine = Engine(_Slow(HFBackend(tiny_model_dir, threads=1), fail_on=bad_first), tokenizer, eos_ids=set(),
                    max_running=1, max_waiting=1).start()

    async def scenario():
        loop = asyncio.get_running_loop()
        long = Request("a", _ids(tokenizer, PROMPTS[0]), Params(max_tokens=200, temperature=0), loop, {})
        queued = Request("b", _ids(tokenizer, PROMPTS[2]), Params(max_tokens=2, temperature=0), loop, {})
        engine.submit(long)
        engine.submit(queued)
        with pytest.raises(Overloaded):
            engine.submit(Request("c", [1, 2], Params(max_tokens=2), loop, {}))
        while len(long.generated) < 3:
            await asyncio.sleep(0.01)
        engine.cancel(long)  # what a client disconnect does
        events = []
        while not events or events[-1].finish is None:
            events.append(await long.events.get())
        assert events[-1].finish == "abort" and len(long.generated) < 200
        while (await queued.events.get()).finish is None:
            pass
        assert queued.finish == "length" and len(queued.generated) == 2
        poison = Request("p", _ids(tokenizer, "poison pill"), Params(max_tokens=3, temperature=0), loop, {})
        engine.submit(poison)
        ev = await poison.events.get()
        while ev.finish is None:
            ev = await poison.events.get()
        assert ev.finish == "abort" and "RuntimeError: boom" in ev.error
        after = Request("z", _ids(tokenizer, PROMPTS[0]), Params(max_tokens=3, temperature=0), loop, {})
        engine.submit(after)
        while (await after.events.get()).finish is None:
            pass
        assert after.finish == "length" and len(after.generated) == 3

    try:
        asyncio.run(scenario())
        deadline = time.time() + 5  # the engine thread drops a finished request from its batch after its last event
        while engine.load != (0, 0) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.load == (0, 0)
    finally:
        engine.stop()


def test_prefix_cache_reuses_whole_blocks_leaves_a_token_and_evicts_oldest():
    from serving.kvcache import PrefixCache

    def kv(n, fill):  # one layer's key and value for n tokens, batch 1
        return [np.full((1, 2, n, 4), fill, np.float32), np.full((1, 2, n, 4), -fill, np.float32)]

    block_bytes = 2 * 2 * 4 * 4 * 4  # k + v for one 4-token block
    cache = PrefixCache(max_bytes=3 * block_bytes, block=4)
    a = list(range(10))
    cache.store(a, kv(10, 1.0))  # 2 complete blocks
    n, past = cache.lookup(a)
    assert n == 8 and past[0].shape == (1, 2, 8, 4) and (past[1] == -1.0).all()
    assert cache.lookup(a[:8])[0] == 4  # one token must stay to be run
    assert cache.lookup([99] + a[1:])[0] == 0  # a different first block matches nothing after it
    b = [7, 7, 7, 7, 8, 8, 8, 8, 9]
    cache.store(b, kv(9, 2.0))  # 2 more blocks: over the budget, the least recently used go
    assert cache.bytes <= 3 * block_bytes
    assert cache.lookup(b)[0] == 8


def test_nucleus_matches_a_full_sort():
    from serving.sampling import _nucleus
    for seed in range(30):
        g = np.random.default_rng(seed)
        z = g.normal(size=3000) * g.uniform(0.5, 8)  # flat to peaked distributions
        q = np.exp(z - z.max())
        q /= q.sum()
        top_p = g.uniform(0.1, 0.99)
        order = np.argsort(-q)
        ref = order[:np.searchsorted(np.cumsum(q[order]), top_p) + 1]
        assert sorted(_nucleus(q, top_p, first=16).tolist()) == sorted(ref.tolist()), seed
