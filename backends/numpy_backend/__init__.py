"""The numpy reference wrapped as a PagedAttention backend: slow, exact, always available."""
from __future__ import annotations

import dataclasses

import numpy as np

from paged_attention import reference
from paged_attention.host_arrays import cast_out, from_bf16_bits, host, out_dtype, to_bf16_bits
from paged_attention.interface import KVPool, PagedAttention
from paged_attention.validation import PoolSpec, StepArgs

KNOWN_PATHS = ("reference",)


def probe() -> str | None:
    return None


class NumpyPool(KVPool):
    """K and V as numpy arrays of the pool's dtype; a bfloat16 pool holds the bit patterns as
    uint16 (numpy has no bfloat16), rounded to nearest even on write."""

    def __init__(self, spec: PoolSpec):
        super().__init__(spec, "numpy")
        self.bf16 = spec.dtype == "bfloat16"
        dtype = np.uint16 if self.bf16 else spec.dtype
        self.k = np.zeros(spec.shape, dtype=dtype)
        self.v = np.zeros(spec.shape, dtype=dtype)

    def store(self, x) -> np.ndarray:
        """New rows in the pool's storage dtype."""
        x = host(x)
        return to_bf16_bits(x) if self.bf16 else x.astype(self.dtype, copy=False)

    def values(self, a: np.ndarray) -> np.ndarray:
        """Stored elements as numbers (bfloat16 widened to float32, exactly)."""
        return from_bf16_bits(a) if self.bf16 else a

    def to_numpy(self):
        """(k, v) copies; a bfloat16 pool's come back as float32."""
        return self.values(self.k).copy(), self.values(self.v).copy()


class NumpyBackend(PagedAttention):
    name = "numpy"
    paths = KNOWN_PATHS
    variants = {"reference": frozenset({"soft_cap", "alibi_slopes", "return_lse", "sinks"})}
    pool_dtypes = ("float16", "bfloat16", "float32")
    # bfloat16 inputs: MLX arrays or ml_dtypes numpy arrays (widened exactly to float32);
    # outputs keep q's dtype and kind (host_arrays.cast_out).
    q_dtypes = ("float16", "bfloat16", "float32", "float64")

    @property
    def device(self) -> str:
        return "cpu (numpy float64 reference)"

    def _create_pool(self, spec):
        return NumpyPool(spec)

    def _write_kv(self, pool, slots, k, v):
        b, off = np.divmod(slots, pool.block_size)
        pool.k[b, off] = pool.store(k)
        pool.v[b, off] = pool.store(v)

    def _copy_blocks(self, pool, src, dst):
        pool.k[dst] = pool.k[src]
        pool.v[dst] = pool.v[src]

    def _attend(self, path, q, pool, args: StepArgs, sinks=None):
        k, v = pool.k, pool.v
        if pool.bf16:   # widen only the blocks this call reads (tables renumbered to them)
            used, tables = np.unique(args.block_tables, return_inverse=True)
            args = dataclasses.replace(args, block_tables=tables.reshape(args.block_tables.shape))
            k, v = pool.values(pool.k[used]), pool.values(pool.v[used])
        out, lse = reference.step(host(q), k, v, args, sinks)
        return cast_out(out, out_dtype(q)), lse

    def _run(self, plan, q, pool, k, v):
        return self._run_variant(plan, q, pool, k, v, None)[0]

    def _run_variant(self, plan, q, pool, k, v, sinks):
        if k is not None and plan.slots.size:
            self._write_kv(pool, plan.slots, k, v)
        out, lse = self._attend(plan.path, q, pool, plan.args, sinks)
        return out, lse.astype(np.float32)

    # -- lab capabilities (interface.py) --------------------------------------------------------
    def peak_memory_of(self, fn):
        # numpy allocates on the host heap: tracemalloc sees every array a call creates.
        import tracemalloc
        tracemalloc.start()
        try:
            out = fn()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def dense_attention(self, q, k, v, scale):
        # Vectorised float32 softmax attention: what a host implementation with a contiguous
        # cache would do, the baseline the float64 paged reference is compared with.
        b, hq, d = q.shape
        hkv = k.shape[1]
        qg = np.asarray(q, np.float32).reshape(b, hkv, hq // hkv, d)
        s = np.matmul(qg, np.asarray(k, np.float32).transpose(0, 1, 3, 2)) * np.float32(scale)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return np.matmul(s, np.asarray(v, np.float32)).reshape(b, hq, d).astype(q.dtype)


Backend = NumpyBackend  # the registry's name for this module's backend class
