"""The numpy reference wrapped as a PagedAttention backend: slow, exact, always available."""
from __future__ import annotations

import numpy as np

from paged_attention import reference
from paged_attention.interface import KVPool, PagedAttention
from paged_attention.validation import DecodeArgs, PoolSpec


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
    paths = ("reference",)
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
