"""Wall time of one prompt's prefill() through the public API only (create_pool, write_kv,
prefill), on each backend asked for:

    paged-attn bench prefill [--backends vulkan] [--tokens 2048] [--repeats 5]

Hq=32, Hkv=8, D=128, fp16, block 16, a shuffled block table; the wall time of --repeats calls
after one warm-up call (median and min), and the RMS of the output against the float64 numpy
reference. Two trees compare with `paged-attn compare RUN_A RUN_B` (ADR 0008 timed this tree
against the one issue 14 was filed against, with the script this bench replaces).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ... import reference, registry

BS, HKV, HQ, D = 16, 8, 32, 128


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default="vulkan", help="comma-separated registry names")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048], help="prompt lengths")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up")
    p.add_argument("--seed", type=int, default=0)


def prefill_wall(be, tokens: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    nb = -(-tokens // BS)
    pool = be.create_pool(nb, BS, HKV, D, "float16")
    table = rng.permutation(nb).astype(np.int32)
    pos = np.arange(tokens)
    slots = table[pos // BS].astype(np.int64) * BS + pos % BS
    k, v, q = (rng.standard_normal((tokens, h, D)).astype(np.float16) for h in (HKV, HKV, HQ))
    be.write_kv(pool, slots, k, v)
    out = be.to_numpy(be.prefill(q, pool, table, 0))
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        be.to_numpy(be.prefill(q, pool, table, 0))
        walls.append(time.perf_counter() - t0)
    kh = np.zeros((nb * BS, HKV, D), np.float16)
    vh = np.zeros_like(kh)
    kh[slots], vh[slots] = k, v
    shape = (nb, BS, HKV, D)
    rms = float(reference.rms(out, reference.prefill(q, kh.reshape(shape), vh.reshape(shape),
                                                     table, 0)))
    return {"tokens": tokens, "median_ms": float(np.median(walls)) * 1e3,
            "min_ms": float(np.min(walls)) * 1e3, "repeats": repeats, "rms": rms}


def measure(a) -> tuple[list[dict], list[str]]:
    """Records "prefill": one per backend x prompt length."""
    rows, notes = [], []
    for name in [n.strip() for n in a.backends.split(",") if n.strip()]:
        reason = registry.unavailable_reason(name)
        if reason:
            notes.append(f"{name} skipped: {reason}")
            continue
        with registry.get_backend(name) as be:
            for tokens in a.tokens:
                r = {"measurement": "prefill", "backend": name, "device": be.device,
                     **prefill_wall(be, tokens, a.repeats, a.seed)}
                print(f"{name} prefill of {tokens} tokens: median {r['median_ms']:.2f} ms "
                      f"(min {r['min_ms']:.2f}), rms vs reference {r['rms']:.2e}", flush=True)
                rows.append(r)
    return rows, notes


def main(argv=None) -> int:
    from ..experiments.runner import bench_cli
    return bench_cli("prefill", argv)


if __name__ == "__main__":
    sys.exit(main())
