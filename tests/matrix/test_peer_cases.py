"""The peers' own decode test cases, ported: vLLM's `tests/kernels/attention/test_attention.py`
(`test_paged_attention`: USE_ALIBI, bf16/fp16, GQA/MHA, block sizes 16/32, random block tables
that may repeat blocks) and FlashInfer's `tests/attention/test_batch_decode_kernels.py`
(`test_batch_decode_with_paged_kv_cache`: return_lse, and the older revision's
logits_soft_cap=30.0 and ALIBI position encoding, page sizes 1/8/16, head dims 128/256).

Each case keeps the peer's shapes, value distributions, semantics and tolerance (vLLM: atol 1e-3,
rtol 1e-5; FlashInfer: atol 1e-3, rtol 1e-3), checked against the float64 reference. CI runs a
reduced grid (shorter contexts, fewer blocks, FlashInfer's grid pairwise); set
PAGED_ATTENTION_PEER_FULL=1 for the peers' full sizes (a GPU run: ADR 0010). A path that does not
implement a case's variant must refuse it by name (UnsupportedPath), never skip it silently.
The LSE is checked too, in our natural-log convention (FlashInfer's own is base 2:
lse_2 = lse_e / ln 2). The peers' fp8 KV cases (vLLM kv_cache_dtype="fp8", FlashInfer
kv_dtype=float8_e4m3fn) run on quantized pools (ADR 0011); a path that cannot read them must
refuse them by name (create_pool or plan)."""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from paged_attention import reference
from paged_attention.errors import InvalidInput, UnsupportedPath
from paged_attention.kv_formats import from_e4m3, to_e4m3

FULL = os.environ.get("PAGED_ATTENTION_PEER_FULL", "") == "1"


def _planned(backend, path, pool, tables, lens, num_q_heads, **variant):
    """The plan, or None after checking that `path` refuses a variant it lacks by name."""
    used = [k for k, v in variant.items() if v is not None and v is not False]
    missing = [f for f in used if f not in backend.variants.get(path, ())]
    if missing:
        with pytest.raises(UnsupportedPath, match=missing[0]):
            backend.plan(pool, tables, lens, num_q_heads=num_q_heads, path=path, **variant)
        return None
    return backend.plan(pool, tables, lens, num_q_heads=num_q_heads, path=path, **variant)


def _fill(backend, pool, keys, values):
    """Write [NB, BS, Hkv, D] keys/values into every slot of the pool."""
    nb, bs = keys.shape[:2]
    backend.write_kv(pool, np.arange(nb * bs), keys.reshape(nb * bs, *keys.shape[2:]),
                     values.reshape(nb * bs, *values.shape[2:]))


def _as_dtype(x: np.ndarray, dtype: str):
    """Host values rounded to `dtype` as the peer stores them (bfloat16 by truncating the
    float32 mantissa with round-to-nearest-even, as torch's .to(bfloat16))."""
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        from paged_attention.host_arrays import from_bf16_bits, to_bf16_bits
        return from_bf16_bits(to_bf16_bits(x.astype(np.float32)))
    return x.astype(np.float32)


# -- vLLM ----------------------------------------------------------------------------------------
VLLM_MAX_SEQ_LEN = 57600 if FULL else 300     # full: an H100/H200's 227 KiB of shared memory / 4 - 512
VLLM_NUM_BLOCKS = 4321 if FULL else 160
VLLM_CASES = list(itertools.product(
    [(32, 8), (40, 40), (64, 8)],             # NUM_HEADS
    [64, 128],                                # HEAD_SIZES
    [16, 32],                                 # BLOCK_SIZES
    [False, True],                            # USE_ALIBI
    ["bfloat16", "float16"]))                 # DTYPES
if not FULL:  # every value of every axis, each pair of (heads, head size) x (alibi, dtype) once
    VLLM_CASES = [c for i, c in enumerate(VLLM_CASES) if i % 4 in (0, 3)]


def _quantized_pool(backend, path, *args, **fmt):
    """A pool of the format in `fmt` (create_pool's kv_* arguments), or None after checking
    that the backend (no path reads it) or `path` refuses it by name, as ADR 0011 requires."""
    kv_dtype = fmt["kv_dtype"]
    if not backend.paths_reading(kv_dtype):
        with pytest.raises(InvalidInput, match="kv_dtype"):
            backend.create_pool(*args, **fmt)
        return None
    pool = backend.create_pool(*args, **fmt)
    if kv_dtype not in backend.kv_formats.get(path, ()):
        with pytest.raises(UnsupportedPath, match=kv_dtype):
            backend.plan(pool, np.zeros((1, 1), np.int32), [1], num_q_heads=pool.num_kv_heads,
                         path=path)
        return None
    return pool


@pytest.mark.parametrize("case", VLLM_CASES, ids=lambda c: "h{}-{}_d{}_bs{}_{}_{}".format(
    *c[0], c[1], c[2], "alibi" if c[3] else "plain", c[4]))
def test_vllm_paged_attention(impl, case):
    _vllm_paged_attention(impl, case, None)


# vLLM's kv_cache_dtype="fp8" cases: the cache holds e4m3fn(x / k_scale) (resp. v_scale), the
# reference attends over the dequantized cache (its ref_single_query_cached_kv_attention over
# convert_fp8's output), atol 1e-2 as vLLM's fp8 cases; scales 0.5 / 0.25 exercise them.
VLLM_FP8_CASES = [((32, 8), 128, 16, False, "float16"), ((40, 40), 64, 32, True, "bfloat16"),
                  ((64, 8), 128, 32, False, "bfloat16"), ((32, 8), 64, 16, True, "float16")]


@pytest.mark.parametrize("case", VLLM_FP8_CASES, ids=lambda c: "fp8_h{}-{}_d{}_bs{}_{}_{}".format(
    *c[0], c[1], c[2], "alibi" if c[3] else "plain", c[4]))
def test_vllm_paged_attention_fp8(impl, case):
    _vllm_paged_attention(impl, case, "fp8")


def _vllm_paged_attention(impl, case, kv_cache_dtype):
    backend, path = impl
    (hq, hkv), d, bs, use_alibi, dtype = case
    if dtype not in backend.pool_dtypes:
        pytest.skip(f"{backend.name} has no {dtype} pools")
    rng = np.random.default_rng(0)
    num_seqs, scale = 7, 1.0 / math.sqrt(d)
    q = _as_dtype(rng.uniform(-scale, scale, (num_seqs, hq, d)), dtype)
    slopes = rng.standard_normal(hq).astype(np.float32) if use_alibi else None
    lens = rng.integers(1, VLLM_MAX_SEQ_LEN + 1, num_seqs)
    lens[-1] = VLLM_MAX_SEQ_LEN
    max_blocks = -(-VLLM_MAX_SEQ_LEN // bs)
    tables = rng.integers(0, VLLM_NUM_BLOCKS, (num_seqs, max_blocks)).astype(np.int32)
    keys = _as_dtype(rng.uniform(-scale, scale, (VLLM_NUM_BLOCKS, bs, hkv, d)), dtype)
    values = _as_dtype(rng.uniform(-scale, scale, (VLLM_NUM_BLOCKS, bs, hkv, d)), dtype)
    atol = 1e-3
    if kv_cache_dtype is None:
        pool = backend.create_pool(VLLM_NUM_BLOCKS, bs, hkv, d, dtype)
    else:
        pool = _quantized_pool(backend, path, VLLM_NUM_BLOCKS, bs, hkv, d, dtype,
                               kv_dtype="float8_e4m3", k_scale=0.5, v_scale=0.25)
        if pool is None:
            return
        atol = 1e-2
    _fill(backend, pool, keys, values)
    if kv_cache_dtype is not None:   # what the cache holds: the reference's arithmetic
        fmt = pool.spec.kv_format
        keys = fmt.dequantize(fmt.quantize(keys, dtype, "k"), dtype, "k")
        values = fmt.dequantize(fmt.quantize(values, dtype, "v"), dtype, "v")
    plan = _planned(backend, path, pool, tables, lens, hq, alibi_slopes=slopes)
    if plan is None:
        return
    out = backend.to_numpy(backend.run(plan, backend.from_numpy(q, dtype), pool))
    want = reference.step(q.astype(np.float64), keys, values, plan.args)[0]
    np.testing.assert_allclose(out.astype(np.float64), want, atol=atol, rtol=1e-5)


# -- FlashInfer ----------------------------------------------------------------------------------
def flashinfer_alibi_slopes(num_heads: int) -> np.ndarray:
    """FlashInfer's (and the ALiBi paper's) slopes: powers of 2^(-8/n) for the largest power of
    two n <= heads, then the odd powers of 2^(-4/n) for the rest."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 / n * (i + 1)) for i in range(n)]
    slopes += [2.0 ** (-4.0 / n * (2 * i + 1)) for i in range(num_heads - n)]
    return np.array(slopes, np.float32)


FI_AXES = dict(batch_size=[12, 17, 128], kv_len=[54, 97, 512, 2048, 16384], page_size=[1, 8, 16],
               num_qo_heads=[4, 32], head_dim=[128, 256],
               encoding=["NONE", "ALIBI", "SOFTCAP30"])
if FULL:
    FI_CASES = list(itertools.product(*FI_AXES.values()))
else:  # a pairwise cover of the smaller values: every pair of axis values appears in some case
    FI_CASES = [(12, 54, 1, 4, 128, "NONE"), (17, 97, 8, 32, 256, "ALIBI"),
                (12, 97, 16, 32, 128, "SOFTCAP30"), (17, 54, 16, 4, 256, "SOFTCAP30"),
                (12, 512, 8, 4, 256, "ALIBI"), (17, 512, 1, 32, 128, "NONE"),
                (17, 54, 8, 32, 128, "ALIBI"), (12, 97, 1, 4, 256, "SOFTCAP30"),
                (12, 512, 16, 32, 256, "NONE"), (12, 54, 16, 4, 128, "ALIBI")]


@pytest.mark.parametrize("case", FI_CASES, ids=lambda c: "b{}_kv{}_ps{}_qo{}_d{}_{}".format(*c))
def test_flashinfer_batch_decode(impl, case):
    _flashinfer_batch_decode(impl, case, None)


# FlashInfer's kv_dtype=torch.float8_e4m3fn cases: the cache is randn cast to e4m3fn (no
# scale), the reference attends over it widened to float; tolerance 1e-2 as theirs for fp8.
FI_FP8_CASES = [(12, 54, 1, 4, 128, "NONE"), (17, 97, 8, 32, 256, "ALIBI"),
                (12, 97, 16, 32, 128, "SOFTCAP30"), (17, 512, 16, 4, 128, "NONE")]


@pytest.mark.parametrize("case", FI_FP8_CASES,
                         ids=lambda c: "fp8_b{}_kv{}_ps{}_qo{}_d{}_{}".format(*c))
def test_flashinfer_batch_decode_fp8(impl, case):
    _flashinfer_batch_decode(impl, case, "float8_e4m3fn")


def _flashinfer_batch_decode(impl, case, kv_dtype):
    backend, path = impl
    batch, kv_len, page, hq, d, enc = case
    hkv = 4
    rng = np.random.default_rng(1)
    pages_per_seq = -(-kv_len // page)
    total = pages_per_seq * batch
    q = rng.standard_normal((batch, hq, d)).astype(np.float16)
    keys = rng.standard_normal((total, page, hkv, d)).astype(np.float16)
    values = rng.standard_normal((total, page, hkv, d)).astype(np.float16)
    tables = np.arange(total, dtype=np.int32).reshape(batch, pages_per_seq)
    lens = np.full(batch, kv_len)
    tol = 1e-3
    if kv_dtype is None:
        pool = backend.create_pool(total, page, hkv, d, "float16")
    else:
        pool = _quantized_pool(backend, path, total, page, hkv, d, "float16",
                               kv_dtype="float8_e4m3")
        if pool is None:
            return
        tol = 1e-2
        keys, values = (from_e4m3(to_e4m3(x.astype(np.float32))) for x in (keys, values))
    _fill(backend, pool, keys, values)
    variant = dict(return_lse=True,
                   soft_cap=30.0 if enc == "SOFTCAP30" else None,
                   alibi_slopes=flashinfer_alibi_slopes(hq) if enc == "ALIBI" else None)
    plan = _planned(backend, path, pool, tables, lens, hq, **variant)
    if plan is None:
        return
    out, lse = (backend.to_numpy(a) for a in backend.run(plan, backend.from_numpy(q, "float16"),
                                                         pool))
    want, want_lse = reference.step(q.astype(np.float64), keys, values, plan.args)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)
