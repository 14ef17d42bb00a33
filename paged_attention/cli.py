"""`paged-attn`: the command line of the framework."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import registry
from .workload import DecodeWorkload, WorkloadConfig


def cmd_info(args) -> int:
    for name in registry.BACKENDS:
        reason = registry.unavailable_reason(name)
        if reason:
            print(f"{name:8s} unavailable: {reason}")
        else:
            b = registry.get_backend(name)
            print(f"{name:8s} device={b.device!r} paths={b.paths}")
            b.close()
    return 0


def cmd_demo(args) -> int:
    """A short fragmented decode on every available backend x path, checked against the reference."""
    cfg = WorkloadConfig(batch=4, num_kv_heads=2, group_size=4, head_dim=64, block_size=16,
                         dtype="float16", max_prompt=256)
    print(f"{'backend':8s} {'path':10s} {'device':40s} {'steps':>5s} {'max RMS':>9s} {'ms/step':>8s}")
    for name in registry.available_backends():
        backend = registry.get_backend(name)
        for path in backend.paths:
            wl = DecodeWorkload(backend, cfg, path=path)
            t0, worst = time.perf_counter(), 0.0
            for _ in range(args.steps):
                worst = max(worst, wl.step().rms)
            ms = (time.perf_counter() - t0) * 1e3 / args.steps
            print(f"{name:8s} {path:10s} {backend.device[:40]:40s} {args.steps:5d} {worst:9.2e} {ms:8.2f}")
        backend.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paged-attn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list backends, devices and paths").set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help="short decode parity run on every backend")
    d.add_argument("--steps", type=int, default=50)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
