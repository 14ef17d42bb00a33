"""End-to-end decode benchmark: what a model's decode loop pays, through the public API.

    paged-attn bench e2e [--preset h100|cpu] [--backends mlx,vulkan] [--batches 1,8,32]
                         [--contexts 4k,16k,32k] [--layers 32] [--steps 8] [--json FILE]

A model-like serial loop: per step one `plan` (block tables, lengths, the new tokens' slots),
then per layer `run(plan, q, pool_i, k, v)`, where layer i's q, k and v are computed from
layer i-1's output (so layers cannot overlap or be batched: the dependency a real model has;
k and v are a contiguous view of it, `new_rows`).
Each layer has its own pool (rotated among as many distinct pools as --budget-gib allows,
each larger than L2 at the big points); tables are fragmented (a random permutation of the
pool); every step appends one token per sequence. Geometry: Hq 32, Hkv 8, D 128, float16,
block 16. Variants timed, in turns step by step so drift hits them alike:

  api     plan() once + run() per layer: what a model calls
  overlap the api loop as a serving engine runs it: the layers are submitted (`submit`), and the
          next step's plan is made while the device works, then the outputs are read (mlx-lm's
          own generate_step orders a step so: step t+1 is built before step t's token is read)
  fresh   plans of successive steps made before timing, one per step, run() per layer: api -
          fresh is plan()'s host work, fresh - run what a step's new device arrays cost
  run     one plan made outside the timed step, run() per layer: run - kernel is run()'s checks
  inputs  the kernel loop plus what any caller of the kernels must do per step: the step's
          lengths and slots made into device inputs by `prepare_unchecked` (the backend hook), no
          validation and no plan() call. api - inputs is the API's own cost; inputs - kernel
          what the device's per-step inputs cost (on MLX CUDA: ADR 0007)
  kernel  the same loop through `run_unchecked` (the backend hook) with the plan made once
          outside the timed step: the backend's kernels and nothing else (no validation, no plan)
  pipe, pipe_kernel
          api and kernel in mlx-lm's generate_step order: step t+1, plan() included, is built
          on step t's still-lazy output (layer 0's q is step t's last output) and submitted
          before step t's output is read; timed over blocks of steps, the two alternating
          (pipe/pipe_kernel is the API's cost in the order a model's loop runs). Where
          --budget-gib gives fewer pools than layers, a pool written twice in a step while
          the previous step is in flight is copied whole by MLX: both absolute pipe times
          grow, the ratio does not (ADR 0007)
  sdpa    MLX only: mx.fast.scaled_dot_product_attention over contiguous [B, Hkv, T, D] K/V,
          same serial chain, no paging and no append: the contiguous-cache baseline

Reported per point: ms per step (median), api/kernel and api/sdpa, effective TB/s (K+V bytes
read per step / step time) next to the device's peak (paged_attention.devices; the preset's
where the device is unknown), and host us per run() (time spent inside the
run() calls / layers). `--host` adds the CPU issue-cost check: plan(), run() and decode() host
time at B=32 x 2048 blocks without evaluating anything. See adr/0007-plan-run.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time

import numpy as np

import paged_attention as pa

from .benches import parse_sizes
from .timing import round_robin, wall

PRESETS = {
    "h100": dict(batches=[1, 8, 32], contexts=[4096, 16384, 32768], layers=32, steps=8,
                 warmup=3, budget_gib=24.0, peak_tbs=3.35, paths=None),
    "cpu": dict(batches=[1, 4], contexts=[256, 1024], layers=4, steps=3, warmup=1,
                budget_gib=1.0, peak_tbs=None, paths=None),
}
HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, "float16"
PIPE_BLOCKS = 3


def _native(be, x: np.ndarray):
    """x in the backend's own array type (inputs in it cost no host round trip per call)."""
    return x if be.array_type is np.ndarray else be.array_type(x)


def new_rows(x):
    """A layer's new K/V rows [B, Hkv, D] made from the previous layer's output x [B, Hq, D]:
    its first B * Hkv rows, a contiguous view, so the rows depend on x as a model's projections
    do without a kernel of their own (the strided view x[:, :Hkv] is copied by MLX before a
    custom kernel reads it: one launch per layer that no model makes and the SDPA baseline
    does not pay)."""
    b = x.shape[0]
    return x.reshape(b * HQ, D)[:b * HKV].reshape(b, HKV, D)


def has_sdpa_baseline(be) -> bool:
    """The contiguous baseline is MLX's SDPA: only comparable where outputs are mx.arrays."""
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return be.array_type is mx.array


class Point:
    """One (backend, path, batch, context): the pools, tables and the three loops."""

    def __init__(self, be, path: str, batch: int, ctx: int, layers: int, steps: int,
                 budget_gib: float, seed: int = 0):
        self.be, self.path, self.batch, self.ctx, self.layers = be, path, batch, ctx, layers
        rng = np.random.default_rng(seed)
        self.max_len = ctx + steps + 8
        per_seq = -(-self.max_len // BS)
        num_blocks = batch * per_seq
        pool_bytes = 2 * num_blocks * BS * HKV * D * 2
        self.num_pools = max(1, min(layers, int(budget_gib * 2**30 // pool_bytes)))
        self.pools = [be.create_pool(num_blocks, BS, HKV, D, DTYPE) for _ in range(self.num_pools)]
        # Cached context: random K/V written through the API (a few chunks per pool).
        self.tables = rng.permutation(num_blocks).astype(np.int32).reshape(batch, per_seq)
        slots = (self.tables[:, :, None] * BS + np.arange(BS)).reshape(batch, -1)[:, :ctx].reshape(-1)
        # One random chunk, made once (in the backend's own array type) and written everywhere:
        # the values do not matter for timing, and the host neither draws nor copies gigabytes.
        chunk = min(1 << 16, slots.size)
        kv = _native(be, rng.standard_normal((chunk, HKV, D)).astype(np.float16))
        for pool in self.pools:
            for i in range(0, slots.size, chunk):
                s = slots[i:i + chunk]
                be.write_kv(pool, s, kv[:s.size], kv[:s.size])
        self.len = ctx
        self.q0 = _native(be, rng.standard_normal((batch, HQ, D)).astype(np.float16))
        self.run_s: list[float] = []   # host seconds of each run() / plan() in the api loop
        self.plan_s: list[float] = []
        # The kernel loop's plan, made once outside the timed steps (it repeats the same step).
        saved = self.len
        self.kernel_plan = self._plan_next()
        self.len = saved
        self.fresh_plans: list = []
        self._pending = None

    def _next(self):
        """The step's lengths and slots: one new token per sequence."""
        lens = np.full(self.batch, self.len + 1, np.int32)
        slots = self.tables[:, self.len // BS].astype(np.int64) * BS + self.len % BS
        self.len += 1
        if self.len >= self.max_len:  # keep the loop going: rewrite the last positions
            self.len = self.ctx
        return lens, slots

    def _plan_next(self):
        """plan() for the next step (one appended token per sequence)."""
        lens, slots = self._next()
        return self.be.plan(self.pools[0], self.tables, lens, num_q_heads=HQ, slot_mapping=slots,
                            path=self.path)

    def _layers(self, plan, call, timed: bool = False, x=None):
        """The serial chain: layer i's q, k and v come from layer i-1's output; layer 0's from
        x (default q0). timed: each call's host seconds go to run_s."""
        x = self.q0 if x is None else x
        for i in range(self.layers):
            kv = new_rows(x)
            t0 = time.perf_counter()
            x = call(plan, x, self.pools[i % self.num_pools], kv, kv)
            if timed:
                self.run_s.append(time.perf_counter() - t0)
        return x

    def api_step(self):
        t0 = time.perf_counter()
        plan = self._plan_next()
        self.plan_s.append(time.perf_counter() - t0)
        return self.be.to_numpy(self._layers(plan, self.be.run, timed=True))

    def overlap_step(self):
        """The api loop as a serving engine runs it: the step's layers are submitted, then the
        NEXT step's plan is made on the host while the device works (its tables and slots do not
        depend on this step's outputs), then the outputs are read."""
        x = self._layers(self._pending or self._plan_next(), self.be.run)
        self.be.submit([x])
        self._pending = self._plan_next()
        return self.be.to_numpy(x)

    def kernel_step(self, checked: bool = False):
        """The kernel loop (`run_unchecked`, no checks); checked=True: the same through run(), so
        the difference is run()'s O(1) checks and api - run is what plan() costs per step."""
        return self.be.to_numpy(self._layers(self.kernel_plan,
                                             self.be.run if checked else self.be.run_unchecked))

    def inputs_step(self):
        """The kernel loop with this step's inputs made by the backend hook alone
        (`prepare_unchecked`: the kernel plan with the new lengths and slots swapped in, nothing
        validated)."""
        lens, slots = self._next()
        base = self.kernel_plan
        plan = self.be.prepare_unchecked(
            base, args=dataclasses.replace(base.args, context_lens=lens), slots=slots)
        return self.be.to_numpy(self._layers(plan, self.be.run_unchecked))

    def _submitted(self, x, api: bool):
        """One step built on x and submitted: plan() + run() per layer (api), else the kernel
        plan through `run_unchecked`."""
        plan, call = (self._plan_next(), self.be.run) if api else \
            (self.kernel_plan, self.be.run_unchecked)
        x = self._layers(plan, call, x=x)
        self.be.submit([x])
        return x

    def pipelined(self, steps: int, api: bool) -> float:
        """Seconds per step over `steps` steps in mlx-lm's generate_step order: step t+1 (its
        plan() too) is built on step t's still-lazy output and submitted before step t's output
        is read, so the host builds one step while the device runs the previous one. Fill and
        drain are inside the timing."""
        t0 = time.perf_counter()
        x = self._submitted(self.q0, api)
        for _ in range(steps - 1):
            nxt = self._submitted(x, api)
            self.be.to_numpy(x)
            x = nxt
        self.be.to_numpy(x)
        return (time.perf_counter() - t0) / steps

    def make_fresh_plans(self, n: int) -> None:
        """n plans of successive steps, made before timing: `fresh_step` runs each once, so its
        difference to `run` is what a step's new device arrays cost, apart from plan()'s host work."""
        saved = self.len
        self.fresh_plans.extend(self._plan_next() for _ in range(n))
        self.len = saved

    def fresh_step(self):
        return self.be.to_numpy(self._layers(self.fresh_plans.pop(), self.be.run))

    def kv_bytes_per_step(self) -> int:
        return self.layers * self.batch * self.ctx * HKV * D * 2 * 2

    def close(self):
        self.pools.clear()


def sdpa_step_fn(batch: int, ctx: int, layers: int, budget_gib: float, seed: int = 0):
    """The contiguous-cache baseline on MLX: SDPA over [B, Hkv, ctx, D] K/V, serial chain."""
    import mlx.core as mx
    per = 2 * batch * ctx * HKV * D * 2
    n = max(1, min(layers, int(budget_gib * 2**30 // per)))
    key = mx.random.key(seed)
    caches = [(mx.random.normal((batch, HKV, ctx, D), key=mx.random.split(key, 2 * i + 2)[0])
               .astype(mx.float16),
               mx.random.normal((batch, HKV, ctx, D), key=mx.random.split(key, 2 * i + 3)[0])
               .astype(mx.float16)) for i in range(n)]
    mx.eval(caches)
    q0 = mx.random.normal((batch, HQ, 1, D), key=key).astype(mx.float16)
    scale = D ** -0.5

    def step():
        x = q0
        for i in range(layers):
            k, v = caches[i % n]
            x = mx.fast.scaled_dot_product_attention(x, k, v, scale=scale)
        mx.eval(x)
        return x
    return step


def bench_point(be, path, batch, ctx, cfg) -> dict:
    # Each point starts with nothing cached from the previous ones (their pools and SDPA
    # caches): in one process, what an earlier point left in the allocator's cache slowed a
    # later point's host work (ADR 0007).
    gc.collect()
    be.release_cached_memory()
    p = Point(be, path, batch, ctx, cfg["layers"], cfg["steps"] + cfg["warmup"] + 2,
              cfg["budget_gib"])
    p.make_fresh_plans(cfg["steps"] + cfg["warmup"])
    fns = {"api": p.api_step, "overlap": p.overlap_step, "fresh": p.fresh_step,
           "run": lambda: p.kernel_step(checked=True), "inputs": p.inputs_step,
           "kernel": p.kernel_step}
    if cfg.get("sdpa"):
        fns["sdpa"] = sdpa_step_fn(batch, ctx, cfg["layers"], cfg["budget_gib"])
    times = round_robin({k: wall(fn) for k, fn in fns.items()}, cfg["steps"], cfg["warmup"])
    # The pipelined pair keeps a step in flight across calls, so it cannot take turns with the
    # others step by step: whole blocks alternate instead (median of the blocks; the first
    # block of each warms up).
    n = max(2, cfg["steps"])
    times.update(round_robin({"pipe": lambda: p.pipelined(n, True),
                              "pipe_kernel": lambda: p.pipelined(n, False)}, PIPE_BLOCKS, 1))
    t = {k: statistics.median(v) for k, v in times.items()}
    # Medians: the first calls record kernels and compile shaders.
    host_us = 1e6 * statistics.median(p.run_s)
    plan_us = 1e6 * statistics.median(p.plan_s)
    row = {"backend": be.name, "path": path, "batch": batch, "context": ctx,
           "layers": cfg["layers"], "pools": p.num_pools,
           "api_ms": 1e3 * t["api"], "overlap_ms": 1e3 * t["overlap"],
           "overlap_over_kernel": t["overlap"] / t["kernel"],
           "pipe_ms": 1e3 * t["pipe"], "pipe_kernel_ms": 1e3 * t["pipe_kernel"],
           "pipe_over_kernel": t["pipe"] / t["pipe_kernel"],
           "fresh_ms": 1e3 * t["fresh"], "run_ms": 1e3 * t["run"],
           "inputs_ms": 1e3 * t["inputs"], "kernel_ms": 1e3 * t["kernel"],
           "api_over_kernel": t["api"] / t["kernel"], "api_over_inputs": t["api"] / t["inputs"],
           "host_us_per_run": host_us,
           "host_us_per_plan": plan_us,
           "api_tbs": p.kv_bytes_per_step() / t["api"] / 1e12,
           "kernel_tbs": p.kv_bytes_per_step() / t["kernel"] / 1e12}
    if "sdpa" in t:
        row["sdpa_ms"] = 1e3 * t["sdpa"]
        row["api_over_sdpa"] = t["api"] / t["sdpa"]
    p.close()
    return row


def host_costs(be, path: str, batch: int = 32, blocks: int = 2048, repeats: int = 200,
               budget_s: float = 1.0) -> dict:
    """Host time of plan(), run() and decode() at B x `blocks` blocks, nothing evaluated on a
    lazy backend: what issuing a layer costs the CPU. Each figure is the median of `repeats`
    calls, fewer (at least 5) once the calls have taken budget_s together: a synchronous backend
    (Vulkan) runs the attention inside run() and decode(), and on a CPU device 200 of those at
    this size take many minutes."""
    rng = np.random.default_rng(0)
    num_blocks = batch * blocks
    pool = be.create_pool(num_blocks, BS, HKV, D, DTYPE)
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(batch, blocks)
    lens = np.full(batch, blocks * BS, np.int32)
    q = _native(be, np.zeros((batch, HQ, D), np.float16))

    def med(fn):
        ts = round_robin({"fn": wall(fn)}, repeats, max_seconds=budget_s, min_repeats=5)["fn"]
        return 1e6 * statistics.median(ts)
    plan = be.plan(pool, tables, lens, num_q_heads=HQ, path=path)
    out = {"backend": be.name, "path": path, "batch": batch, "blocks": blocks,
           "plan_us": med(lambda: be.plan(pool, tables, lens, num_q_heads=HQ, path=path)),
           "run_us": med(lambda: be.run(plan, q, pool)),
           "check_us": med(lambda: be.check_run(plan, q, pool)),
           "kernel_call_us": med(lambda: be.run_unchecked(plan, q, pool)),
           "decode_us": med(lambda: be.decode(q, pool, tables, lens, path=path))}
    out["run_over_decode"] = out["run_us"] / out["decode_us"]
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--backends", default="mlx,vulkan", help="comma-separated registry names")
    ap.add_argument("--paths", default=None, help="comma-separated paths (default: every path "
                                                   "available on each backend)")
    ap.add_argument("--batches", type=parse_sizes)
    ap.add_argument("--contexts", type=parse_sizes)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--budget-gib", type=float)
    ap.add_argument("--no-sdpa", action="store_true", help="skip the contiguous SDPA baseline")
    ap.add_argument("--host", action="store_true", help="also measure plan/run/decode host cost "
                                                        "at B=32 x 2048 blocks")


def resolve(a) -> None:
    """The preset's values for the options not given, so the config snapshot says them."""
    for key in ("batches", "contexts", "layers", "steps", "budget_gib"):
        if getattr(a, key) is None:
            setattr(a, key, PRESETS[a.preset][key])


def measure(a) -> list[dict]:
    """Records: one per backend x path x point ("e2e"), and with --host one per backend x path
    ("e2e.host")."""
    cfg = dict(PRESETS[a.preset])
    for key in ("batches", "contexts", "layers", "steps", "budget_gib"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    rows, host = [], []
    for name in [n.strip() for n in a.backends.split(",") if n.strip()]:
        reason = pa.registry.unavailable_reason(name)
        if reason:
            print(f"# {name}: skipped ({reason})")
            continue
        be = pa.get_backend(name)
        paths = [p for p in (a.paths.split(",") if a.paths else be.paths) if p in be.paths]
        # The device's own peak where it is known (the preset's is the H100's).
        known = pa.devices.peak_bandwidth(be.device)
        peak_tbs = known / 1e12 if known else cfg["peak_tbs"]
        ceiling = pa.devices.ceiling_bandwidth(be.device)
        ceil_tbs = ceiling / 1e12 if ceiling else None
        print(f"# {name} on {be.device}: paths {paths}; peak {peak_tbs or '?'} TB/s; measured "
              f"read ceiling {ceil_tbs or '?'} TB/s (paged_attention.devices.CEILINGS)")
        for path in paths:
            if a.host:
                h = host_costs(be, path)
                host.append({"measurement": "e2e.host", "device": be.device, **h})
                print(f"host {name}/{path} B={h['batch']} x {h['blocks']} blocks: plan "
                      f"{h['plan_us']:.1f} us, run {h['run_us']:.1f} us (checks {h['check_us']:.1f}, "
                      f"kernel call {h['kernel_call_us']:.1f}), decode {h['decode_us']:.1f} "
                      f"us, run/decode {h['run_over_decode']:.3f}", flush=True)
            print(f"{'backend/path':16s} {'B':>3s} {'ctx':>6s} {'api ms':>9s} {'overlap':>9s} {'fresh ms':>9s} {'run ms':>9s} {'inputs':>9s} {'kernel ms':>9s} "
                  f"{'api/kern':>8s} {'api/inpt':>8s} {'ovl/kern':>8s} {'pipe ms':>8s} {'pip/pipk':>8s} {'sdpa ms':>8s} {'api/sdpa':>8s} {'TB/s':>6s} {'host us/run':>11s} {'us/plan':>8s}")
            for batch in cfg["batches"]:
                for ctx in cfg["contexts"]:
                    c = dict(cfg, sdpa=not a.no_sdpa and has_sdpa_baseline(be))
                    r = bench_point(be, path, batch, ctx, c)
                    rows.append({"measurement": "e2e", "device": be.device, "peak_tbs": peak_tbs,
                                 "ceiling_tbs": ceil_tbs, **r})
                    peak = f" ({100 * r['api_tbs'] / peak_tbs:.0f}% of {peak_tbs:.2f})" \
                        if peak_tbs else ""
                    if ceil_tbs:
                        peak += f" ({100 * r['api_tbs'] / ceil_tbs:.0f}% of ceiling {ceil_tbs:.2f})"
                    print(f"{name + '/' + path:16s} {batch:3d} {ctx:6d} {r['api_ms']:9.2f} {r['overlap_ms']:9.2f} {r['fresh_ms']:9.2f} {r['run_ms']:9.2f} {r['inputs_ms']:9.2f} "
                          f"{r['kernel_ms']:9.2f} {r['api_over_kernel']:8.3f} {r['api_over_inputs']:8.3f} {r['overlap_over_kernel']:8.3f} "
                          f"{r['pipe_ms']:8.2f} {r['pipe_over_kernel']:8.3f} "
                          f"{r.get('sdpa_ms', float('nan')):8.2f} {r.get('api_over_sdpa', float('nan')):8.3f} "
                          f"{r['api_tbs']:6.3f} {r['host_us_per_run']:11.1f} {r['host_us_per_plan']:8.1f}{peak}", flush=True)
        be.close()
    return host + rows


def main(argv=None) -> int:
    from .experiments.runner import bench_cli
    return bench_cli("e2e", argv)


if __name__ == "__main__":
    sys.exit(main())
