"""MLX-specific behaviour: in-place KV writes and the fused path's availability."""
from __future__ import annotations

import numpy as np
import pytest

import paged_attention as pa
from paged_attention.lab.workload import fragmented_tables

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")


def test_write_kv_updates_the_pool_in_place(mlx_backend):
    """A write of a few slots must not copy the 64 MiB pools: MLX donates the pool buffer to
    the scatter when no other reference is alive. On CUDA the previous command's references are
    dropped by a completion callback that can lag mx.eval (measured on the H100: 8-13% of
    back-to-back writes copied the pool), so each write here starts after mx.synchronize() (the
    condition MLXBackend._write_kv records); then 1 write in ~1800 still copied, so one copy in 8
    is tolerated."""
    pool = mlx_backend.create_pool(2048, 16, 8, 128, "float16")
    pool_bytes = pool.nbytes // 2
    k = np.ones((8, 8, 128), np.float16)
    mlx_backend.write_kv(pool, np.arange(8), k, k)      # warm up the scatter kernels
    mx.eval(pool.k, pool.v)
    extra = []
    for step in range(8):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mlx_backend.write_kv(pool, np.arange(8) + 100 * step, k * step, k)
        mx.eval(pool.k, pool.v)
        extra.append(mx.get_peak_memory() - base)
    copied = [e for e in extra if e >= pool_bytes // 8]
    assert len(copied) <= 1, f"write_kv copied a {pool_bytes}-byte pool in {len(copied)} of 8 writes: {extra}"
    kk, _ = pool.to_numpy()
    assert np.all(kk.reshape(-1, 8, 128)[700:708] == 7)


def test_fused_path_on_cpu_names_the_device(mlx_backend):
    if "fused" in mlx_backend.paths:
        pytest.skip(f"MLX has a GPU here ({mlx_backend.device}); the CPU error cannot occur")
    pool = mlx_backend.create_pool(4, 16, 1, 64, "float16")
    with pytest.raises(pa.UnsupportedPath, match="no Metal or CUDA device"):
        mlx_backend.decode(np.zeros((1, 1, 64), np.float16), pool, np.zeros((1, 1), np.int32),
                           np.ones(1, np.int32), path="fused")


def test_bfloat16_pool_matches_reference(mlx_backend):
    from paged_attention.lab.workload import DecodeWorkload, WorkloadConfig
    wl = DecodeWorkload(mlx_backend, WorkloadConfig(batch=3, dtype="bfloat16", seed=4), path="gather")
    # The workload draws bf16-representable K/V/q, so only accumulation error remains.
    worst = max(wl.step().rms for _ in range(40))
    assert worst < 5e-3


def test_auto_never_picks_fused_for_a_head_dim_it_cannot_run(monkeypatch):
    """The fused kernel takes head_dim 32..256 (multiples of 32): 'auto' moves to gather for
    others, an explicit path='fused' (or decode_step) says why before anything runs or is written.
    Runs without a GPU: the backend is told it has both paths, and no kernel is reached."""
    from paged_attention.backends.mlx.backend import MLXBackend
    from paged_attention.validation import PoolSpec, check_decode
    be = MLXBackend()
    monkeypatch.setattr(be, "paths", ("fused", "gather"))
    monkeypatch.setattr(be, "_auto_path", lambda args, spec: "fused")
    monkeypatch.delenv("PAGED_ATTENTION_PATH", raising=False)
    odd, fine = PoolSpec(4, 4, 2, 20), PoolSpec(4, 4, 2, 64)
    args = check_decode(np.zeros((1, 2, 20), np.float32), odd, [[0]], [1], None, None)
    assert "head_dim" in be.shape_unsupported_reason("fused", odd)
    assert be.shape_unsupported_reason("fused", fine) is None
    assert be.shape_unsupported_reason("gather", odd) is None
    assert be.resolve_path("auto", args, odd) == "gather"
    with pytest.raises(pa.UnsupportedPath, match="head_dim in 32..256"):
        be.resolve_path("fused", args, odd)
    pool = be.create_pool(4, 4, 2, 20, "float32")
    before = [np.array(a) for a in (pool.k, pool.v)]
    kv = np.ones((1, 2, 20), np.float32)
    with pytest.raises(pa.UnsupportedPath, match="head_dim"):
        be.decode_step([pa.LayerStep(np.zeros((1, 4, 20), np.float32), pool, kv, kv)], [0],
                       [[0]], [1], path="fused")
    assert all(np.array_equal(b, np.array(a)) for b, a in zip(before, (pool.k, pool.v)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("qlens", [[9], [1, 1, 6, 1, 3], [1, 1, 1, 8, 12], [0, 7, 1, 0, 2]])
def test_mixed_plan_chunks_match_the_reference(dtype, window, qlens):
    """The fused path's ragged step (backends/mlx/mixed.py): prompt chunks run as one causal
    SDPA each over their gathered blocks (prefixes, windows, GQA), decode rows through the
    decode callable, and the rows come back in order. Runs on any MLX device: the decode rows
    go through the gather plan here (the fused kernel's own ragged runs are in the matrix)."""
    from paged_attention import reference
    from paged_attention.backends.mlx.gather import GatherPlan
    from paged_attention.backends.mlx.mixed import MixedPlan
    from paged_attention.validation import PoolSpec, check_query_lens, check_tables
    rng = np.random.default_rng(len(qlens) * 7 + (window or 0))
    bs, hkv, group, d = 4, 2, 3, 32
    qlens = np.asarray(qlens)
    lens = qlens + rng.integers(0, 30, qlens.size)            # a cached prefix before each chunk
    nb, tables = fragmented_tables(rng, lens, bs)
    mxd = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[dtype]
    k = rng.standard_normal((nb, bs, hkv, d)).astype(np.float32)
    v = rng.standard_normal((nb, bs, hkv, d)).astype(np.float32)
    kx, vx = mx.array(k).astype(mxd), mx.array(v).astype(mxd)
    q = rng.standard_normal((int(qlens.sum()), hkv * group, d)).astype(np.float32)
    spec = PoolSpec(nb, bs, hkv, d, dtype)
    args = check_query_lens(qlens, check_tables(spec, tables, lens, None, None, window, hkv * group))
    plan = MixedPlan(args, bs, lambda seqs: GatherPlan(seqs, bs))
    out = np.array(plan(mx.array(q).astype(mxd), kx, vx).astype(mx.float32))
    want = reference.ragged(q, np.array(kx.astype(mx.float32)), np.array(vx.astype(mx.float32)),
                            tables, lens, qlens, window=window)
    assert out.shape == want.shape
    assert np.sqrt(np.mean((out - want) ** 2)) < 5e-3


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("qlens", [[1, 1, 6, 1, 3], [0, 7, 1, 0, 2], [9]])
@pytest.mark.parametrize("cap,alibi,sinks,lse", [(2.0, False, False, True), (None, True, True, True),
                                                 (1.5, True, True, False)])
def test_mixed_plan_variants_match_the_reference(window, qlens, cap, alibi, sinks, lse):
    """The fused path's ragged step with attention variants (ADR 0010): prompt chunks go
    through the gather path's variant attention over their blocks (positions counted from the
    first block read, which a window moves), decode rows through the decode callable's
    `with_lse`, rows and LSE back in order. Any MLX device: the decode rows use the gather plan
    here (the fused kernel's own are in tests/matrix/test_variants.py on a GPU)."""
    import dataclasses

    from paged_attention import reference
    from paged_attention.backends.mlx.gather import GatherPlan
    from paged_attention.backends.mlx.mixed import MixedPlan
    from paged_attention.validation import (PoolSpec, check_query_lens, check_tables,
                                            check_variant)
    rng = np.random.default_rng(len(qlens) * 11 + (window or 0))
    bs, hkv, group, d = 4, 2, 2, 32
    hq = hkv * group
    qlens = np.asarray(qlens)
    lens = qlens + rng.integers(3, 30, qlens.size)
    nb, tables = fragmented_tables(rng, lens, bs, spare_blocks=2)
    k = rng.standard_normal((nb, bs, hkv, d)).astype(np.float32)
    v = rng.standard_normal((nb, bs, hkv, d)).astype(np.float32)
    q = rng.standard_normal((int(qlens.sum()), hq, d)).astype(np.float32)
    slopes = -rng.uniform(0.05, 0.5, hq).astype(np.float32) if alibi else None
    sink = rng.standard_normal(hq).astype(np.float32) if sinks else None
    spec = PoolSpec(nb, bs, hkv, d, "float32")
    args = check_query_lens(qlens, check_tables(spec, tables, lens, None, None, window, hq))
    args = dataclasses.replace(args, variant=check_variant(cap, slopes, lse, hq))
    plan = MixedPlan(args, bs, lambda rows: GatherPlan(dataclasses.replace(rows, variant=args.variant), bs))
    out, got_lse = plan.with_lse(mx.array(q), mx.array(k), mx.array(v),
                                 None if sink is None else mx.array(sink))
    want, want_lse = reference.step(q, k, v, args, sink)
    assert reference.rms(np.array(out), want) < 1e-4
    if lse:
        np.testing.assert_allclose(np.array(got_lse), want_lse, atol=1e-4)
    else:
        assert got_lse is None
