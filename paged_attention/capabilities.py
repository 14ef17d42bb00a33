"""The capabilities the lab relies on (benchmarks, experiments, soak; ADR 0006), with their
defaults: a mixin of `PagedAttention` (interface.py), which users subclass.

The defaults suit a synchronous host backend; a backend overrides what its device does
differently, so lab code asks for a capability and never for a backend's name.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import devices
from .errors import UnsupportedPath

if TYPE_CHECKING:   # annotations only: interface.py imports this module
    from .interface import KVPool, Plan
    from .validation import PoolSpec, StepArgs


class LabCapabilities:
    """Mixin of `PagedAttention`: the seams below call its hooks (`_check_run`, `_run`,
    `_prepare`, `_auto_path`) and read `name` and `device`."""

    def synchronize(self, outs: Sequence = (), pools: Sequence[KVPool] = ()) -> None:
        """Block until `outs` (arrays this backend returned) and pending writes to `pools` are
        computed. Synchronous backends have nothing to wait for."""

    def submit(self, outs: Sequence = ()) -> None:
        """Start computing `outs` without waiting for them (lazy backends), so the host can
        prepare the next step's plan meanwhile. Synchronous backends have computed them already."""

    def from_numpy(self, x: np.ndarray, dtype: str):
        """`x` as a query array of this backend in `dtype` (16-bit float or float32 on the host;
        bfloat16 becomes float32 where the array type has none)."""
        return np.asarray(x).astype(np.float16 if dtype == "float16" else np.float32)

    def memory_in_use(self) -> int | None:
        """Bytes this backend holds on its device, or None when it cannot tell (host backends and
        lavapipe: their memory is in the process's RSS)."""
        return None

    def release_cached_memory(self) -> None:
        """Give cached allocations back, so that a memory sample measures live memory."""

    def peak_memory_of(self, fn) -> tuple[Any, int | None]:
        """(fn(), the extra bytes at the peak while it ran), or None for the bytes when the
        backend cannot tell."""
        return fn(), None

    @property
    def device_facts(self) -> devices.DeviceFacts:
        """Peak bandwidth, compute units, timestamp period of this device (paged_attention.devices)."""
        return devices.lookup(self.device)

    has_device_timer: bool = False

    def device_time(self, fn) -> tuple[Any, float | None]:
        """(fn(), device seconds of the attention kernels of the last call fn made), None for the
        seconds when this backend has no device timer."""
        return fn(), None

    def dense_attention(self, q, k, v, scale: float):
        """Attention over contiguous K/V [B, Hkv, T, D] (arrays from `from_numpy`) for q
        [B, Hq, D]: the contiguous-cache baseline the lab compares paged paths with."""
        raise UnsupportedPath(f"backend {self.name!r} has no dense attention baseline")

    @property
    def has_dense_attention(self) -> bool:
        return type(self).dense_attention is not LabCapabilities.dense_attention

    # Seams of plan/run for benchmarks that split a step's cost into its parts (lab/e2e.py):
    # each is one of run()'s or plan()'s own steps, named. Not part of a model loop.
    def check_run(self, plan: Plan, q, pool: KVPool, k=None, v=None) -> None:
        """run()'s O(1) checks alone (raises InvalidInput as run() would), nothing executed."""
        self._check_run(plan, q, pool, k, v)

    def run_unchecked(self, plan: Plan, q, pool: KVPool, k=None, v=None):
        """run() without its checks or its lock: the backend's kernel call for a plan already
        checked against these arrays. Wrong inputs are undefined behaviour; single-threaded
        benchmarks only."""
        return self._run(plan, q, pool, k, v)

    def prepare_unchecked(self, plan: Plan, **changes) -> Plan:
        """A copy of `plan` with `changes` (Plan fields) applied and the backend's per-step work
        (plan.device) redone, nothing validated: what a step's new inputs cost the backend
        alone, without plan()'s checks and path choice."""
        plan = dataclasses.replace(plan, device=None, **changes)
        device = self._prepare(plan)
        if device is not None:   # as in _make_plan: set once, before anyone sees the plan
            object.__setattr__(plan, "device", device)
        return plan

    def auto_path(self, args: StepArgs, spec: PoolSpec) -> str:
        """The path `path="auto"` picks for these decode rows on this backend itself (its
        selector table, else its heuristic), ignoring $PAGED_ATTENTION_PATH."""
        return self._auto_path(args, spec)
