"""host_arrays.copy_into: large copies (a prefill's q into staging, its output out) run in slabs on
threads; the result must equal numpy's own assignment for every layout and dtype pair."""
from __future__ import annotations

import numpy as np
import pytest

from paged_attention import host_arrays


@pytest.mark.parametrize("src_dtype,dst_dtype", [("float16", "float16"), ("float32", "float16"),
                                                 ("float16", "float32"), ("float64", "float32")])
@pytest.mark.parametrize("rows", [1, 2, 7, 37])
def test_copy_into_matches_assignment(monkeypatch, src_dtype, dst_dtype, rows):
    monkeypatch.setattr(host_arrays, "PARALLEL_COPY_BYTES", 1)  # every copy takes the threads
    slabs = []
    real = host_arrays._copy_pool

    def counting():
        pool = real()

        class Wrap:
            def submit(self, fn, *a, **k):
                slabs.append(a[0].shape[0])
                return pool.submit(fn, *a, **k)
        return Wrap()
    monkeypatch.setattr(host_arrays, "_copy_pool", counting)
    rng = np.random.default_rng(rows)
    src = rng.standard_normal((rows, 3, 20)).astype(src_dtype)
    staging = np.full((rows + 3, 3, 24), 7, dst_dtype)  # a padded staging view: not contiguous
    dst = staging[:rows, :, :20]
    want = staging.copy()
    want[:rows, :, :20] = src
    host_arrays.copy_into(dst, src)
    np.testing.assert_array_equal(staging, want)  # padding and rows past N untouched
    if rows >= 2:
        assert sum(slabs) == rows and len(slabs) > 1
    else:
        assert not slabs


def test_cast_out_returns_a_fresh_array_in_the_callers_dtype(monkeypatch):
    monkeypatch.setattr(host_arrays, "PARALLEL_COPY_BYTES", 1)
    o = np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    out = host_arrays.cast_out(o, np.dtype(np.float16))
    assert out.dtype == np.float16 and not np.shares_memory(out, o)
    np.testing.assert_array_equal(out, o.astype(np.float16))
