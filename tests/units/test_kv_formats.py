"""The KV-format seam (paged_attention/kv_formats.py, ADR 0011): the numpy reference arithmetic
equals MLX's mx.quantize / mx.dequantize and mx.to_fp8 bit for bit, pools count their scales,
copies carry them, and a path that cannot read a format is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import paged_attention as pa
from paged_attention.kv_formats import KV_DTYPES, KVFormat, from_e4m3, to_e4m3
from paged_attention.validation import PoolSpec

mx = pytest.importorskip("mlx.core", reason="the bit-for-bit checks compare with MLX's own ops")
MX_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def f32(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def rows(seed: int, n: int = 257, d: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 2, d)) * rng.uniform(1e-3, 30, (n, 2, 1))).astype(np.float32)
    x[0, 0] = 0.0                       # a zero group: scale eps, bias 0
    x[1, 0] = 3.0                       # a constant group
    x[2, 1, :64] = -1e-4                # tiny values
    x[3, 0, ::2] = 1e4                  # wide range
    return x


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_reference_is_mlx_quantize_bit_for_bit(dtype, name, group):
    fmt = KVFormat(name, group)
    x = rows(group + len(name))
    got = fmt.quantize(x, dtype)
    wq, s, b = mx.quantize(mx.array(x).astype(MX_DTYPES[dtype]), group_size=group, bits=fmt.bits)
    np.testing.assert_array_equal(got.data, np.array(wq))
    np.testing.assert_array_equal(got.scales, f32(s))
    np.testing.assert_array_equal(got.biases, f32(b))
    # Read back as float32 codes * scale + bias: mx.dequantize over float32 scales, bit for bit.
    deq = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group,
                        bits=fmt.bits)
    np.testing.assert_array_equal(fmt.dequantize(got, dtype), f32(deq))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64),
       st.sampled_from([1.0, 0.5, 0.25, 3.0]))
def test_fp8_reference_is_mlx_to_fp8(values, scale):
    x = np.array(values, np.float32)
    fmt = KVFormat("float8_e4m3", k_scale=scale)
    got = fmt.quantize(x[None], "float32")
    want = np.array(mx.to_fp8(mx.array(x) / scale))
    np.testing.assert_array_equal(got.data[0], want)
    np.testing.assert_array_equal(fmt.dequantize(got, "float32")[0],
                                  f32(mx.from_fp8(mx.array(want), mx.float32)) * np.float32(scale))


def test_fp8_every_half_value_and_code():
    """Every float16 value (normals, subnormals, ties, +-inf, NaN) encodes as mx.to_fp8 does;
    every code decodes as mx.from_fp8; saturation at +-448."""
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(to_e4m3(x), np.array(mx.to_fp8(mx.array(x))))
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(from_e4m3(codes), f32(mx.from_fp8(mx.array(codes), mx.float32)))
    assert from_e4m3(to_e4m3(np.array([1e6, -500.0, 464.0], np.float32))).tolist() == \
        [448.0, -448.0, 448.0]


@pytest.mark.parametrize("name, bound", [("int8", 0.56), ("int4", 0.30), ("float8_e4m3", 0.51)])
def test_pool_bytes_count_scales_within_the_issue_bounds(name, bound):
    plain = PoolSpec(64, 16, 8, 128, "float16")
    spec = pa.get_backend("numpy").create_pool(64, 16, 8, 128, "float16", kv_dtype=name).spec
    assert spec.nbytes / plain.nbytes <= bound
    # K and V data plus, for the affine formats, 2 x (128 / 64) fp16 scales and biases each.
    per_head = {"int8": 128 + 8, "int4": 64 + 8, "float8_e4m3": 128}[name]
    assert spec.nbytes == 64 * 16 * 8 * 2 * per_head


@pytest.mark.parametrize("name", KV_DTYPES)
def test_mlx_pool_holds_mx_quantize_read_in_float32(name):
    """The MLX gather path stores mx.quantize / mx.to_fp8 output and reads back exactly
    mx.quantize's codes * scale + bias in float32 (resp. from_fp8(to_fp8(x / s)) * s); numpy's
    pool agrees."""
    x = rows(7, n=48, d=64)
    kw = dict(k_scale=0.5, v_scale=0.25) if name == "float8_e4m3" else {}
    pools = []
    for b in (pa.get_backend("mlx"), pa.get_backend("numpy")):
        pool = b.create_pool(4, 16, 2, 64, "float16", kv_dtype=name, **kw)
        b.write_kv(pool, np.arange(48), x, -x)
        pools.append(pool.to_numpy())
    xm = mx.array(x).astype(mx.float16)
    if name == "float8_e4m3":
        want = f32(mx.from_fp8(mx.to_fp8(xm.astype(mx.float32) / 0.5), mx.float32)) * np.float32(0.5)
    else:
        bits = 8 if name == "int8" else 4
        wq, s, b = mx.quantize(xm, group_size=64, bits=bits)
        want = f32(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=64,
                                 bits=bits))
    for k, v in pools:
        np.testing.assert_array_equal(k.reshape(64, 2, 64)[:48], want)
    np.testing.assert_array_equal(pools[0][1], pools[1][1])


@pytest.mark.parametrize("name", KV_DTYPES)
def test_copy_blocks_carries_scales(backend, name):
    if not backend.paths_reading(name):
        pytest.skip(f"backend {backend.name!r} reads no {name} pools (refusal: test_fuzz)")
    rng = np.random.default_rng(3)
    big, small, v = (rng.standard_normal((8, 2, 64)).astype(np.float32) * s for s in (10, 0.01, 1))
    pool = backend.create_pool(4, 8, 2, 64, "float32", kv_dtype=name)
    backend.write_kv(pool, np.arange(8), big, v)
    backend.write_kv(pool, np.arange(16, 24), small, v)
    backend.copy_blocks(pool, [(0, 2), (0, 3)])
    k, v = pool.to_numpy()
    np.testing.assert_array_equal(k[2], k[0])
    np.testing.assert_array_equal(k[3], k[0])
    np.testing.assert_array_equal(v[2], v[0])
    assert np.abs(k[0]).max() > 1      # the block's own large scale came along, not block 2's


def test_path_that_cannot_read_a_format_is_refused_and_auto_steps_around_it():
    """A backend lists per path the formats it reads: an explicit path that cannot read the
    pool is refused by name, 'auto' takes one that can, and a format no path reads is refused
    at create_pool."""
    from backends.numpy_backend import Backend as Numpy   # a fresh class to alter

    class TwoPaths(Numpy):
        paths = ("reference", "plain_only")
        kv_formats = {"reference": frozenset({"int8"})}
        variants = {p: Numpy.variants["reference"] for p in paths}

    b = TwoPaths()
    pool = b.create_pool(4, 8, 1, 64, "float32", kv_dtype="int8")
    with pytest.raises(pa.UnsupportedPath, match="does not read kv_dtype 'int8'.*'reference'"):
        b.plan(pool, [[0]], [1], num_q_heads=1, path="plain_only")
    assert b.plan(pool, [[0]], [1], num_q_heads=1, path="auto").path == "reference"
    with pytest.raises(pa.InvalidInput, match="kv_dtype: backend .* no path that reads 'int4'"):
        b.create_pool(4, 8, 1, 64, "float32", kv_dtype="int4")
