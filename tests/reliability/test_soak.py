"""Short soak on every backend x path (the full one is `paged-attn soak --steps 10000`).

A few hundred decode steps with joins, forks (copy-on-write) and finishes: host RSS and device
memory (where the backend reports it) flat after a warm-up, every block back on the free list,
the reference matched on a subsample of steps; then pools created and dropped in a loop give
their memory back. PAGED_ATTENTION_TEST_SOAK_STEPS scales the run.
"""
from __future__ import annotations

import os

import pytest

import numpy as np

from paged_attention.lab.soak import MB, format_report, pool_churn, rss_bytes, run_soak, settle
from paged_attention.lab.workload import WorkloadConfig

pytestmark = pytest.mark.soak

STEPS = int(os.environ.get("PAGED_ATTENTION_TEST_SOAK_STEPS", "400"))
# RSS is sampled after gc + malloc_trim (noise < 1 MB here); the 10,000-step CLI run uses 8 MB.
RSS_LIMIT_MB = 6.0
DEVICE_LIMIT_MB = 0.5


def test_short_soak_flat_memory_no_leaked_blocks(impl, record_property):
    backend, path = impl
    cfg = WorkloadConfig(batch=4, num_kv_heads=2, group_size=4, head_dim=64, block_size=16,
                         dtype="float16", max_prompt=48, max_context=160, fork_every=17,
                         finish_every=29, seed=11)
    rep = run_soak(backend, path=path, steps=STEPS, warmup=STEPS // 2, check_every=10, churn=0,
                   cfg=cfg, rss_limit_mb=RSS_LIMIT_MB, device_limit_mb=DEVICE_LIMIT_MB)
    print("\n" + format_report(rep))
    for key in ("rss_growth_mb", "device_growth_mb", "worst_rms", "ms_per_step"):
        record_property(key, getattr(rep, key))
    assert rep.checked_steps >= STEPS // 10
    assert rep.free_blocks_end == rep.num_blocks
    assert rep.ok, rep.failures


def test_dropped_pools_give_memory_back(backend):
    """After the backend's bounded caches fill (the first 15 pools), creating, filling, decoding
    from and dropping 2 MB pools leaves RSS and device memory flat."""
    rss, dev, first = pool_churn(backend, 30, backend.paths[0], warm=15)
    print(f"\npool churn {backend.name}: first 15 pools {first:+.2f} MB RSS, next 15 {rss:+.2f} MB "
          f"RSS, device {'n/a' if dev is None else f'{dev:+.3f} MB'}")
    assert rss < RSS_LIMIT_MB
    assert dev is None or dev < DEVICE_LIMIT_MB


# Reported to the backend's owner; the test passes once the gap is closed.
RETENTION_GAPS: dict[str, str] = {}  # backend -> reason; empty: every backend complies


def test_dropped_pool_is_released_at_once(backend):
    """A 64 MB pool (K + V), written and decoded from, then dropped: its memory is back at once."""
    rng = np.random.default_rng(0)
    bs, hkv, d, chunk = 16, 2, 64, 4096
    kv = rng.standard_normal((chunk, hkv, d)).astype(np.float16)
    q = rng.standard_normal((2, hkv * 4, d)).astype(np.float16)
    tables, lens = np.arange(8, dtype=np.int32).reshape(2, 4), np.array([64, 50], np.int32)

    def use(pool):
        for start in range(0, pool.num_blocks * bs, chunk):
            backend.write_kv(pool, np.arange(start, start + chunk), kv, kv)
        np.asarray(backend.decode(q, pool, tables, lens))

    use(backend.create_pool(chunk // bs, bs, hkv, d, "float16"))  # staging at its final size
    settle(backend)
    before = rss_bytes()
    pool = backend.create_pool(8192, bs, hkv, d, "float16")   # K + V: 2 x 32 MB
    use(pool)
    settle(backend)
    held = (rss_bytes() - before) / MB
    del pool
    settle(backend)
    growth = (rss_bytes() - before) / MB
    print(f"\n{backend.name}: RSS +{held:.1f} MB with the pool, {growth:+.1f} MB after dropping it")
    if growth > RSS_LIMIT_MB and backend.name in RETENTION_GAPS:
        pytest.xfail(RETENTION_GAPS[backend.name])
    assert growth < RSS_LIMIT_MB
