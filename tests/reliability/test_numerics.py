"""Numerical edge cases on every backend x path, against the float64 reference.

Huge logits (|q.k| * scale up to 1e4 in fp32, fp16 inputs near their range), sliding windows of
1 and wider than the context, contexts ending exactly on / just past / just before a block
boundary, a long context with one dominant key, uniform attention, and NaN in q.
Geometries reuse those of the decode matrix (head_dim 64, block_size 16/32) so the Vulkan
backend compiles few extra shaders.
"""
from __future__ import annotations

import numpy as np
import pytest

from paged_attention import reference
from paged_attention.lab.workload import representable

D, HKV, G = 64, 2, 4
HQ = HKV * G
TOL = {"float32": 2e-4, "float16": 5e-3, "bfloat16": 3e-2}

# Known deviations, reported to the owners (see tests/reliability/test_fuzz.py).
NONFINITE_Q_GAPS: dict[str, str] = {}  # backend -> reason; empty: every backend complies


def need_dtype(backend, dtype):
    if dtype not in backend.pool_dtypes:
        pytest.skip(f"{backend.name} has no {dtype} pools")


class Paged:
    """A fragmented pool holding `lens` sequences; k/v mirror in float64 (values exact in dtype)."""

    def __init__(self, backend, lens, dtype, bs=16, seed=0, kv=None):
        rng = np.random.default_rng(seed)
        self.backend, self.dtype, self.bs = backend, dtype, bs
        self.lens = np.array(lens, np.int32)
        per = [-(-int(n) // bs) for n in lens]
        self.nb = max(1, sum(per)) + 3
        ids = rng.permutation(self.nb)
        width = max(1, max(per, default=0))
        self.tables = np.zeros((len(lens), width), np.int32)
        at = 0
        for b, n in enumerate(per):
            self.tables[b, :n] = ids[at:at + n]
            at += n
        shape = (self.nb, bs, HKV, D)
        self.k = rng.standard_normal(shape) if kv is None else kv[0]
        self.v = rng.standard_normal(shape) if kv is None else kv[1]

    def slot(self, b, pos):
        """(block, offset) of position `pos` of sequence `b`."""
        return self.tables[b, pos // self.bs], pos % self.bs

    def upload(self):
        self.k = representable(self.k, self.dtype).astype(np.float64)
        self.v = representable(self.v, self.dtype).astype(np.float64)
        self.pool = self.backend.create_pool(self.nb, self.bs, HKV, D, self.dtype)
        n = self.nb * self.bs
        self.backend.write_kv(self.pool, np.arange(n),
                              self.k.reshape(n, HKV, D).astype(np.float32),
                              self.v.reshape(n, HKV, D).astype(np.float32))
        return self

    def decode(self, q, path, **kw):
        out = self.backend.decode(q, self.pool, self.tables, self.lens, path=path, **kw)
        return np.asarray(out, dtype=np.float64)

    def ref(self, q, **kw):
        return reference.decode(q, self.k, self.v, self.tables, self.lens, **kw)


def q_like(values, dtype):
    """q in the pool's precision (fp32 q for bfloat16 pools: exact in bf16)."""
    vals = representable(values, dtype)
    return vals.astype(np.float32) if dtype == "bfloat16" else vals


# -- huge logits ---------------------------------------------------------------------------------------
def test_huge_logits_fp32(impl):
    """Logits up to ~1e4 with a runner-up key 2 logits below the winner: finite, and the
    max-subtracted softmax keeps the small difference."""
    backend, path = impl
    rng = np.random.default_rng(1)
    lens = [40, 77, 16]
    p = Paged(backend, lens, "float32", seed=1)
    u = rng.standard_normal((len(lens), HQ, D))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    a = np.sqrt(1e4 * np.sqrt(D))           # |q| = |k| = a  ->  aligned logit = a^2 / sqrt(D) = 1e4
    q = (a * u).astype(np.float32)
    rand = rng.standard_normal(p.k.shape)
    p.k = a * rand / np.linalg.norm(rand, axis=-1, keepdims=True)   # random keys: |logit| ~ 1e3
    for b, n in enumerate(lens):
        for h in range(HKV):
            qh = u[b, h * G]                 # the first q head of each group
            blk, off = p.slot(b, n // 3)
            p.k[blk, off, h] = a * qh        # winner: logit 1e4
            blk, off = p.slot(b, n - 1)
            p.k[blk, off, h] = a * qh * (1 - 2e-4)  # runner-up: 2 logits lower
    p.upload()
    out, ref = p.decode(q, path), p.ref(q)
    assert np.isfinite(out).all()
    assert np.abs(ref).max() > 0.1
    # Logit rounding in fp32 at 1e4 is ~1e-3, so weights carry ~1e-3 relative error.
    assert reference.rms(out, ref) < 5e-3, reference.rms(out, ref)


@pytest.mark.parametrize("case", ["one_coordinate", "all_coordinates"])
def test_huge_logits_fp16(impl, case):
    """fp16 q and K of magnitude ~200: q.k reaches 4e4 (one coordinate) or 2.5e6 (all 64, beyond
    fp16's range): a backend must accumulate the dot product in fp32 to stay finite and right."""
    backend, path = impl
    need_dtype(backend, "float16")
    rng = np.random.default_rng(2)
    lens = [33, 64, 5]
    p = Paged(backend, lens, "float16", seed=2)
    q = np.zeros((len(lens), HQ, D))
    if case == "one_coordinate":
        q[..., 0] = 200.0
        q[..., 1:] = 0.1 * rng.standard_normal(q[..., 1:].shape)
        p.k[..., 0] = rng.uniform(-200, 200, p.k.shape[:-1])
        p.k[..., 1:] *= 0.1
        for b, n in enumerate(lens):       # winner and a runner-up 25/8 ~ 3 logits below
            blk, off = p.slot(b, n // 2)
            p.k[blk, off, :, 0] = 200.0
            blk, off = p.slot(b, n - 1)
            p.k[blk, off, :, 0] = 199.875
    else:
        q[:] = 200.0
        p.k = np.clip(200.0 + 0.5 * rng.standard_normal(p.k.shape), 195, 205)
    q = representable(q, "float16")
    p.upload()
    out, ref = p.decode(q, path), p.ref(q)
    assert np.isfinite(ref).all()
    assert np.isfinite(out).all(), f"{backend.name}/{path}: non-finite output for q.k ~ " \
                                   f"{'4e4' if case == 'one_coordinate' else '2.5e6'}"
    assert reference.rms(out, ref) < 2e-2, reference.rms(out, ref)


# -- windows and block boundaries ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_window_of_one_is_the_last_value(impl, dtype):
    backend, path = impl
    need_dtype(backend, dtype)
    lens = [1, 16, 17, 50]
    p = Paged(backend, lens, dtype, seed=3).upload()
    q = q_like(np.random.default_rng(3).standard_normal((len(lens), HQ, D)), dtype)
    out = p.decode(q, path, window=1)
    for b, n in enumerate(lens):
        blk, off = p.slot(b, n - 1)
        last = np.repeat(p.v[blk, off], G, axis=0)          # [HQ, D]
        np.testing.assert_allclose(out[b], last, atol=2e-3 if dtype != "float32" else 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_window_wider_than_context_is_full_attention(impl, dtype):
    backend, path = impl
    need_dtype(backend, dtype)
    lens = [1, 31, 48, 0]
    p = Paged(backend, lens, dtype, seed=4).upload()
    q = q_like(np.random.default_rng(4).standard_normal((len(lens), HQ, D)), dtype)
    full = p.decode(q, path)
    for window in (49, 64, 10 ** 6, 2 ** 31 + 5):
        out = p.decode(q, path, window=window)
        assert reference.rms(out, full) < (1e-6 if dtype == "float32" else 1e-3), window
    assert reference.rms(full, p.ref(q)) < TOL[dtype]


@pytest.mark.parametrize("bs", [16, 32])
def test_context_on_and_around_block_boundaries(impl, bs):
    backend, path = impl
    lens = [bs * k + d for k in (1, 2, 3) for d in (-1, 0, 1)]
    p = Paged(backend, lens, "float32", bs=bs, seed=5).upload()
    q = np.random.default_rng(5).standard_normal((len(lens), HQ, D)).astype(np.float32)
    for window in (None, bs, bs + 1):
        out, ref = p.decode(q, path, window=window), p.ref(q, window=window)
        assert reference.rms(out, ref) < TOL["float32"], window
    # Garbage in the unused tail of the last block and in the table beyond the context is ignored.
    p.tables = np.concatenate([p.tables, np.full((len(lens), 2), 10 ** 6, np.int32)], axis=1)
    for b, n in enumerate(lens):
        p.tables[b, -(-n // bs):] = -7
    assert reference.rms(p.decode(q, path), p.ref(q)) < TOL["float32"]


# -- long context ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_long_context_single_dominant_key(impl, dtype):
    """2,000+ positions, one key 20 logits above the rest, at the start, middle or end: the output
    is that key's value (the others' total weight is ~2000 * e^-20 ~ 4e-6)."""
    backend, path = impl
    need_dtype(backend, dtype)
    lens = [2048, 2049, 2100]
    where = [0, 1111, 2099]
    p = Paged(backend, lens, dtype, seed=6)
    q = np.zeros((len(lens), HQ, D))
    q[..., 0] = 1.0
    p.k[..., 0] = 0.0
    scale = 1.0
    for b, pos in enumerate(where):
        blk, off = p.slot(b, pos)
        p.k[blk, off, :, 0] = 20.0
    p.upload()
    q = q_like(q, dtype)
    out, ref = p.decode(q, path, scale=scale), p.ref(q, scale=scale)
    assert reference.rms(out, ref) < TOL[dtype]
    for b, pos in enumerate(where):
        blk, off = p.slot(b, pos)
        np.testing.assert_allclose(out[b], np.repeat(p.v[blk, off], G, axis=0),
                                   atol=5e-3 if dtype != "float32" else 1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_uniform_attention_is_the_mean(impl, dtype):
    """q = 0 gives equal logits: the output is the mean of V over the attended positions, also
    over a long context where a low-precision running sum would drift."""
    backend, path = impl
    need_dtype(backend, dtype)
    lens = [1, 17, 1500]
    p = Paged(backend, lens, dtype, seed=7).upload()
    q = np.zeros((len(lens), HQ, D), np.float32)
    for window in (None, 100):
        out = p.decode(q, path, window=window)
        for b, n in enumerate(lens):
            start = 0 if window is None else max(0, n - window)
            vals = np.stack([p.v[p.slot(b, t)] for t in range(start, n)])  # [T, HKV, D]
            mean = np.repeat(vals.mean(axis=0), G, axis=0)
            assert reference.rms(out[b], mean) < TOL[dtype], (b, window)


def test_nonfinite_q_rows_are_nan(impl):
    """A NaN in q makes that (sequence, head) row NaN, as in the reference; every other row
    (same sequence other heads, same group, other sequences) is unaffected."""
    backend, path = impl
    lens = [20, 33, 0]
    p = Paged(backend, lens, "float32", seed=8).upload()
    q = np.random.default_rng(8).standard_normal((len(lens), HQ, D)).astype(np.float32)
    q[0, 1, 3] = np.nan
    q[1, HQ - 1, :] = np.nan
    q[2, 0, 0] = np.nan                     # empty context: zeros regardless
    out = p.decode(q, path)
    clean = q.copy()
    clean[~np.isfinite(clean)] = 0
    ref = p.ref(clean)
    bad = np.zeros((len(lens), HQ), bool)
    bad[0, 1] = bad[1, HQ - 1] = True
    assert reference.rms(out[~bad], ref[~bad]) < TOL["float32"]
    assert np.all(out[2] == 0)
    if not all(np.isnan(out[b, h]).all() for b, h in zip(*np.nonzero(bad))):
        if backend.name in NONFINITE_Q_GAPS:
            pytest.xfail(NONFINITE_Q_GAPS[backend.name])
        pytest.fail(f"{backend.name}/{path}: NaN in q did not give a NaN row")
