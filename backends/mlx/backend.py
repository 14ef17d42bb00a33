"""MLXBackend: pools, KV writes and path dispatch for MLX on Metal, CUDA or the CPU."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from paged_attention.interface import KVPool, PagedAttention
from paged_attention.validation import DecodeArgs, PoolSpec

from .gather import gather_decode, gather_prefill

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def gpu_kind() -> str | None:
    """'metal', 'cuda' or None: which custom-kernel API the default device supports."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def as_mx(x) -> mx.array:
    """x as an mx.array (no copy when it already is one)."""
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x))


class MLXPool(KVPool):
    def __init__(self, spec: PoolSpec):
        super().__init__(spec, "mlx")
        self.k = mx.zeros(spec.shape, dtype=DTYPES[spec.dtype])
        self.v = mx.zeros(spec.shape, dtype=DTYPES[spec.dtype])
        mx.eval(self.k, self.v)

    def to_numpy(self):
        cast = (lambda a: a.astype(mx.float32)) if self.dtype == "bfloat16" else (lambda a: a)
        return np.array(cast(self.k)), np.array(cast(self.v))


class MLXBackend(PagedAttention):
    name = "mlx"
    pool_dtypes = ("float16", "bfloat16", "float32")

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
        # Index assignment lowers to a scatter whose input is the pool itself; with no other
        # reference alive MLX donates the buffer, so only the touched slots are written. Donation
        # is MLX's choice at eval time: on CUDA a finished command's references are dropped by a
        # callback that can lag mx.eval, and then the scatter copies the whole pool. On the H100,
        # writes to one pool right after each other's eval copied 8-13% of the time (1 in ~1800
        # after mx.synchronize()); a 32-layer decode_step loop, where 31 other layers run between
        # two writes to a pool, copied none in 40 steps. tests/test_mlx.py checks the in-place case.
        blocks, offsets = mx.array(slots // pool.block_size), mx.array(slots % pool.block_size)
        dtype = DTYPES[pool.dtype]
        pool.k[blocks, offsets] = mx.array(k).astype(dtype)
        pool.v[blocks, offsets] = mx.array(v).astype(dtype)

    def _copy_blocks(self, pool, src, dst):
        src, dst = mx.array(src), mx.array(dst)
        k_src, v_src = pool.k[src], pool.v[src]
        # Materialise the sources first so the pools have a single reference when scattered.
        mx.eval(k_src, v_src)
        pool.k[dst] = k_src
        pool.v[dst] = v_src

    known_paths = ("gather", "fused")

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

    def _prefill(self, path, q, pool, args: DecodeArgs):
        if path != "gather":
            return super()._prefill(path, q, pool, args)
        q = as_mx(q)
        # The last query sees the longest context, so its table row has every block in use.
        return gather_prefill(q, pool.k, pool.v, args.block_tables[-1] if args.batch else
                              np.zeros(1, np.int32), args.context_lens, args.scale, args.window)

    def _decode_step(self, layers, slots, args, path):
        if path != "fused":
            return super()._decode_step(layers, slots, args, path)
        from .fused import DecodePlan
        # Layers of one geometry share one validated DecodeArgs object (decode_step), so they
        # share one plan: the device copies of the tables, lengths and split-K choice are made
        # once per step instead of once per layer.
        plans: dict[int, DecodePlan] = {}
        outs = []
        for layer, s, a in zip(layers, slots, args):
            if s.size:
                self._write_kv(layer.pool, s, layer.k, layer.v)
            if id(a) not in plans:
                plans[id(a)] = DecodePlan.from_args(self.kernel_api, a, layer.pool.k)
            outs.append(plans[id(a)](as_mx(layer.q), layer.pool.k, layer.pool.v))
        return outs

    def _decode(self, path, q, pool, args: DecodeArgs):
        q = as_mx(q)
        if path == "fused":
            from .fused import fused_decode
            return fused_decode(q, pool.k, pool.v, args, api=self.kernel_api)
        return gather_decode(q, pool.k, pool.v, args.block_tables, args.context_lens,
                             args.scale, args.window)
