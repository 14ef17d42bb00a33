"""The public contract on every backend: names, shapes, edge cases, and errors raised before any
kernel runs with pools left untouched."""
from __future__ import annotations

import numpy as np
import pytest

import paged_attention as pa
from paged_attention import reference

NB, BS, HKV, D = 6, 4, 2, 64


def make_pool(backend, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    pool = backend.create_pool(NB, BS, HKV, D, dtype)
    slots = np.arange(NB * BS)
    k = rng.standard_normal((slots.size, HKV, D)).astype(dtype)
    v = rng.standard_normal((slots.size, HKV, D)).astype(dtype)
    backend.write_kv(pool, slots, k, v)
    return pool, k.reshape(NB, BS, HKV, D), v.reshape(NB, BS, HKV, D)


def test_public_names():
    for name in ("available_backends", "get_backend", "PagedAttention", "KVPool", "BlockManager",
                 "PagedAttentionError", "InvalidInput", "PoolExhausted", "UnsupportedPath",
                 "BackendUnavailable"):
        assert hasattr(pa, name)
    assert issubclass(pa.InvalidInput, ValueError) and issubclass(pa.InvalidInput, pa.PagedAttentionError)
    assert "numpy" in pa.available_backends()
    assert callable(reference.decode)


def test_unknown_backend_says_what_exists():
    with pytest.raises(pa.BackendUnavailable, match="known backends"):
        pa.get_backend("cuda-graph-magic")


def test_pool_roundtrip_and_attributes(backend):
    pool, k, v = make_pool(backend)
    kk, vv = pool.to_numpy()
    assert kk.shape == (NB, BS, HKV, D) and np.array_equal(kk, k) and np.array_equal(vv, v)
    assert (pool.num_blocks, pool.block_size, pool.num_kv_heads, pool.head_dim) == (NB, BS, HKV, D)
    assert isinstance(backend.device, str) and backend.device
    assert backend.paths and all(isinstance(p, str) for p in backend.paths)


def test_copy_blocks(backend):
    pool, k, v = make_pool(backend)
    backend.copy_blocks(pool, [(0, 3), (5, 1)])
    kk, vv = pool.to_numpy()
    k[3], k[1], v[3], v[1] = k[0], k[5], v[0], v[5]
    assert np.array_equal(kk, k) and np.array_equal(vv, v)


def test_edge_cases_match_reference(impl):
    backend, path = impl
    pool, k, v = make_pool(backend)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 2 * HKV, D)).astype(np.float32)
    tables = np.array([[2, 0, 5], [1, 1, 1], [4, 3, 0], [0, 0, 0]], dtype=np.int32)
    # Lengths ending on a block boundary, just past it, a single token and an empty sequence.
    lens = np.array([8, 5, 1, 0], dtype=np.int32)
    for window in (None, 1, 3, 100):
        out = np.asarray(backend.decode(q, pool, tables, lens, window=window, path=path))
        ref = reference.decode(q, k, v, tables, lens, window=window)
        assert out.shape == q.shape and out.dtype == np.float32
        assert reference.rms(out, ref) < 1e-4, window
        assert np.all(out[3] == 0)
    empty = np.asarray(backend.decode(q[:0], pool, tables[:0], lens[:0], path=path))
    assert empty.shape == (0, 2 * HKV, D)


BAD_DECODE = [
    (dict(q=np.zeros((2, 4, 32), np.float32)), "head_dim"),
    (dict(q=np.zeros((2, 3, D), np.float32)), "multiple"),
    (dict(q=np.zeros((2, 4, D), np.int32)), "dtype"),
    (dict(tables=np.array([[0, 1], [2, 6]], np.int32)), r"\[1, 1\] = 6"),
    (dict(tables=np.array([[0, 1], [2, -1]], np.int32)), "outside"),
    (dict(lens=np.array([3, 9], np.int32)), "context_lens"),
    (dict(lens=np.array([3, -1], np.int32)), "context_lens"),
    (dict(lens=np.array([3], np.int32)), "context_lens"),
    (dict(tables=np.array([[0.5, 1], [2, 3]])), "integer"),
    (dict(window=0), "window"),
    (dict(scale=float("nan")), "scale"),
]


@pytest.mark.parametrize("bad,match", BAD_DECODE, ids=[m for _, m in BAD_DECODE])
def test_bad_decode_input_raises_before_running(backend, bad, match):
    pool, k, v = make_pool(backend)
    args = dict(q=np.zeros((2, 4, D), np.float32), tables=np.array([[0, 1], [2, 3]], np.int32),
                lens=np.array([5, 8], np.int32), window=None, scale=None)
    args.update(bad)
    with pytest.raises(pa.InvalidInput, match=match):
        backend.decode(args["q"], pool, args["tables"], args["lens"], window=args["window"],
                       scale=args["scale"])
    kk, vv = pool.to_numpy()
    assert np.array_equal(kk, k) and np.array_equal(vv, v)


def test_padding_beyond_context_is_ignored(backend):
    """Table entries past ceil(context/block_size) may hold anything, even invalid ids."""
    pool, k, v = make_pool(backend)
    q = np.ones((1, 2 * HKV, D), np.float32)
    tables = np.array([[3, -1, 99]], np.int32)
    out = np.asarray(backend.decode(q, pool, tables, np.array([4], np.int32)))
    ref = reference.decode(q, k, v, np.array([[3]]), np.array([4]))
    assert reference.rms(out, ref) < 1e-4


BAD_WRITE = [
    (dict(slots=np.array([0, 24])), r"\[0, 24\)"),
    (dict(slots=np.array([0, -1])), "slot_mapping"),
    (dict(slots=np.array([3, 3])), "distinct"),
    (dict(k=np.zeros((2, HKV, D + 1), np.float32)), "k: expected shape"),
    (dict(v=np.zeros((3, HKV, D), np.float32)), "v: expected shape"),
    (dict(slots=np.array([[0, 1]])), "1-D"),
]


@pytest.mark.parametrize("bad,match", BAD_WRITE, ids=[m for _, m in BAD_WRITE])
def test_bad_write_changes_nothing(backend, bad, match):
    pool, k, v = make_pool(backend)
    args = dict(slots=np.array([0, 1]), k=np.ones((2, HKV, D), np.float32),
                v=np.ones((2, HKV, D), np.float32))
    args.update(bad)
    with pytest.raises(pa.InvalidInput, match=match):
        backend.write_kv(pool, args["slots"], args["k"], args["v"])
    kk, vv = pool.to_numpy()
    assert np.array_equal(kk, k) and np.array_equal(vv, v)


@pytest.mark.parametrize("pairs,match", [([(0, 6)], "block ids"), ([(0, 1), (2, 1)], "once"),
                                         ([(0, 1), (1, 2)], "both"), ([(0, 1, 2)], "pairs")])
def test_bad_copy_changes_nothing(backend, pairs, match):
    pool, k, v = make_pool(backend)
    with pytest.raises(pa.InvalidInput, match=match):
        backend.copy_blocks(pool, pairs)
    kk, vv = pool.to_numpy()
    assert np.array_equal(kk, k) and np.array_equal(vv, v)


def test_bad_pool_arguments(backend):
    with pytest.raises(pa.InvalidInput, match="block_size"):
        backend.create_pool(4, 0, 2, 64)
    with pytest.raises(pa.InvalidInput, match="dtype"):
        backend.create_pool(4, 16, 2, 64, dtype="int8")


def test_pool_from_another_backend_is_rejected(backend):
    other = pa.get_backend("numpy") if backend.name != "numpy" else pa.get_backend("mlx")
    foreign = other.create_pool(NB, BS, HKV, D, "float32")
    with pytest.raises(pa.InvalidInput, match="pool"):
        backend.decode(np.zeros((1, 2, D), np.float32), foreign, np.zeros((1, 1), np.int32),
                       np.ones(1, np.int32))


def test_unknown_path(backend):
    pool, _, _ = make_pool(backend)
    with pytest.raises(pa.UnsupportedPath, match="available paths"):
        backend.decode(np.zeros((1, 2, D), np.float32), pool, np.zeros((1, 1), np.int32),
                       np.ones(1, np.int32), path="teleport")


def test_path_env_override(backend, setenv):
    pool, _, _ = make_pool(backend)
    setenv("PAGED_ATTENTION_PATH", "teleport")
    with pytest.raises(pa.UnsupportedPath):
        backend.decode(np.zeros((1, 2, D), np.float32), pool, np.zeros((1, 1), np.int32),
                       np.ones(1, np.int32))
    setenv("PAGED_ATTENTION_PATH", backend.paths[-1])
    out = backend.decode(np.zeros((1, 2, D), np.float32), pool, np.zeros((1, 1), np.int32),
                         np.ones(1, np.int32))
    assert np.asarray(out).shape == (1, 2, D)


def test_decode_step_writes_then_attends(impl):
    backend, path = impl
    layers, mirrors = [], []
    rng = np.random.default_rng(2)
    tables = np.array([[1, 4], [0, 2]], np.int32)
    for _ in range(3):
        pool, k, v = make_pool(backend, seed=len(layers))
        kn = rng.standard_normal((2, HKV, D)).astype(np.float32)
        vn = rng.standard_normal((2, HKV, D)).astype(np.float32)
        q = rng.standard_normal((2, 2 * HKV, D)).astype(np.float32)
        layers.append(pa.LayerStep(q, pool, kn, vn))
        slots = np.array([4 * 4 + 2, 2 * 4 + 0])
        k.reshape(-1, HKV, D)[slots] = kn
        v.reshape(-1, HKV, D)[slots] = vn
        mirrors.append((k, v))
    lens = np.array([7, 5], np.int32)
    outs = backend.decode_step(layers, np.array([18, 8]), tables, lens, path=path)
    assert len(outs) == 3
    for out, layer, (k, v) in zip(outs, layers, mirrors):
        ref = reference.decode(layer.q, k, v, tables, lens)
        assert reference.rms(np.asarray(out), ref) < 1e-4
