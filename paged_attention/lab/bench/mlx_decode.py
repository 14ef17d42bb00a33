"""Decode-attention benchmark for the MLX paths on one GPU (CUDA or Metal).

    paged-attn bench mlx [--preset h100] [--batches 1,4,8,32] [--contexts 1024,4096,16384,32768]

For each (batch, context) point: Hq=32, Hkv=8, D=128, float16, block 16, every sequence at the
full context over a fragmented (randomly permuted; --tables contiguous: in order) block table.
A decode step of --layers layers is built lazily (serial: each layer's q is the previous
layer's output, as in a model; --independent: each layer its own q, which MLX may overlap; K/V
pools rotated among as many distinct pools as the memory budget allows, each pool's bytes > L2
at the larger points, their sum > L2 always) and evaluated with one mx.eval; the median step
time over --repeats steps / layers is the per-layer time, so launch and synchronisation costs
are amortised. fused (with its --variants) and sdpa take turns step by step, so clock or host-load
drift hits both sides of their ratio alike. Paths timed:
  fused  - paged_attention.backends.mlx.fused (paged kernel, split-K as chosen by its heuristic)
  gather - paged_attention.backends.mlx.gather (take -> contiguous copy -> SDPA); at large points fewer layers
           per eval so its per-layer copies fit in memory
  sdpa   - mx.fast.scaled_dot_product_attention on contiguous [B, Hkv, T, D] K/V: the
           contiguous-cache baseline a paged kernel is measured against
--kv-dtype int8|int4|float8_e4m3 (--kv-group-size): fused and gather read quantized pools (ADR
0011; K/V normal values quantized as the backend stores them), sdpa stays on float16 dense K/V.
--kv-dtype fp16,int8,int4,float8_e4m3 (a list): the fused path also reads each quantized
format's own pools (same tables), timed in turns with the plain pools; ratio format/fp16, each
format's bytes read (data + scales). --attention sinks,softcap,alibi,lse|all: the fused path with
each attention variant (ADR 0010) on the plain path's pools and tables, timed in turns with it;
ratio variant/plain. A targets line per point holds the ratios to the H200 run issue's bounds
(lab/bench/against_plain.py).
Effective bandwidth = K+V bytes read (quantized: data and scales) / per-layer time, next to the HBM peak (--preset) and,
with --ceiling, the streaming-read bandwidth this device actually reaches (mlx_ceiling). The paths
are timed by paged_attention.lab.timing (interleaved, one mx.eval per step).
"""
from __future__ import annotations

import argparse
import math
import sys

import mlx.core as mx
import numpy as np

from paged_attention import devices
from paged_attention.validation import PoolSpec
from paged_attention.backends.mlx.arrays import gpu_kind
from paged_attention.backends.mlx.fused import DecodePlan, parse_variant
from paged_attention.backends.mlx.gather import GatherPlan, decode_args, gather_decode
from paged_attention.errors import InvalidInput
from paged_attention.kv_formats import KVFormat
from paged_attention.validation import PLAIN, StepArgs, check_variant

from ..benches import parse_sizes
from ..timing import serial, time_steps as _time_steps
from . import against_plain

# --preset: device constants from paged_attention.devices, for runs where MLX names the device
# differently (or not at all); without it the device's own name is looked up.
PRESETS = {"h100": "H100"}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def time_steps(paths: dict, layers: int, repeats: int, warmup: int) -> dict:
    """Median seconds per layer of each path, timed by the lab's one harness with mx.eval as
    the step's synchronisation."""
    return _time_steps(paths, layers, repeats, warmup, sync=mx.eval)


def chained(a, fn, qs):
    """Layer i -> fn(i, q): serial (the default, a model's order: layer i's q is layer i-1's
    output, timing.serial), or with --independent q = qs[i], so MLX may overlap the layers."""
    return (lambda i: fn(i, qs[i])) if a.independent else serial(fn, lambda i: qs[i])


def free():
    mx.synchronize()
    mx.clear_cache()



def random_kv(count: int, shape: tuple, dtype) -> list:
    """`count` evaluated (k, v) pairs of random values (never zeros: they can time faster)."""
    out = []
    for _ in range(count):
        k = mx.random.normal(shape, dtype=dtype)
        v = mx.random.normal(shape, dtype=dtype)
        mx.eval(k, v)
        out.append((k, v))
    return out

def quantized_kv(count: int, shape: tuple, dtype, fmt) -> list:
    """`count` (k, v) pairs of a quantized pool's sources: normal values quantized as MLXPool
    stores them (mx.quantize / mx.to_fp8), in the layout the kernels read."""
    from paged_attention.backends.mlx.backend import QuantizedSource
    out = []
    for _ in range(count):
        pair = []
        for scale in (fmt.k_scale, fmt.v_scale):
            x = mx.random.normal(shape, dtype=dtype)
            if fmt.affine:
                data, scales, biases = mx.quantize(x, group_size=fmt.group_size, bits=fmt.bits)
            else:
                data, scales, biases = mx.to_fp8(x.astype(mx.float32) / scale), None, None
            mx.eval(data, *(a for a in (scales, biases) if a is not None))
            pair.append(QuantizedSource(data, scales, biases, fmt, dtype, shape, scale))
        out.append(tuple(pair))
    return out


def layer_fn(plan: DecodePlan, sources: list, sinks):
    """(i, q) -> layer i's output over pool pair i % len(sources): the plain launch, or the
    variant launch (`with_lse`, its output; an LSE comes from the same kernel)."""
    n = len(sources)
    if plan.attention.plain and sinks is None:
        return lambda i, q: plan(q, *sources[i % n])
    return lambda i, q: plan.with_lse(q, *sources[i % n], sinks)[0]


def gather_reference(q, sources, tables, lens, scale, block_size, attention, sinks):
    """(out, lse or None) of the gather path over the same pools, tables and attention."""
    if attention.plain and sinks is None:
        return gather_decode(q, *sources, tables, lens, scale, None), None
    args = StepArgs(batch=q.shape[0], num_q_heads=q.shape[1], block_tables=tables,
                    context_lens=lens, scale=scale, window=None, variant=attention)
    return GatherPlan(args, block_size).with_lse(q, *sources, sinks)


def rms(a, b) -> float:
    return float(mx.sqrt(mx.mean((a.astype(mx.float32) - b.astype(mx.float32)) ** 2)).item())


def run_point(a, api, batch, ctx, rng) -> dict:
    dtype = DTYPES[a.dtype]
    itemsize = 4 if a.dtype == "float32" else 2
    hq, hkv, d, bs = a.hq, a.hkv, a.head_dim, a.block_size
    base, compared = against_plain.split_kv_dtypes(a.kv_dtype, a.dtype)
    fmt = None if base is None else KVFormat(base, a.kv_group_size)

    def nbytes(f):
        return batch * ctx * (hkv * d * itemsize * 2 if f is None else
                              f.bytes_per_token(hkv, d, a.dtype))
    kv_bytes = nbytes(fmt)
    # The compared formats' pools share the memory budget with the plain ones.
    budget = int(a.pool_budget_gb * 2**30) // (1 + len(compared))

    def pool_count(size):
        return max(1, min(a.layers, budget // size))
    pools = pool_count(kv_bytes)
    scale = 1.0 / math.sqrt(d)
    res = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes, "pools": pools,
           "kv_dtype": base, "layer_order": "independent" if a.independent else "serial"}
    qs = [mx.random.normal((batch, hq, d)).astype(dtype) for _ in range(a.layers)]
    mx.eval(qs)

    timed = {}  # name -> layer function; timed together, step by step
    if "sdpa" in a.paths:
        dense = random_kv(pools, (batch, hkv, ctx, d), dtype)
        q4 = [q[:, :, None, :] for q in qs]
        mx.eval(q4)

        def sdpa_one(i, q):
            k, v = dense[i % pools]
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        timed["sdpa"] = chained(a, sdpa_one, q4)

    blocks_per_seq = -(-ctx // bs)
    nb = batch * blocks_per_seq
    order = rng.permutation(nb) if a.tables == "fragmented" else np.arange(nb)
    tables = order.astype(np.int32).reshape(batch, blocks_per_seq)
    lens = np.full(batch, ctx, np.int32)
    paged = random_kv(pools, (nb, bs, hkv, d), dtype) if fmt is None else \
        quantized_kv(pools, (nb, bs, hkv, d), dtype, fmt)

    def plan_for(variant=None, attention=PLAIN, kv_format=fmt):
        return DecodePlan(api, tables, lens, scale, None, num_blocks=nb, block_size=bs,
                          num_kv_heads=hkv, num_q_heads=hq, head_dim=d, pool_dtype=dtype,
                          partitions=a.partitions, variant=variant, attention=attention,
                          kv_format=kv_format)

    if "fused" in a.paths:
        # key -> (plan, its pools, sinks): the plain kernel, its tuning variants, the attention
        # variants on the same pools, the compared formats on their own; all timed in turns.
        cases = {"fused": (plan_for(), paged, None)}
        cases.update({f"variant_{n}": (plan_for(parse_variant(n)), paged, None)
                      for n in a.variants})
        for name in a.attention:
            kw, sinks = against_plain.attention_case(name, hq, rng)
            attention = check_variant(kw.get("soft_cap"), kw.get("alibi_slopes"),
                                      kw.get("return_lse", False), hq)
            cases[f"attn_{name}"] = (plan_for(attention=attention), paged,
                                     None if sinks is None else mx.array(sinks))
        for name in compared:
            f = KVFormat(name, a.kv_group_size)
            res[f"kv_{name}_bytes"] = nbytes(f)
            res[f"kv_{name}_pools"] = n = pool_count(nbytes(f))
            cases[f"kv_{name}"] = (plan_for(kv_format=f),
                                   quantized_kv(n, (nb, bs, hkv, d), dtype, f), None)
        for key, (plan, sources, sinks) in cases.items():
            res[f"{key}_parts" if key != "fused" else "parts"] = plan.num_parts
            timed[key] = chained(a, layer_fn(plan, sources, sinks), qs)
        if a.check:
            for key, (plan, sources, sinks) in cases.items():
                want, want_lse = gather_reference(qs[0], sources[0], tables, lens, scale, bs,
                                                  plan.attention, sinks)
                if plan.attention.plain and sinks is None:
                    got, lse = plan(qs[0], *sources[0]), None
                else:
                    got, lse = plan.with_lse(qs[0], *sources[0], sinks)
                res["rms_vs_gather" if key == "fused" else f"{key}_rms"] = rms(got, want)
                if lse is not None:
                    res[f"{key}_lse_rms"] = rms(lse, want_lse)
                del want, want_lse, got, lse
            free()
    for key, sec in time_steps(timed, a.layers, a.repeats, a.warmup).items():
        res[f"{key}_s"] = sec
    timed.clear()
    if "fused" in a.paths:
        cases.clear()
    if "sdpa" in a.paths:
        del dense, q4
        free()

    if "gather" in a.paths:
        # take (+ a float32 cast where gather.sdpa_dtype keeps float32): up to ~3x the K/V
        # bytes of a 16-bit pool per layer in flight; 4x leaves room for the allocator's cache
        per_eval = max(1, min(a.layers, int(a.gather_budget_gb * 2**30) // (4 * kv_bytes)))
        res["gather_layers_per_eval"] = per_eval
        # One plan per step, as a model's loop builds it: the row index and the calls' dtypes
        # are made once and every layer runs its takes and SDPA.
        spec = PoolSpec(nb, bs, hkv, d, a.dtype, kv_format=fmt)
        gplan = GatherPlan(decode_args(batch, hq, tables, lens, scale, None), bs, spec)
        res["gather_dtype"] = sorted({str(c.dtype).removeprefix("mlx.core.") for c in gplan.calls})

        gather_layer = chained(a, lambda i, q: gplan(q, *paged[i % pools]), qs)
        res["gather_s"] = time_steps({"gather": gather_layer}, per_eval,
                                     max(2, a.repeats // 2), 1)["gather"]
    paged.clear()  # drop the pools (the closures above hold the lists, not copies)
    qs.clear()
    free()
    return res


def ratios(r: dict) -> dict[str, float]:
    """name -> its time / the plain fused time, for each attention variant (attn_<name>) and
    compared format (kv_<name>) timed at point r."""
    if "fused_s" not in r:
        return {}
    return {key[len(pre):-2]: r[key] / r["fused_s"] for key in r for pre in ("attn_", "kv_")
            if key.startswith(pre) and key.endswith("_s")}


def compared_cells(r: dict) -> str:
    """The point's attention variants and compared formats: time, ratio to plain, parity."""
    line = ""
    for name, ratio in ratios(r).items():
        key = f"attn_{name}" if f"attn_{name}_s" in r else f"kv_{name}"
        t = r[f"{key}_s"]
        line += f" | {name} {t * 1e6:.1f}us {ratio:.2f}x p{r[f'{key}_parts']}"
        if key.startswith("kv_"):
            line += (f" {r[f'{key}_bytes'] / 2**20:.2f}MiB "
                     f"{r[f'{key}_bytes'] / t / 1e12:.2f}TB/s")
        if f"{key}_rms" in r:
            line += f" rms {r[f'{key}_rms']:.1e}"
        if f"{key}_lse_rms" in r:
            line += f" lse rms {r[f'{key}_lse_rms']:.1e}"
    return line


def fmt_point(r, peak, ceiling=None) -> str:
    def cell(key):
        if key not in r:
            return f"{'-':>9} {'-':>6}"
        tbs = r["kv_bytes"] / r[key] / 1e12
        return f"{r[key] * 1e6:9.1f} {tbs:6.2f}"
    fused_frac = (f"{r['kv_bytes'] / r['fused_s'] / 1e12 / peak * 100:5.1f}%"
                  if "fused_s" in r and peak else "    -")
    if ceiling:
        fused_frac += (f" {r['kv_bytes'] / r['fused_s'] / 1e12 / ceiling * 100:5.1f}%"
                       if "fused_s" in r else "      -")
    ratio_s = f"{r['fused_s'] / r['sdpa_s']:6.2f}" if "fused_s" in r and "sdpa_s" in r else "     -"
    ratio_g = f"{r['gather_s'] / r['fused_s']:6.1f}" if "fused_s" in r and "gather_s" in r else "     -"
    return (f"{r['batch']:>3} {r['context']:>6} | {cell('fused_s')} {fused_frac} | {cell('gather_s')} | "
            f"{cell('sdpa_s')} | {ratio_s} {ratio_g} | {r.get('parts', '-'):>5} {r['pools']:>5}")


def header(ceiling=None) -> str:
    ceil = f" {'%ceil':>6}" if ceiling else ""
    return (f"{'B':>3} {'ctx':>6} | {'fused us':>9} {'TB/s':>6} {'%peak':>6}{ceil} | {'gather us':>9} "
            f"{'TB/s':>6} | {'sdpa us':>9} {'TB/s':>6} | {'f/sdpa':>6} {'g/f':>6} | {'parts':>5} {'pools':>5}")


def check_targets(results) -> list[tuple[str, bool, str]]:
    out = []
    tbs = {(r["batch"], r["context"]): r["kv_bytes"] / r["fused_s"] / 1e12
           for r in results if "fused_s" in r}
    big = [(k, v) for k, v in tbs.items() if k[0] * k[1] >= 128 * 1024]
    if big:
        worst = min(big, key=lambda kv: kv[1])
        out.append(("fused >= 2.5 TB/s at B*ctx >= 128k", worst[1] >= 2.5, f"min {worst[1]:.2f} at {worst[0]}"))
    if (1, 32768) in tbs:
        out.append(("B=1 ctx 32k >= 1.5 TB/s", tbs[(1, 32768)] >= 1.5, f"{tbs[(1, 32768)]:.2f}"))
    both = [r for r in results if "fused_s" in r and "sdpa_s" in r]
    if both:
        worst = max(both, key=lambda r: r["fused_s"] / r["sdpa_s"])
        ratio = worst["fused_s"] / worst["sdpa_s"]
        out.append(("fused <= 1.10x sdpa everywhere", ratio <= 1.10,
                    f"worst {ratio:.2f} at ({worst['batch']}, {worst['context']})"))
        big = [r for r in both if r["batch"] * r["context"] >= 64 * 1024]
        if big:
            worst = max(big, key=lambda r: r["fused_s"] / r["sdpa_s"])
            ratio = worst["fused_s"] / worst["sdpa_s"]
            out.append(("fused < sdpa at B*ctx >= 64k", ratio < 1.0,
                        f"worst {ratio:.2f} at ({worst['batch']}, {worst['context']})"))
    gf = [r for r in results if "fused_s" in r and "gather_s" in r and r["context"] >= 16384]
    if gf:
        worst = min(gf, key=lambda r: r["gather_s"] / r["fused_s"])
        ratio = worst["gather_s"] / worst["fused_s"]
        out.append(("fused >= 3x faster than gather at ctx >= 16k", ratio >= 3.0,
                    f"worst {ratio:.1f}x at ({worst['batch']}, {worst['context']})"))
    return out


def main(argv=None) -> int:
    from ..experiments.runner import bench_cli
    return bench_cli("mlx", argv)


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="device constants (HBM peak)")
    p.add_argument("--batches", default="1,4,8,32")
    p.add_argument("--contexts", default="1k,4k,16k,32k")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--paths", default="fused,gather,sdpa")
    p.add_argument("--kv-dtype", type=against_plain.kv_dtype_option, default=None,
                   help="one of int8, int4, float8_e4m3: quantized pools for fused and gather "
                        "(ADR 0011; sdpa stays float16); a comma list with fp16 (e.g. "
                        "fp16,int8,int4,float8_e4m3): the fused path on each format's pools "
                        "timed in turns with plain pools, ratio format/fp16")
    p.add_argument("--attention", type=against_plain.attention_option, default="",
                   help="attention variants (ADR 0010) of the fused path timed in turns with "
                        "plain on the same pools: a comma list of plain, sinks, softcap, alibi, "
                        "lse, or all; ratio variant/plain")
    p.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--tables", choices=("fragmented", "contiguous"), default="fragmented",
                   help="block tables: a random permutation of the pool (default) or each sequence's "
                        "blocks in order, back to back (isolates the cost of scattered blocks)")
    p.add_argument("--partitions", type=int, default=None, help="force the split-K count (1: off)")
    p.add_argument("--pool-budget-gb", type=float, default=16.0,
                   help="memory for the distinct K/V pools rotated across layers")
    p.add_argument("--gather-budget-gb", type=float, default=12.0)
    p.add_argument("--peak-tbs", type=float, default=None, help="HBM peak for the %%peak column")
    p.add_argument("--variants", default="",
                   help="also time these fused kernel variants, e.g. pf1,pf0i4,pf1nc,pf0hf0")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--serial", dest="independent", action="store_false", default=False,
                       help="layer i's q is layer i-1's output, as in a model (the default)")
    order.add_argument("--independent", action="store_true",
                       help="each layer its own q, so MLX may overlap the layers' kernels: "
                            "throughput, not a model's step time (ADR 0004, 'Serial timing')")
    p.add_argument("--check", action="store_true", help="also report fused-vs-gather RMS per point")
    p.add_argument("--ceiling", action="store_true",
                   help="first measure the streaming-read ceiling (paged-attn bench mlx-ceiling) and report "
                        "the fused path's fraction of it (%%ceil)")
    p.add_argument("--seed", type=int, default=0)


def resolve(a) -> None:
    """Refuse option combinations that cannot be measured, before any device work."""
    _, compared = against_plain.split_kv_dtypes(a.kv_dtype, a.dtype)
    if (a.attention or compared) and "fused" not in a.paths.split(","):
        raise InvalidInput(f"--paths: --attention and a --kv-dtype list time the fused path; "
                           f"expected fused among the paths, got {a.paths}")


def measure(a):
    """Records "mlx": one per point x timed path (fused, its variants, gather, sdpa) and per
    attention variant and compared format (path fused); the targets' verdicts as notes."""
    from ..benches import BenchUnavailable
    a = argparse.Namespace(**vars(a))
    resolve(a)
    a.paths = set(a.paths.split(","))
    a.variants = [v for v in a.variants.split(",") if v]
    a.attention = [v for v in a.attention.split(",") if v]
    api = gpu_kind()
    if api is None:
        raise BenchUnavailable("no Metal or CUDA device for MLX custom kernels: nothing to benchmark")
    info = mx.device_info()
    facts = devices.lookup(PRESETS[a.preset] if a.preset else str(info.get("device_name", "")))
    peak = a.peak_tbs or (facts.peak_bytes_per_s / 1e12 if facts.peak_bytes_per_s else None)
    print(f"device: {info.get('device_name', api)} ({api}); mlx {mx.__version__}; "
          f"HBM peak {peak or '?'} TB/s; layers/step {a.layers}; dtype {a.dtype}; "
          f"Hq {a.hq} Hkv {a.hkv} D {a.head_dim} block {a.block_size}; "
          f"kv {a.kv_dtype or a.dtype}{f' group {a.kv_group_size}' if a.kv_dtype else ''}; "
          f"layers {'independent' if a.independent else 'serial'}")
    ceiling = None
    if a.ceiling:
        from .mlx_ceiling import stream_read
        ceiling = stream_read(api)["read_bytes_per_s"] / 1e12
        print(f"measured streaming-read ceiling: {ceiling:.2f} TB/s"
              + (f" ({ceiling / peak * 100:.0f}% of the {peak} TB/s peak)" if peak else ""))
    print("per-layer times in us; TB/s = K+V bytes / time; f/sdpa = fused/sdpa time; "
          "g/f = gather/fused time; the paths of a point are timed in turns, step by step")
    print(header(ceiling), flush=True)
    rng = np.random.default_rng(a.seed)
    mx.random.seed(a.seed)
    results = []
    for batch in parse_sizes(a.batches):
        for ctx in parse_sizes(a.contexts):
            r = run_point(a, api, batch, ctx, rng)
            results.append(r)
            line = fmt_point(r, peak, ceiling)
            if "rms_vs_gather" in r:
                line += f" | rms {r['rms_vs_gather']:.1e}"
            for name in a.variants:
                t = r[f"variant_{name}_s"]
                line += (f" | {name} {t * 1e6:.1f}us {r['kv_bytes'] / t / 1e12:.2f}TB/s"
                         f" p{r[f'variant_{name}_parts']}")
                if f"variant_{name}_rms" in r:
                    line += f" rms {r[f'variant_{name}_rms']:.1e}"
            print(line + compared_cells(r), flush=True)
            if ratios(r):
                print(against_plain.summary_line(batch, ctx, ratios(r), "fused"), flush=True)
    print()
    print(header(ceiling))
    for r in results:
        print(fmt_point(r, peak, ceiling) + compared_cells(r))
    verdicts = check_targets(results) + against_plain.overall(
        [{"name": n, "batch": r["batch"], "context": r["context"], "ratio": x, "where": "fused"}
         for r in results for n, x in ratios(r).items()])
    for name, ok, detail in verdicts:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    notes = [f"{'PASS' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in verdicts]
    notes.append(f"{api}; HBM peak {peak or '?'} TB/s; measured read ceiling "
                 f"{'-' if ceiling is None else f'{ceiling:.2f}'} TB/s")
    return records(results, str(info.get("device_name", api))), notes


def records(results: list[dict], device: str) -> list[dict]:
    """One record per point and timed path (the `<path>_s` keys of a result)."""
    out = []
    for r in results:
        for key in [k for k in r if k.endswith("_s")]:
            path = key[:-2]
            # An attention variant or compared format is the fused path with another attention
            # or other pools: its own fields, its ratio to plain fused and the target's verdict.
            attention = path[5:] if path.startswith("attn_") else None
            compared = path[3:] if path.startswith("kv_") else None
            name = attention or compared
            kv_bytes = r[f"{path}_bytes"] if compared else r["kv_bytes"]
            ratio = r[key] / r["fused_s"] if name and "fused_s" in r else None
            bound, ok = against_plain.verdict(name, r["batch"], r["context"], ratio) \
                if ratio is not None else (None, None)
            out.append({"measurement": "mlx", "backend": "mlx", "device": device,
                        "path": "fused" if name else path, "attention": attention,
                        "batch": r["batch"], "context": r["context"],
                        "layer_order": r.get("layer_order"),
                        "pools": r[f"{path}_pools"] if compared else r["pools"],
                        "kv_bytes": kv_bytes, "kv_dtype": compared or r.get("kv_dtype"),
                        "us_per_layer": r[key] * 1e6,
                        "tbs": kv_bytes / r[key] / 1e12,
                        "ratio_vs_plain": ratio, "target": bound, "target_ok": ok,
                        "parts": r.get("parts" if path == "fused" else f"{path}_parts"),
                        "layers_per_eval": r.get("gather_layers_per_eval") if path == "gather" else None,
                        "compute_dtype": ",".join(r["gather_dtype"]) if path == "gather" else None,
                        "rms_vs_gather": r.get("rms_vs_gather" if path == "fused" else f"{path}_rms"),
                        "lse_rms_vs_gather": r.get(f"{path}_lse_rms")})
    return out


if __name__ == "__main__":
    sys.exit(main())
