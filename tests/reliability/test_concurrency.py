"""Threads sharing one backend instance, each decoding on its own pool, on every backend x path.

`PagedAttention`'s public methods are serialised per instance (interface._serialized), so
threads take turns inside a backend whose staging buffers and device queue are not thread-safe
(the Vulkan backend segfaulted without it). Each thread's outputs must equal those of the same
workload run alone: correct, and no cross-talk between the threads' pools or staging.
"""
from __future__ import annotations

import threading

import numpy as np

from paged_attention.lab.workload import DecodeWorkload, WorkloadConfig

STEPS = 60
THREADS = 3
TOLERANCE = 5e-3


def config(seed: int) -> WorkloadConfig:
    # Different batch sizes and head groups per thread so that staging sizes and recorded
    # command buffers differ between the threads.
    return WorkloadConfig(batch=2 + seed % 3, num_kv_heads=2, group_size=(1, 4, 8)[seed % 3],
                          head_dim=64, block_size=16, dtype=("float16", "float32")[seed % 2],
                          max_prompt=40, max_context=120, fork_every=13, finish_every=23,
                          seed=100 + seed)


def run_alone(backend, path, seed):
    wl = DecodeWorkload(backend, config(seed), path=path)
    outs = [wl.step().out for _ in range(STEPS)]
    wl.close()
    return outs


def test_threads_on_separate_pools(impl):
    backend, path = impl
    expected = [run_alone(backend, path, s) for s in range(THREADS)]
    results, errors = {}, []
    start = threading.Barrier(THREADS)

    def work(seed):
        try:
            wl = DecodeWorkload(backend, config(seed), path=path)
            start.wait(timeout=60)
            steps = [wl.step() for _ in range(STEPS)]
            wl.close()
            results[seed] = (steps, wl.manager.num_free == wl.num_blocks)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((seed, repr(exc)))

    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a decode thread hung"
    assert not errors, errors
    for seed, (steps, all_free) in results.items():
        assert all_free
        for r, want in zip(steps, expected[seed]):
            assert r.rms < TOLERANCE, f"thread {seed} step {r.step}: RMS {r.rms:.2e}"
            np.testing.assert_array_equal(r.out, want, err_msg=f"thread {seed} step {r.step}")
