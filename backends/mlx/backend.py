"""MLXBackend: pools, KV writes and path dispatch for MLX on Metal, CUDA or the CPU."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from paged_attention.interface import KVPool, PagedAttention, Plan
from paged_attention.kv_formats import KV_DTYPES
from paged_attention.validation import PoolSpec

from . import KNOWN_PATHS
from .arrays import DTYPES, as_mx, gpu_kind, take_wide
from .gather import GatherPlan
from .mixed import MixedPlan

class MLXPool(KVPool):
    """K and V as mx.arrays of the pool's dtype, or (quantized pools) their format's storage:
    k, v the data and k_scales/k_biases/v_scales/v_biases (affine formats), all indexed by
    (block, offset) (kv_formats.py). Gather reads a quantized pool through `sources()`."""

    def __init__(self, spec: PoolSpec):
        super().__init__(spec, "mlx")
        fmt = spec.kv_format
        self.k_scales = self.k_biases = self.v_scales = self.v_biases = None
        if fmt is None:
            self.k = mx.zeros(spec.shape, dtype=DTYPES[spec.dtype])
            self.v = mx.zeros(spec.shape, dtype=DTYPES[spec.dtype])
        else:
            data = (*spec.shape[:3], fmt.data_width(spec.head_dim))
            kind = mx.uint32 if fmt.affine else mx.uint8
            self.k, self.v = mx.zeros(data, dtype=kind), mx.zeros(data, dtype=kind)
            if fmt.affine:
                groups = (*spec.shape[:3], fmt.groups(spec.head_dim))
                self.k_scales, self.k_biases, self.v_scales, self.v_biases = (
                    mx.zeros(groups, dtype=DTYPES[spec.dtype]) for _ in range(4))
        mx.eval(*self.arrays())

    def arrays(self) -> list:
        """Every array indexed by (block, offset): what a write or a block copy touches."""
        return [a for a in (self.k, self.v, self.k_scales, self.k_biases, self.v_scales,
                            self.v_biases) if a is not None]

    def sources(self):
        """(keys, values) as gather reads them: the arrays, or QuantizedSource views."""
        if self.kv_format is None:
            return self.k, self.v
        fmt, dt = self.kv_format, DTYPES[self.dtype]
        return (QuantizedSource(self.k, self.k_scales, self.k_biases, fmt, dt, self.spec.shape,
                                fmt.k_scale),
                QuantizedSource(self.v, self.v_scales, self.v_biases, fmt, dt, self.spec.shape,
                                fmt.v_scale))

    def write(self, blocks, offsets, k, v) -> None:
        """Quantize k, v [S, Hkv, D] and scatter them (and their scales) at (blocks, offsets)."""
        fmt, dt = self.kv_format, DTYPES[self.dtype]
        for x, data, scales, biases, scale in (
                (k, self.k, self.k_scales, self.k_biases, fmt.k_scale),
                (v, self.v, self.v_scales, self.v_biases, fmt.v_scale)):
            x = as_mx(x).astype(dt)
            if fmt.affine:
                wq, s, b = mx.quantize(x, group_size=fmt.group_size, bits=fmt.bits)
                data[blocks, offsets] = wq
                scales[blocks, offsets] = s
                biases[blocks, offsets] = b
            else:   # in float32, as the reference: e4m3fn(x / scale)
                data[blocks, offsets] = mx.to_fp8(x.astype(mx.float32) / scale)

    def to_numpy(self):
        if self.kv_format is not None:   # dequantized, as attention reads them
            k, v = self.sources()
            return tuple(np.array(s.dequantize(s.data, s.scales, s.biases).astype(mx.float32))
                         for s in (k, v))
        cast = (lambda a: a.astype(mx.float32)) if self.dtype == "bfloat16" else (lambda a: a)
        return np.array(cast(self.k)), np.array(cast(self.v))


class QuantizedSource:
    """One of a quantized pool's K or V as the gather path reads it: `take(table)` gathers the
    blocks' data and scales, then dequantizes only those, to float32 (the affine formats through
    mx.dequantize with float32 scales: codes * scale + bias with no rounding to the pool's dtype
    in between, the reference arithmetic of paged_attention.kv_formats bit for bit)."""

    __slots__ = ("data", "scales", "biases", "fmt", "dtype", "shape", "scale")

    def __init__(self, data, scales, biases, fmt, dtype, shape, scale):
        self.data, self.scales, self.biases, self.fmt = data, scales, biases, fmt
        self.dtype, self.shape, self.scale = dtype, shape, scale

    def dequantize(self, data, scales, biases) -> mx.array:
        if self.fmt.affine:
            return mx.dequantize(data, scales.astype(mx.float32), biases.astype(mx.float32),
                                 group_size=self.fmt.group_size, bits=self.fmt.bits)
        return mx.from_fp8(data, mx.float32) * self.scale

    def take(self, table: mx.array) -> mx.array:
        """[*table.shape, block_size, Hkv, D] values of the blocks in `table`."""
        def pick(a):
            return None if a is None else \
                take_wide(a.reshape(a.shape[0], -1), table).reshape(*table.shape, *a.shape[1:])
        return self.dequantize(pick(self.data), pick(self.scales), pick(self.biases))

    def take_rows(self, index: mx.array) -> mx.array:
        """[*index.shape, D] values of the (token, head) rows in `index` (gather.take_rows)."""
        pick = (lambda a: None if a is None else take_wide(a.reshape(-1, a.shape[-1]), index))
        return self.dequantize(pick(self.data), pick(self.scales), pick(self.biases))


class MLXBackend(PagedAttention):
    name = "mlx"
    pool_dtypes = ("float16", "bfloat16", "float32")
    # Gather writes the variants out in float32; the fused kernel compiles each in as its own
    # form (its prompt chunks go through gather's variant attention): ADR 0010.
    variants = {"gather": frozenset({"soft_cap", "alibi_slopes", "return_lse", "sinks"}),
                "fused": frozenset({"soft_cap", "alibi_slopes", "return_lse", "sinks"})}
    # Gather dequantizes the blocks it takes; the fused kernel reads the packed data and
    # dequantizes in registers (one form per format), its prompt chunks as gather (ADR 0011).
    kv_formats = {"gather": frozenset(KV_DTYPES), "fused": frozenset(KV_DTYPES)}

    def __init__(self):
        self.kernel_api = gpu_kind()
        self.paths = ("gather", "fused") if self.kernel_api else ("gather",)

    @property
    def device(self) -> str:
        kind = self.kernel_api or "cpu"
        try:
            return f"{mx.device_info().get('device_name', kind)} ({kind})"
        except Exception:  # noqa: BLE001 - device_info is informational only
            return kind

    def _create_pool(self, spec):
        return MLXPool(spec)

    def _write_kv(self, pool, slots, k, v):
        # An in-place scatter, as in _run (see the comment there).
        blocks, offsets = mx.array(slots // pool.block_size), mx.array(slots % pool.block_size)
        if pool.kv_format is not None:
            return pool.write(blocks, offsets, k, v)
        dtype = DTYPES[pool.dtype]
        pool.k[blocks, offsets] = mx.array(k).astype(dtype)
        pool.v[blocks, offsets] = mx.array(v).astype(dtype)

    def _copy_blocks(self, pool, src, dst):
        src, dst = mx.array(src), mx.array(dst)
        arrays = pool.arrays()      # K, V and, quantized, their scales
        taken = [a[src] for a in arrays]
        # Materialise the sources first so the pools have a single reference when scattered.
        mx.eval(*taken)
        for a, t in zip(arrays, taken):
            a[dst] = t

    known_paths = KNOWN_PATHS

    def path_unavailable_reason(self, path):
        if path == "fused" and not self.kernel_api:
            return (f"no Metal or CUDA device for MLX custom kernels (MLX device: {self.device}); "
                    "the fused path needs one, use path='gather'")
        return super().path_unavailable_reason(path)

    def shape_unsupported_reason(self, path, spec):
        if path == "fused":
            from .fused import head_dim_unsupported_reason
            return head_dim_unsupported_reason(spec.head_dim)
        return None

    # -- plan/run: host work once per step, nothing but device work per layer -----------------
    array_type = mx.array

    def _prepare(self, plan: Plan) -> "_StepPlan":
        slots = plan.slots if plan.slots is not None and plan.slots.size else None
        fused = None
        if plan.path == "fused":
            from .fused import DecodePlan  # lazily: it compiles kernels and is GPU-only

            def decode(rows):
                # The write indices ride in the plan's one device array (ADR 0007), and so do
                # the variant's soft-cap and slopes (`rows`, a selection, carries no variant).
                return DecodePlan.from_spec(self.kernel_api, rows, plan.spec, slots=slots,
                                            attention=plan.args.variant)
            args = plan.args
            if args.decode_only or not (args.query_lens > 1).any():
                # Every row a decode query: the sequences with a query (in order) are the rows.
                attend = fused = decode(args if args.decode_only else
                                        args.select(np.flatnonzero(args.query_lens)))
            else:   # prompt chunks: one SDPA each, the decode rows fused (mixed.py)
                attend = MixedPlan(args, plan.spec.block_size, decode)
                fused = attend.decode
        else:
            attend = GatherPlan(plan.args, plan.spec.block_size, plan.spec)
        if slots is None:
            write = None
        elif fused is not None:
            write = fused.write
        else:   # (block, offset) of each new row, int32 [2, S]
            both = mx.array(np.stack(np.divmod(slots, plan.spec.block_size)).astype(np.int32))
            write = (both[0], both[1])
        return _StepPlan(write, attend, DTYPES[plan.spec.dtype])

    def _run(self, plan: Plan, q, pool, k, v):
        step = plan.device
        if k is not None and getattr(step.attend, "appends", False):
            # The fused decode kernel stores the new rows itself (one launch instead of a
            # scatter per pool before it; ADR 0004, "Append in the kernel"). It writes the
            # pools in place, unknown to MLX: mx.depends makes every later reader of the pools
            # be built after this step's output, which orders MLX's evaluation but, on CUDA,
            # not the GPU's (the hazard in that ADR section; why the form is off by default).
            out = step.attend.append(as_mx(q), pool.k, pool.v, self._as_pool(k, step.dtype),
                                     self._as_pool(v, step.dtype))
            pool.k, pool.v = mx.depends([pool.k, pool.v], [out])
            return out
        self._write_step(step, pool, k, v)
        return step.attend(as_mx(q), *pool.sources())

    @staticmethod
    def _as_pool(x, dtype) -> mx.array:
        x = as_mx(x)
        return x if x.dtype == dtype else x.astype(dtype)

    def _run_variant(self, plan: Plan, q, pool, k, v, sinks):
        # Every attend object has the variant form: GatherPlan (written out in float32),
        # DecodePlan (the fused kernel's forms with the features compiled in) and MixedPlan
        # (decode rows fused, prompt chunks through gather's variant attention). The LSE is
        # None where the plan does not return it and the path need not compute it.
        step = plan.device
        self._write_step(step, pool, k, v)
        return step.attend.with_lse(as_mx(q), *pool.sources(),
                                    None if sinks is None else mx.array(sinks))

    def _merge_states(self, out_a, lse_a, out_b, lse_b):
        out_a, out_b = as_mx(out_a), as_mx(out_b)
        la, lb = as_mx(lse_a).astype(mx.float32), as_mx(lse_b).astype(mx.float32)
        m = mx.maximum(la, lb)
        m = mx.where(mx.isinf(m), 0.0, m)
        wa, wb = mx.exp(la - m)[..., None], mx.exp(lb - m)[..., None]
        total = wa + wb
        out = (out_a.astype(mx.float32) * wa + out_b.astype(mx.float32) * wb) / \
            mx.where(total > 0, total, 1.0)
        return out.astype(out_a.dtype), (m + mx.log(total[..., 0]))

    @staticmethod
    def _write_step(step, pool, k, v) -> None:
        if k is not None and step.write is not None:
            # Index assignment lowers to a scatter whose input is the pool itself; with no other
            # reference alive MLX donates the buffer, so only the touched slots are written.
            # Donation is MLX's choice at eval time, and on CUDA it can lag (a whole-pool copy
            # now and then when one pool is written back to back; never in a layer loop):
            # measurements in ADR 0004, "Pool writes"; tests/backends/test_mlx.py checks it.
            blocks, offsets = step.write
            if pool.kv_format is not None:
                return pool.write(blocks, offsets, k, v)
            pool.k[blocks, offsets] = MLXBackend._as_pool(k, step.dtype)
            pool.v[blocks, offsets] = MLXBackend._as_pool(v, step.dtype)

    # -- lab capabilities (interface.py): lazy arrays, an allocator with a cache ----------------
    def synchronize(self, outs=(), pools=()):
        mx.eval(*outs, *[a for p in pools for a in p.arrays()])

    def submit(self, outs=()):
        mx.async_eval(*outs)

    def from_numpy(self, x, dtype):
        a = mx.array(np.asarray(x, np.float32)).astype(DTYPES[dtype])
        mx.eval(a)
        return a

    def memory_in_use(self):
        return int(mx.get_active_memory())

    def release_cached_memory(self):
        mx.synchronize()
        mx.clear_cache()

    def peak_memory_of(self, fn):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = fn()
        return out, max(0, mx.get_peak_memory() - base)

    def dense_attention(self, q, k, v, scale):
        # Attends in the dtype the gather path picks for an unmasked decode call of this shape
        # (gather.sdpa_dtype), so "x dense" compares like with like; casts count in both.
        from .gather import sdpa_dtype
        dt, fused = sdpa_dtype(k.dtype, q.shape[1], k.shape[1], 1, k.shape[2], k.shape[3], None)
        if k.dtype != dt:
            k, v = k.astype(dt), v.astype(dt)
        out = mx.fast.scaled_dot_product_attention(q.astype(dt)[:, :, None, :], k, v,
                                                   scale=float(scale), force_fused=fused)
        return out[:, :, 0, :].astype(q.dtype)


class _StepPlan:
    """MLX's per-step state: the write indices (block, offset) and the attention callable."""

    __slots__ = ("write", "attend", "dtype")

    def __init__(self, write, attend, dtype):
        self.write, self.attend, self.dtype = write, attend, dtype

