"""`paged-attn`: the command line of the framework."""
from __future__ import annotations

import argparse
import os
import sys
import time


from .. import registry
from . import benches
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


def _experiment_error(exc) -> int:
    print(f"paged-attn: error: {exc}", file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    """Run an experiment file; print its summary table and where the artefacts are."""
    from .experiments import config as xconfig
    try:
        exp = xconfig.load(args.experiment, quick=args.quick)
        for name in args.backend or []:
            if name not in registry.BACKENDS:
                raise xconfig.ConfigError(f"--backend: expected one of {sorted(registry.BACKENDS)}, "
                                          f"got {name!r}")
    except xconfig.ConfigError as exc:
        return _experiment_error(exc)
    from .experiments.results import fixed_line
    from .experiments.runner import run
    command = " ".join(["paged-attn", args.command, args.experiment]
                       + (["--quick"] if args.quick else [])
                       + [f"--backend {b}" for b in args.backend or []])
    res = run(exp, backends=args.backend, out_dir=args.out, progress=not args.no_progress,
              command=command)
    if exp.kind == "bench":
        print(f"\n{exp.name} (bench {exp.bench}):\n{res.table}")
        print(f"run directory: {res.run_dir} (summary.md, results.jsonl, results.csv, env.json, "
              "config.yaml)")
        return 0 if res.rows else 1
    print(f"\n{exp.name}: {fixed_line(res.rows)}")
    print(res.table)
    for c in res.calibration:
        for label, s in c["regret"].items():
            worst = "-" if s["max"] is None else f"{s['max']:.3f}"
            print(f"selector regret [{c['backend']}] {label}: max {worst} over {s['points']} "
                  f"point(s), {s['over_5pct']} over 5%")
        print(f"selector table written: {c['table_path']}")
    for note in res.notes:
        print(f"note: {note}")
    for p in res.plots:
        print(f"plot: {p}")
    print(f"run directory: {res.run_dir} (summary.md, results.jsonl, results.csv, env.json, config.yaml)")
    ok = [r for r in res.rows if r.get("status") == "ok"]
    bad = [r for r in ok if r.get("rms_ok") is False]
    errors = [r for r in res.rows if r.get("status") == "error"]
    if errors:
        print(f"paged-attn: {len(errors)} measurement(s) failed; first: {errors[0]['note']}",
              file=sys.stderr)
        return 1
    if bad:
        print(f"paged-attn: {len(bad)} point(s) exceed the RMS tolerance", file=sys.stderr)
        return 1
    return 0 if ok or exp.kind == "prefix_sharing" else 1


def cmd_calibrate(args) -> int:
    """Run the selector calibration experiment (writes the per-device selector table)."""
    if args.experiment is None:
        args.experiment = "selector_calibration"  # shipped with the package
    return cmd_run(args)


def cmd_compare(args) -> int:
    """Per-point ratios (B / A) of two runs, matching points by backend, path and parameters."""
    from .experiments.results import compare
    for run_dir in (args.run_a, args.run_b):
        if not os.path.isfile(os.path.join(run_dir, "results.jsonl")) and not run_dir.endswith(".jsonl"):
            return _experiment_error(f"{run_dir}: not a run directory (no results.jsonl)")
    text, matched = compare(args.run_a, args.run_b)
    print(text)
    return 0 if matched else 1


def _add_experiment_commands(sub) -> None:
    for name, func, doc in (("run", cmd_run, "run an experiment file (YAML)"),
                            ("calibrate", cmd_calibrate, "calibrate the path selector on this machine")):
        r = sub.add_parser(name, help=doc)
        if name == "run":
            r.add_argument("experiment", help="a YAML file, or the name of a shipped experiment (smoke, decode_sweep, ...)")
        else:
            r.add_argument("--experiment", default=None,
                           help="calibration experiment (default: the shipped selector_calibration)")
        r.add_argument("--backend", action="append", help="run only this backend (repeatable)")
        r.add_argument("--quick", action="store_true", help="the experiment's small grid and iterations")
        r.add_argument("--out", default=None, help="run directory (default runs/<timestamp>-<name>/)")
        r.add_argument("--no-progress", action="store_true", help="no progress bar")
        r.set_defaults(func=func)
    c = sub.add_parser("compare", help="per-point ratios between two runs")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paged-attn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list backends, devices and paths").set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help="short decode parity run on every backend")
    d.add_argument("--steps", type=int, default=50)
    d.set_defaults(func=cmd_demo)
    _add_experiment_commands(sub)
    from . import soak
    s = sub.add_parser("soak", help="long decode run checking flat memory and no leaked blocks")
    soak.add_arguments(s).set_defaults(func=soak.run)
    b = sub.add_parser("bench", help="a backend's kernel benchmark, or e2e (the model-like loop "
                                      "through plan/run); args after the name go to it, e.g. "
                                      "`paged-attn bench e2e --preset h100`")
    b.add_argument("backend", metavar="bench", choices=sorted(benches.BENCHES),
                   help="one of: " + "; ".join(f"{n} ({x.help})" for n, x in benches.BENCHES.items()))
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    from .generate import add_generate_parser
    add_generate_parser(sub)
    t = sub.add_parser("tune", help="measure the fused kernels' candidate configurations on this "
                                    "device; --write stores the winners in the tuning table")
    from . import tune
    tune.add_arguments(t).set_defaults(func=cmd_tune)
    return p


def cmd_tune(args) -> int:
    from . import tune
    return tune.run(args)


def cmd_bench(args) -> int:
    """`paged-attn bench NAME ...`: the bench's flags as an experiment, through the one runner."""
    from .experiments.runner import bench_cli
    return bench_cli(args.backend, args.bench_args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv   # the command as given (tune records it in the table's provenance)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
