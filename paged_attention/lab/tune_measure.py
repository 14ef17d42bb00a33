"""The measurers of `paged-attn tune` (lab/tune.py): one per backend, each building a (batch,
context) point, checking every candidate against the default and timing them in turns.

A measurer has `backend`, `device`, `peak` (bytes/s or None), `versions`, `kv_bytes(B, ctx)`
and `point(batch, ctx, cands, use)` -> ({name: seconds per layer}, {name: why skipped},
{name: facts such as the split count}); `use(name)` is the context under which the backend
reads candidate `name`'s row. Candidate failures are caught here, one candidate at a time.
"""
from __future__ import annotations

import math
import platform

import numpy as np

from .. import devices
from ..errors import PagedAttentionError
from . import timing
from .workload import uniform_tables

DEFAULT_NAME = "default"   # the candidate with no parameters: the built-in configuration
REL_TOL = 2e-2   # a candidate's output vs the default's: RMS of the difference / RMS of the default


class TuneUnavailable(PagedAttentionError):
    """This machine cannot measure the backend (exit status 2, with the reason)."""


def measurer(a):
    return {"mlx": MLXMeasurer, "vulkan": VulkanMeasurer}[a.backend](a)


def rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2)) / max(np.sqrt(np.mean(want ** 2)), 1e-30))


def versions(**extra) -> dict:
    from importlib import metadata
    try:
        pa = metadata.version("paged-attention")
    except metadata.PackageNotFoundError:
        pa = "unknown"
    return {"paged_attention": pa, "python": platform.python_version(), "numpy": np.__version__,
            **extra}


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


class _Base:
    def __init__(self, a):
        self.a = a
        self.rng = np.random.default_rng(a.seed)
        self.itemsize = 4 if a.dtype == "float32" else 2

    def kv_bytes(self, batch: int, ctx: int) -> int:
        return 2 * batch * ctx * self.a.hkv * self.a.head_dim * self.itemsize

    def pools_for(self, batch: int, ctx: int) -> int:
        return max(1, min(self.a.layers, int(self.a.pool_budget_gb * 2**30) // self.kv_bytes(batch, ctx)))

    @staticmethod
    def check(outs: dict, cands, errors: dict) -> None:
        """Drop (into errors) every candidate whose output is off the default's by > REL_TOL."""
        want = outs.get(DEFAULT_NAME)
        for c in cands:
            if c.label in outs and want is not None and c.label != DEFAULT_NAME:
                err = rel_rms(outs[c.label], want)
                if not err <= REL_TOL:
                    errors[c.label] = f"output off the default's by {err:.1e} (relative RMS)"
                    del outs[c.label]


class MLXMeasurer(_Base):
    backend = "mlx"

    def __init__(self, a):
        super().__init__(a)
        try:
            import mlx.core as mx
            from paged_attention.backends.mlx.arrays import gpu_kind
            from paged_attention.backends.mlx.fused import DecodePlan, device_name
        except ImportError as e:
            raise TuneUnavailable(f"MLX is not installed ({e}); nothing to tune") from None
        self.api = gpu_kind()
        if self.api is None:
            raise TuneUnavailable("no Metal or CUDA device for MLX custom kernels (the fused "
                                  "kernel does not run on this machine's MLX): nothing to tune")
        self.mx, self.DecodePlan = mx, DecodePlan
        self.device = device_name(self.api)
        self.peak = devices.lookup(self.device).peak_bytes_per_s
        self.versions = versions(mlx=mx.__version__, api=self.api)
        mx.random.seed(a.seed)

    def point(self, batch, ctx, cands, use):
        mx, a = self.mx, self.a
        dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[a.dtype]
        tables, lens = uniform_tables(self.rng, batch, ctx, a.block_size)
        nb = tables.size
        shape = (nb, a.block_size, a.hkv, a.head_dim)
        pools = [(mx.random.normal(shape, dtype=dtype), mx.random.normal(shape, dtype=dtype))
                 for _ in range(self.pools_for(batch, ctx))]
        qs = [mx.random.normal((batch, a.hq, a.head_dim)).astype(dtype) for _ in range(a.layers)]
        mx.eval(pools, qs)
        plans, outs, errors, facts = {}, {}, {}, {}
        for c in cands:
            try:
                with use(c.label):
                    plan = self.DecodePlan(
                        self.api, tables, lens, 1.0 / math.sqrt(a.head_dim), None, num_blocks=nb,
                        block_size=a.block_size, num_kv_heads=a.hkv, num_q_heads=a.hq,
                        head_dim=a.head_dim, pool_dtype=dtype)
                out = plan(qs[0], *pools[0])
                outs[c.label] = np.array(out.astype(mx.float32))   # compiles and runs it
                plans[c.label] = plan
                facts[c.label] = {"parts": plan.num_parts, "tile": plan.cfg.tile}
            except Exception as e:  # noqa: BLE001 - a candidate that fails is skipped, not fatal
                errors[c.label] = _why(e)
        self.check(outs, cands, errors)
        # Serial layers, as the model's step runs them (timing.serial): timed independent, MLX
        # on CUDA overlaps their kernels and the table would be chosen for a throughput no
        # decode step sees (ADR 0004, "Serial timing").
        fns = {n: timing.serial(lambda i, q, p=p: p(q, *pools[i % len(pools)]), qs.__getitem__)
               for n, p in plans.items() if n in outs}
        secs = self._time(fns, errors)
        del pools, qs, plans
        mx.synchronize()
        mx.clear_cache()
        return secs, errors, facts

    def _time(self, fns: dict, errors: dict) -> dict:
        a = self.a
        try:
            return timing.time_steps(fns, a.layers, a.repeats, a.warmup, sync=self.mx.eval)
        except Exception:  # noqa: BLE001 - find the one that fails; the others still count
            secs = {}
            for n, fn in fns.items():
                try:
                    secs.update(timing.time_steps({n: fn}, a.layers, a.repeats, a.warmup,
                                                  sync=self.mx.eval))
                except Exception as e:  # noqa: BLE001
                    errors[n] = _why(e)
            return secs


class VulkanMeasurer(_Base):
    backend = "vulkan"

    def __init__(self, a):
        super().__init__(a)
        from paged_attention import registry
        why = registry.unavailable_reason("vulkan")
        if why:
            raise TuneUnavailable(f"the Vulkan backend is unavailable: {why}")
        self.be = registry.get_backend("vulkan")
        self.device = self.be.device
        self.peak = devices.lookup(self.device).peak_bytes_per_s
        self.versions = versions(device=self.device)

    def point(self, batch, ctx, cands, use):
        be, a, dt = self.be, self.a, np.dtype(self.a.dtype)
        tables, lens = uniform_tables(self.rng, batch, ctx, a.block_size)
        # Pool 0 holds random K/V (the candidates' outputs are compared on it); the others,
        # rotated across layers so small points are not served from L2, stay zero: contents
        # do not change the traffic (lab/bench/vulkan_decode.py's step does the same).
        pools = [be.create_pool(tables.size, a.block_size, a.hkv, a.head_dim, a.dtype)
                 for _ in range(self.pools_for(batch, ctx))]
        n = tables.size * a.block_size
        tile = min(n, 16384)
        kt, vt = (self.rng.standard_normal((tile, a.hkv, a.head_dim)).astype(dt) for _ in "kv")
        for s0 in range(0, n, tile):
            be.write_kv(pools[0], np.arange(s0, min(n, s0 + tile)), kt[:n - s0], vt[:n - s0])
        q = self.rng.standard_normal((batch, a.hq, a.head_dim)).astype(dt)
        plans, outs, errors, facts = {}, {}, {}, {}
        for c in cands:
            try:
                with use(c.label):   # the plan keeps its rule: its runs need no override
                    plan = be.plan(pools[0], tables, lens, num_q_heads=a.hq)
                    facts[c.label] = {"path": plan.path,
                                     "nsplit": be.split_geometry(plan.args, plan.spec)[0]
                                     if plan.path == "splitk" else 1}
                outs[c.label] = np.asarray(be.run(plan, q, pools[0]), np.float32)
                plans[c.label] = plan
            except Exception as e:  # noqa: BLE001 - a candidate that fails is skipped, not fatal
                errors[c.label] = _why(e)
        self.check(outs, cands, errors)
        fns = {nm: (lambda i, p=p: be.run(p, q, pools[i % len(pools)]))
               for nm, p in plans.items() if nm in outs}
        secs = self._time(fns, errors)
        del pools, plans
        return secs, errors, facts

    def _time(self, fns: dict, errors: dict) -> dict:
        """Device time per layer (timestamps) where the device has a timer, else wall time."""
        a, be = self.a, self.be
        try:
            got = timing.device_step_times(be, fns, a.layers, a.warmup + a.repeats)
            if got:
                return {n: float(np.median(ts[a.warmup:])) for n, ts in got.items()}
            steps = {n: timing.layered(fn, a.layers, sync=lambda outs: None)
                     for n, fn in fns.items()}
            return {n: float(np.median(ts)) / a.layers
                    for n, ts in timing.round_robin(steps, a.repeats, a.warmup).items()}
        except Exception as e:  # noqa: BLE001
            for n in fns:
                errors[n] = f"timing failed: {_why(e)}"
            return {}
