"""Per-device tuning table of the fused kernels: which kernel and split-K parameters a device
runs at a given batch size (adr/0004-mlx-fused-kernel.md, "Per-device tuning").

The table (the shipped `tuning.json`, or $PAGED_ATTENTION_TUNING_TABLE) has one row per
(device key of `devices.DEVICES`, backend "mlx" | "vulkan"): a list of rules, the first whose
`max_batch` >= B (or null: any B) applying, each a dict of parameters, plus the provenance of
the row (command, date, versions, the measured grid and times). `paged-attn tune --write`
measures a device and replaces its row, and only its row.

A parameter missing from a rule, and every parameter of a device without a row, takes the
backend's built-in value (the constants next to the kernels); settings (PAGED_ATTENTION_MLX_*,
PAGED_ATTENTION_VK_*) win over the table. This module knows the parameters' names and types,
not their values: the backends own those.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import devices, settings
from .errors import InvalidInput

SHIPPED = Path(__file__).with_name("tuning.json")
BACKENDS = ("mlx", "vulkan")

# What a rule may say, per backend: name -> the types its value may have.
_INT, _NUM, _BOOL = (int,), (int, float), (bool,)
PARAMETERS: dict[str, dict[str, tuple]] = {
    "mlx": {   # backends/mlx/fused.py: the kernel's variant knobs, then the split-K wave model
        "prefetch": _BOOL, "iters": _INT, "stream": _INT, "hf": _BOOL, "ws": _BOOL, "warps": _INT,
        "l2": _INT, "chunk": _INT, "ctas_per_unit": _NUM, "min_part_tokens": _INT,
        "split_tile_cost": _NUM, "split_launch_cost": _NUM, "split_tolerance": _NUM},
    "vulkan": {  # backends/vulkan/geometry.py: decode.comp's shape, then the split geometry
        "wg": _INT, "unroll": _INT, "tpt": _INT, "per_cu": _NUM, "split_occupancy": _NUM,
        "min_chunk": _INT},
}


@dataclass(frozen=True)
class Rule:
    """One rule of a row: its parameters as sorted (name, value) pairs (hashable, so the
    backends key their memoised per-step decisions on it)."""
    max_batch: int | None
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str, default=None):
        for key, value in self.params:
            if key == name:
                return value
        return default

    def as_dict(self) -> dict:
        return dict(self.params)


EMPTY = Rule(None)   # no row: every parameter at its built-in value


def _fail(where: str, what: str) -> InvalidInput:
    return InvalidInput(f"tuning table {where}: {what}")


def parse_rules(backend: str, rules, where: str = "rules") -> tuple[Rule, ...]:
    """A row's rules (a list of {"max_batch": int | null, "params": {...}}) checked against
    PARAMETERS: rising max_batch, a null one only last."""
    if backend not in PARAMETERS:
        raise _fail(where, f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(rules, list) or not rules:
        raise _fail(where, f"expected a non-empty list of rules, got {rules!r}")
    out, last = [], 0
    for i, r in enumerate(rules):
        at = f"{where}[{i}]"
        if not isinstance(r, dict) or set(r) - {"max_batch", "params"}:
            raise _fail(at, f"expected {{'max_batch': int | null, 'params': {{...}}}}, got {r!r}")
        mb, params = r.get("max_batch"), r.get("params", {})
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb <= last):
            raise _fail(at, f"max_batch must be an int > {last} (rules rise) or null, got {mb!r}")
        if mb is None and i != len(rules) - 1:
            raise _fail(at, "max_batch null (any batch) is only allowed on the last rule")
        if not isinstance(params, dict):
            raise _fail(at, f"params must be a dict, got {params!r}")
        for name, value in params.items():
            types = PARAMETERS[backend].get(name)
            if types is None:
                raise _fail(at, f"unknown {backend} parameter {name!r}; expected one of "
                                f"{sorted(PARAMETERS[backend])}")
            if not isinstance(value, types) or (types != _BOOL and isinstance(value, bool)):
                raise _fail(at, f"{name} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
        out.append(Rule(mb, tuple(sorted(params.items()))))
        last = mb or last
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _load(path: str, _stamp) -> tuple[dict, dict]:
    """(document, {(key, backend): rules}); _stamp (mtime, size) reloads a rewritten file."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"tuning table {path}: no such file ($PAGED_ATTENTION_TUNING_TABLE)") \
            from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"tuning table {path}: not JSON: {e}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, dict):
        raise _fail(path, "expected an object with a 'rows' object {device key: {backend: row}}")
    parsed = {}
    for key, per_backend in rows.items():
        for backend, row in (per_backend or {}).items():
            where = f"{path}: rows[{key!r}][{backend!r}]"
            if not isinstance(row, dict) or "rules" not in row:
                raise _fail(where, "expected {'rules': [...], 'provenance': {...}}")
            parsed[(key, backend)] = parse_rules(backend, row["rules"], where)
    return doc, parsed


def table_path() -> str:
    return settings.get().tuning_table or str(SHIPPED)


def load(path: str | None = None) -> tuple[dict, dict]:
    path = path or table_path()
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    return _load(str(path), stamp)


def device_key(device: str) -> str | None:
    """The row a device string reads: $PAGED_ATTENTION_TUNING_DEVICE, else its devices.py key."""
    return settings.get().tuning_device or devices.lookup(device).key


def rules(backend: str, device: str) -> tuple[Rule, ...] | None:
    """The rules of `device`'s row for `backend`, None without a row."""
    return load()[1].get((device_key(device), backend))


def rule(backend: str, device: str, batch: int) -> Rule:
    """The parameters `backend` runs a B=`batch` step with on `device` (a backend's device
    string); EMPTY (built-in values) without a row. Memoised per (device, batch, settings):
    plan() calls it once per step."""
    return _rule(backend, device, int(batch), settings.get())


@functools.lru_cache(maxsize=1024)
def _rule(backend: str, device: str, batch: int, _settings) -> Rule:
    for r in rules(backend, device) or ():
        if r.max_batch is None or r.max_batch >= batch:
            return r
    return EMPTY


def write_row(path: str | Path, key: str, backend: str, rule_list: list[dict],
              provenance: dict) -> None:
    """Replace the (key, backend) row of the table at `path` (created when missing) and
    nothing else; the rules are checked first, so a bad row never reaches the file."""
    if key not in {k for k, *_ in devices.DEVICES}:
        raise InvalidInput(f"device key {key!r} is not a devices.DEVICES key; expected one of "
                           f"{[k for k, *_ in devices.DEVICES]}")
    parse_rules(backend, rule_list, f"new row {key!r}/{backend!r}")
    path = Path(path)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    doc.setdefault("rows", {}).setdefault(key, {})[backend] = {
        "rules": rule_list, "provenance": provenance}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    _load.cache_clear()
    _rule.cache_clear()
