"""MLX-specific behaviour: in-place KV writes and the fused path's availability."""
from __future__ import annotations

import numpy as np
import pytest

import paged_attention as pa

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")


@pytest.fixture(scope="module")
def mlx_backend():
    reason = pa.registry.unavailable_reason("mlx")
    if reason:
        pytest.skip(reason)
    return pa.get_backend("mlx")


def test_write_kv_updates_the_pool_in_place(mlx_backend):
    """A write of a few slots must not copy the 64 MiB pools: MLX donates the pool buffer to
    the scatter when no other reference is alive."""
    pool = mlx_backend.create_pool(2048, 16, 8, 128, "float16")
    pool_bytes = pool.nbytes // 2
    k = np.ones((8, 8, 128), np.float16)
    mlx_backend.write_kv(pool, np.arange(8), k, k)      # warm up the scatter kernels
    mx.eval(pool.k, pool.v)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for step in range(4):
        mlx_backend.write_kv(pool, np.arange(8) + 100 * step, k * step, k)
        mx.eval(pool.k, pool.v)
    extra = mx.get_peak_memory() - base
    assert extra < pool_bytes // 8, f"write_kv used {extra} extra bytes for a {pool_bytes}-byte pool"
    kk, _ = pool.to_numpy()
    assert np.all(kk.reshape(-1, 8, 128)[300:308] == 3)


def test_fused_path_on_cpu_names_the_device(mlx_backend):
    if "fused" in mlx_backend.paths:
        pytest.skip(f"MLX has a GPU here ({mlx_backend.device}); the CPU error cannot occur")
    pool = mlx_backend.create_pool(4, 16, 1, 64, "float16")
    with pytest.raises(pa.UnsupportedPath, match="no Metal or CUDA device"):
        mlx_backend.decode(np.zeros((1, 1, 64), np.float16), pool, np.zeros((1, 1), np.int32),
                           np.ones(1, np.int32), path="fused")


def test_bfloat16_pool_matches_reference(mlx_backend):
    from paged_attention.workload import DecodeWorkload, WorkloadConfig
    wl = DecodeWorkload(mlx_backend, WorkloadConfig(batch=3, dtype="bfloat16", seed=4), path="gather")
    # The workload draws bf16-representable K/V/q, so only accumulation error remains.
    worst = max(wl.step().rms for _ in range(40))
    assert worst < 5e-3
