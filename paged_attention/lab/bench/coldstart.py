"""The first-token cost of a fresh process: what kernel compilation adds to its first `generate`,
and whether the next process gets its kernels from the cross-process caches (ADR 0009, "Cold
start"; the SPIR-V cache: ADR 0008):

    paged-attn bench coldstart [--backend mlx|vulkan] [--processes 2] [--fresh-caches]

Starts --processes fresh Python processes one after the other. Each builds a random-weight
llama-shaped mlx-lm model, then runs `generate` on the paged cache twice with the same prompts,
on one backend instance (as a server would): the first run pays every compilation the process
needs, the second (warm) none. Per process: the first and warm wall times, first - warm, the
process's start-up (interpreter, imports, model), glslc runs and SPIR-V files loaded (Vulkan), and
the files of MLX's PTX cache before and after (CUDA: one per kernel NVRTC compiled). The target:
a process after the first has first - warm <= 2 s.

--fresh-caches points MLX_PTX_CACHE_DIR, PAGED_ATTENTION_VK_SPIRV_CACHE and the Vulkan drivers'
own pipeline caches (MESA_SHADER_CACHE_DIR, NVIDIA's __GL_SHADER_DISK_CACHE_PATH) of every
process into one new temporary directory, so process 1 starts with nothing compiled and the
user's caches are neither read nor written (whether a driver caches at all is left to its own
defaults; "driver cache files" says what it wrote); without it the processes use the caches
where they are.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...errors import PagedAttentionError

TARGET_S = 2.0      # the bound on a later process's first - warm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["mlx", "vulkan"], default="mlx")
    p.add_argument("--path", default="auto", help="the backend's path (auto: its selector)")
    p.add_argument("--processes", type=int, default=2, help="fresh processes, one after another")
    p.add_argument("--fresh-caches", action="store_true",
                   help="start from empty PTX and SPIR-V caches in a temporary directory shared "
                        "by the run's processes (the user's caches are not touched)")
    m = p.add_argument_group("model (llama-shaped, random weights)")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=1024)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--head-dim", type=int, default=128)
    m.add_argument("--intermediate", type=int, default=2816)
    m.add_argument("--vocab", type=int, default=32000)
    m.add_argument("--dtype", default="auto",
                   help="weights and KV (auto: bfloat16 on a GPU, float32 on the CPU)")
    w = p.add_argument_group("workload (the same for both runs of a process)")
    w.add_argument("--batch", type=int, default=4, help="prompts per generate")
    w.add_argument("--prompt-tokens", type=int, default=128)
    w.add_argument("--max-tokens", type=int, default=16)
    w.add_argument("--timeout", type=float, default=600.0, help="seconds one process may take")


def _model_config(a) -> dict:
    return dict(model_type="llama", hidden_size=a.hidden, num_hidden_layers=a.layers,
                intermediate_size=a.intermediate, num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads, head_dim=a.head_dim, rms_norm_eps=1e-5,
                vocab_size=a.vocab, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=True)


def ptx_cache_dir() -> Path:
    """Where MLX's CUDA backend keeps NVRTC output (mlx/backend/cuda/jit_module.cpp,
    ptx_cache_dir(): $MLX_PTX_CACHE_DIR, else <temp dir>/mlx/<version>/ptx)."""
    env = os.environ.get("MLX_PTX_CACHE_DIR")
    if env:
        return Path(env)
    import mlx.core as mx
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"


def _files(d: Path | None, pattern: str) -> int:
    return len([f for f in d.glob(pattern) if f.is_file()]) if d is not None and d.is_dir() else 0


def fresh_env(root: str) -> dict:
    """This process's environment with every cache the processes use under `root`: MLX's PTX,
    our SPIR-V, and the Vulkan drivers' pipeline caches (SPIR-V -> device code; NVIDIA does not
    create its directory, so it is made here)."""
    driver = os.path.join(root, "driver")
    os.makedirs(driver, exist_ok=True)
    env = dict(os.environ, MLX_PTX_CACHE_DIR=os.path.join(root, "ptx"))
    env.update(PAGED_ATTENTION_VK_SPIRV_CACHE=os.path.join(root, "spirv"),
               MESA_SHADER_CACHE_DIR=driver, __GL_SHADER_DISK_CACHE_PATH=driver)
    return env


def child(cfg: dict) -> dict:
    """One fresh process's measurement (runs in the subprocess)."""
    t0 = time.perf_counter()
    import mlx.core as mx
    import numpy as np

    from ... import registry
    from ...integrations import mlx_lm as pl
    from ..generate import build_model
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    model = build_model(cfg["model"], dtype)
    be = registry.get_backend(cfg["backend"])
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg["model"]["vocab_size"],
                           (cfg["batch"], cfg["prompt_tokens"])).tolist()
    compiler = getattr(be, "compiler", None)       # Vulkan's ShaderCompiler
    ptx = ptx_cache_dir()
    driver = Path(cfg["driver_dir"]) if cfg.get("driver_dir") else None
    startup = time.perf_counter() - t0

    def counters():
        return dict(ptx=_files(ptx, "*.ptx"), driver=_files(driver, "**/*"),
                    glslc=compiler.compiles if compiler else 0,
                    spirv_loaded=compiler.disk_hits if compiler else 0)

    def run():
        t = time.perf_counter()
        out = pl.generate(model, prompts, max_tokens=cfg["max_tokens"], backend=be,
                          path=cfg["path"], stop_tokens=())
        mx.synchronize()
        return time.perf_counter() - t, out

    c0 = counters()
    first, out_first = run()
    c1 = counters()
    warm, out_warm = run()
    c2 = counters()
    be.close()
    return dict(dtype=dtype, device=be.device, startup_s=startup, first_s=first, warm_s=warm,
                overhead_s=first - warm, same_tokens=out_first == out_warm,
                # The process's glslc runs and SPIR-V loads up to the end of its first run
                # (the backend's creation compiles its subgroup probe).
                glslc_runs=c1["glslc"], glslc_warm=c2["glslc"] - c1["glslc"],
                spirv_loaded=c1["spirv_loaded"],
                ptx_before=c0["ptx"], ptx_written=c1["ptx"] - c0["ptx"],
                ptx_written_warm=c2["ptx"] - c1["ptx"], ptx_dir=str(ptx),
                driver_cache_files=c1["driver"] if driver else None,
                spirv=compiler is not None,
                spirv_dir=None if compiler is None or compiler.cache is None
                else str(compiler.cache),
                spirv_disk_error=getattr(compiler, "disk_error", None))


def _spawn(cfg: dict, env: dict | None, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", __name__, "--child", json.dumps(cfg)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PagedAttentionError(f"bench coldstart: a process ran past --timeout {timeout} s")
    wall = time.perf_counter() - t0
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or not last or not last[0].startswith("{"):
        raise PagedAttentionError(f"bench coldstart: a process failed (exit {proc.returncode}):\n"
                                  f"{(proc.stderr or proc.stdout)[-3000:]}")
    return dict(json.loads(last[0]), process_s=wall)


def measure(a) -> tuple[list[dict], list[str]]:
    """Records "coldstart": one per process, in the order they ran."""
    from ... import registry
    from ..benches import BenchUnavailable
    reason = registry.unavailable_reason(a.backend)
    if reason:
        raise BenchUnavailable(f"backend {a.backend!r} is unavailable: {reason}")
    if a.processes < 1:
        raise BenchUnavailable(f"--processes: expected >= 1, got {a.processes}")
    cfg = dict(model=_model_config(a), backend=a.backend, path=a.path, dtype=a.dtype,
               batch=a.batch, prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens)
    tmp = tempfile.TemporaryDirectory(prefix="pa-coldstart-") if a.fresh_caches else None
    env = None                   # the processes inherit this one's environment
    if tmp is not None:
        env = fresh_env(tmp.name)
        cfg["driver_dir"] = os.path.join(tmp.name, "driver")
    rows = []
    print(f"{'process':>7s} {'start-up s':>10s} {'first s':>8s} {'warm s':>7s} "
          f"{'first-warm s':>12s} {'glslc runs':>10s} {'SPIR-V loaded':>13s} "
          f"{'PTX before':>10s} {'PTX written':>11s} {'driver cache files':>18s}", flush=True)
    try:
        for i in range(1, a.processes + 1):
            r = _spawn(cfg, env, a.timeout)
            r.update(measurement="coldstart", backend=a.backend, path=a.path, process=i,
                     fresh_caches=a.fresh_caches)
            rows.append(r)
            print(f"{i:7d} {r['startup_s']:10.2f} {r['first_s']:8.2f} {r['warm_s']:7.2f} "
                  f"{r['overhead_s']:12.2f} {r['glslc_runs']:10d} "
                  f"{r['spirv_loaded']:13d} "
                  f"{r['ptx_before']:10d} {r['ptx_written']:11d} "
                  f"{'-' if r['driver_cache_files'] is None else r['driver_cache_files']:>18}",
                  flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    spirv = f", SPIR-V {rows[0]['spirv_dir'] or 'off'}" if rows[0]["spirv"] else ""
    notes = [f"caches: PTX {rows[0]['ptx_dir']}{spirv}"
             + (" (fresh, removed after the run)" if a.fresh_caches else "")]
    for r in rows[1:]:
        verdict = "within" if r["overhead_s"] <= TARGET_S else "OVER"
        notes.append(f"process {r['process']}: first - warm {r['overhead_s']:.2f} s, {verdict} "
                     f"the {TARGET_S:g} s target ({r['glslc_runs']} glslc "
                     f"runs, {r['ptx_written']} PTX files written)")
    for r in rows:
        if not r["same_tokens"]:
            notes.append(f"process {r['process']}: the warm run's tokens differ from the first's")
        if r["spirv_disk_error"]:
            notes.append(f"process {r['process']}: SPIR-V disk cache unusable: "
                         f"{r['spirv_disk_error']}")
    return rows, notes      # the runner prints the notes


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    from ..experiments.runner import bench_cli
    return bench_cli("coldstart", argv)


if __name__ == "__main__":
    sys.exit(main())
