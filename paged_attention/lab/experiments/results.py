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
FIELDS = (["experiment", "measurement", "backend", "device", "path", "status", "note"]
          + list(GRID_AXES)
          + ["time_source", "us_median", "us_p10", "us_p90", "host_us_median", "device_us_median",
             "iterations", "pools", "bytes_per_token", "kv_bytes", "gbs", "peak_frac", "vs_dense",
             "extra_mem_mb", "rms", "rms_ok", "rms_vs_plain", "rms_vs_exact", "prefill_ms",
             "tokens_written", "prefix_hit_tokens", "blocks_used", "blocks_no_sharing",
             "memory_saved", "kv_mb_used", "kv_mb_no_sharing", "model", "steps", "prompts",
             "tokens_equal", "first_divergence", "first_divergences", "greedy_s",
             "plain_greedy_s"])

AXIS_LABEL = {"batch": "B", "context": "ctx", "num_q_heads": "Hq", "num_kv_heads": "Hkv",
              "head_dim": "D", "block_size": "block", "dtype": "dtype", "kv_dtype": "kv",
              "kv_group_size": "group", "window": "window", "fragmentation": "tables",
              "layers": "L", "shared_prefix": "shared"}


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
    if set(names) <= set(SWEEP):
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


def _decode_rows(rows: list[dict]) -> list[dict]:
    """The sweep's own records (not a greedy or other measurement's)."""
    return [r for r in rows if not r.get("measurement")]


def quantized(rows: list[dict]) -> bool:
    return any(r.get("kv_dtype") is not None for r in rows)


def markdown_table(rows: list[dict], kind: str = "decode") -> str:
    """A markdown table of the measured rows; parameters fixed across the run are left out
    (`fixed_line` states them). With quantized KV points, three more columns: bytes per token
    and the errors vs plain KV and vs float64 over the unquantized values."""
    ok = [r for r in _decode_rows(rows) if r.get("status") == "ok"]
    if not ok:
        return "(no measured points)\n"
    var = varying_axes(ok)
    fmt_cols = quantized(ok)
    head = ["backend", "path"] + [AXIS_LABEL[a] for a in var]
    if kind == "prefix_sharing":
        head += ["prefill ms", "tokens written", "prefix hit tokens", "blocks used / unshared",
                 "memory saved", "decode us/layer", "GB/s", "RMS"]
    else:
        head += ["us/layer (median)", "p10-p90", "GB/s", "% peak", "x dense", "extra MB", "RMS"]
    if fmt_cols:
        head += ["bytes/token", "RMS vs plain", "RMS vs exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        cells = [r["backend"], r["path"]] + [_fmt(_axis_text(a, r.get(a)) if a == "kv_dtype"
                                                  else r.get(a)) for a in var]
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
        if fmt_cols:
            cells += [_fmt(r.get("bytes_per_token")), _fmt(r.get("rms_vs_plain"), ".1e"),
                      _fmt(r.get("rms_vs_exact"), ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def greedy_table(rows: list[dict]) -> str:
    """The greedy-agreement records as a markdown table ('' when there are none)."""
    ok = [r for r in rows if r.get("measurement") == "greedy" and r.get("status") == "ok"]
    if not ok:
        return ""
    head = ["backend", "path", "kv", "group", "tokens equal", "first divergence",
            "per prompt", "engine s (plain)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        firsts = ", ".join("-" if f is None else str(f) for f in r["first_divergences"])
        lines.append("| " + " | ".join([
            r["backend"], r["path"], r["kv_dtype"], _fmt(r.get("kv_group_size")),
            f"{100 * r['tokens_equal']:.1f}%", _fmt(r.get("first_divergence")), firsts,
            f"{r['greedy_s']:.2f} ({r['plain_greedy_s']:.2f})"]) + " |")
    return "\n".join(lines) + "\n"


def on_cpu(device: str) -> bool:
    """Whether a backend's device string names a CPU (numpy, MLX on the CPU, lavapipe)."""
    d = device.lower()
    return "cpu" in d or "llvmpipe" in d or "lavapipe" in d


def fixed_line(rows: list[dict]) -> str:
    rows = _decode_rows(rows)
    ok = [r for r in rows if r.get("status") == "ok"] or rows
    fx = fixed_axes(ok)
    return ", ".join(f"{AXIS_LABEL[a]}={v}" for a, v in fx.items())


def _shared_legend(fig, row_axes) -> None:
    """One legend for a figure, right of its plots: every label of the row's axes, once."""
    handles, labels = [], []
    for ax in row_axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _summary_head(meta: dict):
    """(buffer, its write) with a run summary's title and description written."""
    out = io.StringIO()
    out.write(f"# {meta['name']} ({meta['started']})\n\n")
    if meta.get("description"):
        out.write(meta["description"].strip() + "\n\n")
    return out, out.write


def summary_markdown(meta: dict, rows: list[dict], plots: list[str], calibration: list[dict]) -> str:
    out, w = _summary_head(meta)
    w(f"Command: `{meta['command']}`\n\n")
    w("Devices: " + "; ".join(f"{b}: {d}" for b, d in meta["devices"].items()) + "\n\n")
    w(f"Fixed: {fixed_line(rows)}. Per-layer time of an L-layer decode step (median over "
      f"{meta['iterations']} timed steps, p10-p90); '(dev)' marks device timestamps, else host "
      f"time. GB/s = K+V bytes attended (quantized KV: with their scales) / time. x dense = "
      f"time / contiguous dense baseline of the same backend. RMS vs the float64 numpy "
      f"reference over what the pool holds (quantized: its dequantized values), on a subsample "
      f"of sequences.")
    if quantized(rows):
        w(" kv: the pool's KV format (plain: K/V in dtype; ADR 0011); bytes/token: one "
          "token's K, V and scales in one layer. RMS vs plain: vs the same path over a plain "
          "pool holding the same values unquantized (what the format costs there); RMS vs "
          "exact: vs float64 attention over those unquantized values (format and kernel "
          "together).")
    cpus = sorted(b for b, d in meta["devices"].items() if on_cpu(d))
    if cpus:
        w(f" **GB/s on a CPU ({', '.join(cpus)}) is reported, not meaningful for speed claims**: "
          f"it measures host arithmetic and caches, not a GPU's memory stream.")
    w("\n\n")
    w(markdown_table(rows, meta.get("kind", "decode")))
    greedy = greedy_table(rows)
    if greedy:
        g = next(r for r in rows if r.get("measurement") == "greedy")
        w(f"\n## Greedy agreement with plain KV\n\nA random {g['model']} model (the "
          f"experiment's greedy.model, float weights), {g['prompts']} prompt(s), {g['steps']} "
          f"greedy steps each through the engine, on plain pools (the model's dtype) and on "
          f"each format; tokens equal: the fraction equal to the plain run's, position by "
          f"position; first divergence: the first step where a prompt's tokens part ('-': "
          f"none). Random weights give many near-ties of the top two logits.\n\n")
        w(greedy)
    bad = [r for r in rows if r.get("status") == "ok" and r.get("rms_ok") is False]
    if bad:
        w(f"\n**{len(bad)} point(s) over the RMS tolerance {meta['rms_tolerance']}.**\n")
    for status, title in (("error", "Errors (unexpected; see results.jsonl)"), ("skipped", "Skipped")):
        skipped = [r for r in rows if r.get("status") == status]
        if skipped:
            w(f"\n{title}:\n")
            seen = set()
            for r in skipped:
                what = f" ({r['measurement']}, {r.get('kv_dtype')})" if r.get("measurement") else ""
                line = f"- {r['backend']} {r.get('path') or ''}{what}: {r['note']}"
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
                    f" {AXIS_LABEL[a]}={_axis_text(a, r.get(a))}" for a in others
                    if not (a == "kv_group_size" and r.get(a) is None))
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
        _shared_legend(fig, axes[0])
        fig.tight_layout()
        path = os.path.join(run_dir, f"{stem}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(path)
    return files


def _axis_text(axis: str, v) -> str:
    return "plain" if axis == "kv_dtype" and v is None else str(v)


def format_plots(run_dir: str, rows: list[dict]) -> list[str]:
    """formats.png: per KV format, grouped by backend/path: bytes per token (x plain), the
    errors vs float64 over the unquantized values and vs plain KV, effective GB/s, and the
    greedy agreement; decode figures at the largest point (B x ctx) each measured."""
    from .greedy import label
    dec = [r for r in _decode_rows(rows) if r.get("status") == "ok"]
    greedy = [r for r in rows if r.get("measurement") == "greedy" and r.get("status") == "ok"]
    if not quantized(dec) and not greedy:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = list(dict.fromkeys(label(r.get("kv_dtype"), r.get("kv_group_size"))
                              for r in dec + greedy))
    fmts.sort(key=lambda f: f != "plain")
    at: dict = {}      # (backend/path, format) -> the row at its largest point
    for r in dec:
        key = (f"{r['backend']}/{r['path']}", label(r.get("kv_dtype"), r.get("kv_group_size")))
        if key not in at or r["batch"] * r["context"] > at[key]["batch"] * at[key]["context"]:
            at[key] = r
    plain_bytes = {k[0]: r["bytes_per_token"] for k, r in at.items()
                   if k[1] == "plain" and r.get("bytes_per_token")}
    panels = [("bytes per token (x plain)",
               {k: r["bytes_per_token"] / plain_bytes[k[0]] for k, r in at.items()
                if k[0] in plain_bytes and r.get("bytes_per_token")}, False),
              ("RMS vs float64, unquantized values",
               {k: r["rms_vs_exact"] for k, r in at.items() if r.get("rms_vs_exact")}, True),
              ("RMS vs plain KV (same path)",
               {k: r["rms_vs_plain"] for k, r in at.items() if r.get("rms_vs_plain")}, True),
              ("effective GB/s (bytes read incl. scales)",
               {k: r["gbs"] for k, r in at.items() if r.get("gbs")}, False),
              ("greedy tokens equal to plain KV (%)",
               {(f"{r['backend']}/{r['path']}", label(r["kv_dtype"], r["kv_group_size"])):
                100 * r["tokens_equal"] for r in greedy}, False)]
    panels = [p for p in panels if p[1]]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1.5, 3.6 * nrows),
                             squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(panels):]:
        ax.set_visible(False)
    series = sorted({k[0] for _, vals, _ in panels for k in vals})
    width = 0.8 / max(1, len(series))
    for ax, (title, vals, logy) in zip(axes[0], panels):
        for i, name in enumerate(series):
            xs = [j + i * width for j, f in enumerate(fmts) if (name, f) in vals]
            ys = [vals[(name, f)] for f in fmts if (name, f) in vals]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fmts))])
        ax.set_xticklabels(fmts, rotation=30, ha="right", fontsize=8)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    _shared_legend(fig, axes[0])
    fig.tight_layout()
    path = os.path.join(run_dir, "formats.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


# -- comparison ------------------------------------------------------------------------------------
# The record format of the YAML sweeps (kinds decode and prefix_sharing: records without a
# "measurement" field); the benches declare theirs in lab.bench.BENCHES.
DECODE = benches.Measurement(("backend", "path") + tuple(GRID_AXES),
                           (("us_median", "time"), ("gbs", "GB/s")),
                           compare=("us_median", "gbs"), x="context")
# A sweep's greedy section (experiments.greedy): one record per backend, path and format.
GREEDY = benches.Measurement(("backend", "path", "kv_dtype", "kv_group_size"),
                             (("tokens_equal", "tokens equal"),
                              ("first_divergence", "first divergence")),
                             compare=("tokens_equal", "first_divergence"))
SWEEP = {None: DECODE, "greedy": GREEDY}


def schema_of(name: str | None) -> benches.Measurement | None:
    return SWEEP[name] if name in SWEEP else benches.measurement(name)


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
    out, w = _summary_head(meta)
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
