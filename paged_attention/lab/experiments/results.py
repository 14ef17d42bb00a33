"""Run artefacts: environment record, results.jsonl/csv, summary.md, plots, and comparison of runs."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata

from .. import benches
from .config import GRID_AXES

# Columns of results.csv, in order (results.jsonl holds the same records).
FIELDS = (["experiment", "backend", "device", "path", "status", "note"] + list(GRID_AXES)
          + ["time_source", "us_median", "us_p10", "us_p90", "host_us_median", "device_us_median",
             "iterations", "pools", "kv_bytes", "gbs", "peak_frac", "vs_dense", "extra_mem_mb",
             "rms", "rms_ok", "prefill_ms", "tokens_written", "prefix_hit_tokens", "blocks_used",
             "blocks_no_sharing", "memory_saved", "kv_mb_used", "kv_mb_no_sharing"])

AXIS_LABEL = {"batch": "B", "context": "ctx", "num_q_heads": "Hq", "num_kv_heads": "Hkv",
              "head_dim": "D", "block_size": "block", "dtype": "dtype", "window": "window",
              "fragmentation": "tables", "layers": "L", "shared_prefix": "shared"}


# -- environment -----------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(backends: dict) -> dict:
    """What produced a run: devices, driver, versions, git commit, host."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    devices = {}
    for name, be in backends.items():
        d = {"device": be.device, "paths": list(be.paths)}
        for attr in ("subgroup_size", "compute_units", "timestamps_supported", "kernel_api"):
            if hasattr(be, attr):
                d[attr] = getattr(be, attr)
        devices[name] = d
    return {
        "devices": devices,
        "nvidia_driver": _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]),
        "python": sys.version.split()[0],
        "versions": {k: _version(k) for k in ("numpy", "pyyaml", "mlx", "kp", "matplotlib", "tqdm")},
        "git_commit": _run(["git", "rev-parse", "HEAD"], cwd=repo),
        "git_dirty": None if dirty is None else bool(dirty),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


# -- records ---------------------------------------------------------------------------------------
def columns(rows: list[dict]) -> list[str]:
    """results.csv's columns: FIELDS for the sweeps' records; for a bench's, the leading fields,
    then each measurement's params and metrics, then any other key, in first-seen order."""
    names = list(dict.fromkeys(r.get("measurement") for r in rows))
    if names in ([], [None]):
        return FIELDS
    cols = ["experiment", "measurement", "status", "note", "device"]
    for name in names:
        schema = schema_of(name)
        if schema is not None:
            cols += list(schema.params) + [k for k, _ in schema.metrics]
    for r in rows:
        cols += list(r)
    return list(dict.fromkeys(cols))


def write_records(run_dir: str, rows: list[dict]) -> None:
    with open(os.path.join(run_dir, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    fields = columns(rows)
    with open(os.path.join(run_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in fields})


def _cell(v):
    if v is None:
        return ""
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def read_records(run: str) -> list[dict]:
    path = run if run.endswith(".jsonl") else os.path.join(run, "results.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- formatting ------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3g") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def varying_axes(rows: list[dict]) -> list[str]:
    return [a for a in GRID_AXES if len({json.dumps(r.get(a)) for r in rows}) > 1]


def fixed_axes(rows: list[dict]) -> dict:
    return {a: rows[0].get(a) for a in GRID_AXES if a not in varying_axes(rows)} if rows else {}


def markdown_table(rows: list[dict], kind: str = "decode") -> str:
    """A markdown table of the measured rows; parameters fixed across the run are left out
    (`fixed_line` states them)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return "(no measured points)\n"
    var = varying_axes(ok)
    head = ["backend", "path"] + [AXIS_LABEL[a] for a in var]
    if kind == "prefix_sharing":
        head += ["prefill ms", "tokens written", "prefix hit tokens", "blocks used / unshared",
                 "memory saved", "decode us/layer", "GB/s", "RMS"]
    else:
        head += ["us/layer (median)", "p10-p90", "GB/s", "% peak", "x dense", "extra MB", "RMS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        cells = [r["backend"], r["path"]] + [_fmt(r.get(a)) for a in var]
        if kind == "prefix_sharing" and r["path"] == "prefill":
            cells += [_fmt(r["prefill_ms"], ".2f"), _fmt(r["tokens_written"]),
                      _fmt(r["prefix_hit_tokens"]), f"{r['blocks_used']} / {r['blocks_no_sharing']}",
                      f"{100 * r['memory_saved']:.0f}%", "-", "-", "-"]
        elif kind == "prefix_sharing":
            cells += ["-"] * 5 + [_fmt(r["us_median"], ".1f"), _fmt(r.get("gbs"), ".2f"),
                                  _fmt(r.get("rms"), ".1e")]
        else:
            pf = r.get("peak_frac")
            cells += [_fmt(r["us_median"], ".1f") + ("" if r.get("time_source") == "host" else " (dev)"),
                      f"{r['us_p10']:.1f}-{r['us_p90']:.1f}", _fmt(r.get("gbs"), ".2f"),
                      "-" if pf is None else f"{100 * pf:.1f}", _fmt(r.get("vs_dense"), ".2f"),
                      _fmt(r.get("extra_mem_mb"), ".2f"), _fmt(r.get("rms"), ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fixed_line(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"] or rows
    fx = fixed_axes(ok)
    return ", ".join(f"{AXIS_LABEL[a]}={v}" for a, v in fx.items())


def summary_markdown(meta: dict, rows: list[dict], plots: list[str], calibration: list[dict]) -> str:
    out = io.StringIO()
    w = out.write
    w(f"# {meta['name']} ({meta['started']})\n\n")
    if meta.get("description"):
        w(meta["description"].strip() + "\n\n")
    w(f"Command: `{meta['command']}`\n\n")
    w("Devices: " + "; ".join(f"{b}: {d}" for b, d in meta["devices"].items()) + "\n\n")
    w(f"Fixed: {fixed_line(rows)}. Per-layer time of an L-layer decode step (median over "
      f"{meta['iterations']} timed steps, p10-p90); '(dev)' marks device timestamps, else host "
      f"time. GB/s = K+V bytes attended / time. x dense = time / contiguous dense baseline of "
      f"the same backend. RMS vs the float64 numpy reference on a subsample of sequences.\n\n")
    w(markdown_table(rows, meta.get("kind", "decode")))
    bad = [r for r in rows if r.get("status") == "ok" and r.get("rms_ok") is False]
    if bad:
        w(f"\n**{len(bad)} point(s) over the RMS tolerance {meta['rms_tolerance']}.**\n")
    for status, title in (("error", "Errors (unexpected; see results.jsonl)"), ("skipped", "Skipped")):
        skipped = [r for r in rows if r.get("status") == status]
        if skipped:
            w(f"\n{title}:\n")
            seen = set()
            for r in skipped:
                line = f"- {r['backend']} {r.get('path') or ''}: {r['note']}"
                if line not in seen:
                    seen.add(line)
                    w(line + "\n")
    for c in calibration:
        w(f"\n## Path selector calibration: {c['backend']} on {c['device']}\n\n")
        w(f"Table: `{c['table_path']}` ({c['entries']} shape keys; paths {', '.join(c['paths'])}).\n\n")
        w("| chooser | points | max regret | mean regret | points > 5% |\n|---|---|---|---|---|\n")
        for label, s in c["regret"].items():
            w(f"| {label} | {s['points']} | {_fmt(s['max'], '.3f')} | {_fmt(s['mean'], '.3f')} | "
              f"{s['over_5pct']} |\n")
        w("\nRegret = time of the chosen path / time of the fastest path at the point, on this "
          "run's measurements. 'calibrated selector' uses the table built from them (in sample: "
          "1.0 unless points share a bucket); 'leave-one-bucket-out' chooses each point from the "
          "table without its own bucket; 'previous table' is the table this run replaced "
          "(an independent earlier measurement), when there was one.\n")
    if plots:
        w("\nPlots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in plots) + "\n")
    return out.getvalue()


# -- plots -----------------------------------------------------------------------------------------
def plot(run_dir: str, rows: list[dict], x: str, facet: str, metrics: list[tuple[str, str, str]]
         ) -> list[str]:
    """One PNG per metric: metric vs `x`, one panel per value of `facet`, one line per backend,
    path and other varying parameter. metrics: [(row key, y label, file stem)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, label, stem in metrics:
        data = [r for r in rows if r.get("status") == "ok" and r.get(key) is not None]
        if not data:
            continue
        facets = sorted({r.get(facet) for r in data}, key=lambda v: (v is None, v))
        others = [a for a in varying_axes(data) if a not in (x, facet)]
        fig, axes = plt.subplots(1, len(facets), figsize=(4.2 * len(facets) + 1.5, 3.8),
                                 squeeze=False, sharey=False)
        for ax, fv in zip(axes[0], facets):
            lines: dict = {}
            for r in data:
                if r.get(facet) != fv:
                    continue
                name = f"{r['backend']}/{r['path']}" + "".join(
                    f" {AXIS_LABEL[a]}={r.get(a)}" for a in others)
                lines.setdefault(name, []).append((r.get(x), r[key]))
            for name, pts in sorted(lines.items()):
                pts.sort(key=lambda t: (t[0] is None, t[0]))
                xs = [p[0] if p[0] is not None else 0 for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=name)
            xs_all = [r.get(x) for r in data if isinstance(r.get(x), (int, float)) and r.get(x)]
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
                ax.set_xscale("log", base=2)
            if key in ("us_median", "prefill_ms"):
                ax.set_yscale("log")
            ax.set_title(f"{AXIS_LABEL.get(facet, facet)}={fv}")
            ax.set_xlabel(AXIS_LABEL.get(x, x))
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.tight_layout()
        path = os.path.join(run_dir, f"{stem}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(path)
    return files


# -- comparison ------------------------------------------------------------------------------------
# The record format of the YAML sweeps (kinds decode and prefix_sharing: records without a
# "measurement" field); the benches declare theirs in lab.bench.BENCHES.
DECODE = benches.Measurement(("backend", "path") + tuple(GRID_AXES),
                           (("us_median", "time"), ("gbs", "GB/s")),
                           compare=("us_median", "gbs"), x="context")


def schema_of(name: str | None) -> benches.Measurement | None:
    return DECODE if name is None else benches.measurement(name)


def _points(run: str) -> dict:
    """(measurement, point) -> record, for the measured records of a run."""
    out = {}
    for r in read_records(run):
        name = r.get("measurement")
        schema = schema_of(name)
        if r.get("status") == "ok" and schema is not None:
            out[(name,) + tuple(json.dumps(r.get(k)) for k in schema.params)] = r
    return out


def compare(run_a: str, run_b: str) -> tuple[str, int]:
    """Markdown tables of B/A ratios for the points both runs measured, one per measurement
    (matching points on the measurement's params); (text, matched)."""
    a, b = _points(run_a), _points(run_b)
    common = [k for k in a if k in b]
    lines = [f"A = {run_a}", f"B = {run_b}"]
    for name in dict.fromkeys(k[0] for k in common):
        schema = schema_of(name)
        keys = [k for k in common if k[0] == name]
        rows = [a[k] for k in keys]
        var = [p for p in schema.params
               if p in ("backend", "path") or len({json.dumps(r.get(p)) for r in rows}) > 1]
        head = [AXIS_LABEL.get(p, p) for p in var]
        for _, label in schema.compared():
            head += [f"A {label}", f"B {label}", f"{label} B/A"]
        lines += [""] + ([f"{name}:"] if name else []) + [
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in keys:
            ra, rb = a[k], b[k]
            cells = [_fmt(ra.get(p)) for p in var]
            for m, _ in schema.compared():
                va, vb = ra.get(m), rb.get(m)
                ok = isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va
                cells += [_fmt(va, ".4g"), _fmt(vb, ".4g"), _fmt(vb / va if ok else None, ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
    only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
    lines.append("")
    lines.append(f"{len(common)} matched point(s); {only_a} only in A, {only_b} only in B.")
    return "\n".join(lines), len(common)


# -- bench runs ------------------------------------------------------------------------------------
def bench_table(rows: list[dict], name: str) -> str:
    """A markdown table of one measurement's records: the params that vary, then its metrics."""
    schema = schema_of(name)
    ok = [r for r in rows if r.get("measurement") == name and r.get("status") == "ok"]
    if not ok or schema is None:
        return ""
    var = [p for p in schema.params
           if p in ("backend", "path") or len({json.dumps(r.get(p)) for r in ok}) > 1]
    metrics = [(k, label) for k, label in schema.metrics if any(r.get(k) is not None for r in ok)]
    head = [AXIS_LABEL.get(p, p) for p in var] + [label for _, label in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        lines.append("| " + " | ".join([_fmt(r.get(p)) for p in var]
                                       + [_fmt(r.get(k), ".4g") for k, _ in metrics]) + " |")
    fixed = {p: ok[0].get(p) for p in schema.params if p not in var and p in ok[0]}
    lead = ("Fixed: " + ", ".join(f"{AXIS_LABEL.get(p, p)}={v}" for p, v in fixed.items())
            + ".\n\n") if fixed else ""
    return lead + "\n".join(lines) + "\n"


def bench_summary(meta: dict, rows: list[dict], plots: list[str], notes: list[str]) -> str:
    out = io.StringIO()
    w = out.write
    w(f"# {meta['name']} ({meta['started']})\n\n")
    if meta.get("description"):
        w(meta["description"].strip() + "\n\n")
    w(f"Bench: `{meta['bench']}`. Command: `{meta['command']}`\n\n")
    if meta["devices"]:
        w("Devices: " + "; ".join(f"{b}: {d}" for b, d in meta["devices"].items()) + "\n\n")
    w("Options: " + ", ".join(f"{k}={v}" for k, v in meta["options"].items()) + "\n")
    for name in dict.fromkeys(r.get("measurement") for r in rows):
        table = bench_table(rows, name)
        if table:
            w(f"\n## {name}\n\n{table}")
    if notes:
        w("\nNotes:\n" + "".join(f"- {n}\n" for n in notes))
    if plots:
        w("\nPlots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in plots) + "\n")
    return out.getvalue()


def bench_plots(run_dir: str, rows: list[dict]) -> list[str]:
    """One PNG per measurement with an x param of two or more values: its headline metric vs x,
    one line per combination of the other params that vary."""
    files = []
    for name in dict.fromkeys(r.get("measurement") for r in rows):
        schema = schema_of(name)
        ok = [r for r in rows if r.get("measurement") == name and r.get("status") == "ok"]
        if schema is None or schema.x is None or not ok:
            continue
        key, label = schema.metrics[0]
        data = [r for r in ok if isinstance(r.get(key), (int, float))
                and isinstance(r.get(schema.x), (int, float))]
        if len({r[schema.x] for r in data}) < 2:
            continue
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        others = [p for p in schema.params if p != schema.x
                  and len({json.dumps(r.get(p)) for r in data}) > 1]
        lines: dict = {}
        for r in data:
            line = " ".join(f"{AXIS_LABEL.get(p, p)}={r.get(p)}" for p in others) or name
            lines.setdefault(line, []).append((r[schema.x], r[key]))
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for line, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=line)
        xs = [r[schema.x] for r in data]
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(AXIS_LABEL.get(schema.x, schema.x))
        ax.set_ylabel(label)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = os.path.join(run_dir, f"{name.replace('.', '-')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
