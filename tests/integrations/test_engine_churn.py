"""Churn on a small pool (CPU, numpy backend, a tiny model): a hypothesis state machine of
add / step / abort / fork (n > 1) / trim with exact block accounting after every operation and
every finished request equal to its isolated greedy run; then a soak of thousands of requests
with flat RSS (as tests/reliability/test_soak.py does for the kernels)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
import mlx.core as mx  # noqa: E402
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,  # noqa: E402
                                 rule)

from paged_attention.integrations import mlx_lm as pl  # noqa: E402
from paged_attention.lab.soak import MB, rss_bytes, settle  # noqa: E402

CONFIG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
              vocab_size=64, max_position_embeddings=4096, rope_theta=10000.0,
              tie_word_embeddings=True)
VOCAB = CONFIG["vocab_size"]
MAX_NEW = 8
# Prompts start with one of these (or nothing), so the prefix cache hits, is evicted and refills.
PREFIXES = [[], [5, 9, 13, 17], [5, 9, 13, 17, 21, 25, 29, 33], [40, 41, 42]]


@functools.cache
def tiny_model():
    with mx.stream(mx.cpu):
        return pl.random_model(CONFIG, seed=5)


@functools.cache
def isolated(prompt: tuple) -> list:
    """The prompt's greedy run alone in a big pool, MAX_NEW tokens (shorter runs are prefixes)."""
    return pl.generate(tiny_model(), [list(prompt)], max_tokens=MAX_NEW, backend="numpy",
                       prefix_caching=False)[0]


def expected(prompt, max_tokens, stop) -> list:
    want = isolated(tuple(prompt))[:max_tokens]
    cut = next((i for i, t in enumerate(want) if t in stop), len(want))
    return want[:cut]


def check_books(eng: pl.Engine) -> None:
    """Every group: free + used == total; each block's reference count equals the number of live
    table entries naming it; the block managers hold exactly the running sequences, each at the
    length the engine has computed."""
    running = eng.running()
    for g in eng.state.groups:
        bm = g.bm
        s = bm.stats()
        assert s.free + s.used == bm.num_blocks
        assert sorted(bm.sequences()) == sorted(running)
        refs = np.zeros(bm.num_blocks, np.int64)
        if running:
            tables = bm.block_tables(running, pad=-1)
            np.add.at(refs, tables[tables >= 0], 1)
        assert [bm.ref_count(b) for b in range(bm.num_blocks)] == refs.tolist()
        for sid in running:
            assert bm.context_len(sid) == eng._seqs[sid].computed


pytestmark = pytest.mark.usefixtures("on_cpu")   # tests/integrations/conftest.py


class EngineChurn(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # 10 blocks of 4: the longest request (14 + 8 - 1 positions) fits alone in 6, two
        # together run the pool dry, so steps preempt.
        self.eng = pl.Engine(tiny_model(), backend="numpy", block_size=4, num_blocks=10,
                             max_batch_tokens=10)
        self.reqs: dict[int, tuple] = {}

    @rule(prefix=st.sampled_from(PREFIXES),
          suffix=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
          max_tokens=st.integers(1, MAX_NEW), n=st.integers(1, 3),
          stop_at=st.none() | st.integers(0, MAX_NEW - 1))
    def add(self, prefix, suffix, max_tokens, n, stop_at):
        prompt = prefix + suffix
        stop = () if stop_at is None else (isolated(tuple(prompt))[stop_at],)
        rid = self.eng.add_request(prompt, max_tokens, n, stop_tokens=stop)
        self.reqs[rid] = (prompt, max_tokens, n, set(stop))

    @precondition(lambda self: self.eng.has_work)
    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            if self.eng.has_work:
                self.eng.step()

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.eng.abort(rid)
        del self.reqs[rid]

    @precondition(lambda self: self.eng._live)
    @rule(data=st.data(), k=st.integers(1, 3))
    def trim(self, data, k):
        sid = data.draw(st.sampled_from(sorted(self.eng._live)))
        self.eng.trim(sid, k)

    @rule()
    def collect(self):
        for rid in [r for r in self.reqs if self.eng.done(r)]:
            self._check(rid, self.eng.pop(rid))

    def _check(self, rid, got):
        prompt, max_tokens, n, stop = self.reqs.pop(rid)
        assert got == [expected(prompt, max_tokens, stop)] * n, (rid, prompt)

    @invariant()
    def books_balance(self):
        check_books(self.eng)

    def teardown(self):
        self.eng.run()
        check_books(self.eng)
        for rid in list(self.reqs):
            self._check(rid, self.eng.pop(rid))
        assert self.eng.block_counts() == [0]
        assert not (self.eng._live or self.eng.finished or self.eng._requests)


TestEngineChurn = EngineChurn.TestCase
TestEngineChurn.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_churn_soak_flat_rss():
    """Thousands of short requests through a small pool (preemptions, prefix-cache eviction,
    forks, stops, aborts): RSS flat after a warm-up, nothing left in the engine at the end, and
    every 50th request equal to its isolated run."""
    total, warm, in_flight = 3000, 600, 24
    model = tiny_model()
    eng = pl.Engine(model, backend="numpy", block_size=4, num_blocks=24, max_batch_tokens=32)
    rng = np.random.default_rng(0)
    reqs: dict = {}
    added = checked = 0
    base = None

    def add():
        nonlocal added
        prompt = PREFIXES[rng.integers(len(PREFIXES))] + rng.integers(0, VOCAB, rng.integers(1, 7)).tolist()
        max_tokens, n = int(rng.integers(1, MAX_NEW + 1)), int(rng.integers(1, 3))
        stop = (int(rng.integers(VOCAB)),) if rng.random() < 0.5 else ()
        rid = eng.add_request(prompt, max_tokens, n, stop_tokens=stop)
        reqs[rid] = (prompt, max_tokens, n, set(stop), added % 50 == 0)
        added += 1

    while added < total or eng.has_work:
        while added < total and len(reqs) < in_flight:
            add()
        eng.step()
        if reqs and rng.random() < 0.05:
            rid = list(reqs)[rng.integers(len(reqs))]
            eng.abort(rid)
            del reqs[rid]
        for rid in [r for r in reqs if eng.done(r)]:
            prompt, max_tokens, n, stop, verify = reqs.pop(rid)
            got = eng.pop(rid)
            if verify:
                assert got == [expected(prompt, max_tokens, stop)] * n
                checked += 1
        if base is None and added >= warm:
            settle(eng.state.backend)
            mx.clear_cache()
            base = rss_bytes()
    settle(eng.state.backend)
    mx.clear_cache()
    growth = (rss_bytes() - base) / MB
    print(f"\nengine churn: {total} requests, {eng.stats.steps} steps, {eng.stats.preemptions} "
          f"preemptions, RSS {growth:+.2f} MB after the first {warm}")
    assert growth < 6.0                       # tests/reliability/test_soak.py's limit
    assert checked >= total // 50 - 10 and eng.stats.preemptions > 0
    assert eng.block_counts() == [0]
    assert not (eng._live or eng.finished or eng._requests or eng._waiting)
