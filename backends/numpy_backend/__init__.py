"""The numpy reference wrapped as a PagedAttention backend: slow, exact, always available."""
from __future__ import annotations

import dataclasses

import numpy as np

from paged_attention import reference
from paged_attention.host_arrays import cast_out, from_bf16_bits, host, out_dtype, to_bf16_bits
from paged_attention.interface import KVPool, PagedAttention
from paged_attention.kv_formats import KV_DTYPES, QuantizedRows
from paged_attention.validation import PoolSpec, StepArgs

KNOWN_PATHS = ("reference",)


def probe() -> str | None:
    return None


class NumpyPool(KVPool):
    """K and V as numpy arrays of the pool's dtype; a bfloat16 pool holds the bit patterns as
    uint16 (numpy has no bfloat16), rounded to nearest even on write. A quantized pool holds its
    format's storage (kv_formats): k, v are the data, k_scales/k_biases (affine formats) the
    per-group scales in the pool's dtype, indexed by block and offset like the data."""

    def __init__(self, spec: PoolSpec):
        super().__init__(spec, "numpy")
        self.bf16 = spec.dtype == "bfloat16"
        dtype = np.uint16 if self.bf16 else spec.dtype
        fmt = spec.kv_format
        self.k_scales = self.k_biases = self.v_scales = self.v_biases = None
        if fmt is None:
            self.k = np.zeros(spec.shape, dtype=dtype)
            self.v = np.zeros(spec.shape, dtype=dtype)
            return
        data = (*spec.shape[:3], fmt.data_width(spec.head_dim))
        self.k = np.zeros(data, dtype=fmt.data_dtype)
        self.v = np.zeros(data, dtype=fmt.data_dtype)
        if fmt.affine:
            groups = (*spec.shape[:3], fmt.groups(spec.head_dim))
            self.k_scales, self.k_biases, self.v_scales, self.v_biases = (
                np.zeros(groups, dtype=dtype) for _ in range(4))

    def arrays(self) -> list[np.ndarray]:
        """Every array indexed by (block, offset): what a write or a block copy touches."""
        return [a for a in (self.k, self.v, self.k_scales, self.k_biases, self.v_scales,
                            self.v_biases) if a is not None]

    def store(self, x) -> np.ndarray:
        """New rows in the pool's storage dtype."""
        x = host(x)
        return to_bf16_bits(x) if self.bf16 else x.astype(self.dtype, copy=False)

    def values(self, a: np.ndarray) -> np.ndarray:
        """Stored elements as numbers (bfloat16 widened to float32, exactly)."""
        return from_bf16_bits(a) if self.bf16 else a

    def write(self, blocks, offsets, k, v) -> None:
        fmt = self.spec.kv_format
        if fmt is None:
            self.k[blocks, offsets] = self.store(k)
            self.v[blocks, offsets] = self.store(v)
            return
        for which, x, data, scales, biases in (("k", k, self.k, self.k_scales, self.k_biases),
                                               ("v", v, self.v, self.v_scales, self.v_biases)):
            rows = fmt.quantize(host(x), self.dtype, which)
            data[blocks, offsets] = rows.data
            if scales is not None:
                scales[blocks, offsets] = self.store(rows.scales)
                biases[blocks, offsets] = self.store(rows.biases)

    def read(self, blocks=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(k, v) of `blocks` as numbers: widened (bfloat16) or dequantized (float32)."""
        fmt = self.spec.kv_format
        if fmt is None:
            return self.values(self.k[blocks]), self.values(self.v[blocks])

        def deq(which, data, scales, biases):
            rows = QuantizedRows(data[blocks], None if scales is None else
                                 self.values(scales[blocks]),
                                 None if biases is None else self.values(biases[blocks]))
            return fmt.dequantize(rows, self.dtype, which)
        return (deq("k", self.k, self.k_scales, self.k_biases),
                deq("v", self.v, self.v_scales, self.v_biases))

    def to_numpy(self):
        """(k, v) copies; a bfloat16 pool's come back as float32, a quantized pool's
        dequantized (float32)."""
        k, v = self.read()
        return k.copy(), v.copy()


class NumpyBackend(PagedAttention):
    name = "numpy"
    paths = KNOWN_PATHS
    variants = {"reference": frozenset({"soft_cap", "alibi_slopes", "return_lse", "sinks"})}
    kv_formats = {"reference": frozenset(KV_DTYPES)}
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
        pool.write(b, off, k, v)

    def _copy_blocks(self, pool, src, dst):
        for a in pool.arrays():     # the scales travel with their blocks
            a[dst] = a[src]

    def _attend(self, path, q, pool, args: StepArgs, sinks=None):
        k, v = pool.k, pool.v
        if pool.bf16 or pool.kv_format is not None:
            # Widen or dequantize only the blocks this call reads (tables renumbered to them).
            used, tables = np.unique(args.block_tables, return_inverse=True)
            args = dataclasses.replace(args, block_tables=tables.reshape(args.block_tables.shape))
            k, v = pool.read(used)
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
