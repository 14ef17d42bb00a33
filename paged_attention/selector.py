"""Choice of decode path for path="auto": a per-device calibration table, else a fixed rule.

`PagedAttention.resolve_path` honours $PAGED_ATTENTION_PATH first; otherwise the backend's
`_auto_path` asks its own `PathSelector` (`backend.selector.choose(args, spec)`; a backend may
override `_auto_path`, and may pass its own rule as `fallback`).

Shape key. A decode call is reduced to (work rows bucket, context bucket, windowed):
  * work rows = batch x num_kv_heads, the number of independent (sequence, KV head) rows the
    kernels spread over the device, rounded up to a power of two;
  * context = the longest attended context (window applied), rounded up to a power of two;
  * windowed = whether a sliding window is set.
The issue's "slab count" (block-table width) is not a separate axis: at a fixed block size the
table width is the context divided by the block size, so it adds nothing to the context bucket.

Calibrated choice. `paged-attn run experiments/selector_calibration.yaml` (or `paged-attn
calibrate`) times every path on a grid and writes, per backend and device, a JSON table
{shape key: {path: seconds per layer}} to
``${XDG_CACHE_HOME:-~/.cache}/paged-attention/selector/<backend>-<device-slug>.json``.
A key found in the table gets its fastest path; a key not in it gets the fastest path of the
nearest calibrated key (distance in log2 space over rows and context, same windowed flag).

Uncalibrated rule (no table for this backend and device, or no entry with the windowed flag):
the backend's `fallback(args, spec)` when given, else the fused kernel when the backend has one
(it reads each K/V byte once, where gather first copies the context), else its first path.

Cost. Each backend instance owns one PathSelector, which caches its decisions per shape key; a cached selection is a
max over the context lengths, two bit_length calls and one dict lookup: the calibration table is
consulted once per shape key (tests/units/test_selector.py counts the lookups over 2001 calls;
it times nothing, a timed test fails on a loaded machine).
"""
from __future__ import annotations

import json
import math
import os
import re
import weakref
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from . import settings
from .validation import StepArgs, PoolSpec

SCHEMA_VERSION = 1
# Live selectors, so that a table written in this process (calibration) resets their decisions.
_selectors: "weakref.WeakSet[PathSelector]" = weakref.WeakSet()

Key = tuple  # (rows bucket, context bucket, windowed)


def pow2_bucket(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def shape_key(args: StepArgs, spec: PoolSpec) -> Key:
    ctx = int(args.context_lens.max()) if args.batch else 0
    if args.window is not None and ctx > args.window:
        ctx = args.window
    return (pow2_bucket(args.batch * spec.num_kv_heads), pow2_bucket(ctx), args.window is not None)


def point_key(batch: int, num_kv_heads: int, context: int, window: int | None) -> Key:
    """The shape key of a uniform-context grid point (what calibration records)."""
    ctx = context if window is None else min(context, window)
    return (pow2_bucket(batch * num_kv_heads), pow2_bucket(ctx), window is not None)


# -- calibration tables -------------------------------------------------------------------------
def cache_dir() -> str:
    """$PAGED_ATTENTION_SELECTOR_DIR if set (tests isolate themselves with it), else the user cache."""
    if settings.get().selector_dir:
        return settings.get().selector_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "paged-attention", "selector")


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:80] or "unknown"


def table_path(backend_name: str, device: str) -> str:
    return os.path.join(cache_dir(), f"{backend_name}-{device_slug(device)}.json")


@dataclass
class CalibrationTable:
    """Measured seconds per layer of each path at each shape key, for one backend and device."""

    backend: str
    device: str
    entries: dict = field(default_factory=dict)   # Key -> {path: seconds}
    meta: dict = field(default_factory=dict)      # how it was measured (experiment, shapes, ...)

    def add(self, key: Key, path: str, seconds: float) -> None:
        """Record a measurement; several measurements of one key and path keep their sum, so
        points sharing a bucket are compared on their total time."""
        slot = self.entries.setdefault(tuple(key), {})
        slot[path] = slot.get(path, 0.0) + float(seconds)

    def best(self, key: Key, paths=None) -> str | None:
        times = self.entries.get(tuple(key), {})
        cands = {p: t for p, t in times.items() if paths is None or p in paths}
        return min(cands, key=cands.get) if cands else None

    def lookup(self, key: Key, paths) -> str | None:
        """Fastest path among `paths` at `key`, or at the nearest calibrated key with the same
        windowed flag that measured at least two of them; None when there is none."""
        paths = tuple(paths)
        exact = self.entries.get(tuple(key))
        if exact and sum(p in exact for p in paths) >= 2:
            return self.best(key, paths)
        rows, ctx, windowed = key
        best_d, best_key = None, None
        for k, times in self.entries.items():
            if k[2] != windowed or sum(p in times for p in paths) < 2:
                continue
            d = math.hypot(math.log2(k[0]) - math.log2(rows), math.log2(k[1]) - math.log2(max(ctx, 1)))
            if best_d is None or (d, k) < (best_d, best_key):
                best_d, best_key = d, k
        return None if best_key is None else self.best(best_key, paths)

    def to_json(self) -> dict:
        return {"schema": SCHEMA_VERSION, "backend": self.backend, "device": self.device,
                "meta": self.meta,
                "entries": [{"rows": k[0], "context": k[1], "windowed": k[2], "seconds": v}
                            for k, v in sorted(self.entries.items())]}

    @classmethod
    def from_json(cls, data: dict) -> "CalibrationTable":
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"calibration schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
        entries = {(int(e["rows"]), int(e["context"]), bool(e["windowed"])):
                   {str(p): float(t) for p, t in e["seconds"].items()} for e in data["entries"]}
        return cls(str(data["backend"]), str(data["device"]), entries, dict(data.get("meta", {})))


def write_table(table: CalibrationTable, path: str | None = None) -> str:
    """Store `table` (atomically) where `choose_path` finds it; returns the file path."""
    path = path or table_path(table.backend, table.device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table.to_json(), f, indent=1)
    os.replace(tmp, path)
    clear_cache()
    return path


def load_table(backend_name: str, device: str) -> CalibrationTable | None:
    """The stored table of this backend and device, or None (missing or unreadable)."""
    try:
        with open(table_path(backend_name, device)) as f:
            return CalibrationTable.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_cache() -> None:
    """Make every live selector forget its table and decisions (after a table changed on disk)."""
    for sel in list(_selectors):
        sel.reset()


# -- the choice ---------------------------------------------------------------------------------
def default_rule(paths) -> str:
    """The uncalibrated rule: fused when present, else the first path."""
    return "fused" if "fused" in paths else paths[0]


_USE_FALLBACK = ""


class PathSelector:
    """The path choice of one backend instance (`backend.selector`): its calibration table,
    loaded on first use, and its decisions by shape key."""

    def __init__(self, backend_name: str, device: str, paths):
        self.backend_name, self.device, self.paths = backend_name, device, tuple(paths)
        self.decisions: dict = {}
        self._table: CalibrationTable | None = None
        self._loaded = False
        _selectors.add(self)

    @property
    def table(self) -> CalibrationTable | None:
        if not self._loaded:
            self._table = (load_table(self.backend_name, self.device) if len(self.paths) > 1
                           else None)
            self._loaded = True
        return self._table

    def reset(self) -> None:
        self._loaded = False
        self.decisions = {}

    def choose(self, args: StepArgs, spec: PoolSpec, *,
               fallback: Callable[[StepArgs, PoolSpec], str] | None = None) -> str:
        """The path for this call (see the module docstring)."""
        key = shape_key(args, spec)
        path = self.decisions.get(key)
        if path is None:
            table = self.table
            path = (table.lookup(key, self.paths) if table else None) or _USE_FALLBACK
            self.decisions[key] = path
        if not path:   # no calibrated answer for this key
            return fallback(args, spec) if fallback else default_rule(self.paths)
        return path


def choose_path(backend, args: StepArgs, spec: PoolSpec, *,
                fallback: Callable[[StepArgs, PoolSpec], str] | None = None) -> str:
    """`backend.selector.choose(...)`: the path `backend` should use for this call."""
    return backend.selector.choose(args, spec, fallback=fallback)


# -- regret ---------------------------------------------------------------------------------------
def regret(measured: dict, choose: Callable[[Key], str | None]) -> list[dict]:
    """Per key of `measured` ({key: {path: seconds}}): the chosen path, the best one and
    regret = time(chosen) / time(best) (1.0 is perfect). Keys with fewer than two paths, or
    whose chosen path was not measured, are left out."""
    rows = []
    for key, times in sorted(measured.items()):
        if len(times) < 2:
            continue
        chosen = choose(key)
        if chosen not in times:
            continue
        best = min(times, key=times.get)
        rows.append({"key": key, "chosen": chosen, "best": best,
                     "regret": times[chosen] / times[best]})
    return rows


def regret_summary(rows: list[dict]) -> dict:
    if not rows:
        return {"points": 0, "max": None, "mean": None, "over_5pct": 0}
    r = [x["regret"] for x in rows]
    return {"points": len(r), "max": max(r), "mean": sum(r) / len(r),
            "over_5pct": sum(x > 1.05 for x in r)}
