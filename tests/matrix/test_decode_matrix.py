"""The acceptance matrix: 200 fragmented decode steps per configuration, every backend x path,
each step checked against the float64 reference (RMS < 5e-3)."""
from __future__ import annotations

import itertools
import os
import zlib

import pytest

from paged_attention.lab.workload import DecodeWorkload, WorkloadConfig

STEPS = int(os.environ.get("PAGED_ATTENTION_TEST_MATRIX_STEPS", "200"))
TOLERANCE = 5e-3

GRID = list(itertools.product(
    ("float16", "float32"),  # pool dtype
    (1, 3, 8),               # batch
    (1, 4, 8),               # Hq / Hkv
    (64, 128),               # head_dim
    (16, 32),                # block_size
    (None, 40),              # sliding window
)) + list(itertools.product(
    ("bfloat16",),           # bfloat16 pools (q float32 holding bf16 values): a smaller grid,
    (1, 8),                  # since bf16 shares fp16's storage and paths on every backend
    (1, 4),
    (64, 128),
    (16,),
    (None, 40),
))


SHORT = {"float16": "16", "float32": "32", "bfloat16": "bf16"}


def grid_id(p):
    dtype, b, g, d, bs, w = p
    return f"{SHORT[dtype]}-B{b}-g{g}-D{d}-bs{bs}-{'w' + str(w) if w else 'full'}"


def run_matrix(impl, cfg, record_property, max_chunk: int = 0, tag: str = "") -> None:
    """STEPS fragmented steps of one configuration, each checked against the reference; the
    worst RMS goes to the session summary (conftest) under backend-path[-tag] and dtype."""
    backend, path = impl
    dtype, batch, group, head_dim, block_size, window = cfg
    if dtype not in backend.pool_dtypes:
        pytest.skip(f"backend {backend.name!r} has no {dtype} pools")
    seed = zlib.crc32((tag + grid_id(cfg)).encode())
    wl = DecodeWorkload(backend, WorkloadConfig(
        batch=batch, num_kv_heads=2, group_size=group, head_dim=head_dim, block_size=block_size,
        dtype=dtype, window=window, seed=seed, max_chunk=max_chunk), path=path)
    worst = 0.0
    for _ in range(STEPS):
        r = wl.step()
        assert r.out.shape == r.ref.shape
        assert r.rms < TOLERANCE, f"step {r.step}: RMS {r.rms:.2e} >= {TOLERANCE}"
        worst = max(worst, r.rms)
    record_property("matrix", (f"{backend.name}-{path}{tag and '-' + tag}", dtype, worst))
    assert wl.steps_done == STEPS
    wl.close()
    assert wl.manager.num_free == wl.num_blocks


@pytest.mark.parametrize("cfg", GRID, ids=[grid_id(p) for p in GRID])
def test_fragmented_decode_matches_reference(impl, cfg, record_property):
    run_matrix(impl, cfg, record_property)


RAGGED_GRID = list(itertools.product(
    ("float16", "float32"),  # pool dtype
    (1, 3, 8),               # batch
    (1, 4),                  # Hq / Hkv
    (64, 128),               # head_dim
    (16,),                   # block_size
    (None, 40),              # sliding window
)) + list(itertools.product(("bfloat16",), (3, 8), (4,), (64, 128), (16,), (None, 40)))


@pytest.mark.parametrize("cfg", RAGGED_GRID, ids=[grid_id(p) for p in RAGGED_GRID])
def test_fragmented_ragged_plan_run_matches_reference(impl, cfg, record_property):
    """plan/run with mixed rows every step: new prompts prefill in chunks of up to 12 tokens beside
    running decodes (and idle sequences with no query); run() writes each step's K/V first."""
    run_matrix(impl, cfg, record_property, max_chunk=12, tag="ragged")
