"""bfloat16 pools on every backend: storage rounding, input kinds, output kind."""
from __future__ import annotations

import numpy as np
import pytest

from paged_attention import reference

HKV, HQ, BS = 2, 4, 16


@pytest.mark.parametrize("q_dtype", ["float32", "float16", "bfloat16"])
def test_bfloat16_pool_matches_reference(backend, q_dtype):
    """A bf16 pool rounds new rows to nearest even (what to_numpy returns are bf16 values:
    the low 16 bits of every float32 are zero) and decodes them like the reference. Inputs may
    be float32/float16 numpy or bfloat16 MLX arrays (numpy has no bfloat16); the output keeps
    q's dtype, and an MLX bfloat16 q gets an MLX bfloat16 array back. An odd head dim (40)
    exercises Vulkan's padding to 8 elements."""
    if "bfloat16" not in backend.pool_dtypes:
        pytest.skip(f"backend {backend.name!r} has no bfloat16 pools")
    rng = np.random.default_rng(5)
    b, width, d = 3, 3, 40
    pool = backend.create_pool(b * width, BS, HKV, d, "bfloat16")
    tables = rng.permutation(b * width).astype(np.int32).reshape(b, width)
    lens = np.array([7, 33, 48])
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
    backend.write_kv(pool, slots, k, v)
    kh, vh = pool.to_numpy()
    assert kh.dtype == np.float32 and not (kh.view(np.uint32) & 0xFFFF).any()
    blk, off = np.divmod(slots, BS)
    assert np.abs(kh[blk, off] - kin).max() <= np.abs(kin).max() * 2 ** -8
    out = backend.decode(q, pool, tables, lens)
    if q_dtype == "bfloat16":
        assert type(out).__module__.startswith("mlx") and out.dtype == mx.bfloat16
    host = backend.to_numpy(out)
    assert host.dtype == (np.float32 if q_dtype == "bfloat16" else np.dtype(q_dtype))
    want = reference.decode(qh, kh, vh, tables, lens)
    assert reference.rms(host, want) < (1e-4 if q_dtype == "float32" else 5e-3)
