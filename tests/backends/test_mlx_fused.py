"""The fused MLX paged-decode kernel (backends/mlx/fused.py, shaders/mlx/).

GPU tests run on a Metal or CUDA MLX device and skip elsewhere; the source-structure and
heuristic tests run everywhere (the Metal source is generated from the same body as CUDA)."""
from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from paged_attention.backends.mlx import kernel_source as ks  # noqa: E402
from paged_attention.backends.mlx.backend import MLXBackend, gpu_kind  # noqa: E402
from paged_attention.backends.mlx.fused import (DecodePlan, choose_partitions, fused_decode,  # noqa: E402
                                kernel_config)
from paged_attention.backends.mlx.gather import gather_decode  # noqa: E402
from paged_attention import reference  # noqa: E402
from paged_attention.validation import PoolSpec, check_decode  # noqa: E402
from paged_attention.lab.workload import fragmented_tables  # noqa: E402

API = gpu_kind()
needs_gpu = pytest.mark.skipif(API is None, reason="no Metal or CUDA device for MLX custom kernels")
needs_metal = pytest.mark.skipif(API != "metal", reason="no Metal device")
MX = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
TOL = 5e-3


def make_case(seed, lens, hkv, group, d, bs, dtype, window=None, spare=5):
    """Fragmented pools (random block order) holding `lens` tokens per sequence."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens, np.int32)
    nb, tables = fragmented_tables(rng, lens, bs, spare)
    k = mx.array(rng.standard_normal((nb, bs, hkv, d)).astype(np.float32)).astype(MX[dtype])
    v = mx.array(rng.standard_normal((nb, bs, hkv, d)).astype(np.float32)).astype(MX[dtype])
    qdt = np.float16 if dtype == "float16" else np.float32
    q = rng.standard_normal((len(lens), hkv * group, d)).astype(qdt)
    return q, k, v, tables, lens


def host(a):
    return np.array(a.astype(mx.float32))


def run_and_compare(q, k, v, tables, lens, window=None, partitions=None, scale=None):
    spec = PoolSpec(*k.shape, dtype=str(k.dtype).rsplit(".", 1)[-1])
    args = check_decode(q, spec, tables, lens, scale, window)
    out = fused_decode(mx.array(q), k, v, args, api=API, partitions=partitions)
    assert out.shape == q.shape and out.dtype == mx.array(q).dtype
    got = host(out)
    ref = reference.decode(q, host(k), host(v), tables, lens, scale=scale, window=window)
    assert np.isfinite(got).all()
    err = reference.rms(got, ref)
    assert err < TOL, f"RMS {err:.2e}"
    return got, err


SHAPES = [  # (dtype, lens, hkv, group, d, bs, window)
    ("float16", [37, 1, 300], 2, 4, 128, 16, None),
    ("float16", [129, 64, 5], 2, 1, 64, 32, None),
    ("float16", [500, 17], 1, 8, 128, 16, 40),
    ("float32", [77, 300, 2], 2, 4, 64, 16, None),
    ("float32", [260], 2, 8, 128, 32, 100),
    ("bfloat16", [300, 45], 2, 4, 128, 16, None),
    ("bfloat16", [91, 200], 4, 1, 64, 32, 33),
    ("float16", [333, 12], 1, 16, 128, 16, None),   # two head chunks per KV head
    ("float16", [150, 7], 2, 6, 96, 16, None),      # G=6, D=96 (idle lanes in a row)
    ("float16", [210, 3], 1, 4, 256, 16, None),
    ("float32", [120], 1, 8, 256, 16, 50),
    ("float16", [1000, 0, 33], 2, 4, 128, 16, None),  # a zero-length sequence
]


@needs_gpu
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: f"{c[0]}-L{max(c[1])}-g{c[3]}-D{c[4]}-bs{c[5]}"
                         f"-{'w' + str(c[6]) if c[6] else 'full'}")
def test_fused_matches_reference(case):
    dtype, lens, hkv, group, d, bs, window = case
    q, k, v, tables, lens = make_case(hash(str(case)) % 2**31, lens, hkv, group, d, bs, dtype)
    got, _ = run_and_compare(q, k, v, tables, lens, window=window)
    assert not got[lens == 0].any(), "an empty sequence must give zeros"


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("window", [None, 1500])
def test_split_k_forced_on_and_off(dtype, window):
    q, k, v, tables, lens = make_case(7, [6000, 2500, 1, 0, 4097], 2, 4, 128, 16, dtype)
    outs = {}
    for parts in (1, 3, 16, None):
        outs[parts], _ = run_and_compare(q, k, v, tables, lens, window=window, partitions=parts)
    assert reference.rms(outs[1], outs[16]) < TOL
    spec = PoolSpec(*k.shape, dtype=dtype)
    plan = DecodePlan.from_args(API, check_decode(q, spec, tables, lens, None, window), k, 16)
    assert plan.num_parts > 1


@needs_gpu
@pytest.mark.parametrize("variant", ["pf0hf0", "pf1", "pf0i4", "pf1nc", "pf1i8", "pf0nc2", "pf0nc3hf0", "pf0w2", "pf0l1", "pf1l2"])
@pytest.mark.parametrize("case", [("float16", [3000, 70, 0], 2, 4, 128, 16, None, 8),
                                  ("bfloat16", [900, 1], 1, 8, 64, 32, 300, None),
                                  ("float32", [1200], 2, 6, 96, 16, None, 1)],
                         ids=["f16", "bf16-window", "f32-g6-d96"])
def test_kernel_variants_match_reference(variant, case):
    from paged_attention.backends.mlx.fused import parse_variant
    dtype, lens, hkv, group, d, bs, window, parts = case
    q, k, v, tables, lens = make_case(19, lens, hkv, group, d, bs, dtype)
    spec = PoolSpec(*k.shape, dtype=dtype)
    args = check_decode(q, spec, tables, lens, None, window)
    plan = DecodePlan.from_args(API, args, k, parts, parse_variant(variant))
    assert plan.num_parts > 1 if parts and parts > 1 else True
    got = host(plan(mx.array(q), k, v))
    ref = reference.decode(q, host(k), host(v), tables, lens, window=window)
    assert reference.rms(got, ref) < TOL


@needs_gpu
def test_all_empty_and_empty_batch():
    q, k, v, tables, lens = make_case(3, [0, 0], 2, 4, 64, 16, "float16")
    got, _ = run_and_compare(q, k, v, tables, lens)
    assert not got.any()
    spec = PoolSpec(*k.shape, dtype="float16")
    args = check_decode(q[:0], spec, tables[:0], lens[:0], None, None)
    assert fused_decode(mx.array(q[:0]), k, v, args, api=API).shape == (0, 8, 64)


@needs_gpu
def test_block_ids_are_clamped_in_kernel():
    """A corrupt table entry (bypassing host validation) reads block NB-1, never out of bounds."""
    q, k, v, tables, lens = make_case(11, [40], 1, 4, 64, 16, "float16")
    nb = k.shape[0]
    bad = tables.copy()
    bad[0, 1] = nb + 1000
    plan = DecodePlan(API, bad, lens, 0.125, None, num_blocks=nb, block_size=16, num_kv_heads=1,
                      num_q_heads=4, head_dim=64, pool_dtype=mx.float16)
    got = host(plan(mx.array(q), k, v))
    fixed = tables.copy()
    fixed[0, 1] = nb - 1
    ref = reference.decode(q, host(k), host(v), fixed, lens, scale=0.125)
    assert reference.rms(got, ref) < TOL


@needs_gpu
def test_through_backend_matches_gather():
    be = MLXBackend()
    assert "fused" in be.paths
    pool = be.create_pool(64, 16, 2, 128, "float16")
    rng = np.random.default_rng(5)
    slots = rng.permutation(64 * 16)[:300]
    be.write_kv(pool, slots, rng.standard_normal((300, 2, 128)).astype(np.float16),
                rng.standard_normal((300, 2, 128)).astype(np.float16))
    tables = (slots[::16][:19] // 16).astype(np.int32)[None, :]
    lens = np.array([19 * 16 - 5], np.int32)
    q = rng.standard_normal((1, 8, 128)).astype(np.float16)
    a = np.asarray(be.decode(q, pool, tables, lens, path="fused"), np.float64)
    b = np.asarray(be.decode(q, pool, tables, lens, path="gather"), np.float64)
    assert reference.rms(a, b) < TOL


@needs_gpu
@pytest.mark.parametrize("partitions", [1, None])
def test_no_gather_copy_memory(partitions):
    """Extra device memory of a fused decode is O(output + split-K partials), while the gather
    path materialises the whole context."""
    q, k, v, tables, lens = make_case(13, [8192] * 4, 8, 4, 128, 16, "float16", spare=0)
    kv_bytes = k.nbytes + v.nbytes
    qm = mx.array(q)
    spec = PoolSpec(*k.shape, dtype="float16")
    args = check_decode(q, spec, tables, lens, None, None)
    mx.eval(qm, k, v)
    mx.eval(fused_decode(qm, k, v, args, api=API, partitions=partitions))  # compile outside
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    plan = DecodePlan.from_args(API, args, k, partitions)
    out = plan(qm, k, v)
    mx.eval(out)
    extra = mx.get_peak_memory() - base
    small = tables.nbytes + lens.nbytes + 64  # plan's device copies of tables, lengths, scalars
    allowed = out.nbytes + plan.partial_bytes() + small + (1 << 20)
    assert extra <= allowed, f"fused used {extra} extra bytes, allowed {allowed} (K+V {kv_bytes})"
    assert (partitions == 1) == (plan.partial_bytes() == 0)
    del out
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(gather_decode(qm, k, v, args.block_tables, args.context_lens, args.scale, None))
    assert mx.get_peak_memory() - base >= kv_bytes // 2, "the gather path should copy the context"


@needs_metal
def test_metal_kernel_runs():
    q, k, v, tables, lens = make_case(17, [300, 5], 2, 4, 128, 16, "float16")
    run_and_compare(q, k, v, tables, lens)
    run_and_compare(q, k, v, tables, lens, partitions=4)


# ---- CPU-runnable: one source, two targets ----------------------------------------------------
TARGET_TOKENS = re.compile(r"__shfl|__syncthreads|threadIdx|blockIdx|simd_|threadgroup_barrier|"
                           r"\bdevice\b|\bthreadgroup\b|as_type|__half|__nv_bfloat16|\bhalf\b")


def code(text):
    """Text without // comments."""
    return re.sub(r"//[^\n]*", "", text)


def defined_names(text):
    return set(re.findall(r"#define (PA_\w+)", text)) | set(re.findall(r"\b(pa_\w+)\s*\(", text)) \
        | set(re.findall(r"typedef [\w ]+ (pa_\w+);", text))


def test_prologues_define_the_same_names():
    (ch, cb), (mh, mb) = ks.prologue("cuda"), ks.prologue("metal")
    macros = re.compile(r"#define (PA_\w+)|typedef [\w ]+ (pa_\w+);")
    assert set(macros.findall(ch)) == set(macros.findall(mh))
    # helper functions: the same set, apart from target-private helpers behind a macro
    assert defined_names(ch) - {"pa_ld_stream"} == defined_names(mh)
    assert re.findall(r"const int (pa_\w+)", cb) == re.findall(r"const int (pa_\w+)", mb)


@pytest.mark.parametrize("kernel,split", [("decode", False), ("decode", True), ("reduce", False),
                                          ("stream_read", False)])
def test_both_targets_share_the_body(kernel, split):
    shared = ks.shared_body(kernel)
    assert not TARGET_TOKENS.search(code(shared)), "target-specific code belongs in the prologues"
    assert not TARGET_TOKENS.search(code(ks._read("common.h")))
    for api in ks.TARGETS:
        header, body = ks.kernel_source(api, kernel, split)
        assert shared in body
        assert body.count("{") == body.count("}") and header.count("{") == header.count("}")
        assert (f"#define PA_SPLIT {int(split)}" in body) == (kernel == "decode")
    names = set(re.findall(r"\bPA_\w+|\bpa_\w+", code(shared)))
    local = set(re.findall(r"constexpr int (PA_\w+)", shared)) | \
        set(re.findall(r"PA_SHARED float (pa_\w+)", shared)) | set(re.findall(r"#define (PA_\w+)", shared)) \
        | set(re.findall(r"(?:const )?(?:float|int|pa_i64) (pa_\w+)", shared))
    every = ks.KERNEL_FEATURES.get((kernel, split), ())
    # what the assembled source declares: the form's #defines and the input/output names of
    # the kernel's forms (the body names both forms' arguments, each behind its #if)
    args = {n for (k, sp), feats in ks.KERNEL_FEATURES.items() if k == kernel
            for n in ks.input_names(k, sp, feats) + ks.output_names(k, sp, feats)}
    for api in ks.TARGETS:
        header, body = ks.kernel_source(api, kernel, split, every)
        provided = defined_names(header) | set(re.findall(r"const int (pa_\w+)", body)) | \
            set(re.findall(r"#define (PA_\w+)", body)) | args
        assert names - local <= provided, f"{api}: missing {names - local - provided}"


def test_translation_units_are_well_formed():
    cfg = kernel_config(128, 16, 8, 4, mx.float16)
    tmpl = [(n, str(v).rsplit(".", 1)[-1] if not isinstance(v, int) else v)
            for n, v in cfg.template(mx.float16, mx.float16)]
    ins = {"q": "float16", "k_pool": "float16", "v_pool": "float16", "pa_step": "int32"}
    metal = ks.metal_translation_unit("decode", False, ins, {"out": "float16"}, tmpl)
    cuda = ks.cuda_translation_unit("decode", False, ins, {"out": "float16"}, tmpl)
    assert "[[threadgroup_position_in_grid]]" in metal and "template <typename T, typename OutT, int D" in metal
    assert "__global__ void pa_paged_decode(" in cuda and "using T = __half;" in cuda
    for tu in (metal, cuda):
        assert ks.shared_body("decode") in tu


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("dtype,d,group", [("float16", 128, 4), ("bfloat16", 64, 8), ("float32", 256, 8)])
def test_cuda_source_compiles_without_spills(tmp_path, dtype, d, group):
    cfg = kernel_config(d, 16, 8, group, MX[dtype])
    tmpl = [(n, dtype if n == "T" else "float32" if n == "OutT" else v)
            for n, v in cfg.template(None, None)]
    ins = {"q": "float32", "k_pool": dtype, "v_pool": dtype, "pa_step": "int32"}
    for split in (False, True):
        outs = {"o_part": "float32", "ml_part": "float32"} if split else {"out": "float32"}
        src = tmp_path / f"k{int(split)}.cu"
        src.write_text(ks.cuda_translation_unit("decode", split, ins, outs, tmpl))
        r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v",
                            "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "0 bytes spill stores" in r.stderr, r.stderr[-2000:]


# ---- heuristics ---------------------------------------------------------------------------
def test_split_k_fills_the_gpu_for_one_long_sequence():
    cfg = kernel_config(128, 16, 8, 4, mx.float16)
    parts, size = choose_partitions(1, 8, 32768, cfg.tile, 132)
    assert 8 * parts >= 132 * 2 and size % cfg.tile == 0 and parts * size >= 32768
    assert choose_partitions(1, 8, 32768, cfg.tile, 132, partitions=1) == (1, -(-32768 // cfg.tile) * cfg.tile)
    assert choose_partitions(32, 8, 1024, cfg.tile, 132)[0] <= 4
    assert choose_partitions(4, 8, 0, cfg.tile, 132) == (1, cfg.tile)


def test_kernel_config_register_budget():
    for dt in (mx.float16, mx.bfloat16, mx.float32):
        for d in range(32, 257, 32):
            for g in (1, 3, 4, 8, 16, 32):
                c = kernel_config(d, 16, 2, g, dt)
                assert c.chunk <= 8 and c.tpt * c.nv * (4 if dt == mx.float32 else 8) >= d
                assert 32 % c.tpt == 0 and math.prod([c.chunk, c.nv]) >= 1


def test_variant_names():
    from paged_attention.backends.mlx.fused import parse_variant
    assert parse_variant("pf1i4nc2hf0") == {"prefetch": True, "iters": 4, "stream": 2, "hf": False}
    assert "hf" not in parse_variant("pf0")  # the default (heads along grid x) stays
    assert parse_variant("pf0w2l1") == {"prefetch": False, "iters": 0, "stream": 0, "warps": 2, "l2": 1}
    assert kernel_config(128, 16, 8, 4, mx.float16).heads_fast
    cfg = kernel_config(128, 16, 8, 4, mx.float16, parse_variant("pf0hf0"))
    assert cfg.grid(6, 3) == (6 * cfg.threads, 8, 3)
    assert kernel_config(128, 16, 8, 4, mx.float16).grid(6, 3) == (8 * cfg.threads, 6, 3)
    with pytest.raises(ValueError, match="variant"):
        parse_variant("rows8")


@needs_gpu
def test_stream_read_probe_reads_every_vector():
    """The ceiling probe's xor-fold over its strided vectors matches numpy: it reads what it
    claims to read, so the bandwidth it reports is real."""
    from paged_attention.backends.mlx.bench_hooks import STREAM_THREADS, stream_read
    words = np.random.default_rng(0).integers(0, 2**32, size=4 * 5000, dtype=np.uint32)
    got = np.array(stream_read(API, mx.array(words), 2))
    threads = 2 * STREAM_THREADS
    vec = np.bitwise_xor.reduce(words.reshape(-1, 4), axis=1)
    want = np.array([np.bitwise_xor.reduce(vec[t::threads]) if t < len(vec) else 0
                     for t in range(threads)], dtype=np.uint32)
    assert np.array_equal(got, want)


def test_plan_decisions_follow_settings_and_cover_the_context():
    """DecodePlan caches its kernel config and split-K choice per geometry (plan() is on every
    step's critical path): a settings override still takes effect, and the partitions, chosen
    for the length rounded up to whole tiles, always cover the attended tokens."""
    from paged_attention import settings

    def plan(lens, window=None):
        lens = np.asarray(lens, np.int32)
        tables = np.zeros((lens.size, 2048), np.int32)
        return DecodePlan("cuda", tables, lens, 0.125, window, num_blocks=4096, block_size=16,
                          num_kv_heads=8, num_q_heads=32, head_dim=128, pool_dtype=mx.float16)
    with settings.override(mlx_splitk="3"):
        assert plan([32768]).num_parts == 3
    from paged_attention.backends.mlx.fused import compute_units
    p = plan([32768])   # a whole number of tiles: the same choice as the uncached heuristic
    assert (p.num_parts, p.part_size) == choose_partitions(
        1, 8 * p.cfg.num_chunks, 32768, p.cfg.tile, compute_units("cuda"))
    with settings.override(mlx_splitk="off"):
        assert plan([32768]).num_parts == 1
    for n in (1, 255, 4097, 30001, 32768):
        for window in (None, 1000):
            p = plan([n, n // 2], window)
            assert p.num_parts * p.part_size >= min(n, window or n)


def test_step_array_layout():
    """Every kernel of a step reads one int32 array in place (paged_decode.body): the header,
    then the lengths and tables at the offsets it names, then the write indices the pool
    scatters use. Built on any MLX device (nothing is launched)."""
    from paged_attention.backends.mlx.fused import STEP_HEADER
    tables = np.array([[3, 9, 4], [7, 0, 1]], np.int32)
    lens = np.array([40, 17], np.int32)
    slots = np.array([39 + 3 * 16 - 16, 16], np.int64)
    p = DecodePlan("cuda", tables, lens, 0.125, 100, num_blocks=64, block_size=16,
                   num_kv_heads=2, num_q_heads=8, head_dim=64, pool_dtype=mx.float16, slots=slots)
    ints = np.array(p.ints)
    assert list(ints[:5]) == [64, 3, 100, p.part_size, p.num_parts]
    assert ints[5:6].view(np.float32)[0] == np.float32(0.125)
    lens_at, tables_at = ints[6], ints[7]
    assert lens_at == STEP_HEADER
    np.testing.assert_array_equal(ints[lens_at:lens_at + 2], lens)
    np.testing.assert_array_equal(ints[tables_at:tables_at + 6].reshape(2, 3), tables)
    np.testing.assert_array_equal(np.array(p.write[0]), slots // 16)
    np.testing.assert_array_equal(np.array(p.write[1]), slots % 16)
    empty = DecodePlan("cuda", np.zeros((2, 0), np.int32), np.zeros(2, np.int32), 0.5, None,
                       num_blocks=64, block_size=16, num_kv_heads=2, num_q_heads=8, head_dim=64,
                       pool_dtype=mx.float16)
    e = np.array(empty.ints)
    assert e[1] == 1 and e[2] == 0 and empty.write is None
    np.testing.assert_array_equal(e[e[7]:e[7] + 2], [0, 0])   # one zero entry per row


# ---- attention variants (ADR 0010): soft-cap, ALiBi, sinks, LSE as compiled-in forms -----------
VARIANT_FEATURES = tuple(f for f in ks.FEATURE_DEFINES if f != "append")  # the attention variants


def variant_case(seed, lens, hkv, group, d, bs, dtype, window, cap, alibi, sinks, lse):
    """make_case's pools plus validated args carrying the Variant, and the sinks (or None)."""
    import dataclasses

    from paged_attention.validation import check_variant
    q, k, v, tables, lens = make_case(seed, lens, hkv, group, d, bs, dtype)
    rng = np.random.default_rng(seed + 1)
    hq = hkv * group
    slopes = -rng.uniform(0.01, 0.3, hq).astype(np.float32) if alibi else None
    sink = (2 * rng.standard_normal(hq)).astype(np.float32) if sinks else None
    spec = PoolSpec(*k.shape, dtype=dtype)
    args = check_decode(q, spec, tables, lens, None, window)
    args = dataclasses.replace(args, variant=check_variant(cap, slopes, lse, hq))
    return q, k, v, args, sink


def run_variant(q, k, v, args, sink, partitions):
    plan = DecodePlan.from_args(API, args, k, partitions)
    out, lse = plan.with_lse(mx.array(q), k, v, None if sink is None else mx.array(sink))
    want, want_lse = reference.step(q, host(k), host(v), args, sink)
    return plan, host(out), (None if lse is None else np.array(lse)), want, want_lse


@needs_gpu
@pytest.mark.parametrize("partitions", [1, 5, None])
@pytest.mark.parametrize("feats", [f for n in range(1, 5) for f in itertools.combinations(VARIANT_FEATURES, n)],
                         ids=lambda f: "+".join(f))
def test_variant_forms_match_the_reference(feats, partitions):
    """Every combination of the four features, unsplit and split-K (forced and chosen), against
    the float64 reference: the output, and the LSE where asked (natural log, sinks included)."""
    cap, alibi, sinks, lse = (f in feats for f in VARIANT_FEATURES)
    q, k, v, args, sink = variant_case(23, [1500, 1, 0, 700], 2, 4, 128, 16, "float16", None,
                                       8.0 if cap else None, alibi, sinks, lse)
    plan, got, got_lse, want, want_lse = run_variant(q, k, v, args, sink, partitions)
    assert partitions != 5 or plan.num_parts == 5
    assert reference.rms(got, want) < TOL
    assert not got[2].any(), "an empty sequence gives zeros, sinks or not"
    if lse:
        assert got_lse.shape == (4, 8) and got_lse.dtype == np.float32
        np.testing.assert_allclose(got_lse, want_lse, atol=2e-3, rtol=0)
        assert np.all(np.isneginf(got_lse[2]) == (not sinks))
    else:
        assert got_lse is None


@needs_gpu
@pytest.mark.parametrize("case", [("bfloat16", [900, 37], 1, 8, 64, 32, 300),
                                  ("float32", [1200, 3], 2, 6, 96, 16, None),
                                  ("float16", [333, 12], 1, 16, 128, 16, 100)],
                         ids=["bf16-window", "f32-g6-d96", "f16-g16-window"])
@pytest.mark.parametrize("partitions", [1, 4])
def test_all_variants_over_dtypes_windows_and_groups(case, partitions):
    dtype, lens, hkv, group, d, bs, window = case
    q, k, v, args, sink = variant_case(29, lens, hkv, group, d, bs, dtype, window, 20.0, True,
                                       True, True)
    _, got, got_lse, want, want_lse = run_variant(q, k, v, args, sink, partitions)
    assert reference.rms(got, want) < TOL
    np.testing.assert_allclose(got_lse, want_lse, atol=2e-3, rtol=0)


@needs_gpu
def test_split_k_counts_a_sink_once():
    """A sink is one key per query: with 8 partitions it must not join 8 denominators. exp(8)
    is about the sum of the 4000 keys' weights (logits ~ N(0, 1)), so a sink counted 8 times
    would move the LSE by ~1.6 and the output by a large fraction of itself."""
    q, k, v, args, _ = variant_case(31, [4000], 2, 4, 128, 16, "float32", None, None, False,
                                    False, True)
    sink = np.full(8, 8.0, np.float32)
    outs, lses = [], []
    for parts in (1, 8):
        plan, got, got_lse, want, want_lse = run_variant(q, k, v, args, sink, parts)
        assert plan.num_parts == parts
        assert reference.rms(got, want) < 1e-4
        np.testing.assert_allclose(got_lse, want_lse, atol=1e-4, rtol=0)
        outs.append(got)
        lses.append(got_lse)
    np.testing.assert_allclose(lses[0], lses[1], atol=1e-4)


@needs_gpu
def test_plain_runs_keep_the_plain_kernel():
    """A plan without variants launches the plain forms (no extra input or output)."""
    q, k, v, tables, lens = make_case(37, [300], 2, 4, 64, 16, "float16")
    spec = PoolSpec(*k.shape, dtype="float16")
    plan = DecodePlan.from_args(API, check_decode(q, spec, tables, lens, None, None), k)
    got = host(plan(mx.array(q), k, v))
    out, lse = plan.with_lse(mx.array(q), k, v, None)     # no features: the plain form too
    assert lse is None and np.array_equal(host(out), got)


# CPU-runnable: the forms' sources, names, signatures and the step array's variant fields.
def test_every_form_has_its_own_name_and_signature():
    names = set()
    for kernel, split in (("decode", False), ("decode", True), ("reduce", False)):
        allowed = [f for f in VARIANT_FEATURES if f in ks.KERNEL_FEATURES[(kernel, split)]]
        for n in range(len(allowed) + 1):
            for feats in itertools.combinations(allowed, n):
                names.add(ks.kernel_name(kernel, split, feats))
                _, body = ks.kernel_source("cuda", kernel, split, feats)
                for f, define in ks.FEATURE_DEFINES.items():
                    assert f"#define {define} {int(f in feats)}\n" in body
                assert ("pa_sinks" in ks.input_names(kernel, split, feats)) == ("sinks" in feats)
                assert ("lse" in ks.output_names(kernel, split, feats)) == ("return_lse" in feats)
    assert len(names) == 16 + 4 + 4
    assert ks.kernel_name("decode") == "pa_paged_decode"      # the plain forms keep their names
    for feats in (("sinks",), ("return_lse",)):                 # the reduce's job under split-K
        with pytest.raises(ValueError, match="does not implement"):
            ks.kernel_source("cuda", "decode", True, feats)


def test_step_array_carries_the_cap_and_slopes():
    from paged_attention.backends.mlx.fused import STEP_HEADER
    from paged_attention.validation import check_variant
    tables = np.array([[3, 9], [7, 0]], np.int32)
    lens = np.array([20, 17], np.int32)
    slopes = np.array([-0.5, -0.25, -0.125, -0.0625], np.float32)

    def ints(attention, slots=None):
        p = DecodePlan("cuda", tables, lens, 0.125, None, num_blocks=64, block_size=16,
                       num_kv_heads=2, num_q_heads=4, head_dim=64, pool_dtype=mx.float16,
                       slots=slots, attention=attention)
        return p, np.array(p.ints)
    _, plain = ints(check_variant(None, None, True, 4))
    assert plain[8] == 0 and plain[9] == 0 and plain.size == STEP_HEADER + 2 + 4
    p, a = ints(check_variant(30.0, slopes, False, 4), slots=np.array([19, 32]))
    assert a[8:9].view(np.float32)[0] == np.float32(30.0)
    np.testing.assert_array_equal(a[a[9]:a[9] + 4].view(np.float32), slopes)
    np.testing.assert_array_equal(a[a[7]:a[7] + 4].reshape(2, 2), tables)   # tables unmoved
    np.testing.assert_array_equal(np.array(p.write[0]), [1, 2])             # writes after slopes
    np.testing.assert_array_equal(np.array(p.write[1]), [3, 0])


NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed (the CUDA sources are "
                                "compiled offline for sm_90; MLX itself compiles them with NVRTC)")


def nvcc_cubin(tmp_path, name, source):
    """Compile one translation unit for sm_90; (cubin bytes, ptxas report)."""
    folder = tmp_path / name
    folder.mkdir()
    src = folder / "kernel.cu"
    src.write_text(source)
    r = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v",
                        "-diag-suppress", "177", "-o", str(folder / "kernel.cubin"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return (folder / "kernel.cubin").read_bytes(), r.stderr


def form_unit(kernel, split, feats, dtype, d, group, q_dtype="float16", kv=None, kv_group=64):
    """The CUDA translation unit MLX would build for one form (decode or reduce); kv: the
    quantized format the decode form reads (its pools uint32 words or uint8 codes, the affine
    scales in `dtype`)."""
    from paged_attention.kv_formats import KVFormat
    fmt = None if kv is None else KVFormat(kv, kv_group)
    data = dtype if fmt is None else "uint32" if fmt.affine else "uint8"
    sig_types = {"q": q_dtype, "k_pool": data, "v_pool": data, "pa_step": "int32",
                 "o_part": "float32", "ml_part": "float32", "pa_sinks": "float32",
                 "out": q_dtype, "lse": "float32", **{n: dtype for n in ks.AFFINE_INPUTS}}
    ins = {n: sig_types[n] for n in ks.input_names(kernel, split, feats, kv)}
    outs = {n: sig_types[n] for n in ks.output_names(kernel, split, feats)}
    if kernel == "reduce":
        tmpl = [("OutT", q_dtype), ("D", d), ("HQ", 8 * group)]
    else:
        cfg = kernel_config(d, 16, 8, group, MX[dtype], kv_format=fmt)
        tmpl = [(n, data if n == "T" else q_dtype if n == "OutT" else dtype if n == "ST" else v)
                for n, v in cfg.template(None, None)]
    return ks.cuda_translation_unit(kernel, split, ins, outs, tmpl, feats, kv)


FORMS = [(kernel, split, feats) for kernel, split in (("decode", False), ("decode", True), ("reduce", False))
         for n in range(5) for feats in itertools.combinations(
             [f for f in VARIANT_FEATURES if f in ks.KERNEL_FEATURES[(kernel, split)]], n)]
GEOMETRIES = [("float16", 128, 4), ("bfloat16", 64, 8), ("float32", 256, 8)]


@needs_nvcc
@pytest.mark.parametrize("i", range(len(FORMS)),
                         ids=[f"{k}{'-split' if s else ''}-{'+'.join(f) or 'plain'}" for k, s, f in FORMS])
def test_every_variant_form_compiles_for_cuda_without_spills(tmp_path, i):
    """Each form (16 unsplit decode, 4 split decode, 4 reduce) as MLX would assemble it, through
    nvcc for sm_90 (one geometry per form, rotating over the dtypes; the all-features forms get
    every geometry in the next test): syntax and types hold, and no register spills."""
    kernel, split, feats = FORMS[i]
    dtype, d, group = GEOMETRIES[i % len(GEOMETRIES)]
    _, report = nvcc_cubin(tmp_path, "k", form_unit(kernel, split, feats, dtype, d, group))
    assert "0 bytes spill stores" in report, report[-2000:]


@needs_nvcc
@pytest.mark.parametrize("geometry,q_dtype", list(zip(GEOMETRIES, ["float32", "bfloat16", "float16"])),
                         ids=lambda g: f"{g[0]}-D{g[1]}-g{g[2]}" if isinstance(g, tuple) else f"q-{g}")
def test_all_features_compile_for_every_geometry(tmp_path, geometry, q_dtype):
    """The forms with every feature, for each pool dtype and geometry, with a q dtype other
    than the one the per-form test uses."""
    dtype, d, group = geometry
    for kernel, split in (("decode", False), ("decode", True), ("reduce", False)):
        feats = tuple(f for f in VARIANT_FEATURES if f in ks.KERNEL_FEATURES[(kernel, split)])
        _, report = nvcc_cubin(tmp_path, f"{kernel}{int(split)}",
                               form_unit(kernel, split, feats, dtype, d, group, q_dtype))
        assert "0 bytes spill stores" in report, report[-2000:]


def test_variant_translation_units_have_the_signatures_mlx_builds():
    """The all-features forms as MLX would wrap them: the sinks an input after pa_step (Metal:
    in the constant address space when under 8 values, as MLX passes small inputs), the LSE an
    output after out; bool template arguments as MLX writes them (CUDA constexpr bool; Metal
    `bool` parameters instantiated with 1/0)."""
    cfg = kernel_config(64, 16, 2, 2, mx.float16)
    tmpl = [(n, "float16" if n in ("T", "OutT") else v) for n, v in cfg.template(None, None)]
    feats = VARIANT_FEATURES
    ins = {"q": "float16", "k_pool": "float16", "v_pool": "float16", "pa_step": "int32",
           "pa_sinks": "float32"}
    outs = {"out": "float16", "lse": "float32"}
    cuda = ks.cuda_translation_unit("decode", False, ins, outs, tmpl, feats)
    assert "const float* pa_sinks,\n    __half* out,\n    float* lse) {" in cuda
    assert "constexpr bool PF = false;" in cuda and "#define PA_SINKS 1" in cuda
    metal = ks.metal_translation_unit("decode", False, ins, outs, tmpl, feats, small={"pa_sinks"})
    assert "const constant float* pa_sinks [[buffer(4)]]" in metal
    assert "device float* lse [[buffer(6)]]" in metal and "bool PF" in metal
    assert "pa_paged_decode_cap_alibi_sinks_lse<" in metal
    with pytest.raises(ValueError, match="takes inputs"):
        ks.cuda_translation_unit("decode", False, ins, outs, tmpl, ())   # sinks without the form


@pytest.mark.parametrize("query_lens", [None, [1, 4, 1]], ids=["decode", "ragged"])
@pytest.mark.parametrize("splitk", ["off", "4"])
def test_run_launches_the_form_for_exactly_the_features_used(monkeypatch, query_lens, splitk):
    """The host side of the variant path on any MLX device, the kernels replaced by a stand-in
    that checks each launch against its form's signature: which forms run(plan, sinks=) picks,
    unsplit and split-K (the split decode takes cap and bias, the reduce sinks and LSE), the
    sinks passed as float32 [Hq], and out/lse shapes back through MixedPlan's row order."""
    from paged_attention import settings
    from paged_attention.backends.mlx import fused
    launched = []

    def stand_in(api, kernel, split, features=frozenset(), kv=None):
        ins, outs = ks.input_names(kernel, split, features, kv), ks.output_names(kernel, split, features)

        def launch(inputs, output_shapes, output_dtypes, template, grid, threadgroup):
            assert len(inputs) == len(ins) and len(output_shapes) == len(outs) == len(output_dtypes)
            if "pa_sinks" in ins:
                assert inputs[-1].dtype == mx.float32 and inputs[-1].shape == (8,)
            launched.append(ks.kernel_name(kernel, split, features))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return launch
    monkeypatch.setattr(fused, "_kernel", stand_in)
    be = MLXBackend()
    monkeypatch.setattr(be, "kernel_api", "cuda")
    monkeypatch.setattr(be, "paths", ("gather", "fused"))
    pool = be.create_pool(256, 16, 2, 64, "float16")
    rng = np.random.default_rng(0)
    tables = rng.permutation(256)[:192].reshape(3, 64).astype(np.int32)
    lens = np.array([1000, 5, 600])
    split = "_split" if splitk != "off" else ""
    cases = [  # (cap, alibi, lse, sinks) -> the forms launched
        ((30.0, True, True, True), [f"pa_paged_decode{split}_cap_alibi" + ("" if split else "_sinks_lse")]
         + (["pa_paged_reduce_sinks_lse"] if split else [])),
        ((None, False, False, True), [f"pa_paged_decode{split}" + ("" if split else "_sinks")]
         + (["pa_paged_reduce_sinks"] if split else [])),
        ((5.0, False, True, False), [f"pa_paged_decode{split}_cap" + ("" if split else "_lse")]
         + (["pa_paged_reduce_lse"] if split else [])),
    ]
    with settings.override(mlx_splitk=splitk):
        for (cap, alibi, lse, sinks), forms in cases:
            slopes = -np.linspace(0.1, 0.8, 8).astype(np.float32) if alibi else None
            plan = be.plan(pool, tables, lens, num_q_heads=8, query_lens=query_lens, soft_cap=cap,
                           alibi_slopes=slopes, return_lse=lse, path="fused")
            q = mx.array(rng.standard_normal((plan.num_rows, 8, 64)).astype(np.float16))
            launched.clear()
            got = be.run(plan, q, pool, sinks=np.ones(8, np.float32) if sinks else None)
            out, lse_out = got if lse else (got, None)
            assert launched == forms
            assert out.shape == q.shape and out.dtype == q.dtype
            if lse:
                assert lse_out.shape == (plan.num_rows, 8) and lse_out.dtype == mx.float32


# ---- quantized KV (ADR 0011): the PA_KV forms read int8 / int4 / fp8 pools in place -----------
KV_FORMATS = [("int8", 64), ("int4", 64), ("int4", 32), ("float8_e4m3", 64)]


def quantized_case(seed, kv, kv_group, lens, hkv, group, d, bs, dtype, scales=(1.0, 1.0)):
    """An MLX backend's quantized pool holding `lens` tokens per sequence (fragmented tables),
    written through write_kv (so quantized as the backend stores them), and a q."""
    rng = np.random.default_rng(seed)
    be = MLXBackend()
    lens = np.asarray(lens, np.int32)
    nb, tables = fragmented_tables(rng, lens, bs)
    fp8 = {"k_scale": scales[0], "v_scale": scales[1]} if kv == "float8_e4m3" else {}
    pool = be.create_pool(nb, bs, hkv, d, dtype, kv_dtype=kv, kv_group_size=kv_group, **fp8)
    slots = np.arange(nb * bs)
    k, v = rng.standard_normal((2, slots.size, hkv, d)).astype(np.float32)
    be.write_kv(pool, slots, k, v)
    q = rng.standard_normal((len(lens), hkv * group, d)).astype(np.float32)
    return be, pool, q, tables, lens


@needs_gpu
@pytest.mark.parametrize("partitions", ["off", "5", None])
@pytest.mark.parametrize("kv,kv_group", KV_FORMATS, ids=lambda x: str(x))
def test_quantized_pools_match_the_reference(kv, kv_group, partitions):
    """The fused kernel on int8 / int4 / fp8 pools, unsplit, split-K forced and chosen, vs the
    float64 reference over the pool's dequantized K/V (pool.to_numpy(): float32 codes * scale +
    bias, the kernel's own arithmetic, ADR 0011): within the output's rounding, far inside the
    project's 5e-3. The same checks on the CPU emulation of the kernel:
    test_mlx_kernel_emulated.py."""
    from paged_attention import settings
    for i, (dtype, lens, hkv, group, d, bs, window) in enumerate(
            [("float16", [1500, 1, 0, 700], 2, 4, 128, 16, None),
             ("bfloat16", [900, 37], 1, 8, 64, 32, 300),
             ("float32", [1200, 3], 2, 6, 96, 16, None),
             ("float16", [333, 12], 1, 16, 256, 16, 100)]):
        if d % kv_group:
            continue
        be, pool, q, tables, lens = quantized_case(41 + i, kv, kv_group, lens, hkv, group, d,
                                                   bs, dtype, (0.5, 0.25))
        with settings.override(mlx_splitk=partitions or ""):
            plan = be.plan(pool, tables, lens, num_q_heads=hkv * group, window=window,
                           path="fused")
            got = host(be.run(plan, q.astype(np.float16 if dtype == "float16" else np.float32),
                              pool))
        # A forced count is rounded to whole tiles per partition (choose_partitions): a short
        # context gets fewer, but split it is (seen on the H200: 3 or 4 of 5).
        assert partitions != "5" or 1 < plan.device.attend.num_parts <= 5
        want = reference.step(q, *pool.to_numpy(), plan.args)[0]
        assert reference.rms(got, want) < 3e-4, (dtype, d, reference.rms(got, want))
        assert not got[lens == 0].any()


@needs_gpu
@pytest.mark.parametrize("partitions", ["off", "4"])
@pytest.mark.parametrize("kv,kv_group", KV_FORMATS[:2] + KV_FORMATS[3:], ids=lambda x: str(x))
def test_quantized_pools_with_every_variant(kv, kv_group, partitions):
    """The quantized forms composed with the attention variants (cap, ALiBi, sinks, LSE) and
    split-K, and a ragged step (prompt chunks through gather's dequantizing take)."""
    from paged_attention import settings
    be, pool, q, tables, lens = quantized_case(53, kv, kv_group, [1300, 40, 9], 2, 4, 128, 16,
                                               "float16", (2.0, 0.5))
    rng = np.random.default_rng(5)
    slopes = -rng.uniform(0.01, 0.3, 8).astype(np.float32)
    sink = rng.standard_normal(8).astype(np.float32)
    k, v = pool.to_numpy()
    for qlens in (None, [1, 6, 1]):
        rows = 3 if qlens is None else 8
        qq = rng.standard_normal((rows, 8, 128)).astype(np.float16)
        with settings.override(mlx_splitk=partitions):
            plan = be.plan(pool, tables, lens, num_q_heads=8, query_lens=qlens, soft_cap=20.0,
                           alibi_slopes=slopes, return_lse=True, path="fused")
            out, lse = be.run(plan, qq, pool, sinks=sink)
        want, want_lse = reference.step(qq, k, v, plan.args, sink)
        assert reference.rms(host(out), want) < TOL
        np.testing.assert_allclose(np.array(lse), want_lse, atol=2e-3, rtol=0)


# CPU-runnable: the quantized forms' names, sources, signatures, step array and host path.
def test_every_kv_form_has_its_own_name_and_inputs():
    names = set()
    for kv in ks.KV_DEFINES:
        for split in (False, True):
            name = ks.kernel_name("decode", split, (), kv)
            names.add(name)
            _, body = ks.kernel_source("cuda", "decode", split, (), kv)
            assert f"#define PA_KV {ks.KV_DEFINES[kv]}\n" in body
            ins = ks.input_names("decode", split, (), kv)
            assert ins[:4] == ks.INPUTS["decode"]
            assert (ins[4:] == ks.AFFINE_INPUTS) == (kv != "float8_e4m3")
        assert ks.kernel_name("decode", False, ("soft_cap", "sinks"), kv).endswith(
            f"_{'fp8' if kv == 'float8_e4m3' else kv}_cap_sinks")
        assert ks.input_names("decode", False, ("sinks",), kv)[-1] == "pa_sinks"
    assert len(names) == 6 and ks.kernel_name("decode") not in names
    assert "#define PA_KV 0\n" in ks.kernel_source("cuda", "decode")[1]   # plain: no format
    # The Metal specialisation, as MLX would wrap it: packed storage, scales in the pool dtype,
    # ST and GS template parameters (compiled on Apple silicon only; CUDA's nvcc tests below).
    from paged_attention.kv_formats import KVFormat
    cfg = kernel_config(128, 16, 2, 4, mx.float16, kv_format=KVFormat("int4", 32))
    tmpl = [(n, "uint32" if n == "T" else "float16" if n in ("OutT", "ST") else v)
            for n, v in cfg.template(None, None)]
    ins = dict({"q": "float16", "k_pool": "uint32", "v_pool": "uint32", "pa_step": "int32"},
               **{n: "float16" for n in ks.AFFINE_INPUTS})
    metal = ks.metal_translation_unit("decode", False, ins, {"out": "float16"}, tmpl, kv="int4")
    assert "const device uint32_t* k_pool [[buffer(1)]]" in metal
    assert "const device float16_t* v_biases [[buffer(7)]]" in metal
    assert "typename ST, int GS>" in metal and "pa_paged_decode_int4<" in metal
    with pytest.raises(ValueError, match="only the decode kernel"):
        ks.kernel_source("cuda", "reduce", False, (), "int8")
    with pytest.raises(ValueError, match="only the decode kernel"):
        ks.input_names("decode", False, (), "int2")


def test_kv_kernel_config_keeps_16_byte_loads_and_the_register_budget():
    """A packed vector is 16 bytes: 16 int8/fp8 or 32 int4 elements per thread and vector, so
    fewer query heads share a threadgroup (q and accumulators stay within the plain kernel's
    128 per thread), and every row is covered."""
    from paged_attention.kv_formats import KVFormat
    for kv, elems in (("int8", 16), ("int4", 32), ("float8_e4m3", 16)):
        for d in range(32, 257, 32):
            for g in (1, 3, 4, 8, 16):
                c = kernel_config(d, 16, 2, g, mx.float16, kv_format=KVFormat(kv, 32))
                assert c.tpt * c.nv * elems >= d and 32 % c.tpt == 0 and d % elems == 0
                assert 2 * c.chunk * c.nv * elems <= 128 and c.num_chunks * c.chunk >= g
                tmpl = dict(c.template("uint32", "float16", "float16"))
                assert (tmpl.get("GS"), tmpl.get("ST")) == ((32, "float16") if kv != "float8_e4m3"
                                                            else (None, None))
    assert "GS" not in dict(kernel_config(128, 16, 2, 4, mx.float16).template(None, None))
    from paged_attention.backends.mlx.fused import parse_variant
    c = kernel_config(128, 16, 2, 4, mx.float16, parse_variant("pf0i4c2"), kv_format=KVFormat("int8"))
    assert (c.chunk, c.num_chunks, c.iters) == (2, 2, 4)


def test_step_array_carries_the_fp8_scales():
    from paged_attention.kv_formats import KVFormat
    tables, lens = np.array([[3, 9]], np.int32), np.array([20], np.int32)

    def ints(fmt):
        return np.array(DecodePlan("cuda", tables, lens, 0.125, None, num_blocks=64,
                                   block_size=16, num_kv_heads=2, num_q_heads=4, head_dim=64,
                                   pool_dtype=mx.float16, kv_format=fmt).ints)
    a = ints(KVFormat("float8_e4m3", 64, 0.5, 0.125))
    np.testing.assert_array_equal(a[10:12].view(np.float32), [0.5, 0.125])
    assert list(ints(KVFormat("int4", 64))[10:12]) == [0, 0] == list(ints(None)[10:12])


@pytest.mark.parametrize("kv", list(ks.KV_DEFINES))
@pytest.mark.parametrize("splitk", ["off", "4"])
def test_run_on_quantized_pools_launches_the_format_form(monkeypatch, kv, splitk):
    """The host side on a quantized pool, on any MLX device (kernels replaced by a stand-in
    that checks each launch against its form's signature): the form of the pool's format, its
    packed storage and (affine) scales and biases passed in input_names' order with the
    template's T / ST / GS, split-K's reduce unchanged; a ragged step's chunks dequantize."""
    from paged_attention import settings
    from paged_attention.backends.mlx import fused
    launched = []

    def stand_in(api, kernel, split, features=frozenset(), kv_=None):
        ins = ks.input_names(kernel, split, features, kv_)

        def launch(inputs, output_shapes, output_dtypes, template, grid, threadgroup):
            assert len(inputs) == len(ins)
            if kernel == "decode":
                t = dict(template)
                data = mx.uint8 if kv == "float8_e4m3" else mx.uint32
                assert inputs[1].dtype == inputs[2].dtype == t["T"] == data
                assert inputs[3].dtype == mx.int32
                for a in inputs[4:8] if kv != "float8_e4m3" else ():
                    assert a.dtype == mx.float16 == t["ST"] and a.shape == (256, 16, 2, 2)
                assert ("GS" in t) == (kv != "float8_e4m3")
            launched.append(ks.kernel_name(kernel, split, features, kv_))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return launch
    monkeypatch.setattr(fused, "_kernel", stand_in)
    be = MLXBackend()
    monkeypatch.setattr(be, "kernel_api", "cuda")
    monkeypatch.setattr(be, "paths", ("gather", "fused"))
    pool = be.create_pool(256, 16, 2, 64, "float16", kv_dtype=kv, kv_group_size=32)
    rng = np.random.default_rng(1)
    be.write_kv(pool, np.arange(256 * 16), *rng.standard_normal((2, 4096, 2, 64)).astype(np.float32))
    tables = rng.permutation(256)[:192].reshape(3, 64).astype(np.int32)
    lens = np.array([1000, 9, 600])
    short = {"int8": "int8", "int4": "int4", "float8_e4m3": "fp8"}[kv]
    with settings.override(mlx_splitk=splitk):
        plan = be.plan(pool, tables, lens, num_q_heads=8, path="fused")
        be.run(plan, rng.standard_normal((3, 8, 64)).astype(np.float16), pool)
        split = splitk != "off"
        assert launched == [f"pa_paged_decode{'_split' if split else ''}_{short}"] + \
            (["pa_paged_reduce"] if split else [])
        # Ragged: the chunk's rows through gather's dequantizing take, against the reference
        # (the decode rows are the stand-in's zeros and are left out).
        plan = be.plan(pool, tables, lens, num_q_heads=8, query_lens=[1, 5, 1], path="fused")
        q = rng.standard_normal((7, 8, 64)).astype(np.float16)
        got = host(be.run(plan, q, pool))
    k, v = pool.to_numpy()
    want = reference.step(q, k, v, plan.args)[0]
    assert reference.rms(got[1:6], want[1:6]) < TOL


KV_FORMS = [(kv, gs, split, feats) for kv, gs in (("int8", 64), ("int4", 32), ("int4", 128),
                                                  ("float8_e4m3", 64))
            for split, feats in ((False, ()), (True, ()), (False, tuple(VARIANT_FEATURES)),
                                 (True, ("soft_cap", "alibi_slopes")))]


@needs_nvcc
@pytest.mark.parametrize("i", range(len(KV_FORMS)),
                         ids=[f"{kv}-g{gs}{'-split' if s else ''}-{'+'.join(f) or 'plain'}"
                              for kv, gs, s, f in KV_FORMS])
def test_every_kv_form_compiles_for_cuda_without_spills(tmp_path, i):
    """Each format x (split or not) x variants, as MLX would assemble it, through nvcc for sm_90
    at the common shape (fp16 pools, D=128, G=4): types hold and no register spills."""
    kv, gs, split, feats = KV_FORMS[i]
    _, report = nvcc_cubin(tmp_path, "k", form_unit("decode", split, feats, "float16", 128, 4,
                                                    kv=kv, kv_group=gs))
    assert "0 bytes spill stores" in report, report[-2000:]


@needs_nvcc
@pytest.mark.parametrize("kv", list(ks.KV_DEFINES))
def test_kv_forms_compile_for_every_geometry(tmp_path, kv):
    """The all-features forms of each format over the other geometries (bf16 D=64 G=8 with a
    float32 q, fp32 D=256 G=8 with a bf16 q), unsplit and split."""
    for (dtype, d, group), q_dtype in zip(GEOMETRIES[1:], ["float32", "bfloat16"]):
        for split in (False, True):
            feats = tuple(f for f in VARIANT_FEATURES if f in ks.KERNEL_FEATURES[("decode", split)])
            _, report = nvcc_cubin(tmp_path, f"{dtype}{int(split)}",
                                   form_unit("decode", split, feats, dtype, d, group, q_dtype,
                                             kv=kv, kv_group=32))
            assert "0 bytes spill stores" in report, report[-2000:]


def test_kernel_element_decoding_is_exact():
    """The two bit tricks of common.h's pa_kv_elem, mirrored in numpy over every code: an
    e4m3fn code's bits placed as a float16 ((c & 0x7f) << 7 | (c & 0x80) << 8) are its value
    / 2^8 (normals and subnormals; the kernel's fp8 scales carry the 2^8), and an affine code
    OR 0x4B000000 as a float32, minus 2^23, is the code. The source must still say so."""
    from paged_attention.kv_formats import from_e4m3
    header = ks._read("common.h")
    assert "pa_h2f(((w & 0x7fu) << 7) | ((w & 0x80u) << 8))" in header
    assert "pa_bits_f32(0x4B000000u | (w & (KV == 2 ? 0xfu : 0xffu))) - 8388608.0f" in header
    c = np.arange(256, dtype=np.uint32)
    finite = (c & 0x7F) != 0x7F
    half = (((c & 0x7F) << 7) | ((c & 0x80) << 8)).astype(np.uint16).view(np.float16)
    got = half.astype(np.float32) * np.float32(256)
    np.testing.assert_array_equal(got[finite], from_e4m3(c[finite].astype(np.uint8)))
    assert np.array_equal(np.signbit(got[finite]), c[finite] >= 128)   # -0 stays -0
    magic = (np.uint32(0x4B000000) | c).view(np.float32) - np.float32(8388608.0)
    np.testing.assert_array_equal(magic, c.astype(np.float32))


# -- per-device tuning: every candidate of `paged-attn tune --backend mlx --candidates full` --------
@needs_gpu
@pytest.mark.parametrize("dtype,which", [("float16", "quick"), ("float16", "full/16"),
                                         ("bfloat16", "quick")])
def test_every_tuning_candidate_matches_the_reference(tmp_path, dtype, which):
    """Each candidate read as a tuning-table row (as tune times it): a ragged batch, once with
    the candidate's own split-K choice and once forced to 4 partitions, within the bound. The
    quick set whole (what tune runs by default), and every 16th of the full set (each candidate
    is two or three kernel compiles: the whole full set is ~400, minutes of NVRTC)."""
    import json

    from paged_attention import settings
    from paged_attention.lab.tune import mlx_candidates
    cands = mlx_candidates("quick") if which == "quick" else mlx_candidates("full")[::16]
    table = tmp_path / "candidates.json"
    table.write_text(json.dumps({"rows": {c.label: {"mlx": {"rules": [
        {"max_batch": None, "params": c.params}]}} for c in cands}}))
    q, k, v, tables, lens = make_case(11, [2100, 1, 517], 2, 4, 128, 16, dtype)
    spec = PoolSpec(*k.shape, dtype=dtype)
    args = check_decode(q, spec, tables, lens, None, None)
    want = reference.decode(q, host(k), host(v), tables, lens)
    for c in cands:
        with settings.override(tuning_table=str(table), tuning_device=c.label):
            for partitions in (None, 4):
                got = host(fused_decode(mx.array(q), k, v, args, api=API, partitions=partitions))
                err = reference.rms(got, want)
                assert err < TOL, f"{c.label} partitions={partitions}: RMS {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("dtype,partitions", [("float16", "off"), ("float16", None),
                                              ("bfloat16", "4")])
def test_decode_run_stores_the_new_rows_in_the_kernel(dtype, partitions):
    """run(plan, q, pool, k, v) on a decode plan whose slots are each sequence's next position:
    the fused kernel stores the new rows itself (the append form, no scatter), the pools then
    hold exactly what the numpy backend's hold, the output matches the reference over them, and
    a second step on the written pools (which MLX only sees through mx.depends) reads them."""
    import paged_attention as pa
    from paged_attention import settings
    rng = np.random.default_rng(7)
    be, ref = pa.get_backend("mlx"), pa.get_backend("numpy")
    bs, hkv, hq, d, lens = 16, 2, 8, 128, np.array([300, 1, 77], np.int32)
    tables = rng.permutation(64).astype(np.int32)[:3 * 20].reshape(3, 20)
    pools = [b.create_pool(64, bs, hkv, d, dtype) for b in (be, ref)]
    init = rng.standard_normal((2, 64 * bs, hkv, d)).astype(np.float32)
    for b, p in zip((be, ref), pools):
        b.write_kv(p, np.arange(64 * bs), *init)
    for step in range(2):
        pos = lens.astype(np.int64) - 1
        slots = tables[np.arange(3), pos // bs].astype(np.int64) * bs + pos % bs
        q = rng.standard_normal((3, hq, d)).astype(np.float32)
        k, v = rng.standard_normal((2, 3, hkv, d)).astype(np.float32)
        with settings.override(mlx_splitk=partitions or "", mlx_fused_append="auto"):
            plan = be.plan(pools[0], tables, lens, num_q_heads=hq, slot_mapping=slots,
                           path="fused")
            assert plan.device.attend.appends
            got = host(be.run(plan, q, pools[0], k, v))
        with settings.override(mlx_splitk=partitions or ""):    # off by default: the scatter
            assert not be.plan(pools[0], tables, lens, num_q_heads=hq, slot_mapping=slots,
                               path="fused").device.attend.appends
        rplan = ref.plan(pools[1], tables, lens, num_q_heads=hq, slot_mapping=slots)
        want = ref.run(rplan, q, pools[1], k, v)
        np.testing.assert_array_equal(pools[0].to_numpy()[0], pools[1].to_numpy()[0])
        np.testing.assert_array_equal(pools[0].to_numpy()[1], pools[1].to_numpy()[1])
        assert reference.rms(got, want) < TOL
        lens = lens + 1


def test_compiled_names_change_with_the_source(monkeypatch):
    """MLX's CUDA backend caches compiled kernels on disk by name: the name a form is compiled
    under carries a digest of its source, so an edited body (or another release) never loads an
    old binary, while the same source keeps one name across processes."""
    a = ks.binary_name("cuda", "decode", True, (), None)
    assert a.startswith(ks.kernel_name("decode", True)) and a == ks.binary_name("cuda", "decode", True)
    assert a != ks.binary_name("metal", "decode", True)
    body = ks.shared_body("decode")
    monkeypatch.setattr(ks, "shared_body", lambda kernel: body + "\n// edited\n")
    assert ks.binary_name("cuda", "decode", True) != a
