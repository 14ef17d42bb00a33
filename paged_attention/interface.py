"""The backend-neutral contract: `KVPool` and `PagedAttention`.

A backend subclasses both and implements the underscored hooks. The public methods here own
validation and path resolution, so every backend rejects bad input identically and before
any of its kernels run.
"""
from __future__ import annotations

import functools
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import InvalidInput, UnsupportedPath
from .validation import (FLOAT_DTYPES, DecodeArgs, PoolSpec, check_copy_pairs, check_decode,
                         check_pool_spec, check_prefill, check_write, dtype_name, shape_of)

PATH_ENV = "PAGED_ATTENTION_PATH"


def _serialized(method):
    """Run a public method under the instance's lock: backends keep per-instance staging buffers
    and device queues that are not thread-safe, so threads sharing a backend take turns."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._call_lock:
            return method(self, *args, **kwargs)
    return wrapper


class KVPool(ABC):
    """One layer's K and V block pools, each [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, spec: PoolSpec, backend_name: str):
        self.spec = spec
        self.backend_name = backend_name

    num_blocks = property(lambda self: self.spec.num_blocks)
    block_size = property(lambda self: self.spec.block_size)
    num_kv_heads = property(lambda self: self.spec.num_kv_heads)
    head_dim = property(lambda self: self.spec.head_dim)
    dtype = property(lambda self: self.spec.dtype)
    nbytes = property(lambda self: self.spec.nbytes)

    @abstractmethod
    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies (k, v), each [num_blocks, block_size, Hkv, D] in the pool's dtype
        (bfloat16 pools come back as float32)."""

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}(num_blocks={s.num_blocks}, block_size={s.block_size}, "
                f"num_kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, dtype={s.dtype!r})")


@dataclass
class LayerStep:
    """One layer's share of a decode step: its query, its pool and the new tokens' K/V [N, Hkv, D]."""

    q: Any
    pool: KVPool
    k: Any
    v: Any


class PagedAttention(ABC):
    """Paged decode attention on one backend.

    Data-oriented like vLLM/FlashInfer kernels: plain arrays in, array out. Allocation and
    sharing of blocks live in `BlockManager`, never here.
    """

    name: str = "abstract"
    paths: tuple[str, ...] = ()
    pool_dtypes: tuple[str, ...] = ("float16", "float32")
    q_dtypes: tuple[str, ...] = FLOAT_DTYPES

    @property
    def kv_dtypes(self) -> tuple[str, ...]:
        """dtypes write_kv accepts for new k/v: the float dtypes the backend also takes for q
        (a backend that cannot read bfloat16 arrays must reject them before writing anything)."""
        return tuple(d for d in self.q_dtypes if d in FLOAT_DTYPES)

    @property
    @abstractmethod
    def device(self) -> str:
        """Human-readable device, e.g. 'cpu', 'NVIDIA H100 80GB HBM3', 'llvmpipe (LLVM 15.0.6, 256 bits)'."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._call_lock = threading.RLock()  # see _serialized: public calls are thread-safe
        self._pool_token = object()          # marks the pools this instance created
        return self

    # -- pools ---------------------------------------------------------------------------------
    @_serialized
    def create_pool(self, num_blocks, block_size, num_kv_heads, head_dim, dtype="float16") -> KVPool:
        """A zero-filled pool pair for one layer."""
        spec = check_pool_spec(num_blocks, block_size, num_kv_heads, head_dim, dtype, self.pool_dtypes)
        pool = self._create_pool(spec)
        pool._owner_token = self._pool_token
        return pool

    @_serialized
    def write_kv(self, pool: KVPool, slot_mapping, k, v) -> None:
        """Store k, v [N, Hkv, D] at slots (slot = block_id * block_size + offset), as vLLM's
        reshape_and_cache. Slots must be distinct and inside the pool."""
        self._check_pool(pool)
        slots = check_write(pool.spec, slot_mapping, k, v, self.kv_dtypes)
        if slots.size:
            self._write_kv(pool, slots, k, v)

    @_serialized
    def copy_blocks(self, pool: KVPool, pairs) -> None:
        """Copy whole blocks (K and V) src -> dst for each (src, dst) pair: the copy-on-write step."""
        self._check_pool(pool)
        src, dst = check_copy_pairs(pool.spec, pairs)
        if src.size:
            self._copy_blocks(pool, src, dst)

    # -- attention -----------------------------------------------------------------------------
    @_serialized
    def decode(self, q, pool: KVPool, block_tables, context_lens, *, scale=None, window=None,
               path: str = "auto"):
        """Decode attention for one new token per sequence.

        q: [B, Hq, D] (Hq a multiple of the pool's Hkv); block_tables: int32 [B, max_blocks];
        context_lens: int32 [B], each <= max_blocks * block_size; window: attend to the last
        `window` positions only. Returns [B, Hq, D] in q's dtype, accepted by np.asarray.
        """
        self._check_pool(pool)
        args = check_decode(q, pool.spec, block_tables, context_lens, scale, window, self.q_dtypes)
        return self._decode(self.resolve_path(path, args, pool.spec), q, pool, args)

    @_serialized
    def prefill(self, q, pool: KVPool, block_table, start_pos: int = 0, *, scale=None, window=None,
                path: str = "auto"):
        """Causal attention for a prompt chunk of one sequence, over its own (possibly shared) blocks.

        q: [T, Hq, D], the queries of positions [start_pos, start_pos + T), whose K/V must already
        be written (`write_kv`); positions < start_pos may sit in prefix-cached blocks. block_table:
        int [max_blocks]. Returns [T, Hq, D] in q's dtype.
        """
        self._check_pool(pool)
        args = check_prefill(q, pool.spec, block_table, start_pos, scale, window, self.q_dtypes)
        return self._prefill(self.resolve_path(path, args, pool.spec), q, pool, args)

    @_serialized
    def decode_step(self, layers: Sequence[LayerStep], slot_mapping, block_tables, context_lens, *,
                    scale=None, window=None, path: str = "auto") -> list:
        """One decode step across layers: append each layer's new K/V at `slot_mapping`, then
        attend. context_lens already count the appended tokens. Every layer is validated before
        any is written. Backends that can batch a whole step into one submission override
        `_decode_step`."""
        if not layers:
            raise InvalidInput("layers: expected at least one LayerStep")
        checked = []
        # Layers share the step's tables: validate them once per distinct (pool geometry, q shape,
        # q dtype), which are the only per-layer inputs check_decode looks at.
        args_by_key: dict = {}
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerStep):
                raise InvalidInput(f"layers[{i}]: expected a LayerStep, got {type(layer).__name__}")
            self._check_pool(layer.pool)
            slots = check_write(layer.pool.spec, slot_mapping, layer.k, layer.v, self.kv_dtypes)
            key = (layer.pool.spec, shape_of(layer.q, "q"), dtype_name(layer.q))
            if key not in args_by_key:
                args_by_key[key] = check_decode(layer.q, layer.pool.spec, block_tables, context_lens,
                                                scale, window, self.q_dtypes)
            checked.append((slots, args_by_key[key]))
        # Every layer's geometry is checked here, before any layer is written.
        specs = list(dict.fromkeys(layer.pool.spec for layer in layers))
        chosen = self.resolve_path(path, checked[0][1], *specs)
        return self._decode_step(list(layers), [c[0] for c in checked], [c[1] for c in checked], chosen)

    @property
    def known_paths(self) -> tuple[str, ...]:
        """Every path this backend has on some device; `paths` is the subset usable here."""
        return self.paths

    def path_unavailable_reason(self, path: str) -> str | None:
        """None when `path` runs here, else why not (used for errors and test skips)."""
        if path in self.paths:
            return None
        return f"path {path!r} is not available on backend {self.name!r} (device {self.device})"

    def shape_unsupported_reason(self, path: str, spec: PoolSpec) -> str | None:
        """None when `path` (available here) handles pools of this geometry, else why not
        (e.g. a kernel limited to some head dims). 'auto' never picks such a path."""
        return None

    def resolve_path(self, path: str, args: DecodeArgs, spec: PoolSpec, *more: PoolSpec) -> str:
        """'auto' -> $PAGED_ATTENTION_PATH if set, else the selector's choice (moved to the first
        path that handles every given pool geometry); explicit paths are checked."""
        auto = False
        if path == "auto":
            path = os.environ.get(PATH_ENV)
            if not path:
                path, auto = self._auto_path(args, spec), True
        if path not in self.paths:
            why = self.path_unavailable_reason(path) if path in self.known_paths else \
                f"unknown path {path!r} for backend {self.name!r}"
            raise UnsupportedPath(f"{why}; available paths: {self.paths}")

        def unsupported(p):
            return next(filter(None, (self.shape_unsupported_reason(p, s) for s in (spec, *more))),
                        None)
        why = unsupported(path)
        if why and auto:
            path = next((p for p in self.paths if not unsupported(p)), path)
            why = unsupported(path)
        if why:
            raise UnsupportedPath(why)
        return path

    def close(self) -> None:
        """Release device resources. The backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hooks for backends --------------------------------------------------------------------
    @abstractmethod
    def _create_pool(self, spec: PoolSpec) -> KVPool: ...

    @abstractmethod
    def _write_kv(self, pool: KVPool, slots: np.ndarray, k, v) -> None: ...

    @abstractmethod
    def _copy_blocks(self, pool: KVPool, src: np.ndarray, dst: np.ndarray) -> None: ...

    @abstractmethod
    def _decode(self, path: str, q, pool: KVPool, args: DecodeArgs): ...

    def _prefill(self, path: str, q, pool: KVPool, args: DecodeArgs):
        # Query i of the chunk is a decode query with context start_pos + i + 1 over the same
        # table, so every decode kernel (and its bounds checks) serves prefill unchanged. It
        # re-reads the prefix once per query: fine for correctness and short prompts; backends
        # with a better kernel override this.
        return self._decode(path, q, pool, args)

    def _decode_step(self, layers: list[LayerStep], slots: list[np.ndarray],
                     args: list[DecodeArgs], path: str) -> list:
        outs = []
        for layer, s, a in zip(layers, slots, args):
            if s.size:
                self._write_kv(layer.pool, s, layer.k, layer.v)
            outs.append(self._decode(path, layer.q, layer.pool, a))
        return outs

    def _auto_path(self, args: DecodeArgs, spec: PoolSpec) -> str:
        from .selector import choose_path
        return choose_path(self, args, spec)

    def _check_pool(self, pool) -> None:
        if not isinstance(pool, KVPool) or getattr(pool, "backend_name", None) != self.name:
            raise InvalidInput(f"pool: expected a KVPool created by backend {self.name!r}, "
                               f"got {type(pool).__name__}")
        if getattr(pool, "_owner_token", self._pool_token) is not self._pool_token:
            # Device pools live in their creator's device context (and die with its close()).
            raise InvalidInput(f"pool: created by another {self.name!r} backend instance; a pool "
                               "can only be used with the instance that created it")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device={self.device!r} paths={self.paths}>"
