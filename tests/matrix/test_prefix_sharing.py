"""Prefill into the block pool, prefix sharing and copy-on-write on every backend x path,
checked against dense (unpaged) causal attention."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from paged_attention import BlockManager, reference

BS, HKV, GROUP, D = 16, 2, 4, 64
TOL = 5e-3


def token_state(tokens, pos):
    """(q, k, v) a model would produce at `pos`: a function of the prefix tokens[:pos+1] only,
    so equal prefixes give equal K/V and sharing their blocks is valid."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(tokens[:pos + 1], np.int64).tobytes()))
    q = rng.standard_normal((HKV * GROUP, D))
    k, v = rng.standard_normal((2, HKV, D))
    return (x.astype(np.float16) for x in (q, k, v))


def states(tokens, start=0):
    qs, ks, vs = zip(*(token_state(tokens, p) for p in range(start, len(tokens))))
    return np.stack(qs), np.stack(ks), np.stack(vs)


def prefill(backend, path, bm, pool, sid, tokens):
    """Allocate (reusing cached prefix blocks), write only the uncached suffix, attend."""
    slots = bm.add_sequence(sid, token_ids=tokens)
    start = bm.cached_tokens(sid)
    q, k, v = states(tokens, start)
    backend.write_kv(pool, slots, k, v)
    out = backend.prefill(q, pool, np.array(bm.block_table(sid), np.int32), start, path=path)
    return np.asarray(out, np.float64), start


def dense(tokens):
    q, k, v = states(tokens)
    return reference.dense_causal(q, k, v)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_cold_and_shared_prefix_match_dense(impl, rng):
    backend, path = impl
    bm = BlockManager(64, BS, fragmented=True, seed=1)
    pool = backend.create_pool(64, BS, HKV, D, "float16")
    prompt_a = rng.integers(0, 1000, 90).tolist()               # 5 full blocks + 10 tokens
    out_a, hit_a = prefill(backend, path, bm, pool, "a", prompt_a)
    assert hit_a == 0 and reference.rms(out_a, dense(prompt_a)) < TOL

    used = bm.stats().used
    prompt_b = prompt_a[:80] + rng.integers(1000, 2000, 21).tolist()
    out_b, hit_b = prefill(backend, path, bm, pool, "b", prompt_b)
    assert hit_b == 80                                          # 5 cached blocks reused
    assert bm.stats().used - used == 2                          # ceil(101 / 16) - 5
    assert bm.stats().shared == 5 and bm.stats().prefix_hit_tokens == 80
    assert out_b.shape[0] == 21
    assert reference.rms(out_b, dense(prompt_b)[80:]) < TOL


def test_copy_on_write_leaves_the_other_sequence_untouched(impl, rng):
    backend, path = impl
    bm = BlockManager(32, BS, fragmented=True, seed=2)
    pool = backend.create_pool(32, BS, HKV, D, "float16")
    prompt = rng.integers(0, 1000, 40).tolist()                 # tail block holds 8 tokens
    prefill(backend, path, bm, pool, "a", prompt)
    bm.fork("a", "c")
    table_a = bm.block_table("a")
    before = [x[table_a].copy() for x in pool.to_numpy()]
    slots, copies = bm.append_slots("c", 3, token_ids=[5, 6, 7])
    assert len(copies) == 1 and copies[0][0] == table_a[-1]
    backend.copy_blocks(pool, copies)
    q, k, v = states(prompt + [5, 6, 7], 40)
    backend.write_kv(pool, slots, k, v)
    after = [x[table_a] for x in pool.to_numpy()]
    assert all(np.array_equal(b, a) for b, a in zip(before, after))   # byte-identical
    out = backend.prefill(q, pool, np.array(bm.block_table("c"), np.int32), 40, path=path)
    assert reference.rms(np.asarray(out, np.float64), dense(prompt + [5, 6, 7])[40:]) < TOL


def test_prefill_then_200_decode_steps(impl, rng):
    """Two requests sharing a 64-token prefix: prefill, then 200 decode steps each, every step
    against dense attention over the host-side history of that request."""
    backend, path = impl
    steps = 200
    bm = BlockManager(64, BS, fragmented=True, seed=3)
    pool = backend.create_pool(64, BS, HKV, D, "float16")
    shared = rng.integers(0, 1000, 64).tolist()
    tokens = {"a": shared + rng.integers(0, 1000, 7).tolist(),
              "b": shared + rng.integers(0, 1000, 30).tolist()}
    hist = {}
    for sid in ("a", "b"):
        prefill(backend, path, bm, pool, sid, tokens[sid])
        _, k, v = states(tokens[sid])
        hist[sid] = [k, v]
    assert bm.cached_tokens("b") == 64
    seqs = ["a", "b"]
    for step in range(steps):
        new = [[int(rng.integers(0, 1000))] for _ in seqs]
        slots, copies = bm.append_batch(seqs, 1, token_ids=new)
        backend.copy_blocks(pool, copies)
        qs, ks, vs = [], [], []
        for sid, t in zip(seqs, new):
            tokens[sid] += t
            q, k, v = token_state(tokens[sid], len(tokens[sid]) - 1)
            qs.append(q), ks.append(k), vs.append(v)
            hist[sid] = [np.concatenate([hist[sid][0], k[None]]), np.concatenate([hist[sid][1], v[None]])]
        backend.write_kv(pool, slots, np.stack(ks), np.stack(vs))
        out = np.asarray(backend.decode(np.stack(qs), pool, bm.block_tables(seqs), bm.context_lens(seqs),
                                        path=path), np.float64)
        for i, sid in enumerate(seqs):
            ref = reference.attend(qs[i], *hist[sid], 1 / np.sqrt(D))
            assert reference.rms(out[i], ref) < TOL, f"step {step} seq {sid}"
