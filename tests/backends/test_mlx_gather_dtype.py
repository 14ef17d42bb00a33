"""The gather path's compute dtype (backends/mlx/gather.py, ADR 0002 "Gather in the pool's
dtype"): copies and SDPA in the pool's dtype where MLX runs a fused SDPA kernel, float32 where
it would run its unfused ops. The CPU has no fused SDPA kernel, so `auto` is float32 here;
these tests force `pool` (PAGED_ATTENTION_MLX_GATHER_DTYPE) to run the pool-dtype calls on the
CPU (through MLX's unfused ops) against the float64 reference, and show why `auto` keeps
float32 where MLX falls back."""
from __future__ import annotations

import numpy as np
import pytest

import paged_attention as pa
from paged_attention import reference, settings
from paged_attention.lab.workload import fragmented_tables, representable

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
gather = pytest.importorskip("paged_attention.backends.mlx.gather",
                             reason="the MLX backend is not importable")

HKV, G, D, BS = 2, 4, 64, 16
HQ = HKV * G


def paged(be, dtype, lens, seed, scale_kv=1.0):
    """A fragmented pool holding sequences of `lens`, its tables and float64 K/V."""
    rng = np.random.default_rng(seed)
    nb, tables = fragmented_tables(rng, lens, BS)
    k = representable(scale_kv * rng.standard_normal((nb, BS, HKV, D)), dtype).astype(np.float64)
    v = representable(rng.standard_normal((nb, BS, HKV, D)), dtype).astype(np.float64)
    pool = be.create_pool(nb, BS, HKV, D, dtype)
    n = nb * BS
    be.write_kv(pool, np.arange(n), k.reshape(n, HKV, D).astype(np.float32),
                v.reshape(n, HKV, D).astype(np.float32))
    return pool, tables, np.asarray(lens, np.int32), k, v


def run_step(be, pool, tables, lens, q, qlens, window):
    plan = be.plan(pool, tables, lens, num_q_heads=HQ, query_lens=qlens, window=window,
                   path="gather")
    return np.asarray(be.to_numpy(be.run(plan, q, pool)), np.float64), plan


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("case", ["equal", "ragged", "ragged_with_chunks"])
def test_pool_dtype_matches_the_reference(mlx_backend, dtype, window, case):
    """Forced `pool`: every call copies and attends in fp16/bf16, within the project's RMS
    bound; equal lengths (no mask), ragged lengths (one masked call here: the CPU has no fused
    kernel for the per-length calls), windows (each row's own span) and prompt chunks."""
    lens, qlens = {"equal": ([70, 70, 70, 70], [1, 1, 1, 1]),
                   "ragged": ([70, 33, 0, 129, 5], [1, 1, 0, 1, 1]),
                   "ragged_with_chunks": ([70, 40, 90, 17], [1, 9, 1, 17])}[case]
    pool, tables, lens, k, v = paged(mlx_backend, dtype, lens, seed=len(lens) + (window or 0))
    qlens = np.asarray(qlens)
    rng = np.random.default_rng(5)
    q = representable(rng.standard_normal((int(qlens.sum()), HQ, D)), dtype)
    q = q.astype(np.float32 if dtype == "bfloat16" else np.float16)
    want = reference.ragged(q.astype(np.float64), k, v, tables, lens, qlens, window=window)
    with settings.override(mlx_gather_dtype="pool"):
        got, plan = run_step(mlx_backend, pool, tables, lens, q, qlens, window)
    assert {c.dtype for c in plan.device.attend.calls} == {gather.DTYPES[dtype]}
    assert reference.rms(got, want) < 5e-3, reference.rms(got, want)
    if case == "equal":
        assert all(c.mask is None for c in plan.device.attend.calls)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_length_groups_match_the_reference(mlx_backend, dtype, monkeypatch):
    """Where MLX's fused SDPA takes unmasked but not masked decode calls (CUDA), ragged rows
    run as one unmasked call per visible-key count, rows put back in order. Forced here by
    answering the fused-kernel question as CUDA does."""
    monkeypatch.setattr(gather, "has_fused_sdpa", lambda *a: a[-1] is None)
    lens = [70, 33, 70, 0, 129, 33, 5]
    pool, tables, lens, k, v = paged(mlx_backend, dtype, lens, seed=3)
    rng = np.random.default_rng(6)
    q = representable(rng.standard_normal((len(lens), HQ, D)), dtype)
    q = q.astype(np.float32 if dtype == "bfloat16" else np.float16)
    want = reference.decode(q.astype(np.float64), k, v, tables, lens)
    with settings.override(mlx_gather_dtype="pool"):
        got, plan = run_step(mlx_backend, pool, tables, lens, q, None, None)
    calls = plan.device.attend.calls
    assert sorted(c.keys for c in calls) == [5, 33, 70, 129]
    assert all(c.mask is None for c in calls)
    assert reference.rms(got, want) < 5e-3, reference.rms(got, want)
    assert np.all(got[3] == 0)


def test_auto_is_float32_without_a_fused_kernel(mlx_backend):
    """`auto` asks MLX whether a fused kernel takes the call; the CPU has none, so every call
    stays float32. On a GPU the unmasked decode call of a supported head dim is fused."""
    pool, tables, lens, _, _ = paged(mlx_backend, "float16", [40, 40], seed=1)
    plan = mlx_backend.plan(pool, tables, lens, num_q_heads=HQ, path="gather")
    (call,) = plan.device.attend.calls
    fused = gather.has_fused_sdpa(mx.float16, HQ, HKV, 1, 40, D, None)
    assert call.mask is None
    assert call.dtype == (mx.float16 if fused else mx.float32)
    assert call.fused == fused
    if mx.default_device() == mx.cpu:
        assert not fused


def test_setting_rejects_unknown_modes(mlx_backend):
    pool, tables, lens, _, _ = paged(mlx_backend, "float16", [40], seed=1)
    with settings.override(mlx_gather_dtype="half"):
        with pytest.raises(pa.InvalidInput, match="MLX_GATHER_DTYPE"):
            mlx_backend.plan(pool, tables, lens, num_q_heads=HQ, path="gather")


@pytest.mark.parametrize("mode,finite", [("auto", True), ("float32", True), ("pool", False)])
def test_large_logits_need_float32_where_mlx_runs_unfused_ops(mlx_backend, mode, finite):
    """Why float32 stays where MLX would run its unfused SDPA (the CPU, masks CUDA's fused
    kernels refuse): those ops compute q.k in the input dtype, and fp16 q.k beyond 65504 is
    inf (then NaN). q and K of magnitude ~200 in fp16 give q.k ~ 2.5e6: `auto` (float32 here)
    and `float32` stay finite and right, a forced `pool` does not."""
    if mode == "auto" and gather.has_fused_sdpa(mx.float16, HQ, HKV, 1, 64, D, None):
        pytest.skip("MLX has a fused SDPA kernel here: auto runs fp16 through it "
                    "(tests/reliability/test_numerics.py::test_huge_logits_fp16 covers that)")
    rng = np.random.default_rng(2)
    lens = [64, 64]
    pool, tables, lens, _, v = paged(mlx_backend, "float16", lens, seed=2)
    k = np.clip(200.0 + 0.5 * rng.standard_normal(v.shape), 195, 205)
    k = representable(k, "float16").astype(np.float64)
    n = k.shape[0] * BS
    mlx_backend.write_kv(pool, np.arange(n), k.reshape(n, HKV, D).astype(np.float32),
                v.reshape(n, HKV, D).astype(np.float32))
    q = np.full((len(lens), HQ, D), 200.0, np.float16)
    want = reference.decode(q.astype(np.float64), k, v, tables, lens)
    with settings.override(mlx_gather_dtype=mode):
        got, _ = run_step(mlx_backend, pool, tables, lens, q, None, None)
    assert np.isfinite(got).all() == finite
    if finite:
        assert reference.rms(got, want) < 2e-2


@pytest.mark.parametrize("mode", ["auto", "pool"])
def test_rows_that_see_nothing_are_zeros(mlx_backend, mode):
    """Every decode row at length 0 (no call at all) and a NaN q there: zeros, as the
    reference."""
    pool, tables, lens, _, _ = paged(mlx_backend, "float16", [0, 0, 0], seed=4)
    q = np.full((3, HQ, D), np.nan, np.float16)
    with settings.override(mlx_gather_dtype=mode):
        got, plan = run_step(mlx_backend, pool, tables, lens, q, None, None)
    assert plan.device.attend.calls == []
    assert np.all(got == 0)


@pytest.mark.parametrize("dtype,width,word", [
    ("float16", 128, "uint64"), ("bfloat16", 64, "uint64"), ("float32", 128, "uint64"),
    ("float16", 6, "uint32"), ("float16", 3, "float16"), ("float32", 3, "float32"),
    ("uint8", 128, "uint64"), ("uint32", 16, "uint64"), ("uint8", 2, "uint16")])
def test_wide_word_take_is_the_bitwise_take(monkeypatch, dtype, width, word):
    """take_wide (ADR 0002, "Wide-word takes") moves rows as the widest words their byte size
    divides into (`word`, the dtype MLX's take is handed) and is bit for bit mx.take, NaN and
    -0.0 payloads included, over a 3-D index."""
    from paged_attention.backends.mlx.arrays import take_wide
    rng = np.random.default_rng(7)
    itemsize = np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize
    a = mx.array(rng.integers(0, 256, (500, width * itemsize), dtype=np.uint8))
    a = a.view(getattr(mx, dtype))
    index = mx.array(rng.integers(0, 500, (3, 4, 5)).astype(np.int32))
    want = mx.take(a, index, axis=0)
    take, handed = mx.take, []
    monkeypatch.setattr(mx, "take", lambda x, *args, **kw: handed.append(x.dtype) or
                        take(x, *args, **kw))
    got = take_wide(a, index)
    assert handed == [getattr(mx, word)]
    assert got.dtype == want.dtype and got.shape == want.shape == (3, 4, 5, width)
    assert np.array_equal(np.array(got.view(mx.uint8)), np.array(want.view(mx.uint8)))
