"""Measurement of one grid point on one backend: every path, timed inside an L-layer step.

Per point the harness builds the block tables once (fragmented: blocks handed out in random
order by a BlockManager; contiguous: each sequence owns a run of consecutive blocks), `pools`
layer pools (rotated over the L layers so the step streams more memory than any cache holds),
and one query per layer. A timed step issues decode for all L layers and synchronises once
(MLX: lazy outputs, then one `mx.eval`; numpy and Vulkan are synchronous per call). The
per-layer time of a step is its time / L; a point reports the median and the p10/p90 over the
timed steps. The paths of a point are timed interleaved (one step of each in turn), so load
changes on a shared machine affect all of them alike (paged_attention.lab.timing). Where the
backend has a device timer (`backend.has_device_timer`) the kernel time from the device is the
primary time and the host time is kept alongside.

The "dense" path is the contiguous baseline: the backend's `dense_attention` over contiguous
[B, Hkv, T, D] K/V stored in the pool dtype (MLX: SDPA in the gather path's compute dtype;
numpy: a vectorised float32 attention). Backends without one (Vulkan) report no overhead.

A point with a quantized `kv_dtype` (ADR 0011) runs the paths that list the format in
`backend.kv_formats` (the others, and the dense baseline, are skipped with the reason). Its
bytes are the format's (K, V and their scales: `PoolSpec.bytes_per_token`), and beside the
pool it gets a plain twin of the grid's dtype holding the same (unquantized) values, for two
more errors: vs the same path over the plain pool (what the format costs on that path) and vs
float64 attention over the unquantized values (the format's and the kernel's error together).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import reference
from ...block_manager import BlockManager
from .. import timing
from ..workload import representable


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
    kv_bytes: int            # bytes one layer's attention must read (K, V, their scales)
    pool_bytes: int
    plain: object = None     # quantized points: a plain pool of the same values (checks only)


# -- helpers ---------------------------------------------------------------------------------------
def choose_paths(backend, requested: list[str], params: dict | None = None
                 ) -> list[tuple[str, str | None]]:
    """[(path, skip reason or None)] for this backend from the experiment's `paths`, at a
    point (`params`: a path that cannot read the point's kv_dtype is skipped)."""
    has_dense = backend.has_dense_attention
    if requested == ["all"]:
        out = [(p, None) for p in backend.paths] + ([("dense", None)] if has_dense else [])
    else:
        out = []
        for p in requested:
            if p == "dense":
                out.append((p, None if has_dense else
                            f"no dense baseline for backend {backend.name!r}"))
            elif p == "auto" or p in backend.paths:
                out.append((p, None))
            elif p in backend.known_paths:
                out.append((p, backend.path_unavailable_reason(p)))
            # a path this backend never has (e.g. 'reference' on mlx) is not its business
    fmt = (params or {}).get("kv_dtype")
    return out if fmt is None else [(p, why or format_unread(backend, p, fmt)) for p, why in out]


def format_unread(backend, path: str, kv_dtype: str) -> str | None:
    """Why `path` cannot run a point of `kv_dtype` pools, or None when it can."""
    if path == "dense":
        return f"the dense baseline reads plain K/V only, not kv_dtype {kv_dtype!r}"
    readers = backend.paths_reading(kv_dtype)
    if path == "auto":
        return None if readers else f"no path of backend {backend.name!r} reads kv_dtype {kv_dtype!r}"
    if path in readers:
        return None
    others = f"paths that do: {list(readers)}" if readers else "no path here does"
    return (f"path {path!r} of backend {backend.name!r} does not read kv_dtype {kv_dtype!r} "
            f"(backend.kv_formats; {others})")


def format_args(params: dict) -> dict:
    """create_pool's format arguments at a point: none for a plain pool."""
    if params.get("kv_dtype") is None:
        return {}
    return {"kv_dtype": params["kv_dtype"], "kv_group_size": params.get("kv_group_size") or 64}


def attended(params: dict) -> int:
    w = params["window"]
    return params["context"] if w is None else min(params["context"], w)


def kv_bytes(params: dict, pool) -> int:
    """Bytes one layer's decode reads: the attended tokens' K and V in `pool`'s format, their
    scales included (pool.spec.bytes_per_token)."""
    return params["batch"] * attended(params) * pool.spec.bytes_per_token


def make_tables(params: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    b, ctx, bs = params["batch"], params["context"], params["block_size"]
    nbps = -(-ctx // bs)
    num_blocks = b * nbps
    bm = BlockManager(num_blocks, bs, fragmented=params["fragmentation"] == "fragmented", seed=seed)
    for i in range(b):
        bm.add_sequence(i, ctx)
    return bm.block_tables(list(range(b))), bm.context_lens(list(range(b))), num_blocks


def fill_pool(backend, pool, rng, dtype: str, num_slots: int, twin=None) -> None:
    """Random K/V in every slot, written as a repeated random tile (cheap for large pools);
    `twin`, a second pool, gets the same values."""
    hkv, d = pool.num_kv_heads, pool.head_dim
    tile = min(num_slots, 8192)
    kt = representable(rng.standard_normal((tile, hkv, d)), dtype)
    vt = representable(rng.standard_normal((tile, hkv, d)), dtype)
    for s0 in range(0, num_slots, tile):
        n = min(tile, num_slots - s0)
        for p in (pool, twin) if twin is not None else (pool,):
            backend.write_kv(p, np.arange(s0, s0 + n), kt[:n], vt[:n])


# -- setup -----------------------------------------------------------------------------------------
def build(backend, params: dict, measure: dict, seed: int = 0) -> Setup:
    p = params
    if p["dtype"] not in backend.pool_dtypes:
        raise Skip(f"backend {backend.name!r} has no {p['dtype']} pools (it has {backend.pool_dtypes})")
    tables, lens, num_blocks = make_tables(p, seed)

    def new_pool(fmt):
        return backend.create_pool(num_blocks, p["block_size"], p["num_kv_heads"], p["head_dim"],
                                   p["dtype"], **fmt)
    pools = [new_pool(format_args(p))]
    pool_bytes = pools[0].nbytes
    budget = measure["max_pool_memory_mb"] * 1e6
    npools = max(1, min(measure["pools"], p["layers"], int(budget // pool_bytes)))
    pools += [new_pool(format_args(p)) for _ in range(npools - 1)]
    plain = new_pool({}) if p.get("kv_dtype") is not None else None
    rng = np.random.default_rng(seed)
    # Pool 0 holds random data (it is checked against the reference); the others stay zero:
    # the traffic, and so the time, does not depend on the values (a zero affine group has a
    # zero scale, a real one not: the same bytes are read either way).
    fill_pool(backend, pools[0], rng, p["dtype"], num_blocks * p["block_size"], twin=plain)
    host_qs = [representable(rng.standard_normal((p["batch"], p["num_q_heads"], p["head_dim"])), p["dtype"])
               for _ in range(p["layers"])]
    qs = [backend.from_numpy(q, p["dtype"]) for q in host_qs]
    return Setup(p, tables, lens, pools, qs, host_qs[0].astype(np.float64),
                 kv_bytes(p, pools[0]), pool_bytes, plain)


# -- the dense baseline ----------------------------------------------------------------------------
class Dense:
    """Contiguous K/V [B, Hkv, T, D] per pool and the backend's dense attention over them
    (T = attended tokens)."""

    def __init__(self, backend, s: Setup, seed: int = 1):
        p = s.params
        self.backend = backend
        t = attended(p)
        rng = np.random.default_rng(seed)
        shape = (p["batch"], p["num_kv_heads"], t, p["head_dim"])
        tile = (p["batch"], p["num_kv_heads"], min(t, 4096), p["head_dim"])
        kt = representable(rng.standard_normal(tile), p["dtype"])
        vt = representable(rng.standard_normal(tile), p["dtype"])
        reps = -(-t // tile[2])
        self.k_host = np.concatenate([kt] * reps, axis=2)[:, :, :t]
        self.v_host = np.concatenate([vt] * reps, axis=2)[:, :, :t]
        assert self.k_host.shape == shape
        self.scale = 1.0 / np.sqrt(p["head_dim"])
        # One copy per rotated pool, so a step streams as much memory as the paged one.
        self.kv = [(backend.from_numpy(self.k_host, p["dtype"]),
                    backend.from_numpy(self.v_host, p["dtype"])) for _ in s.pools]
        self.qs = s.qs

    def decode(self, layer: int, q=None):
        k, v = self.kv[layer % len(self.kv)]
        return self.backend.dense_attention(self.qs[layer] if q is None else q, k, v, self.scale)

    def reference(self, q0: np.ndarray, n: int) -> np.ndarray:
        return np.stack([reference.attend(q0[i], self.k_host[i].transpose(1, 0, 2),
                                          self.v_host[i].transpose(1, 0, 2), self.scale)
                         for i in range(n)])


# -- timing ----------------------------------------------------------------------------------------
def _one_layer(backend, s: Setup, path: str, dense: Dense | None):
    """layer -> output of one decode call of `path` (or of the dense baseline). Serial, as a
    model's layers: layer i > 0 reads layer i-1's output as its q (timing.serial; independent
    layers would be overlapped by MLX on CUDA, ADR 0004 "Serial timing")."""
    if path == "dense":
        return timing.serial(dense.decode, s.qs.__getitem__)
    npools, window = len(s.pools), s.params["window"]

    def one(layer, q):
        return backend.decode(q, s.pools[layer % npools], s.tables, s.lens, window=window,
                              path=path)
    return timing.serial(one, s.qs.__getitem__)


def time_paths(backend, s: Setup, paths: list[str], measure: dict, dense: Dense | None = None
               ) -> dict:
    """Time several paths (a path may be "dense") on one built setup: {path: fields or Exception}.

    Timed steps are interleaved round-robin over the paths (timing.round_robin), so a change in
    machine load hits every path alike and the ratios between paths stay meaningful on a busy
    machine; then, where the backend has a device timer, as many device-timed rounds.
    """
    nl = s.params["layers"]
    ones, steps, res = {}, {}, {}
    for path in paths:
        one = _one_layer(backend, s, path, dense)

        def step(one=one):
            outs = [one(layer) for layer in range(nl)]
            backend.synchronize(outs)
            return outs
        try:
            for _ in range(measure["warmup"]):
                step()
            outs, extra = backend.peak_memory_of(step)
        except Exception as exc:  # noqa: BLE001 - a failing path is reported, the sweep goes on
            res[path] = exc
            continue
        ones[path], steps[path] = one, timing.wall(step)
        res[path] = {"out0": outs[0], "extra_mem_mb": None if extra is None else extra / 1e6}

    host = {path: [t / nl for t in ts] for path, ts in timing.round_robin(
        steps, measure["iterations"], max_seconds=measure["max_seconds"]).items()}
    rounds = len(next(iter(host.values()))) if host else 0
    dev = timing.device_step_times(backend, {p: o for p, o in ones.items() if p != "dense"},
                                   nl, rounds)

    for path in steps:
        d = dev.get(path) or []
        stats = timing.percentiles_us(d or host[path])
        res[path].update({
            "time_source": "device" if d else "host",
            "us_median": stats["median"], "us_p10": stats["p10"], "us_p90": stats["p90"],
            "host_us_median": timing.percentiles_us(host[path])["median"],
            "device_us_median": timing.percentiles_us(d)["median"] if d else None,
            "iterations": len(host[path]),
        })
    return res


def check_rms(backend, s: Setup, out0, check: dict, dense: Dense | None = None) -> float | None:
    """RMS of layer 0's output vs the float64 reference over what the pool holds (a quantized
    pool: its dequantized values), on the first `check.sequences` sequences: the kernel's error."""
    p = s.params
    n = min(check["sequences"], p["batch"])
    if n * p["context"] > check["max_reference_tokens"]:
        return None
    got = np.asarray(backend.to_numpy(out0), np.float64)[:n]
    if dense is not None:
        want = dense.reference(s.q0_host, n)
    else:
        k, v = s.pools[0].to_numpy()
        want = reference.decode(s.q0_host[:n], k, v, s.tables[:n], s.lens[:n], window=p["window"])
    return reference.rms(got, want)


def format_errors(backend, s: Setup, path: str, out0, check: dict, rms: float | None) -> dict:
    """A quantized point's errors on layer 0, over the first `check.sequences` sequences:
    rms_vs_plain (the same path over the plain twin pool: what the format costs there) and
    rms_vs_exact (float64 attention over the unquantized values; None past
    check.max_reference_tokens). A plain point's rms_vs_exact is its rms; it has no
    rms_vs_plain."""
    if s.plain is None:
        return {"rms_vs_plain": None, "rms_vs_exact": rms}
    p = s.params
    n = min(check["sequences"], p["batch"])
    got = np.asarray(backend.to_numpy(out0), np.float64)[:n]
    plain_out = backend.decode(s.qs[0], s.plain, s.tables, s.lens, window=p["window"], path=path)
    out = {"rms_vs_plain": reference.rms(got, np.asarray(backend.to_numpy(plain_out))[:n]),
           "rms_vs_exact": None}
    if n * p["context"] <= check["max_reference_tokens"]:
        k, v = s.plain.to_numpy()
        want = reference.decode(s.q0_host[:n], k, v, s.tables[:n], s.lens[:n], window=p["window"])
        out["rms_vs_exact"] = reference.rms(got, want)
    return out
