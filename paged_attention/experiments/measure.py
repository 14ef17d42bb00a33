"""Measurement of one grid point on one backend: every path, timed inside an L-layer step.

Per point the harness builds the block tables once (fragmented: blocks handed out in random
order by a BlockManager; contiguous: each sequence owns a run of consecutive blocks), `pools`
layer pools (rotated over the L layers so the step streams more memory than any cache holds),
and one query per layer. A timed step issues decode for all L layers and synchronises once
(MLX: lazy outputs, then one `mx.eval`; numpy and Vulkan are synchronous per call). The
per-layer time of a step is its time / L; a point reports the median and the p10/p90 over the
timed steps. The paths of a point are timed interleaved (one step of each in turn), so load
changes on a shared machine affect all of them alike. Where the backend exposes device timestamps (the Vulkan backend's
`record_timestamps` / `last_timestamps`, or a `last_kernel_time_s` attribute) the kernel time
from the device is the primary time and the host time is kept alongside.

The "dense" path is the contiguous baseline implemented here, not by the backend: MLX
`mx.fast.scaled_dot_product_attention` over contiguous [B, Hkv, T, D] K/V (stored in the pool
dtype, attended in the gather path's compute dtype), numpy a vectorised float32 attention over
the same layout. Backends without one (Vulkan) report no overhead.
"""
from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from .. import reference
from ..block_manager import BlockManager
from ..workload import representable

DENSE_BACKENDS = ("mlx", "numpy")
NS_PER_TICK = 1.0   # Vulkan timestamp period (Kompute 0.9 does not expose it; NVIDIA and lavapipe: 1 ns)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


class Skip(Exception):
    """This point or path cannot run here; the message says why."""


@dataclass
class Setup:
    """Everything one point needs on one backend, shared by its paths."""

    params: dict
    tables: np.ndarray
    lens: np.ndarray
    pools: list
    qs: list                 # per layer, in the backend's preferred array type
    q0_host: np.ndarray      # layer 0's query on the host (float64)
    kv_bytes: int            # K+V bytes one layer's attention must read
    pool_bytes: int


# -- helpers ---------------------------------------------------------------------------------------
def choose_paths(backend, requested: list[str]) -> list[tuple[str, str | None]]:
    """[(path, skip reason or None)] for this backend from the experiment's `paths`."""
    has_dense = backend.name in DENSE_BACKENDS
    if requested == ["all"]:
        return [(p, None) for p in backend.paths] + ([("dense", None)] if has_dense else [])
    out = []
    for p in requested:
        if p == "dense":
            out.append((p, None if has_dense else f"no dense baseline for backend {backend.name!r}"))
        elif p == "auto" or p in backend.paths:
            out.append((p, None))
        elif p in backend.known_paths:
            out.append((p, backend.path_unavailable_reason(p)))
        # a path this backend never has (e.g. 'reference' on mlx) is simply not its business
    return out


def attended(params: dict) -> int:
    w = params["window"]
    return params["context"] if w is None else min(params["context"], w)


def kv_bytes(params: dict) -> int:
    return (2 * params["batch"] * attended(params) * params["num_kv_heads"] * params["head_dim"]
            * ITEMSIZE[params["dtype"]])


def make_tables(params: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    b, ctx, bs = params["batch"], params["context"], params["block_size"]
    nbps = -(-ctx // bs)
    num_blocks = b * nbps
    bm = BlockManager(num_blocks, bs, fragmented=params["fragmentation"] == "fragmented", seed=seed)
    for i in range(b):
        bm.add_sequence(i, ctx)
    return bm.block_tables(list(range(b))), bm.context_lens(list(range(b))), num_blocks


def to_host(x) -> np.ndarray:
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx
        return np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float64)


def sync(backend_name: str, outs) -> None:
    if backend_name == "mlx":
        import mlx.core as mx
        mx.eval(*outs)


def device_time_s(backend) -> float | None:
    """Kernel time of the backend's last call from device timestamps, when it offers them."""
    t = getattr(backend, "last_kernel_time_s", None)
    if isinstance(t, (int, float)):
        return float(t)
    ts = getattr(backend, "last_timestamps", None)
    if not ts:
        return None
    names = [n for n, _ in ts]
    first = next((i for i, n in enumerate(names) if n.startswith("attn")), None)
    if first is None or first == 0:
        return None
    last = max(i for i, n in enumerate(names) if n.startswith(("attn", "reduce")))
    return (ts[last][1] - ts[first - 1][1]) * NS_PER_TICK * 1e-9


def has_timestamps(backend) -> bool:
    return (isinstance(getattr(backend, "last_kernel_time_s", None), (int, float))
            or (bool(getattr(backend, "timestamps_supported", False))
                and hasattr(backend, "record_timestamps")))


def fill_pool(backend, pool, rng, dtype: str, num_slots: int) -> None:
    """Random K/V in every slot, written as a repeated random tile (cheap for large pools)."""
    hkv, d = pool.num_kv_heads, pool.head_dim
    tile = min(num_slots, 8192)
    kt = representable(rng.standard_normal((tile, hkv, d)), dtype)
    vt = representable(rng.standard_normal((tile, hkv, d)), dtype)
    for s0 in range(0, num_slots, tile):
        n = min(tile, num_slots - s0)
        backend.write_kv(pool, np.arange(s0, s0 + n), kt[:n], vt[:n])


def _q_array(backend_name: str, q: np.ndarray, dtype: str):
    if backend_name == "mlx":
        import mlx.core as mx
        a = mx.array(q.astype(np.float32)).astype(getattr(mx, dtype))
        mx.eval(a)
        return a
    return q.astype(np.float32 if dtype in ("bfloat16", "float32") else np.float16)


# -- setup -----------------------------------------------------------------------------------------
def build(backend, params: dict, measure: dict, seed: int = 0) -> Setup:
    p = params
    if p["dtype"] not in backend.pool_dtypes:
        raise Skip(f"backend {backend.name!r} has no {p['dtype']} pools (it has {backend.pool_dtypes})")
    tables, lens, num_blocks = make_tables(p, seed)
    pool_bytes = 2 * num_blocks * p["block_size"] * p["num_kv_heads"] * p["head_dim"] * ITEMSIZE[p["dtype"]]
    budget = measure["max_pool_memory_mb"] * 1e6
    npools = max(1, min(measure["pools"], p["layers"], int(budget // pool_bytes)))
    rng = np.random.default_rng(seed)
    pools = [backend.create_pool(num_blocks, p["block_size"], p["num_kv_heads"], p["head_dim"], p["dtype"])
             for _ in range(npools)]
    # Pool 0 holds random data (it is checked against the reference); the others stay zero:
    # the traffic, and so the time, does not depend on the values.
    fill_pool(backend, pools[0], rng, p["dtype"], num_blocks * p["block_size"])
    host_qs = [representable(rng.standard_normal((p["batch"], p["num_q_heads"], p["head_dim"])), p["dtype"])
               for _ in range(p["layers"])]
    qs = [_q_array(backend.name, q, p["dtype"]) for q in host_qs]
    return Setup(p, tables, lens, pools, qs, host_qs[0].astype(np.float64), kv_bytes(p), pool_bytes)


# -- the dense baseline ----------------------------------------------------------------------------
class Dense:
    """Contiguous K/V [B, Hkv, T, D] per pool and an attention over them (T = attended tokens)."""

    def __init__(self, backend_name: str, s: Setup, seed: int = 1):
        p = s.params
        self.backend_name = backend_name
        t = attended(p)
        rng = np.random.default_rng(seed)
        shape = (p["batch"], p["num_kv_heads"], t, p["head_dim"])
        tile = (p["batch"], p["num_kv_heads"], min(t, 4096), p["head_dim"])
        kt = representable(rng.standard_normal(tile), p["dtype"])
        vt = representable(rng.standard_normal(tile), p["dtype"])
        reps = -(-t // tile[2])
        self.k_host = np.concatenate([kt] * reps, axis=2)[:, :, :t]
        self.v_host = np.concatenate([vt] * reps, axis=2)[:, :, :t]
        self.scale = 1.0 / np.sqrt(p["head_dim"])
        n = len(s.pools)
        if backend_name == "mlx":
            import mlx.core as mx
            dt = getattr(mx, p["dtype"])
            self.kv = []
            for _ in range(n):
                k, v = mx.array(self.k_host).astype(dt), mx.array(self.v_host).astype(dt)
                mx.eval(k, v)
                self.kv.append((k, v))
            # Attend in the dtype the MLX gather path attends in (float32 on the CPU, where
            # MLX's half-precision SDPA loses precision; the pool dtype on GPUs), so "x dense"
            # compares like with like; the cast is then part of both timings.
            try:
                from paged_attention.backends.mlx.gather import compute_dtype
                self.compute = compute_dtype(dt)
            except ImportError:
                self.compute = dt
            self.out_dtype = dt
            self.qs = [q.astype(self.compute)[:, :, None, :] for q in s.qs]
            mx.eval(*self.qs)
        else:
            self.kv = [(self.k_host, self.v_host)] + [(np.zeros(shape, self.k_host.dtype),) * 2
                                                      for _ in range(n - 1)]
            self.qs = s.qs
        assert self.k_host.shape == shape

    def decode(self, layer: int):
        k, v = self.kv[layer % len(self.kv)]
        q = self.qs[layer]
        if self.backend_name == "mlx":
            import mlx.core as mx
            if k.dtype != self.compute:
                k, v = k.astype(self.compute), v.astype(self.compute)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=float(self.scale))
            return out[:, :, 0, :].astype(self.out_dtype)
        b, hq, d = q.shape
        hkv = k.shape[1]
        qg = q.astype(np.float32).reshape(b, hkv, hq // hkv, d)
        s = np.matmul(qg, k.astype(np.float32).transpose(0, 1, 3, 2)) * np.float32(self.scale)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return np.matmul(s, v.astype(np.float32)).reshape(b, hq, d).astype(q.dtype)

    def reference(self, q0: np.ndarray, n: int) -> np.ndarray:
        return np.stack([reference.attend(q0[i], self.k_host[i].transpose(1, 0, 2),
                                          self.v_host[i].transpose(1, 0, 2), self.scale)
                         for i in range(n)])


# -- timing ----------------------------------------------------------------------------------------
def _percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e6
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90))}


def _stepper(backend, s: Setup, path: str, dense: Dense | None):
    """(one(layer) -> output, step() -> outputs of a synchronised L-layer step) for a path."""
    p = s.params
    nl, npools, window = p["layers"], len(s.pools), p["window"]
    if path == "dense":
        def one(layer):
            return dense.decode(layer)
    else:
        def one(layer):
            return backend.decode(s.qs[layer], s.pools[layer % npools], s.tables, s.lens,
                                  window=window, path=path)

    def step():
        outs = [one(layer) for layer in range(nl)]
        sync(backend.name, outs)
        return outs
    return one, step


def _extra_memory_step(backend, step):
    """Run one step; its extra memory: MLX's allocator peak, numpy's host allocations
    (tracemalloc), None elsewhere."""
    if backend.name == "mlx":
        import mlx.core as mx
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        outs = step()
        return outs, max(0, mx.get_peak_memory() - base)
    if backend.name == "numpy":
        tracemalloc.start()
        try:
            outs = step()
            return outs, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return step(), None


def time_paths(backend, s: Setup, paths: list[str], measure: dict, dense: Dense | None = None
               ) -> dict:
    """Time several paths (a path may be "dense") on one built setup: {path: fields or Skip}.

    Timed steps are interleaved round-robin over the paths (A B A B ...), so a change in machine
    load hits every path alike and the ratios between paths stay meaningful on a busy machine.
    """
    nl = s.params["layers"]
    steppers, res = {}, {}
    for path in paths:
        one, step = _stepper(backend, s, path, dense)
        try:
            for _ in range(measure["warmup"]):
                step()
            outs, extra = _extra_memory_step(backend, step)
        except Exception as exc:  # noqa: BLE001 - a failing path is reported, the sweep goes on
            res[path] = exc
            continue
        steppers[path] = (one, step)
        res[path] = {"out0": outs[0], "extra_mem_mb": None if extra is None else extra / 1e6}

    host = {path: [] for path in steppers}
    spent = 0.0
    for i in range(measure["iterations"]):
        for path, (_, step) in steppers.items():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            host[path].append(dt / nl)
            spent += dt
        if spent > measure["max_seconds"] * max(1, len(steppers)) and i >= 1:
            break

    dev = {path: [] for path in steppers if path != "dense"}
    if dev and has_timestamps(backend):
        use_flag = hasattr(backend, "record_timestamps")
        if use_flag:
            backend.record_timestamps = True
        try:
            for _ in range(len(next(iter(host.values())))):
                for path in dev:
                    one = steppers[path][0]
                    total = 0.0
                    for layer in range(nl):
                        one(layer)
                        t = device_time_s(backend)
                        if t is None:
                            raise Skip("no timestamps")
                        total += t
                    dev[path].append(total / nl)
        except Skip:
            dev = {}
        finally:
            if use_flag:
                backend.record_timestamps = False
    else:
        dev = {}

    for path in steppers:
        d = dev.get(path) or []
        stats = _percentiles(d or host[path])
        res[path].update({
            "time_source": "device" if d else "host",
            "us_median": stats["median"], "us_p10": stats["p10"], "us_p90": stats["p90"],
            "host_us_median": _percentiles(host[path])["median"],
            "device_us_median": _percentiles(d)["median"] if d else None,
            "iterations": len(host[path]),
        })
    return res


def check_rms(s: Setup, out0, check: dict, dense: Dense | None = None) -> float | None:
    """RMS of layer 0's output vs the float64 reference on the first `check.sequences` sequences."""
    p = s.params
    n = min(check["sequences"], p["batch"])
    if n * p["context"] > check["max_reference_tokens"]:
        return None
    got = to_host(out0)[:n]
    if dense is not None:
        want = dense.reference(s.q0_host, n)
    else:
        k, v = s.pools[0].to_numpy()
        want = reference.decode(s.q0_host[:n], k, v, s.tables[:n], s.lens[:n], window=p["window"])
    return reference.rms(got, want)
