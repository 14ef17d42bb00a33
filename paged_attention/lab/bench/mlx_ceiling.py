"""What the device itself allows, measured with MLX: the achievable streaming read bandwidth
(the roofline a decode kernel is judged against, next to the HBM spec peak) and what one
kernel launch costs inside a lazily built graph, custom kernel versus built-in op.

    paged-attn bench mlx-ceiling [--gib 4] [--repeats 7]

The read probe (shaders/mlx/stream_read.body) uses the decode kernel's own 16-byte loads over
several buffers of --gib GiB in all (so nothing is served from L2) and reports the best of a
few grid shapes.
"""
from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from paged_attention.backends.mlx.arrays import gpu_kind
from paged_attention.backends.mlx.bench_hooks import compute_units
from paged_attention.backends.mlx.bench_hooks import stream_read as _read

from ..timing import time_steps as _time_steps


def time_steps(paths: dict, layers: int, repeats: int, warmup: int) -> dict:
    return _time_steps(paths, layers, repeats, warmup, sync=mx.eval)


def stream_read(api: str, gib: float = 4.0, buffers: int = 4, repeats: int = 7) -> dict:
    """Best streaming read bandwidth (bytes/s) over grids of 2..16 threadgroups per SM/core."""
    words = int(gib * 2**30) // buffers // 4 // 4 * 4
    xs = [mx.random.randint(0, 2**31 - 1, (words,), dtype=mx.uint32) for _ in range(buffers)]
    mx.eval(xs)
    units = compute_units(api)
    reads = 4 * buffers  # probe launches per mx.eval
    grids = {per_unit: (lambda i, g=units * per_unit: _read(api, xs[i % buffers], g))
             for per_unit in (2, 4, 8, 16)}
    best = {per_unit: words * 4 / sec
            for per_unit, sec in time_steps(grids, reads, repeats, 1).items()}
    del xs
    mx.clear_cache()
    per_unit = max(best, key=best.get)
    return {"read_bytes_per_s": best[per_unit], "groups_per_unit": per_unit, "all": best}


def launch_cost(api: str, count: int = 64, repeats: int = 7) -> dict:
    """Seconds per kernel of `count` independent tiny kernels in one mx.eval: a custom kernel
    (the read probe over 4 bytes) and a built-in elementwise op."""
    x = mx.zeros((4,), dtype=mx.uint32)
    xs = [mx.zeros((1,), dtype=mx.float32) + i for i in range(count)]
    mx.eval(x, xs)
    return time_steps({"custom_s": lambda i: _read(api, x, 1),
                       "builtin_s": lambda i: mx.abs(xs[i])}, count, repeats, 1)


def main(argv=None) -> int:
    from ..experiments.runner import bench_cli
    return bench_cli("mlx-ceiling", argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gib", type=float, default=4.0, help="bytes read per pass, over 4 buffers")
    p.add_argument("--repeats", type=int, default=7)


def measure(a) -> list[dict]:
    """Records "mlx-ceiling.read" (one per grid shape) and "mlx-ceiling.launch" (custom kernel,
    built-in op)."""
    from ..benches import BenchUnavailable
    api = gpu_kind()
    if api is None:
        raise BenchUnavailable("no Metal or CUDA device for MLX custom kernels: nothing to measure")
    r = stream_read(api, a.gib, repeats=a.repeats)
    shapes = ", ".join(f"{k}/unit {v / 1e12:.2f}" for k, v in r["all"].items())
    print(f"device: {mx.device_info().get('device_name', api)} ({api}), {compute_units(api)} units")
    print(f"stream read: {r['read_bytes_per_s'] / 1e12:.2f} TB/s (threadgroups per unit: {shapes})")
    c = launch_cost(api, repeats=a.repeats)
    print(f"launch in a graph: custom kernel {c['custom_s'] * 1e6:.1f} us, "
          f"built-in op {c['builtin_s'] * 1e6:.1f} us")
    base = {"backend": "mlx", "device": str(mx.device_info().get("device_name", api))}
    return ([{"measurement": "mlx-ceiling.read", **base, "groups_per_unit": k, "read_tbs": v / 1e12,
              "best": k == r["groups_per_unit"], "gib": a.gib} for k, v in r["all"].items()]
            + [{"measurement": "mlx-ceiling.launch", **base, "kernel": k[:-2], "us": v * 1e6}
               for k, v in c.items()])


if __name__ == "__main__":
    sys.exit(main())
