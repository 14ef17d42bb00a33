"""The numpy reference wrapped as a PagedAttention backend: slow, exact, always available."""
from __future__ import annotations

import numpy as np

from paged_attention import reference
from paged_attention.interface import KVPool, PagedAttention
from paged_attention.validation import DecodeArgs, PoolSpec

KNOWN_PATHS = ("reference",)


def probe() -> str | None:
    return None


class NumpyPool(KVPool):
    def __init__(self, spec: PoolSpec):
        super().__init__(spec, "numpy")
        self.k = np.zeros(spec.shape, dtype=spec.dtype)
        self.v = np.zeros(spec.shape, dtype=spec.dtype)

    def to_numpy(self):
        return self.k.copy(), self.v.copy()


class Backend(PagedAttention):
    name = "numpy"
    paths = KNOWN_PATHS
    q_dtypes = ("float16", "float32", "float64")

    @property
    def device(self) -> str:
        return "cpu (numpy float64 reference)"

    def _create_pool(self, spec):
        return NumpyPool(spec)

    def _write_kv(self, pool, slots, k, v):
        b, off = np.divmod(slots, pool.block_size)
        pool.k[b, off] = np.asarray(k)
        pool.v[b, off] = np.asarray(v)

    def _copy_blocks(self, pool, src, dst):
        pool.k[dst] = pool.k[src]
        pool.v[dst] = pool.v[src]

    def _decode(self, path, q, pool, args: DecodeArgs):
        out = reference.decode(q, pool.k, pool.v, args.block_tables, args.context_lens,
                               scale=args.scale, window=args.window)
        return out.astype(np.asarray(q).dtype)

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
