"""Every environment variable the package reads, under the one prefix PAGED_ATTENTION_, read once
into a frozen `Settings` (README, "Settings" table).

Code reads `settings.get().<field>`; the environment is parsed on the first call only, so hot
paths never touch `os.environ`. Tests change settings with `settings.override(field=value)`
(a context manager), or `settings.reload()` after editing the environment.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, fields, replace
from typing import Iterator, Mapping

from .errors import InvalidInput

PREFIX = "PAGED_ATTENTION_"


@dataclass(frozen=True)
class Settings:
    # field: (environment variable after the prefix) documented in the README table
    path: str | None = None                 # PATH: force path="auto" to this path
    selector_dir: str | None = None         # SELECTOR_DIR: where calibration tables live
    mlx_compute_units: int | None = None    # MLX_COMPUTE_UNITS: SMs/cores for split-K
    mlx_variant: str = ""                   # MLX_VARIANT: fused kernel variant, e.g. pf1i4
    mlx_splitk: str = ""                    # MLX_SPLITK: off | N partitions
    vk_device: int = 0                      # VK_DEVICE: Vulkan physical device index
    vk_probe_timeout_s: float = 60.0        # VK_PROBE_TIMEOUT: seconds for the device probe
    vk_compute_units: int | None = None     # VK_CUS
    vk_chunk: int | None = None             # VK_CHUNK: split-K tokens per split
    vk_tpt: int | None = None               # VK_TPT: threads per token
    vk_wg: int | None = None                # VK_WG: workgroup size
    vk_unroll: int | None = None            # VK_U: token loop unroll
    vk_query_tile: int | None = None        # VK_QT: prefill queries per workgroup (1: per query)
    vk_split_occupancy: float = 2.0         # VK_SPLIT_OCC: split-K workgroups per compute unit
    vk_stock_barriers: int = 0              # VK_STOCK_BARRIERS: 1 records Kompute's own barriers
    vk_spin_us: int = 2000                  # VK_SPIN_US: poll a submission's fence this long before sleeping
    vk_host_io: int = 1                     # VK_HOST_IO: 0 copies q/k/v/out through device buffers

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = PREFIX + ENV_NAMES[f.name]
            raw = env.get(name, "").strip()
            if not raw:
                continue
            kind = f.type.split(" ")[0] if isinstance(f.type, str) else f.type.__name__
            try:
                values[f.name] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError:
                raise InvalidInput(f"${name}: expected {kind}, got {raw!r}") from None
        return cls(**values)


ENV_NAMES = {
    "path": "PATH", "selector_dir": "SELECTOR_DIR", "mlx_compute_units": "MLX_COMPUTE_UNITS",
    "mlx_variant": "MLX_VARIANT", "mlx_splitk": "MLX_SPLITK", "vk_device": "VK_DEVICE",
    "vk_probe_timeout_s": "VK_PROBE_TIMEOUT", "vk_compute_units": "VK_CUS", "vk_chunk": "VK_CHUNK",
    "vk_tpt": "VK_TPT", "vk_wg": "VK_WG", "vk_unroll": "VK_U", "vk_query_tile": "VK_QT",
    "vk_split_occupancy": "VK_SPLIT_OCC", "vk_stock_barriers": "VK_STOCK_BARRIERS",
    "vk_spin_us": "VK_SPIN_US", "vk_host_io": "VK_HOST_IO",
}

_lock = threading.Lock()
_current: Settings | None = None


def get() -> Settings:
    """The process's settings, parsed from the environment on first use."""
    global _current
    s = _current
    if s is None:
        with _lock:
            if _current is None:
                _current = Settings.load()
            s = _current
    return s


def reload() -> Settings:
    """Parse the environment again (after a test or a launcher changed it)."""
    global _current
    with _lock:
        _current = Settings.load()
        return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Within the block, `get()` returns the current settings with `changes` applied."""
    global _current
    before = get()
    with _lock:
        _current = replace(before, **changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = before
