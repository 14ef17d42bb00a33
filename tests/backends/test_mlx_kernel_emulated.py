"""The fused MLX kernel's shared bodies run on the CPU (kernel_emulation.py, target_cpu.h)
against the float64 reference: plain pools and the quantized formats of ADR 0011, unsplit and
split-K, with the attention variants of ADR 0010. On any machine with a C++20 compiler: the GPU
runs of the same checks are test_mlx_fused.py's."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import kernel_emulation as emu  # noqa: E402

from paged_attention import reference  # noqa: E402
from paged_attention.backends.mlx import kernel_source as ks  # noqa: E402
from paged_attention.backends.mlx.backend import MLXBackend  # noqa: E402
from paged_attention.backends.mlx.fused import DecodePlan  # noqa: E402
from paged_attention.validation import check_decode, check_variant  # noqa: E402
from paged_attention.lab.workload import fragmented_tables  # noqa: E402

needs_cxx = pytest.mark.skipif(emu.unavailable_reason() is not None,
                               reason=str(emu.unavailable_reason()))
VARIANTS = ("soft_cap", "alibi_slopes", "sinks", "return_lse")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


def emulated_step(workdir, kv, kv_group, dtype, lens, hkv, group, d, bs, window, partitions,
                  features=(), seed=0, q_dtype=np.float16):
    """Pools written through the MLX backend (quantized as it stores them), a DecodePlan as
    plan() builds it, its kernels emulated; (out, lse, args, pool, sinks)."""
    rng = np.random.default_rng(seed)
    be = MLXBackend()
    lens = np.asarray(lens, np.int32)
    nb, tables = fragmented_tables(rng, lens, bs)
    fp8 = {"k_scale": 0.5, "v_scale": 0.25} if kv == "float8_e4m3" else {}
    pool = be.create_pool(nb, bs, hkv, d, dtype, kv_dtype=kv, kv_group_size=kv_group, **fp8)
    k, v = rng.standard_normal((2, nb * bs, hkv, d)).astype(np.float32)
    be.write_kv(pool, np.arange(nb * bs), k, v)
    hq = hkv * group
    q = rng.standard_normal((len(lens), hq, d)).astype(q_dtype)
    slopes = -rng.uniform(0.01, 0.3, hq).astype(np.float32) if "alibi_slopes" in features else None
    sinks = rng.standard_normal(hq).astype(np.float32) if "sinks" in features else None
    args = dataclasses.replace(check_decode(q, pool.spec, tables, lens, None, window),
                               variant=check_variant(20.0 if "soft_cap" in features else None,
                                                     slopes, "return_lse" in features, hq))
    plan = DecodePlan.from_spec("cuda", args, pool.spec, partitions=partitions)
    assert (plan.num_parts > 1) == (partitions > 1)
    out, lse = emu.run_plan(workdir, plan, q, *pool.sources(), sinks, frozenset(features))
    return q, out, lse, args, pool, sinks


CASES = [  # (kv_dtype, group), (dtype, lens, Hkv, G, D, block, window), partitions, features
    *[(kv, ("float16", [700, 1, 0, 300], 2, 4, 128, 16, None), 1, ())
      for kv in [(None, 64), ("int8", 64), ("int4", 32), ("int4", 128), ("float8_e4m3", 64)]],
    *[(kv, ("float16", [700, 1, 0, 300], 2, 4, 128, 16, 200), 3, VARIANTS)
      for kv in [(None, 64), ("int8", 64), ("int4", 32), ("float8_e4m3", 64)]],
    (("int8", 32), ("bfloat16", [900, 37], 1, 8, 64, 32, 300), 3, VARIANTS),
    (("int4", 32), ("float32", [1200, 3], 2, 6, 96, 16, None), 5, ("soft_cap", "sinks")),
    (("float8_e4m3", 64), ("float16", [333, 12], 1, 16, 256, 16, 100), 1, VARIANTS),
    (("int8", 128), ("float32", [500, 77], 2, 1, 128, 16, None), 2, ("alibi_slopes",)),
]


@needs_cxx
@pytest.mark.parametrize("case", CASES, ids=[
    f"{c[0][0] or 'plain'}-g{c[0][1]}-{c[1][0]}-D{c[1][4]}-G{c[1][3]}-p{c[2]}-"
    f"{'+'.join(c[3]) or 'none'}" for c in CASES])
@pytest.mark.parametrize("tuning", ["", "pf0ws1", "pf1i4ws1"], ids=["block", "ws", "ws-pf"])
def test_emulated_kernel_matches_the_reference(workdir, case, tuning):
    """The kernel's output against float64 attention over the pool's values (to_numpy: float32
    codes * scale + bias, as the kernel dequantizes them; fp8 and plain pools exactly) within
    the float16 output's rounding; the LSE where asked; empty sequences give zeros (or the
    sinks' share). Both softmax forms: one per threadgroup (the default) and per warp (WS,
    with and without prefetch)."""
    from paged_attention import settings
    (kv, kv_group), (dtype, lens, hkv, group, d, bs, window), parts, feats = case
    with settings.override(mlx_variant=tuning):
        q, out, lse, args, pool, sinks = emulated_step(workdir, kv, kv_group, dtype, lens, hkv,
                                                       group, d, bs, window, parts, feats,
                                                       seed=len(lens) + d)
    want, want_lse = reference.step(q, *pool.to_numpy(), args, sinks)
    assert reference.rms(out, want) < 3e-4, reference.rms(out, want)
    if "return_lse" in feats:
        np.testing.assert_allclose(lse, want_lse, atol=2e-3, rtol=0)
    if 0 in lens:
        assert not out[list(lens).index(0)].any()


@needs_cxx
def test_emulated_float32_is_exact_to_float32(workdir):
    """With float32 q and output, the int8 and fp8 forms agree with the float64 reference over
    their dequantization to float32 rounding: nothing in the kernel loses more than that."""
    for kv in ("int8", "float8_e4m3"):
        q, out, _, args, pool, _ = emulated_step(workdir, kv, 64, "float32", [300, 45], 2, 4,
                                                 128, 16, None, 1, q_dtype=np.float32)
        assert reference.rms(out, reference.step(q, *pool.to_numpy(), args)[0]) < 1e-6


def test_the_cpu_prologue_defines_what_the_cuda_one_does():
    """The emulation compiles the bodies unchanged only if its prologue provides every name the
    GPU prologues do (and the same per-thread indices)."""
    (cuda_head, cuda_body), (cpu_head, cpu_body) = ks.prologue("cuda"), emu._prologue()
    macros = re.compile(r"#define (PA_\w+)")
    assert set(macros.findall(cuda_head)) == set(macros.findall(cpu_head))
    helpers = re.compile(r"PA_FN [\w<> ]+? (pa_\w+)(?:<[^>]*>)?\(")
    assert set(helpers.findall(cuda_head)) - {"pa_ld_stream"} <= set(helpers.findall(cpu_head))
    assert re.findall(r"const int (pa_\w+)", cuda_body) == re.findall(r"const int (pa_\w+)", cpu_body)


APPEND_CASES = [  # (dtype, lens, Hkv, G, D, block, window, partitions, tuning)
    ("float16", [700, 1, 300, 17], 2, 4, 128, 16, None, 1, ""),
    ("float16", [700, 1, 300, 17], 2, 4, 128, 16, None, 3, "pf0ws1"),
    ("bfloat16", [900, 37], 1, 8, 64, 32, 300, 2, ""),
    ("float32", [1200, 3], 2, 16, 96, 16, None, 1, "pf1i4"),     # G 16: two head chunks
]


@needs_cxx
@pytest.mark.parametrize("case", APPEND_CASES,
                         ids=[f"{c[0]}-G{c[3]}-D{c[4]}-p{c[7]}-{c[8] or 'default'}" for c in APPEND_CASES])
def test_emulated_append_stores_the_new_rows_and_attends_them(workdir, case):
    """The append form (PA_APPEND): each sequence's new K/V row lands at its slot in the pools
    (exactly; nothing else changes) and the output is attention over the pools as written, as a
    scatter followed by the plain kernel would give; also with split-K, a window, several head
    chunks per KV head and the per-warp softmax."""
    from paged_attention import settings
    dtype, lens, hkv, group, d, bs, window, parts, tuning = case
    rng = np.random.default_rng(len(lens) + d)
    be = MLXBackend()
    lens = np.asarray(lens, np.int32)
    nb, tables = fragmented_tables(rng, lens, bs)
    pool = be.create_pool(nb, bs, hkv, d, dtype)
    k, v = rng.standard_normal((2, nb * bs, hkv, d)).astype(np.float32)
    be.write_kv(pool, np.arange(nb * bs), k, v)
    pos = lens.astype(np.int64) - 1
    slots = tables[np.arange(len(lens)), pos // bs].astype(np.int64) * bs + pos % bs
    hq = hkv * group
    q = rng.standard_normal((len(lens), hq, d)).astype(np.float16)
    k_new, v_new = (mx.array(rng.standard_normal((len(lens), hkv, d)).astype(np.float32))
                    .astype(pool.k.dtype) for _ in range(2))
    args = check_decode(q, pool.spec, tables, lens, None, window)
    with settings.override(mlx_variant=tuning, mlx_fused_append="auto"):
        plan = DecodePlan.from_spec("cuda", args, pool.spec, partitions=parts, slots=slots)
    assert plan.appends and (plan.num_parts > 1) == (parts > 1)
    out, k_after, v_after = emu.run_append(workdir, plan, q, pool.k, pool.v, k_new, v_new)
    blocks, offsets = np.divmod(slots, bs)
    want_k, want_v = mx.array(pool.k), mx.array(pool.v)
    want_k[mx.array(blocks), mx.array(offsets)] = k_new
    want_v[mx.array(blocks), mx.array(offsets)] = v_new
    bits = (lambda a: np.array(a.view(mx.uint16))) if dtype == "bfloat16" else np.array
    np.testing.assert_array_equal(k_after, bits(want_k))
    np.testing.assert_array_equal(v_after, bits(want_v))
    f32 = (lambda a: np.array(a.astype(mx.float32)))
    want = reference.step(q, f32(want_k), f32(want_v), args)[0]
    assert reference.rms(out, want) < 3e-4, reference.rms(out, want)


def test_append_only_where_each_slot_is_the_last_attended_position():
    """The host enables the append form only for plain pools whose slots are exactly each
    sequence's position ctx - 1 through its table; anything else keeps the scatter."""
    from paged_attention.backends.mlx.fused import appends
    from paged_attention.kv_formats import KVFormat
    tables = np.array([[3, 1, 0], [2, 4, 0]], np.int32)
    lens = np.array([20, 5], np.int32)
    good = np.array([1 * 16 + 3, 2 * 16 + 4])
    assert appends(good, tables, lens, 16, None)
    assert not appends(good + 1, tables, lens, 16, None)            # another slot
    assert not appends(good[:1], tables, lens, 16, None)             # not one per row
    assert not appends(good, tables, lens, 16, KVFormat("int8", 64))  # quantized pools
    assert not appends(None, tables, lens, 16, None)
    assert not appends(good, tables, np.array([20, 0], np.int32), 16, None)
