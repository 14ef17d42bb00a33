"""The hooks a backend implements: `PagedAttention`'s public methods (interface.py) validate
their input, resolve the path and take the instance's lock, then call these underscored methods,
so a hook only ever sees checked arrays, pools of its own and paths it lists.

Abstract: `_create_pool`, `_write_kv`, `_copy_blocks`, `_run` (and the `device` property of
`PagedAttention`). With defaults a backend overrides where its device does better:
`_prepare` (per-step metadata), `_decode_step` (a whole step in one submission),
`_run_variant` (soft-cap, ALiBi, sinks, LSE: ADR 0010), `_merge_states`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from . import host_arrays, reference

if TYPE_CHECKING:   # annotations only: interface.py imports this module
    from .interface import KVPool, LayerStep, Plan
    from .validation import PoolSpec


class BackendHooks(ABC):
    """Base of `PagedAttention`; users subclass `PagedAttention`, which adds the public API."""

    @abstractmethod
    def _create_pool(self, spec: PoolSpec) -> KVPool: ...

    @abstractmethod
    def _write_kv(self, pool: KVPool, slots: np.ndarray, k, v) -> None: ...

    @abstractmethod
    def _copy_blocks(self, pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None: ...

    def _run_variant(self, plan: Plan, q, pool: KVPool, k, v, sinks: np.ndarray | None):
        """One layer of a checked plan whose Variant is not plain, or given sinks (float32 [Hq]
        on the host): returns (out, lse float32 [N, Hq]). Only paths listed in `variants` for
        the features used are ever called."""
        raise NotImplementedError(f"{type(self).__name__} lists variants it does not run")

    def _merge_states(self, out_a, lse_a, out_b, lse_b):
        """merge_states of checked host arrays (backends with device arrays override this)."""
        out, lse = reference.merge_states(host_arrays.host(out_a), host_arrays.host(lse_a),
                                          host_arrays.host(out_b), host_arrays.host(lse_b))
        return host_arrays.cast_out(out, host_arrays.out_dtype(out_a)), lse.astype(np.float32)

    def _prepare(self, plan: Plan) -> Any:
        """The backend's metadata builder: from the plan's sequence-level form (plan.args) to
        what its kernels read (device copies of tables and lengths, per-row indices, kernel
        choices); stored as plan.device. Runs once per plan, never per layer."""
        return None

    @abstractmethod
    def _run(self, plan: Plan, q, pool: KVPool, k, v):
        """One layer of a checked plain plan: write k, v at plan.slots (when given), then attend;
        returns [N, Hq, D] in q's dtype. O(1) host work: everything per step is in plan.device."""

    def _decode_step(self, layers: list[LayerStep], plans: list[Plan]) -> list:
        """Run every layer of a checked step; backends that batch a step into one submission
        override this."""
        return [self._run(p, layer.q, layer.pool, layer.k, layer.v) for layer, p in zip(layers, plans)]
