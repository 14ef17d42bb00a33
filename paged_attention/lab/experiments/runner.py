"""Running an experiment: the sweep over points x backends x paths, then the run's artefacts."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

import numpy as np
import yaml

from ... import registry, selector, settings
from ...errors import PagedAttentionError
from ...validation import StepArgs, PoolSpec
from . import greedy as G
from . import measure as M
from . import prefix as P
from . import results as R
from .. import benches
from .config import BenchExperiment, Experiment


@dataclass
class RunResult:
    run_dir: str
    rows: list[dict]
    summary: str
    table: str
    plots: list[str]
    calibration: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _run_dir(base: str | None, name: str, started: _dt.datetime) -> str:
    if base is None:
        base = os.path.join("runs", f"{started.strftime('%Y%m%d-%H%M%S')}-{name}")
    path, n = base, 1
    while os.path.exists(path) and os.listdir(path):
        n += 1
        path = f"{base}-{n}"
    os.makedirs(path, exist_ok=True)
    return path


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, disable=not enabled or None, unit="pt", file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _backend_names(exp: Experiment, only: list[str] | None) -> list[str]:
    names = list(registry.BACKENDS) if exp.backends == ["all"] else list(exp.backends)
    if only:
        names = [n for n in only]
    return names


def _base_row(exp, backend, path, params) -> dict:
    return {"experiment": exp.name, "backend": backend.name, "device": backend.device, "path": path,
            **params}


def _status(exc: BaseException) -> str:
    """'skipped' for what the harness expects (unsupported shape or path, out of memory);
    'error' for anything else, which the CLI reports with a non-zero exit status."""
    return "skipped" if isinstance(exc, (PagedAttentionError, M.Skip, MemoryError)) else "error"


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _decode_rows(exp, backend, params, setup, dense, paths, peak, rows_out):
    runnable = [p for p, why in paths if not why]
    measured = M.time_paths(backend, setup, runnable, exp.measure, dense) if runnable else {}
    for path, why in paths:
        row = _base_row(exp, backend, path, params)
        if why:
            rows_out.append({**row, "status": "skipped", "note": why})
            continue
        m = measured[path]
        try:
            if isinstance(m, Exception):
                raise m
            out0 = m.pop("out0")
            rms = M.check_rms(backend, setup, out0, exp.check, dense if path == "dense" else None)
            errors = M.format_errors(backend, setup, path, out0, exp.check, rms)
        except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
            rows_out.append({**row, "status": _status(exc), "note": _why(exc)})
            continue
        gbs = setup.kv_bytes / (m["us_median"] * 1e-6) / 1e9 if m["us_median"] > 0 else None
        note = ""
        if path == "auto":
            args = _args(params, setup.lens)
            note = f"auto -> {backend.resolve_path('auto', args, setup.pools[0].spec)}"
        rows_out.append({**row, "status": "ok", "note": note, **m, "pools": len(setup.pools),
                         "bytes_per_token": setup.pools[0].spec.bytes_per_token,
                         "kv_bytes": setup.kv_bytes, "gbs": gbs, **errors,
                         "peak_frac": (gbs * 1e9 / peak) if (gbs and peak) else None,
                         "rms": rms,
                         "rms_ok": None if rms is None else bool(rms <= exp.check["rms_tolerance"])})


def _args(params: dict, lens=None) -> StepArgs:
    b = params["batch"]
    lens = np.full(b, params["context"], np.int32) if lens is None else np.asarray(lens, np.int32)
    nbps = -(-params["context"] // params["block_size"])
    return StepArgs(batch=b, num_q_heads=params["num_q_heads"],
                      block_tables=np.zeros((b, nbps), np.int32), context_lens=lens,
                      scale=1.0 / np.sqrt(params["head_dim"]), window=params["window"])


def _spec(params: dict) -> PoolSpec:
    nbps = -(-params["context"] // params["block_size"])
    return PoolSpec(params["batch"] * nbps, params["block_size"], params["num_kv_heads"],
                    params["head_dim"], params["dtype"])


def calibrate(exp: Experiment, backend, rows: list[dict], run_dir: str) -> dict | None:
    """Build and store the selector table of `backend` from its measured rows; regret report."""
    real = [p for p in backend.paths]
    # The selector's buckets know no KV format: plain pools' decode points only.
    ok = [r for r in rows if r["backend"] == backend.name and r.get("status") == "ok"
          and r["path"] in real and not r.get("measurement") and r.get("kv_dtype") is None]
    if len({r["path"] for r in ok}) < 2:
        return None
    table = selector.CalibrationTable(backend.name, backend.device, meta={
        "experiment": exp.name, "source": exp.source, "quick": exp.is_quick,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {a: exp.grid[a] for a in ("num_q_heads", "num_kv_heads", "head_dim", "block_size",
                                             "dtype", "fragmentation", "layers")}})
    per_point: dict = {}
    for r in ok:
        key = selector.point_key(r["batch"], r["num_kv_heads"], r["context"], r["window"])
        table.add(key, r["path"], r["us_median"] * 1e-6)
        pid = tuple(r.get(a) for a in R.GRID_AXES)
        per_point.setdefault(pid, {"params": {a: r.get(a) for a in R.GRID_AXES}, "key": key,
                                   "times": {}})["times"][r["path"]] = r["us_median"]
    previous = selector.load_table(backend.name, backend.device)   # before it is replaced
    selector.write_table(table, os.path.join(run_dir, f"selector-{backend.name}.json"))
    path = selector.write_table(table)

    # The regret of the selector's own choices: $PAGED_ATTENTION_PATH must not force them.
    with settings.override(path=None):
        def regret_of(choose) -> dict:
            out = []
            for pt in per_point.values():
                t = pt["times"]
                if len(t) < 2:
                    continue
                c = choose(pt)
                if c in t:
                    out.append({"regret": t[c] / min(t.values()), "chosen": c,
                                "best": min(t, key=t.get), "params": pt["params"]})
            return out

        def calibrated(pt):
            return selector.choose_path(backend, _args(pt["params"]), _spec(pt["params"]))

        def leave_one_out(pt):
            sub = selector.CalibrationTable(table.backend, table.device,
                                            {k: v for k, v in table.entries.items() if k != pt["key"]})
            return sub.lookup(pt["key"], real)

        def backend_auto(pt):
            return backend.auto_path(_args(pt["params"]), _spec(pt["params"]))

        def rule(pt):
            return selector.default_rule(tuple(real))

        details = {"calibrated selector": regret_of(calibrated),
                   "leave-one-bucket-out": regret_of(leave_one_out),
                   "previous table (out of sample)": regret_of(
                       lambda pt: previous.lookup(pt["key"], real)) if previous else [],
                   "backend's own auto": regret_of(backend_auto),
                   "uncalibrated rule": regret_of(rule)}
    with open(os.path.join(run_dir, f"selector-{backend.name}-regret.json"), "w") as f:
        json.dump(details, f, indent=1)
    return {"backend": backend.name, "device": backend.device, "table_path": path,
            "entries": len(table.entries), "paths": sorted({r["path"] for r in ok}),
            "regret": {k: selector.regret_summary(v) for k, v in details.items()},
            "details": details}


def _write_json(run_dir: str, name: str, data) -> None:
    with open(os.path.join(run_dir, name), "w") as f:
        json.dump(data, f, indent=1)


def run_bench(exp: BenchExperiment, *, out_dir: str | None = None, command: str | None = None,
              log=print) -> RunResult:
    """Run a bench (lab.bench) with the experiment's resolved options; the run directory holds
    what a sweep's holds: config.yaml, env.json, results.jsonl/csv, summary.md, plots."""
    started = _dt.datetime.now()
    run_dir = _run_dir(out_dir, exp.name, started)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(exp.to_dict(), f, sort_keys=False)
    spec = benches.get(exp.bench)
    notes: list[str] = []
    reason = registry.unavailable_reason(spec.backend) if spec.backend else None
    rows: list[dict] = []
    if reason:
        notes.append(f"bench {exp.bench} skipped: backend {spec.backend} unavailable: {reason}")
    else:
        try:
            out = benches.module(exp.bench).measure(benches.namespace(exp.options))
        except benches.BenchUnavailable as exc:
            out = ([], [f"bench {exp.bench} skipped: {exc}"])
        rows, more = out if isinstance(out, tuple) else (out, [])
        notes += more
    rows = [{"experiment": exp.name, "measurement": exp.bench, "status": "ok", **r} for r in rows]
    env = R.environment({})
    env["devices"] = {r["backend"]: {"device": r["device"]} for r in rows
                      if r.get("backend") and r.get("device")}
    _write_json(run_dir, "env.json", env)
    R.write_records(run_dir, rows)
    try:
        plots = R.bench_plots(run_dir, rows)
    except ImportError as exc:  # matplotlib is optional (the experiments extra)
        plots = []
        notes.append(f"no plots: {exc}")
    meta = {"name": exp.name, "description": exp.description, "bench": exp.bench,
            "started": started.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command or f"paged-attn run {shlex.quote(exp.source)}",
            "devices": {b: d["device"] for b, d in env["devices"].items()},
            "options": exp.options}
    summary = R.bench_summary(meta, rows, plots, notes)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(summary)
    for note in notes:
        log(note)
    names = dict.fromkeys(r["measurement"] for r in rows)
    table = "\n".join(f"{n}:\n{R.bench_table(rows, n)}" for n in names)
    return RunResult(run_dir, rows, summary, table, plots, [], notes)


def run(exp: Experiment | BenchExperiment, *, backends: list[str] | None = None,
        out_dir: str | None = None, progress: bool = True, command: str | None = None,
        log=print) -> RunResult:
    """Run an experiment: a sweep (decode, prefix_sharing) or a bench; the same artefacts."""
    if exp.kind == "bench":
        if backends and "backends" in exp.options:
            exp.options["backends"] = ",".join(backends)
        return run_bench(exp, out_dir=out_dir, command=command, log=log)
    started = _dt.datetime.now()
    names = _backend_names(exp, backends)
    notes, live = [], {}
    for n in names:
        reason = registry.unavailable_reason(n)
        if reason:
            notes.append(f"backend {n} skipped: {reason}")
            continue
        live[n] = registry.get_backend(n)
    run_dir = _run_dir(out_dir, exp.name, started)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(exp.to_dict(), f, sort_keys=False)
    env = R.environment(live)
    with open(os.path.join(run_dir, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    for note in notes:
        log(note)

    points = exp.points()
    rows: list[dict] = []
    missing = P.api_missing() if exp.kind == "prefix_sharing" else None
    if missing:
        notes.append(f"prefix_sharing skipped: {missing}")
        log(f"prefix_sharing skipped: {missing}")
        points = []
    bar = _progress(len(points) * len(live), progress)
    try:
        for params in points:
            for name, be in live.items():
                if bar is not None:
                    bar.set_description(f"{name} B={params['batch']} ctx={params['context']}")
                paths = M.choose_paths(be, exp.paths, params)
                peak = be.device_facts.peak_bytes_per_s
                # No pools are built where no path can run the point (every row skipped).
                runnable = any(not why for _, why in paths)
                setup = dense = None
                try:
                    if runnable and exp.kind == "prefix_sharing":
                        metrics, setup = P.run_point(be, params, exp.measure)
                        rows.append({**_base_row(exp, be, "prefill", params), "status": "ok",
                                     "note": "", **metrics})
                        paths = [(p, w) for p, w in paths if p != "dense"]
                        dense = None
                    elif runnable:
                        setup = M.build(be, params, exp.measure)
                        dense = M.Dense(be, setup) if any(p == "dense" and not w
                                                               for p, w in paths) else None
                    _decode_rows(exp, be, params, setup, dense, paths, peak, rows)
                except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                    for path, _ in paths or [("-", None)]:
                        rows.append({**_base_row(exp, be, path, params), "status": _status(exc),
                                     "note": _why(exc)})
                finally:
                    setup = dense = None
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    if exp.greedy is not None:
        rows += G.measure(exp.name, live, lambda be: M.choose_paths(be, exp.paths), exp.greedy,
                          G.formats(points))

    # Overhead vs the dense baseline of the same backend at the same shape (the dense baseline
    # reads plain K/V: a quantized point is compared with it too).
    shape = [a for a in R.GRID_AXES if a not in ("kv_dtype", "kv_group_size")]
    dense_t = {(r["backend"],) + tuple(r.get(a) for a in shape): r["us_median"]
               for r in rows if r["path"] == "dense" and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") == "ok" and r.get("us_median"):
            d = dense_t.get((r["backend"],) + tuple(r.get(a) for a in shape))
            r["vs_dense"] = r["us_median"] / d if d else None

    cal = []
    if exp.calibrate:
        for be in live.values():
            c = calibrate(exp, be, rows, run_dir)
            if c is None:
                notes.append(f"selector: {be.name} has fewer than two measured paths here; no table")
            else:
                cal.append(c)

    R.write_records(run_dir, rows)
    metrics = [("us_median", "per-layer decode time (us)", "latency"), ("gbs", "effective GB/s", "gbs")]
    if exp.kind == "prefix_sharing":
        metrics = [("prefill_ms", "prefill (ms)", "prefill"), ("memory_saved", "KV memory saved", "memory")] \
            + metrics
    plots = R.plot(run_dir, rows, exp.plot["x"], exp.plot["facet"], metrics) if rows else []
    plots += R.format_plots(run_dir, rows)
    meta = {"name": exp.name, "description": exp.description, "kind": exp.kind,
            "started": started.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command or f"paged-attn run {shlex.quote(exp.source)}",
            "devices": {n: b.device for n, b in live.items()},
            "iterations": exp.measure["iterations"], "rms_tolerance": exp.check["rms_tolerance"]}
    summary = R.summary_markdown(meta, rows, plots, cal)
    if notes:
        summary += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(summary)
    for be in live.values():
        be.close()
    table = R.markdown_table(rows, exp.kind)
    greedy = R.greedy_table(rows)
    if greedy:
        table += f"\ngreedy agreement with plain KV:\n{greedy}"
    return RunResult(run_dir, rows, summary, table, plots, cal, notes)


def bench_cli(name: str, argv: list[str] | None) -> int:
    """`paged-attn bench NAME [flags]`: the flags become the experiment a YAML file would give,
    run by the one runner into a run directory."""
    spec = benches.BENCHES[name]
    reason = registry.unavailable_reason(spec.backend) if spec.backend else None
    if reason:
        print(f"paged-attn: error: backend {spec.backend!r} is unavailable: {reason}",
              file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    a = benches.parser(name).parse_args(argv)
    follower = getattr(benches.module(name), "follower", None)
    if follower is not None and follower():
        benches.module(name).measure(benches.namespace(benches.resolved(name, a)))
        return 0
    exp = BenchExperiment(name=f"bench-{name}", source="(command line)", bench=name,
                          options=benches.resolved(name, a))
    res = run_bench(exp, out_dir=a.out, command=shlex.join(["paged-attn", "bench", name, *argv]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bench": name, "options": exp.options, "rows": res.rows}, f, indent=1)
    print(f"run directory: {res.run_dir} (summary.md, results.jsonl, results.csv, env.json, "
          f"config.yaml)")
    if not res.rows:
        for note in res.notes:
            print(f"paged-attn: error: {note}", file=sys.stderr)
        return 2
    return 0
