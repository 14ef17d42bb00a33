"""Soak: a long decode run on one backend (joins, forks with copy-on-write, appends, finishes)
checking that memory stays flat and that every block returns to the free list.

    python -m paged_attention.lab.soak --backend mlx --steps 10000
    paged-attn soak --backend vulkan --path splitk --steps 10000

Memory is sampled after a warm-up (caches, staging buffers and recorded command buffers reach
their steady size while the first sequences grow to max_context) and again at the end:
  host    resident set size (/proc/self/statm; ru_maxrss where there is no /proc)
  device  the backend's `memory_in_use()` (MLX: its allocator's active memory); not reported
          where it returns None (lavapipe's device memory is host memory, in the RSS).
After the decode loop, `--churn` pools are created, written, decoded and dropped, to show that
a dropped pool gives its memory back. The reference answer is checked every `--check-every`
steps (it costs more than the decode itself). Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import registry
from .workload import DecodeWorkload, WorkloadConfig

MB = 1 << 20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, KiB (bytes on macOS)
        return peak if sys.platform == "darwin" else peak * 1024


def device_bytes(backend) -> int | None:
    """Bytes the backend holds on its device, when it can tell."""
    n = backend.memory_in_use()
    return None if n is None else int(n)


def _malloc_trim() -> None:
    """Hand glibc's free heap pages back to the OS, so RSS measures live memory, not arenas."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # musl or no libc symbol: sample as is
        pass


def settle(backend) -> None:
    """Let pending work and garbage go before a memory sample."""
    gc.collect()
    backend.release_cached_memory()
    _malloc_trim()


@dataclass
class SoakReport:
    backend: str
    path: str
    device: str
    steps: int
    warmup: int
    seconds: float = 0.0
    ms_per_step: float = 0.0
    checked_steps: int = 0
    worst_rms: float = 0.0
    forks: int = 0
    finishes: int = 0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_mb: float = 0.0
    device_warm_mb: float | None = None
    device_end_mb: float | None = None
    device_growth_mb: float | None = None
    num_blocks: int = 0
    free_blocks_end: int = 0
    churn_pools: int = 0
    churn_rss_growth_mb: float | None = None
    churn_device_growth_mb: float | None = None
    churn_first_pools_rss_mb: float | None = None
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def run_soak(backend, *, path: str = "auto", steps: int = 10_000, warmup: int | None = None,
             check_every: int = 50, churn: int = 0, cfg: WorkloadConfig | None = None,
             rss_limit_mb: float = 8.0, device_limit_mb: float = 1.0, tolerance: float = 5e-3,
             progress=None) -> SoakReport:
    """Run the soak on `backend`; the report's `failures` lists every violated check."""
    cfg = cfg or WorkloadConfig(batch=4, num_kv_heads=2, group_size=4, head_dim=64, block_size=16,
                                dtype="float16", max_prompt=48, max_context=304)
    if warmup is None:
        warmup = min(max(steps // 5, 1), 1000)
    warmup = min(warmup, steps)
    rep = SoakReport(backend.name, path, backend.device, steps, warmup)
    wl = DecodeWorkload(backend, cfg, path=path)
    rep.num_blocks = wl.num_blocks
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        check = i % check_every == 0 or i == steps
        r = wl.step(check=check)
        if r is not None:
            rep.checked_steps += 1
            rep.worst_rms = max(rep.worst_rms, r.rms)
            if not r.rms < tolerance and len(rep.failures) < 10:
                rep.failures.append(f"step {i}: RMS {r.rms:.3e} >= {tolerance}")
        if i == warmup:
            settle(backend)
            rss_warm, dev_warm = rss_bytes(), device_bytes(backend)
        if progress and i % max(1, steps // 10) == 0:
            progress(f"  {backend.name}/{path}: step {i}/{steps}, worst RMS {rep.worst_rms:.2e}, "
                     f"RSS {rss_bytes() / MB:.1f} MB")
    rep.seconds = time.perf_counter() - t0
    rep.ms_per_step = 1e3 * rep.seconds / max(steps, 1)
    rep.forks = steps // cfg.fork_every if cfg.fork_every else 0
    rep.finishes = steps // cfg.finish_every if cfg.finish_every else 0
    settle(backend)
    rss_end, dev_end = rss_bytes(), device_bytes(backend)
    rep.rss_warm_mb, rep.rss_end_mb = rss_warm / MB, rss_end / MB
    rep.rss_growth_mb = (rss_end - rss_warm) / MB
    if dev_warm is not None and dev_end is not None:
        rep.device_warm_mb, rep.device_end_mb = dev_warm / MB, dev_end / MB
        rep.device_growth_mb = (dev_end - dev_warm) / MB
    wl.close()
    stats = wl.manager.stats()
    rep.free_blocks_end = stats.free
    if stats.free != wl.num_blocks or stats.used or wl.manager.sequences():
        rep.failures.append(f"blocks leaked: {stats.free} of {wl.num_blocks} free, {stats.used} "
                            f"still referenced, {len(wl.manager.sequences())} sequences left")
    if steps > warmup and rep.rss_growth_mb > rss_limit_mb:
        rep.failures.append(f"host RSS grew {rep.rss_growth_mb:.1f} MB after warm-up "
                            f"(limit {rss_limit_mb} MB)")
    if steps > warmup and rep.device_growth_mb is not None and rep.device_growth_mb > device_limit_mb:
        rep.failures.append(f"device memory grew {rep.device_growth_mb:.2f} MB after warm-up "
                            f"(limit {device_limit_mb} MB)")
    del wl
    if churn:
        rep.churn_pools = churn
        rep.churn_rss_growth_mb, rep.churn_device_growth_mb, rep.churn_first_pools_rss_mb = \
            pool_churn(backend, churn, path)
        if rep.churn_rss_growth_mb > rss_limit_mb:
            rep.failures.append(f"host RSS grew {rep.churn_rss_growth_mb:.1f} MB over {churn} "
                                f"dropped pools (limit {rss_limit_mb} MB)")
        if rep.churn_device_growth_mb is not None and rep.churn_device_growth_mb > device_limit_mb:
            rep.failures.append(f"device memory grew {rep.churn_device_growth_mb:.2f} MB over "
                                f"{churn} dropped pools (limit {device_limit_mb} MB)")
    return rep


def pool_churn(backend, n: int, path: str = "auto", num_blocks: int = 256,
               warm: int = 20) -> tuple[float, float | None, float]:
    """Create, fill, decode from and drop `n` pools of `num_blocks` x 16 x 2 x 64 fp16 (2 MB of
    K+V at 256 blocks). Returns (RSS growth, device growth) in MB over the pools after the first
    `warm` (bounded caches of recorded work may keep the last few pools alive) and the RSS growth
    over those first pools (what such caches hold)."""
    rng = np.random.default_rng(0)
    bs, hkv, d = 16, 2, 64
    slots = np.arange(num_blocks * bs)
    kv = rng.standard_normal((slots.size, hkv, d)).astype(np.float16)
    q = rng.standard_normal((2, hkv * 4, d)).astype(np.float16)
    tables = np.arange(8, dtype=np.int32).reshape(2, 4)
    lens = np.array([64, 50], np.int32)
    warm = max(1, min(warm, n // 2))
    settle(backend)
    rss_start = rss_bytes()
    rss0 = dev0 = None
    for i in range(n):
        pool = backend.create_pool(num_blocks, bs, hkv, d, "float16")
        backend.write_kv(pool, slots, kv, kv)
        np.asarray(backend.decode(q, pool, tables, lens, path=path))
        del pool
        if i + 1 == warm:
            settle(backend)
            rss0, dev0 = rss_bytes(), device_bytes(backend)
    settle(backend)
    rss1, dev1 = rss_bytes(), device_bytes(backend)
    dev = None if dev0 is None or dev1 is None else (dev1 - dev0) / MB
    return (rss1 - rss0) / MB, dev, (rss0 - rss_start) / MB


def format_report(r: SoakReport) -> str:
    dev = "n/a (backend reports no device figure)" if r.device_warm_mb is None else \
        f"{r.device_warm_mb:.2f} MB -> {r.device_end_mb:.2f} MB ({r.device_growth_mb:+.3f} MB)"
    lines = [
        f"soak {r.backend}/{r.path} on {r.device}",
        f"  steps {r.steps} (warm-up {r.warmup}), {r.seconds:.1f} s, {r.ms_per_step:.2f} ms/step, "
        f"~{r.forks} forks, ~{r.finishes} forced finishes",
        f"  reference checked on {r.checked_steps} steps, worst RMS {r.worst_rms:.2e}",
        f"  host RSS   {r.rss_warm_mb:.1f} MB after warm-up -> {r.rss_end_mb:.1f} MB at the end "
        f"({r.rss_growth_mb:+.2f} MB)",
        f"  device     {dev}",
        f"  blocks     {r.free_blocks_end}/{r.num_blocks} free after releasing every sequence",
    ]
    if r.churn_pools:
        cd = "n/a" if r.churn_device_growth_mb is None else f"{r.churn_device_growth_mb:+.3f} MB"
        lines.append(f"  pool churn {r.churn_pools} pools (2 MB each) created and dropped: RSS "
                     f"{r.churn_first_pools_rss_mb:+.2f} MB over the first "
                     f"{max(1, min(20, r.churn_pools // 2))}, then {r.churn_rss_growth_mb:+.2f} MB; "
                     f"device {cd}")
    lines.append("  PASS" if r.ok else "  FAIL: " + "; ".join(r.failures))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--backend", action="append",
                   help="backend to soak (repeatable; default: every available backend)")
    p.add_argument("--path", default="all",
                   help="decode path, 'auto', or 'all' (every path of the backend; default)")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=None,
                   help="steps before the first memory sample (default: steps/5, at most 1000)")
    p.add_argument("--check-every", type=int, default=50,
                   help="compare with the reference every n steps (default 50)")
    p.add_argument("--churn", type=int, default=40,
                   help="pools to create and drop after the run (default 40; 0 to skip)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-limit-mb", type=float, default=8.0)
    p.add_argument("--device-limit-mb", type=float, default=1.0)
    p.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(args) -> int:
    names = args.backend or registry.available_backends()
    reports = []
    for name in names:
        backend = registry.get_backend(name)
        paths = backend.paths if args.path == "all" else (args.path,)
        for path in paths:
            cfg = WorkloadConfig(batch=args.batch, num_kv_heads=2, group_size=4, head_dim=64,
                                 block_size=16, dtype=args.dtype, seed=args.seed)
            if args.dtype not in backend.pool_dtypes:
                print(f"soak {name}: skipped, no {args.dtype} pools")
                continue
            rep = run_soak(backend, path=path, steps=args.steps, warmup=args.warmup,
                           check_every=args.check_every, churn=args.churn, cfg=cfg,
                           rss_limit_mb=args.rss_limit_mb, device_limit_mb=args.device_limit_mb,
                           progress=None if args.quiet else
                           (lambda line: print(line, file=sys.stderr, flush=True)))
            print(format_report(rep), flush=True)
            reports.append(rep)
        backend.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), ok=r.ok) for r in reports], f, indent=2)
    return 0 if reports and all(r.ok for r in reports) else 1


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="paged-attn soak", description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
