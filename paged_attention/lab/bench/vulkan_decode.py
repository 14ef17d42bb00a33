"""Vulkan decode benchmark (not a test).

    paged-attn bench vulkan [--batch 1 8] [--context 1024 4096] [--layers 32] ...
    paged-attn bench vulkan --preset h100

Per (batch, context) and path: kernel time from Vulkan timestamp queries (median over --iters;
ticks converted with the device's timestampPeriod, which Kompute 0.9 does not expose: the period of
paged_attention.devices is assumed, 1 ns/tick as NVIDIA and lavapipe report, and cross-checked against
wall-clock time), the
effective bandwidth (K+V bytes the attention must read / kernel time), the fraction of the device's
peak when known, the wall time of a whole decode call (upload + submit + wait + download), the
parity against the float64 numpy reference and its time. Then one decode step over --layers layers
(KV append + attention for every layer), reporting the submissions it took and its time.

--attention sinks,softcap,alibi,lse|all (ADR 0010) and --kv-dtype int8,int4,float8_e4m3 (ADR
0011; fp16 may be listed, it is the plain pool): at every point and path, each variant (on the
plain pool) and each format (its own pool, same tables and values' distribution) is timed in
turns with plain, --rounds rounds of --iters repetitions; "x plain" = its kernel time / plain's,
its parity against the numpy reference over what its pool holds, and a targets line per point
and path (lab/bench/against_plain.py: the H200 run issue's bounds).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from paged_attention import devices
from paged_attention.backends.vulkan import bench_hooks as hooks
from paged_attention.errors import InvalidInput, PagedAttentionError
from paged_attention.validation import StepArgs

from ..timing import round_robin, wall, warm_up
from ..workload import uniform_tables
from . import against_plain


def medians(rows: list[dict], scale: float) -> dict:
    """Per-key median of a list of same-keyed dicts of seconds, times `scale`."""
    return {k: float(np.median([r[k] for r in rows])) * scale for k in rows[0]}


def peak_gbs(device: str) -> float | None:
    peak = devices.peak_bandwidth(device)
    return None if peak is None else peak / 1e9


def ns_per_tick(be) -> float:
    return be.device_facts.timestamp_period_ns


def parse_args(argv):
    p = argparse.ArgumentParser(prog="paged-attn bench vulkan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    a = p.parse_args(argv)
    resolve(a)
    return a


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=["small", "h100"], default="small",
                   help="h100: B in {1,8,32} x ctx in {4k,16k,32k}, Hq=32, Hkv=8, D=128, fp16, block 16, "
                        "32 layers")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--context", type=int, nargs="+")
    p.add_argument("--layers", type=int)
    p.add_argument("--step-context", type=int, help="context of the multi-layer step (default: max --context)")
    p.add_argument("--step-batch", type=int, help="batch of the multi-layer step (default: max --batch)")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--paths", nargs="+", default=["fused", "splitk"])
    p.add_argument("--iters", type=int)
    p.add_argument("--reference-max-tokens", type=int, default=131072,
                   help="skip the numpy reference above this many B*ctx tokens")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of GPU warm-up before each timing")
    p.add_argument("--prefill-tokens", type=int, help="prompt length of the prefill timing")
    p.add_argument("--attention", type=against_plain.attention_option, default="",
                   help="attention variants (ADR 0010) timed in turns with plain on the same pool: "
                        "a comma list of plain, sinks, softcap, alibi, lse, or all")
    p.add_argument("--kv-dtype", type=against_plain.kv_dtype_option, default=None,
                   help="quantized formats (ADR 0011) timed in turns with the plain pool, each on "
                        "its own pool: a comma list of int8, int4, float8_e4m3 (fp16 names the "
                        "plain pool)")
    p.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of --iters repetitions per case when variants or formats are "
                        "timed in turns with plain")


def resolve(a) -> None:
    """The preset's values for the options not given."""
    if a.preset == "h100":
        a.batch = a.batch or [1, 8, 32]
        a.context = a.context or [4096, 16384, 32768]
        a.layers = 32 if a.layers is None else a.layers
        a.iters = a.iters or 20
        a.step_context = a.step_context or 16384
        a.step_batch = a.step_batch or 8
        a.prefill_tokens = a.prefill_tokens or 2048
    else:
        a.batch = a.batch or [1, 4]
        a.context = a.context or [512, 2048]
        a.layers = 4 if a.layers is None else a.layers
        a.iters = a.iters or 3
        a.prefill_tokens = a.prefill_tokens or 256
    a.step_context = a.step_context or max(a.context)
    a.step_batch = a.step_batch or max(a.batch)
    against_plain.split_kv_dtypes(a.kv_dtype, a.dtype)   # InvalidInput on another plain dtype
    if a.rounds < 1:
        raise InvalidInput(f"--rounds: expected >= 1, got {a.rounds}")


def compared_formats(a) -> list[str]:
    """--kv-dtype's quantized formats: here even a single one is compared with plain."""
    base, compared = against_plain.split_kv_dtypes(a.kv_dtype, a.dtype)
    return compared or ([base] if base else [])


def fill_pool(be, pool, n_tokens, rng, dtype):
    """Random K/V into the first n_tokens slots, in chunks of a repeated random tile."""
    hkv, d = pool.num_kv_heads, pool.head_dim
    tile = min(n_tokens, 16384)
    kt = rng.standard_normal((tile, hkv, d)).astype(dtype)
    vt = rng.standard_normal((tile, hkv, d)).astype(dtype)
    for s0 in range(0, n_tokens, tile):
        n = min(tile, n_tokens - s0)
        be.write_kv(pool, np.arange(s0, s0 + n), kt[:n], vt[:n])


def rep_kernel_ns(be) -> list[float]:
    """Per-repetition GPU time of the attention (+ split-K reduce) ops of the last timestamped
    submission recorded by `hooks.decode_repeated`."""
    ts = be.last_timestamps
    reps: dict[int, list[int]] = {}
    for i, (name, _) in enumerate(ts):
        if name.startswith(("attn", "reduce")):
            reps.setdefault(int(name.rsplit(".", 1)[1]), []).append(i)
    return [(ts[idx[-1]][1] - ts[idx[0] - 1][1]) * ns_per_tick(be) for _, idx in sorted(reps.items())]


@dataclass
class Case:
    """One kernel timed at a point: plain, an attention variant on the plain pool, or a
    quantized format's own pool (same tables)."""
    name: str                   # "plain", an attention variant or a format
    pool: object
    args: StepArgs              # what decode_repeated records (a variant plan's args carry it)
    sinks: np.ndarray | None
    call: Callable[[], object]  # one whole call through the public API: out, or (out, lse)
    nbytes: int                 # K/V bytes the kernel must read (a format's: data + scales)
    attention: str | None = None
    kv_dtype: str | None = None


def point_cases(be, path, q, pool, formats, variants, tables, lens) -> list[Case]:
    """Plain first (the ratios' denominator), then each attention variant, then each format."""
    tokens = int(lens.sum())
    plain_bytes = tokens * pool.spec.bytes_per_token
    cases = [Case("plain", pool, _args(be, q, pool, tables, lens), None,
                  lambda: be.decode(q, pool, tables, lens, path=path), plain_bytes)]
    for name, (kw, sinks) in variants.items():
        plan = be.plan(pool, tables, lens, num_q_heads=q.shape[1], path=path, **kw)
        cases.append(Case(name, pool, plan.args, sinks,
                          lambda plan=plan, sinks=sinks: be.run(plan, q, pool, sinks=sinks),
                          plain_bytes, attention=name))
    for name, fpool in formats.items():
        cases.append(Case(name, fpool, _args(be, q, fpool, tables, lens), None,
                          lambda fpool=fpool: be.decode(q, fpool, tables, lens, path=path),
                          tokens * fpool.spec.bytes_per_token, kv_dtype=name))
    return cases


def kernel_times(be, a, path, q, cases: list[Case]) -> dict[str, list[float]]:
    """Per-repetition kernel ns of every case: --iters repetitions in one submission, the cases
    in turns for --rounds rounds (one round when plain is alone), so drift hits them alike."""
    be.record_timestamps = True
    try:
        def one_round(out):
            for c in cases:
                hooks.decode_repeated(be, q, c.pool, c.args, path, a.iters, c.sinks)
                out.setdefault(c.name, []).extend(rep_kernel_ns(be))
        warm_up(lambda: one_round({}), a.warmup)
        ks: dict[str, list[float]] = {}
        for _ in range(1 if len(cases) == 1 else a.rounds):
            one_round(ks)
        return ks
    finally:
        be.record_timestamps = False


def parity(case: Case, got, q, tables, lens, plain_kv, refs: dict) -> dict:
    """rms (and lse_rms) of a case's output against the float64 numpy reference over what its
    pool holds (a quantized pool: its dequantized values), and the reference's ms. `refs`
    caches each case's reference across paths."""
    from paged_attention import reference as ref
    if case.name not in refs:
        t0 = time.perf_counter()
        if case.kv_dtype is not None:
            k, v = case.pool.to_numpy()
            refs[case.name] = (ref.decode(q, k, v, tables, lens), None)
        else:
            refs[case.name] = ref.step(q, *plain_kv, case.args, case.sinks)
        refs[case.name] += ((time.perf_counter() - t0) * 1e3,)
    want, want_lse, ms = refs[case.name]
    out, lse = got if isinstance(got, tuple) else (got, None)
    return {"rms": ref.rms(out, want), "ref_ms": ms,
            "lse_rms": None if lse is None else ref.rms(lse, want_lse)}


def bench_point(be, a, batch, ctx, rng, reference):
    dt = np.dtype(a.dtype)
    tables, lens = uniform_tables(rng, batch, ctx, a.block_size)
    pool = be.create_pool(tables.size, a.block_size, a.kv_heads, a.head_dim, a.dtype)
    fill_pool(be, pool, tables.size * a.block_size, rng, dt)
    formats = {}
    for name in a.compared:
        formats[name] = be.create_pool(tables.size, a.block_size, a.kv_heads, a.head_dim,
                                       a.dtype, kv_dtype=name, kv_group_size=a.kv_group_size)
        fill_pool(be, formats[name], tables.size * a.block_size, rng, dt)
    q = rng.standard_normal((batch, a.q_heads, a.head_dim)).astype(dt)
    variants = {name: against_plain.attention_case(name, a.q_heads, rng) for name in a.attention}
    auto = be.resolve_path("auto", _args(be, q, pool, tables, lens), pool.spec)
    check = reference and batch * ctx <= a.reference_max_tokens
    plain_kv = pool.to_numpy() if check else None
    peak = peak_gbs(be.device)
    rows, refs = [], {}
    for path in a.paths:
        cases = point_cases(be, path, q, pool, formats, variants, tables, lens)
        outs = {c.name: c.call() for c in cases}  # compile, record, first submit
        ks = kernel_times(be, a, path, q, cases)
        walls = round_robin({c.name: wall(c.call) for c in cases}, a.iters)
        plain_ns = float(np.median(ks[cases[0].name]))
        for c in cases:
            k_ns = float(np.median(ks[c.name]))
            gbs = c.nbytes / k_ns  # bytes/ns == GB/s
            ratio = None if c is cases[0] else k_ns / plain_ns   # plain comes first
            bound, ok = (None, None) if ratio is None else \
                against_plain.verdict(c.name, batch, ctx, ratio)
            geo = be.split_geometry(c.args, c.pool.spec) if path == "splitk" else (1, 0)
            row = dict(batch=batch, context=ctx, path=path, attention=c.attention,
                       kv_dtype=c.kv_dtype, auto=(path == auto), kernel_us=k_ns / 1e3,
                       kernel_min_us=min(ks[c.name]) / 1e3,
                       wall_us=float(np.median(walls[c.name])) * 1e6, gbs=gbs,
                       peak_frac=(gbs / peak if peak else None), ratio_vs_plain=ratio,
                       target=bound, target_ok=ok, rms=None, lse_rms=None, ref_ms=None,
                       nsplit=geo[0], mbytes=c.nbytes / 1e6)
            if check:
                row.update(parity(c, outs[c.name], q, tables, lens, plain_kv, refs))
            rows.append(row)
    del pool, formats
    return rows


def _args(be, q, pool, tables, lens):
    from paged_attention.validation import check_decode
    return check_decode(q, pool.spec, tables, lens, None, None, be.q_dtypes)


def bench_step(be, a, rng):
    """One decode step over a.layers layers: KV append + attention per layer, one submission."""
    from paged_attention.interface import LayerStep
    dt = np.dtype(a.dtype)
    batch, ctx = a.step_batch, a.step_context
    tables, lens = uniform_tables(rng, batch, ctx, a.block_size)
    pools = [be.create_pool(tables.size, a.block_size, a.kv_heads, a.head_dim, a.dtype)
             for _ in range(a.layers)]  # zero-filled: contents do not change the traffic
    slots = (tables[np.arange(batch), (lens - 1) // a.block_size].astype(np.int64) * a.block_size
             + (lens - 1) % a.block_size)
    layers = [LayerStep(rng.standard_normal((batch, a.q_heads, a.head_dim)).astype(dt), p,
                        rng.standard_normal((batch, a.kv_heads, a.head_dim)).astype(dt),
                        rng.standard_normal((batch, a.kv_heads, a.head_dim)).astype(dt)) for p in pools]
    res = {}
    warm_up(lambda: be.decode_step(layers, slots, tables, lens), a.warmup)
    s0 = be.submissions
    walls, hosts = [], []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        be.decode_step(layers, slots, tables, lens)
        walls.append(time.perf_counter() - t0)
        hosts.append(be.last_host_s)
    res["submissions_per_step"] = (be.submissions - s0) / a.iters
    res["host_ms"] = medians(hosts, 1e3)
    be.record_timestamps = True
    gpu = []
    for _ in range(max(3, a.iters // 4)):
        be.decode_step(layers, slots, tables, lens)
        gpu.append((be.last_timestamps[-1][1] - be.last_timestamps[0][1]) * ns_per_tick(be))
    be.record_timestamps = False
    nbytes = a.layers * 2 * batch * ctx * a.kv_heads * a.head_dim * dt.itemsize
    res.update(layers=a.layers, batch=batch, context=ctx, path=be.resolve_path(
        "auto", _args(be, layers[0].q, pools[0], tables, lens), pools[0].spec),
        wall_ms=float(np.median(walls)) * 1e3, gpu_ms=float(np.median(gpu)) / 1e6,
        gbs=nbytes / float(np.median(gpu)))
    del pools, layers
    return res


def bench_readback(be, mib=16, iters=5):
    """Host read rate of the memory a run's outputs are read from: host-memory output buffers
    with host I/O (the shaders write them), else the staging of a device buffer after its copy."""
    n = mib * (1 << 20) // 4
    view, kind, flags = hooks.readback_buffer(be, n)
    secs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        np.array(view[:n], copy=True)
        secs.append(time.perf_counter() - t0)
    return {"mib": mib, "gbs": n * 4 / float(np.median(secs)) / 1e9, "buffer": kind,
            "staging_flags": None if flags is None else hex(flags)}


def bench_model_loop(be, a, rng, kernel_us):
    """Model-like serial loop through plan/run: one plan per step, layer i's q is layer i-1's
    output (so nothing overlaps), KV append every layer. Compared with layers x one kernel."""
    dt = np.dtype(a.dtype)
    batch, ctx = a.step_batch, a.step_context
    tables, lens = uniform_tables(rng, batch, ctx, a.block_size)
    pools = [be.create_pool(tables.size, a.block_size, a.kv_heads, a.head_dim, a.dtype)
             for _ in range(a.layers)]
    slots = (tables[np.arange(batch), (lens - 1) // a.block_size].astype(np.int64) * a.block_size
             + (lens - 1) % a.block_size)
    kv = rng.standard_normal((batch, a.kv_heads, a.head_dim)).astype(dt)
    q0 = rng.standard_normal((batch, a.q_heads, a.head_dim)).astype(dt)

    phases: list[dict] = []

    def step(log=False):
        t0 = time.perf_counter()
        plan = be.plan(pools[0], tables, lens, num_q_heads=a.q_heads, slot_mapping=slots)
        acc = {"plan": time.perf_counter() - t0, "prepare": 0.0, "submit": 0.0, "wait": 0.0,
               "outputs": 0.0}
        x = q0
        for pool in pools:
            x = be.run(plan, x, pool, kv, kv)
            if log:
                h = be.last_host_s
                acc["prepare"] += h["prepare"]
                acc["outputs"] += h["outputs"]
                if hooks.fence_spin_ns(be):  # the polled eval splits its time: submitting, then waiting
                    acc["submit"] += be.last_submit_wait_ns[0] / 1e9
                    acc["wait"] += be.last_submit_wait_ns[1] / 1e9
                else:
                    acc["wait"] += h["submit_wait"]
        if log:
            phases.append(acc)
        return x
    warm_up(step, a.warmup)
    c0 = be.counters()
    # The breakdown has its own steps (logging costs time too), taking turns with the plain ones.
    n = max(3, a.iters // 4)
    times = round_robin({"plain": wall(step), "logged": wall(lambda: step(log=True))}, n)
    c1 = be.counters()
    wall_ms = float(np.median(times["plain"])) * 1e3
    # Where a layer's time goes (us per layer, medians over the logged steps): plan() once per
    # step, run()'s own Python before the submission (prepare) and after it (outputs), the
    # submission and the fence wait (GPU work of the layer's submission plus the round trip), and
    # the rest (run()'s checks, the loop itself, the logging).
    per_layer = medians(phases, 1e6 / a.layers)
    per_layer["other"] = float(np.median(times["logged"])) * 1e6 / a.layers - sum(per_layer.values())
    del pools
    return {"layers": a.layers, "batch": batch, "context": ctx, "wall_ms": wall_ms,
            "sum_kernels_ms": a.layers * kernel_us / 1e3,
            "ratio": wall_ms / (a.layers * kernel_us / 1e3) if kernel_us else None,
            "per_layer_us": per_layer,
            "recordings_per_step": (c1["recordings"] - c0["recordings"]) / (2 * n),
            "submissions_per_step": (c1["submissions"] - c0["submissions"]) / (2 * n)}


def bench_tiny(be, a, rng, iters=300):
    """Per-layer round trip of a tiny run (B=1, ctx 16): host cost of plan/run per layer."""
    dt = np.dtype(a.dtype)
    pool = be.create_pool(4, a.block_size, a.kv_heads, a.head_dim, a.dtype)
    tables = np.arange(4, dtype=np.int32)[None, :1 + 15 // a.block_size]
    lens = np.array([16])
    q = rng.standard_normal((1, a.q_heads, a.head_dim)).astype(dt)
    plan = be.plan(pool, tables, lens, num_q_heads=a.q_heads)
    for _ in range(20):
        be.run(plan, q, pool)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        be.run(plan, q, pool)
        ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(50):
        be.decode(q, pool, tables, lens)
    return {"run_us": float(np.median(ts)) * 1e6, "decode_us": (time.perf_counter() - t0) / 50 * 1e6}


def bench_submit(be, iters=300):
    """Round trip of a near-empty submission (a 4-byte download): what every run() pays for its
    submit and fence wait, with the blocking wait and with the polled one (patched Kompute)."""
    submit = hooks.empty_submission(be)
    res = {}
    polled = hooks.fence_spin_ns(be)
    for name, ns in (("blocking_us", 0), ("polled_us", polled)):
        if name == "polled_us" and not ns:
            res[name] = None
            continue
        ts, split = [], []
        with hooks.fence_spin(be, ns):
            for i in range(iters + 20):
                t0 = time.perf_counter()
                submit()
                if i >= 20:
                    ts.append(time.perf_counter() - t0)
                    if ns:
                        split.append(be.last_submit_wait_ns)
        res[name] = float(np.median(ts)) * 1e6
        if split:  # what the patched eval measured inside: submitting, then waiting
            res["polled_submit_us"], res["polled_wait_us"] = (float(x) / 1e3 for x in np.median(split, axis=0))
    return res


def bench_prefill(be, a, rng, tokens, baseline=True):
    """Prefill of one `tokens`-token prompt (K/V already written): wall time of prefill(), with
    the query-tiled kernel and (baseline) with one query per workgroup, the kernel before it."""
    from paged_attention import settings
    dt = np.dtype(a.dtype)
    nb = -(-tokens // a.block_size)
    pool = be.create_pool(nb, a.block_size, a.kv_heads, a.head_dim, a.dtype)
    fill_pool(be, pool, nb * a.block_size, rng, dt)
    table = np.arange(nb, dtype=np.int32)
    q = rng.standard_normal((tokens, a.q_heads, a.head_dim)).astype(dt)

    def timed():
        """(output, median wall ms of prefill(), median device ms of its attention dispatch)."""
        out = be.prefill(q, pool, table, 0)
        walls, gpu, hosts = [], [], []
        for _ in range(3):
            t0 = time.perf_counter()
            be.prefill(q, pool, table, 0)
            walls.append(time.perf_counter() - t0)
            hosts.append(be.last_host_s)
            if be.has_device_timer:
                gpu.append(be.device_time(lambda: be.prefill(q, pool, table, 0))[1])
        gpu_ms = float(np.median(gpu)) * 1e3 if gpu and None not in gpu else None
        return out, float(np.median(walls)) * 1e3, gpu_ms, medians(hosts, 1e3)
    out, wall, kernel, host_ms = timed()
    base = base_kernel = None
    if baseline:
        with settings.override(vk_query_tile=1):
            _, base, base_kernel, _ = timed()
    from paged_attention import reference as ref
    want = None
    if tokens <= 4096:
        k, v = pool.to_numpy()
        want = ref.prefill(q, k, v, table, 0)
    rms = None if want is None else ref.rms(out, want)
    # The two prefill kernels on the same prompt (PAGED_ATTENTION_VK_PREFILL forces each; a
    # forced coop that cannot run says why instead of timing the fallback).
    kernels = {}
    for name in ("flash", "coop"):
        try:
            with settings.override(vk_prefill=name):
                o, w, kms, _ = timed()
        except PagedAttentionError as exc:
            kernels[name] = {"skipped": str(exc)}
            continue
        kernels[name] = {"wall_ms": w, "kernel_ms": kms, "rms": None if want is None else ref.rms(o, want)}
    fl, co = kernels["flash"].get("kernel_ms"), kernels["coop"].get("kernel_ms")
    return {"tokens": tokens, "wall_ms": wall, "kernel_ms": kernel, "host_ms": host_ms, "per_query_ms": base,
            "per_query_kernel_ms": base_kernel, "speedup": base / wall if base else None,
            "kernel_speedup": base_kernel / kernel if base_kernel and kernel else None, "rms": rms,
            "coop_speedup": fl / co if fl and co else None,
            **{f"{name}_{key}": val for name, r in kernels.items() for key, val in r.items()}}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    from ..experiments.runner import bench_cli
    return bench_cli("vulkan", argv)


def point_line(r: dict, comparing: bool) -> str:
    """A row of the points table; with variants or formats compared, their case and ratio."""
    case = [r["attention"] or r["kv_dtype"] or "plain"] if comparing else []
    ratio = [fmt(r["ratio_vs_plain"], ".3f")] if comparing else []
    lse = f" (lse {r['lse_rms']:.2e})" if r.get("lse_rms") is not None else ""
    cells = [r["batch"], r["context"], r["path"], *case, "*" if r["auto"] else "",
             f"{r['kernel_us']:.1f}", f"{r['gbs']:.4g}",
             fmt(r["peak_frac"] and 100 * r["peak_frac"], ".1f"), *ratio, f"{r['wall_us']:.0f}",
             r["nsplit"], fmt(r["rms"], ".2e") + lse, fmt(r["ref_ms"], ".0f")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def point_header(comparing: bool) -> str:
    cols = ["B", "ctx", "path", *(["case"] if comparing else []), "auto", "kernel us", "GB/s",
            "% peak", *(["x plain"] if comparing else []), "call wall us", "nsplit",
            "rms vs ref", "numpy ref ms"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def measure(a):
    from paged_attention.registry import get_backend
    a = argparse.Namespace(**vars(a))
    a.attention = [n for n in a.attention.split(",") if n]
    a.compared = compared_formats(a)
    comparing = bool(a.attention or a.compared)
    be = get_backend("vulkan")
    rng = np.random.default_rng(0)
    peak = peak_gbs(be.device)
    print(f"device: {be.device} (subgroup {be.subgroup_size}, ~{be.compute_units} compute units, "
          f"peak {fmt(peak, '.0f')} GB/s); timestamps assume {ns_per_tick(be)} ns/tick")
    print(f"Hq={a.q_heads} Hkv={a.kv_heads} D={a.head_dim} block={a.block_size} dtype={a.dtype} "
          f"iters={a.iters}" + (f"; compared with plain in {a.rounds} rounds: "
                                f"{', '.join(a.attention + a.compared)}" if comparing else ""))
    print(point_header(comparing))
    rows = []
    for batch in a.batch:
        for ctx in a.context:
            point = bench_point(be, a, batch, ctx, rng, reference=True)
            rows += point
            for r in point:
                print(point_line(r, comparing), flush=True)
            for path in a.paths if comparing else ():
                print(against_plain.summary_line(batch, ctx, {
                    r["attention"] or r["kv_dtype"]: r["ratio_vs_plain"] for r in point
                    if r["path"] == path and r["ratio_vs_plain"] is not None}, path), flush=True)
    plain = [r for r in rows if r["attention"] is None and r["kv_dtype"] is None]
    extra = {"readback": bench_readback(be)}
    print(f"readback: {extra['readback']['gbs']:.2f} GB/s reading {extra['readback']['mib']} MiB of mapped "
          f"{extra['readback']['buffer']} buffer memory (memory flags {extra['readback']['staging_flags']}; kp patched: "
          f"{be.counters()['patched']})", flush=True)
    step, kernel_us = None, None
    if a.layers:
        step = bench_step(be, a, rng)
        print(f"decode step: {step['layers']} layers, B={step['batch']}, ctx={step['context']}, "
              f"path={step['path']}: {step['submissions_per_step']:.0f} submission(s)/step, "
              f"GPU {step['gpu_ms']:.2f} ms ({step['gbs']:.0f} GB/s), wall {step['wall_ms']:.2f} ms "
              f"(backend host breakdown ms: " + ", ".join(f"{k} {v:.2f}" for k, v in step["host_ms"].items()) + ")")
        one = [r for r in plain if r["batch"] == step["batch"] and r["context"] == step["context"]
               and r["path"] == step["path"]]
        kernel_us = one[0]["kernel_us"] if one else None
        if kernel_us:
            step["sum_kernels_ms"] = step["layers"] * kernel_us / 1e3
            print(f"step GPU vs sum of its kernels: {step['gpu_ms']:.2f} / {step['sum_kernels_ms']:.2f} ms = "
                  f"{step['gpu_ms'] / step['sum_kernels_ms']:.2f}x (target <= 1.15); wall vs GPU "
                  f"{step['wall_ms'] / step['gpu_ms']:.2f}x (target <= 1.3)", flush=True)
        loop = bench_model_loop(be, a, rng, kernel_us or 0.0)
        extra["model_loop"] = loop
        print(f"model-like serial loop via plan/run: {loop['layers']} layers B={loop['batch']} "
              f"ctx={loop['context']}: wall {loop['wall_ms']:.2f} ms vs sum of kernels "
              f"{loop['sum_kernels_ms']:.2f} ms = {fmt(loop['ratio'], '.2f')}x (target <= 1.5); "
              f"{loop['submissions_per_step']:.0f} submissions, {loop['recordings_per_step']:.0f} "
              f"recordings per step", flush=True)
        print("  per layer, us: " + ", ".join(f"{k} {v:.1f}" for k, v in loop["per_layer_us"].items())
              + f" (kernel {kernel_us or 0:.1f})", flush=True)
    tiny = bench_tiny(be, a, rng)
    extra["tiny"] = tiny
    print(f"tiny round trip (B=1, ctx 16): run {tiny['run_us']:.0f} us per layer (target <= 150), "
          f"decode() {tiny['decode_us']:.0f} us per call", flush=True)
    if hooks.fence_spin_ns(be):  # A/B: the same with kp's blocking fence wait
        with hooks.fence_spin(be, 0):
            blocking = {"tiny": bench_tiny(be, a, rng)}
            if a.layers:
                blocking["model_loop"] = bench_model_loop(be, a, rng, kernel_us or 0.0)
        extra["blocking_wait"] = blocking
        print(f"with the blocking fence wait instead: tiny run {blocking['tiny']['run_us']:.0f} us, "
              f"decode() {blocking['tiny']['decode_us']:.0f} us" + (
                  f", model-like loop {blocking['model_loop']['wall_ms']:.2f} ms" if a.layers else ""),
              flush=True)
    for r in plain:
        if r["batch"] == 1 and r["context"] == max(a.context) and r["path"] == "splitk":
            print(f"B=1 x {r['context']} split-K: {r['gbs'] / 1e3:.2f} TB/s, nsplit {r['nsplit']} "
                  f"(target >= 1.5 TB/s on the H100)")
    sub = bench_submit(be)
    extra["submit"] = sub
    print(f"submission round trip (4-byte download): blocking wait {sub['blocking_us']:.0f} us, "
          f"polled {fmt(sub['polled_us'], '.0f')} us (of which submit {fmt(sub.get('polled_submit_us'), '.0f')} us, "
          f"fence wait {fmt(sub.get('polled_wait_us'), '.0f')} us)", flush=True)
    pf = bench_prefill(be, a, rng, a.prefill_tokens)
    extra["prefill"] = pf
    print(f"prefill of a {pf['tokens']}-token prompt: wall {pf['wall_ms']:.1f} ms (kernel "
          f"{fmt(pf['kernel_ms'], '.2f')} ms); one query per workgroup: wall {fmt(pf['per_query_ms'], '.1f')} ms "
          f"(kernel {fmt(pf['per_query_kernel_ms'], '.2f')} ms); speedup wall {fmt(pf['speedup'], '.1f')}x, "
          f"kernel {fmt(pf['kernel_speedup'], '.1f')}x (rms vs ref {fmt(pf['rms'], '.2e')}); host ms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in pf["host_ms"].items()), flush=True)
    print(f"prefill kernels on that prompt: prefill.comp kernel {fmt(pf.get('flash_kernel_ms'), '.3f')} ms "
          f"(wall {fmt(pf.get('flash_wall_ms'), '.1f')} ms, rms {fmt(pf.get('flash_rms'), '.2e')}); "
          + (f"prefill_coop.comp not run: {pf['coop_skipped']}" if "coop_skipped" in pf else
             f"prefill_coop.comp kernel {fmt(pf['coop_kernel_ms'], '.3f')} ms (wall {pf['coop_wall_ms']:.1f} ms, "
             f"rms {fmt(pf['coop_rms'], '.2e')}); flash / coop kernel time {fmt(pf['coop_speedup'], '.2f')}x"),
          flush=True)
    print("counters:", be.counters())
    # Cross-check of the assumed tick period: the GPU time of a submission cannot exceed its wall time.
    if rows:
        r = max(rows, key=lambda r: r["kernel_us"])
        print(f"tick check: largest point kernel {r['kernel_us']:.0f} us vs its whole call's wall time "
              f"{r['wall_us']:.0f} us (ratio {r['kernel_us'] / r['wall_us']:.2f}, must be <= 1)")
    verdicts = against_plain.overall(
        [{"name": r["attention"] or r["kv_dtype"], "batch": r["batch"], "context": r["context"],
          "ratio": r["ratio_vs_plain"], "where": r["path"]}
         for r in rows if r["ratio_vs_plain"] is not None])
    notes = [f"{'PASS' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in verdicts]
    for note in notes:
        print(f"[{note.split(' ', 1)[0]}] {note.split(' ', 1)[1]}")
    be.close()
    return records(be, rows, step, extra), notes


def records(be, rows, step, extra) -> list[dict]:
    """The measurements above as records of the lab's one format (lab.bench: vulkan.*)."""
    base = {"backend": be.name, "device": be.device}

    def flat(d: dict) -> dict:  # one level: {"host_ms": {"submit": x}} -> {"host_ms.submit": x}
        return {f"{k}.{kk}" if isinstance(v, dict) else k: vv
                for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)])}
    out = [{"measurement": "vulkan.point", **base, **r} for r in rows]
    if step:
        out.append({"measurement": "vulkan.step", **base, **flat(step)})
    # The main figures used the polled fence wait when there is a blocking A/B beside them.
    waits = [("polled" if "blocking_wait" in extra else "blocking", extra)]
    if "blocking_wait" in extra:
        waits.append(("blocking", extra["blocking_wait"]))
    for wait, part in waits:
        if "model_loop" in part:
            out.append({"measurement": "vulkan.model_loop", **base, "wait": wait,
                        **flat(part["model_loop"])})
        out.append({"measurement": "vulkan.tiny", **base, "wait": wait, **part["tiny"]})
    sub = extra["submit"]
    for wait in ("blocking", "polled"):
        if sub.get(f"{wait}_us") is not None:
            out.append({"measurement": "vulkan.submit", **base, "wait": wait,
                        "us": sub[f"{wait}_us"],
                        **({k: v for k, v in sub.items() if k.startswith("polled_") and k != "polled_us"}
                           if wait == "polled" else {})})
    out.append({"measurement": "vulkan.readback", **base, **extra["readback"]})
    out.append({"measurement": "vulkan.prefill", **base, **flat(extra["prefill"])})
    return out


if __name__ == "__main__":
    sys.exit(main())
