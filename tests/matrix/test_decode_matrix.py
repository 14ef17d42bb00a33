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


def run_matrix(impl, cfg, record_property, max_chunk: int = 0, tag: str = "",
               kv: tuple = (None, 64)) -> None:
    """STEPS fragmented steps of one configuration, each checked against the reference; the
    worst RMS goes to the session summary (conftest) under backend-path[-tag] and dtype.
    kv: (kv_dtype, kv_group_size) of a quantized pool; the reference then attends over the
    dequantized K/V (the workload's mirror holds them)."""
    backend, path = impl
    dtype, batch, group, head_dim, block_size, window = cfg
    if dtype not in backend.pool_dtypes:
        pytest.skip(f"backend {backend.name!r} has no {dtype} pools")
    if kv[0] is not None and kv[0] not in backend.kv_formats.get(path, ()):
        pytest.skip(f"path {path!r} of backend {backend.name!r} does not list kv_dtype {kv[0]!r} "
                    "(its refusal is tests/matrix/test_kv_formats.py's)")
    seed = zlib.crc32((tag + grid_id(cfg)).encode())
    wl = DecodeWorkload(backend, WorkloadConfig(
        batch=batch, num_kv_heads=2, group_size=group, head_dim=head_dim, block_size=block_size,
        dtype=dtype, window=window, seed=seed, max_chunk=max_chunk, kv_dtype=kv[0],
        kv_group_size=kv[1]), path=path)
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


# Quantized pools (ADR 0011): each format with each group size, GQA, head dims, windows and
# dtypes covered once per format rather than the whole grid per format (the formats share
# every path's attention; what differs is the write and the dequantization of a block).
KV_GRID = [
    # (kv_dtype, group), (dtype, batch, Hq/Hkv, head_dim, block_size, window)
    (("int8", 64), ("float16", 3, 4, 128, 16, None)),
    (("int8", 32), ("float32", 8, 1, 64, 32, 40)),
    (("int8", 128), ("bfloat16", 1, 8, 128, 16, None)),
    (("int4", 64), ("float16", 8, 4, 128, 16, 40)),
    (("int4", 32), ("float32", 3, 8, 64, 16, None)),
    (("int4", 128), ("float16", 1, 1, 128, 32, None)),
    (("float8_e4m3", 64), ("float16", 3, 4, 128, 16, None)),
    (("float8_e4m3", 64), ("float32", 8, 1, 64, 32, 40)),
    (("float8_e4m3", 64), ("bfloat16", 3, 8, 64, 16, None)),
]


def kv_id(p):
    (fmt, g), cfg = p
    return f"{fmt}-g{g}-{grid_id(cfg)}"


@pytest.mark.parametrize("case", KV_GRID, ids=[kv_id(p) for p in KV_GRID])
def test_fragmented_decode_quantized_kv(impl, case, record_property):
    run_matrix(impl, case[1], record_property, tag=case[0][0], kv=case[0])


KV_RAGGED_GRID = [
    (("int8", 64), ("float16", 8, 4, 128, 16, 40)),
    (("int4", 32), ("float32", 3, 4, 64, 16, None)),
    (("float8_e4m3", 64), ("float16", 8, 4, 64, 16, None)),
]


@pytest.mark.parametrize("case", KV_RAGGED_GRID, ids=[kv_id(p) for p in KV_RAGGED_GRID])
def test_fragmented_ragged_quantized_kv(impl, case, record_property):
    """Ragged plan/run on quantized pools: run() quantizes each step's K/V as it writes them."""
    run_matrix(impl, case[1], record_property, max_chunk=12, tag="ragged-" + case[0][0],
               kv=case[0])
