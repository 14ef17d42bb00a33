"""Backend discovery: which backends this machine can run, and how to get one.

Each backend module exposes `probe() -> str | None` (None when usable, else what is missing
and how to install it), `Backend` (a PagedAttention subclass) and `KNOWN_PATHS` (every path
it has on some device; experiment files are validated against them). Probing is cached per
process because some probes are expensive (Vulkan probes in a subprocess).
"""
from __future__ import annotations

import functools
import importlib

from .errors import BackendUnavailable
from .interface import PagedAttention

BACKENDS: dict[str, str] = {
    "numpy": "paged_attention.backends.numpy_backend",
    "mlx": "paged_attention.backends.mlx",
    "vulkan": "paged_attention.backends.vulkan",
}


def register_backend(name: str, module: str) -> None:
    """Make an out-of-tree backend module (with `probe` and `Backend`) visible to the registry."""
    BACKENDS[name] = module
    unavailable_reason.cache_clear()


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here, else a sentence saying what is missing."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}"
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        return f"cannot import {BACKENDS[name]} ({exc}); install the '{name}' extra: pip install -e '.[{name}]'"
    probe = getattr(module, "probe", None)
    if probe is None:
        return f"{BACKENDS[name]} defines no probe(); it is not a complete backend module"
    return probe()


def known_paths(name: str) -> tuple[str, ...]:
    """Every path backend `name` has on some device (its module's KNOWN_PATHS), without creating
    the backend or importing its array library; () when the module cannot be imported."""
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError:
        return ()
    return tuple(getattr(module, "KNOWN_PATHS", ()))


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in registry order."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def get_backend(name: str) -> PagedAttention:
    """A new instance of backend `name`; raises BackendUnavailable saying what is missing."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return importlib.import_module(BACKENDS[name]).Backend()
