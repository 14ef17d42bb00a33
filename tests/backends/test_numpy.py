"""The numpy reference backend's own behaviour: bfloat16 pools (uint16 bit patterns)."""
from __future__ import annotations

import numpy as np

import paged_attention as pa

BS, HKV = 4, 2


def test_bfloat16_pool_stores_two_bytes_per_element():
    """numpy has no bfloat16: the pool holds the bit patterns as uint16 (the matrix's
    test_bfloat16.py checks rounding and results on every backend)."""
    pool = pa.get_backend("numpy").create_pool(4, BS, HKV, 8, "bfloat16")
    assert pool.k.dtype == np.uint16 and pool.k.nbytes == 4 * BS * HKV * 8 * 2


def test_bf16_rounding_is_nearest_even_and_keeps_nan():
    from paged_attention.host_arrays import from_bf16_bits, to_bf16_bits
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, np.inf, np.nan], np.float32)
    y = from_bf16_bits(to_bf16_bits(x))
    assert y[0] == 1.0 and y[1] == 1.0 and y[2] == 1 + 2 ** -6 and y[3] == -2.5
    assert np.isinf(y[4]) and np.isnan(y[5])
