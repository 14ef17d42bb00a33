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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import reference
from ...block_manager import BlockManager
from .. import timing
from ..workload import representable

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
    has_dense = backend.has_dense_attention
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


def fill_pool(backend, pool, rng, dtype: str, num_slots: int) -> None:
    """Random K/V in every slot, written as a repeated random tile (cheap for large pools)."""
    hkv, d = pool.num_kv_heads, pool.head_dim
    tile = min(num_slots, 8192)
    kt = representable(rng.standard_normal((tile, hkv, d)), dtype)
    vt = representable(rng.standard_normal((tile, hkv, d)), dtype)
    for s0 in range(0, num_slots, tile):
        n = min(tile, num_slots - s0)
        backend.write_kv(pool, np.arange(s0, s0 + n), kt[:n], vt[:n])


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
    qs = [backend.from_numpy(q, p["dtype"]) for q in host_qs]
    return Setup(p, tables, lens, pools, qs, host_qs[0].astype(np.float64), kv_bytes(p), pool_bytes)


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

    def decode(self, layer: int):
        k, v = self.kv[layer % len(self.kv)]
        return self.backend.dense_attention(self.qs[layer], k, v, self.scale)

    def reference(self, q0: np.ndarray, n: int) -> np.ndarray:
        return np.stack([reference.attend(q0[i], self.k_host[i].transpose(1, 0, 2),
                                          self.v_host[i].transpose(1, 0, 2), self.scale)
                         for i in range(n)])


# -- timing ----------------------------------------------------------------------------------------
def _one_layer(backend, s: Setup, path: str, dense: Dense | None):
    """layer -> output of one decode call of `path` (or of the dense baseline)."""
    if path == "dense":
        return dense.decode
    npools, window = len(s.pools), s.params["window"]

    def one(layer):
        return backend.decode(s.qs[layer], s.pools[layer % npools], s.tables, s.lens,
                              window=window, path=path)
    return one


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
    """RMS of layer 0's output vs the float64 reference on the first `check.sequences` sequences."""
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
