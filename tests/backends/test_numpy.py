"""The numpy reference backend's own behaviour: bfloat16 pools (uint16 bit patterns)."""
from __future__ import annotations

import numpy as np
import pytest

import paged_attention as pa
from paged_attention import reference

BS, HKV, HQ = 4, 2, 4


@pytest.mark.parametrize("q_dtype", ["float32", "float16", "bfloat16"])
def test_bfloat16_pool_rounds_on_write_and_matches_reference(q_dtype):
    """A bf16 pool stores the bit patterns (2 bytes per element), rounded to nearest even on
    write; reads widen exactly; inputs may be float32/float16 numpy or bfloat16 MLX arrays and
    the output keeps q's dtype and kind."""
    be = pa.get_backend("numpy")
    rng = np.random.default_rng(7)
    b, width, d = 3, 4, 8
    pool = be.create_pool(b * width, BS, HKV, d, "bfloat16")
    assert pool.k.dtype == np.uint16 and pool.k.nbytes == b * width * BS * HKV * d * 2
    tables = rng.permutation(b * width).astype(np.int32).reshape(b, width)
    lens = np.array([3, 9, 16])
    slots = np.concatenate([tables[i, np.arange(n) // BS] * BS + np.arange(n) % BS
                            for i, n in enumerate(lens)])
    k = rng.standard_normal((slots.size, HKV, d)).astype(np.float32)
    v = rng.standard_normal((slots.size, HKV, d)).astype(np.float32)
    q = rng.standard_normal((b, HQ, d)).astype(np.float32)
    if q_dtype == "bfloat16":
        mx = pytest.importorskip("mlx.core", reason="bfloat16 inputs come from MLX (numpy has none)")
        k, v, q = (mx.array(x).astype(mx.bfloat16) for x in (k, v, q))
        kin, qh = (np.asarray(x.astype(mx.float32)) for x in (k, q))
    else:
        q = q.astype(q_dtype)
        kin, qh = k, q.astype(np.float32)
    be.write_kv(pool, slots, k, v)
    kh, vh = pool.to_numpy()
    assert kh.dtype == np.float32 and not (kh.view(np.uint32) & 0xFFFF).any()
    blk, off = np.divmod(slots, BS)
    assert np.abs(kh[blk, off] - kin).max() <= np.abs(kin).max() * 2 ** -8
    out = be.decode(q, pool, tables, lens)
    if q_dtype == "bfloat16":
        assert out.dtype == mx.bfloat16
        out = be.to_numpy(out)
    assert out.dtype == (np.float32 if q_dtype == "bfloat16" else np.dtype(q_dtype))
    want = reference.decode(qh, kh, vh, tables, lens)
    assert reference.rms(out, want) < (1e-6 if q_dtype == "float32" else 5e-3)


def test_bf16_rounding_is_nearest_even_and_keeps_nan():
    from paged_attention.host_arrays import from_bf16_bits, to_bf16_bits
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, np.inf, np.nan], np.float32)
    y = from_bf16_bits(to_bf16_bits(x))
    assert y[0] == 1.0 and y[1] == 1.0 and y[2] == 1 + 2 ** -6 and y[3] == -2.5
    assert np.isinf(y[4]) and np.isnan(y[5])
