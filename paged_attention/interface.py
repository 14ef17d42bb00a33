"""The backend-neutral contract: `KVPool` and `PagedAttention`.

A backend subclasses both and implements the underscored hooks (listed in hooks.py). The public
methods here own validation and path resolution (paths.py), so every backend rejects bad input
identically and before any of its kernels run.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import host_arrays
from .capabilities import LabCapabilities
from .errors import InvalidInput, UnsupportedPath
from .hooks import BackendHooks
from .paths import PathResolution
from .validation import (FLOAT_DTYPES, PLAIN, PoolSpec, StepArgs, Variant, check_copy_pairs,
                         check_kv, check_num_q_heads, check_pool_spec, check_prefill, check_q,
                         check_query_lens, check_sinks, check_slots, check_states, check_tables,
                         check_variant, check_write, dtype_name)

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

    kv_format = property(lambda self: self.spec.kv_format)

    @abstractmethod
    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies (k, v), each [num_blocks, block_size, Hkv, D] in the pool's dtype
        (bfloat16 pools come back as float32). A quantized pool returns its DEQUANTIZED values
        (float32, the format's reference arithmetic: what attention reads), not its storage."""

    def __repr__(self) -> str:
        s = self.spec
        fmt = "" if s.kv_format is None else f", kv_format={s.kv_format.describe()!r}"
        return (f"{type(self).__name__}(num_blocks={s.num_blocks}, block_size={s.block_size}, "
                f"num_kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, dtype={s.dtype!r}{fmt})")


@dataclass(frozen=True, eq=False)
class Plan:
    """What `PagedAttention.plan` decided for one step, per sequence: validated host inputs, the
    resolved path and the backend's own metadata built from them. Immutable; pass it to `run`
    once per layer. Nothing here is per query row: a 2k-token prompt chunk is one table row.

    spec          the pool geometry every layer of the step shares (PoolSpec)
    path          the resolved path ('auto' already decided)
    args          the validated step (StepArgs); its arrays are exposed below, read-only:
    block_tables  int32 [B, max_blocks]: each sequence's blocks
    context_lens  int32 [B]: each sequence's cached tokens, this step's new ones included
    qo_indptr     int32 [B + 1]: sequence b's queries are rows [qo_indptr[b], qo_indptr[b+1])
                  of q and of the output (FlashInfer's name)
    query_lens    int32 [B]: np.diff(qo_indptr)
    batch, num_q_heads, num_rows   B, Hq and N = qo_indptr[B]: q and the output are [N, Hq, D]
    slots         int64 [S] slots the new k/v rows of `run` are written to, or None
    device        what the backend's metadata builder (`_prepare`) derived from the above:
                  uploaded tables, kernel choices; None where it needs nothing
    """

    backend: "PagedAttention" = field(repr=False)
    spec: PoolSpec
    path: str
    args: StepArgs = field(repr=False)
    slots: np.ndarray | None = field(repr=False)
    device: Any = field(default=None, repr=False)
    q_shape: tuple = field(default=(), repr=False)    # (N, Hq, D): run()'s q and output
    kv_shape: tuple | None = field(default=None, repr=False)  # (S, Hkv, D), None: no writes

    batch = property(lambda self: self.args.batch)
    num_q_heads = property(lambda self: self.args.num_q_heads)
    num_rows = property(lambda self: self.q_shape[0])
    block_tables = property(lambda self: self.args.block_tables)
    context_lens = property(lambda self: self.args.context_lens)
    qo_indptr = property(lambda self: self.args.qo_indptr)

    @property
    def query_lens(self) -> np.ndarray:
        return _frozen(self.args.query_lens)

    def __repr__(self) -> str:
        return (f"Plan(backend={self.backend.name!r}, path={self.path!r}, batch={self.batch}, "
                f"rows={self.num_rows}, num_q_heads={self.num_q_heads}, spec={self.spec})")


_SPECS: dict = {}


@functools.lru_cache(maxsize=None)
def _float_only(dtypes: tuple) -> tuple:
    return tuple(d for d in dtypes if d in FLOAT_DTYPES)  # run() asks per layer: computed once


def _shape(x) -> tuple | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def _frozen(a):
    if isinstance(a, np.ndarray):
        a.flags.writeable = False
    return a


@dataclass
class LayerStep:
    """One layer's share of a decode step: its query, its pool and the new tokens' K/V [N, Hkv, D]."""

    q: Any
    pool: KVPool
    k: Any
    v: Any


class PagedAttention(PathResolution, LabCapabilities, BackendHooks):
    """Paged decode attention on one backend.

    Data-oriented like vLLM/FlashInfer kernels: plain arrays in, array out. Allocation and
    sharing of blocks live in `BlockManager`, never here. The one class a backend subclasses;
    three parts of it live in their own modules: the underscored hooks a backend implements
    (hooks.py), path resolution (`resolve_path`, the `*_reason` methods, `selector`; paths.py)
    and the lab's capabilities with their defaults (`synchronize`, `device_time`, ...;
    capabilities.py).
    """

    name: str = "abstract"
    paths: tuple[str, ...] = ()
    # path -> the attention features (Variant.features(), 'sinks') it implements (ADR 0010);
    # 'auto' steps around a path lacking one the plan uses, an explicit path is refused.
    variants: dict[str, frozenset] = {}
    # path -> the quantized KV formats (create_pool's kv_dtype, ADR 0011) it reads; every path
    # reads plain pools. 'auto' steps around a path that cannot read a step's pools, an explicit
    # one is refused by name, and create_pool refuses a format no path here reads.
    kv_formats: dict[str, frozenset] = {}
    # True when a quantized pool stores exactly the reference arithmetic's values
    # (kv_formats.KVFormat.quantize). A device that quantizes with its own float division may
    # break a rounding tie the other way: a group's scale or a code one step apart (ADR 0011).
    kv_quantization_exact: bool = True
    pool_dtypes: tuple[str, ...] = ("float16", "float32")
    q_dtypes: tuple[str, ...] = FLOAT_DTYPES

    @property
    def kv_dtypes(self) -> tuple[str, ...]:
        """dtypes write_kv accepts for new k/v: the float dtypes the backend also takes for q
        (a backend that cannot read bfloat16 arrays must reject them before writing anything)."""
        return _float_only(self.q_dtypes)

    @property
    @abstractmethod
    def device(self) -> str:
        """Human-readable device, e.g. 'cpu', 'NVIDIA H100 80GB HBM3', 'llvmpipe (LLVM 15.0.6, 256 bits)'."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._call_lock = threading.RLock()  # see _serialized: public calls are thread-safe
        self._pool_token = object()          # marks the pools this instance created
        self._resolved_paths: dict = {}      # see paths.PathResolution.resolve_path
        return self

    # -- pools ---------------------------------------------------------------------------------
    @_serialized
    def create_pool(self, num_blocks, block_size, num_kv_heads, head_dim, dtype="float16", *,
                    kv_dtype=None, kv_group_size=64, k_scale=1.0, v_scale=1.0) -> KVPool:
        """A zero-filled pool pair for one layer.

        dtype: the compute dtype of q, the output and (quantized pools) the scales.
        kv_dtype: None (K/V stored in `dtype`), "int8" or "int4" (MLX's affine group
            quantization along head_dim, kv_group_size 32/64/128 elements per scale and bias),
            "float8_e4m3" (vLLM's fp8: stored = e4m3fn(k / k_scale), read as stored * k_scale;
            likewise V with v_scale). Writes quantize; attention reads the dequantized values.
            See paged_attention.kv_formats and ADR 0011.
        """
        spec = check_pool_spec(num_blocks, block_size, num_kv_heads, head_dim, dtype,
                               self.pool_dtypes, kv_dtype, kv_group_size, k_scale, v_scale)
        if spec.kv_dtype is not None and not self.paths_reading(spec.kv_dtype):
            raise InvalidInput(f"kv_dtype: backend {self.name!r} has no path that reads "
                               f"{spec.kv_dtype!r} pools here (formats by path: "
                               f"{ {p: sorted(self.kv_formats.get(p, ())) for p in self.paths} })")
        # One object per geometry: run() then matches a layer's pool to its plan by identity
        # (a dataclass __eq__ per layer costs more than every other check of run()).
        spec = _SPECS.setdefault(spec, spec)
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

    # -- attention: plan once per step, run once per layer -------------------------------------
    @_serialized
    def plan(self, pool: KVPool, block_tables, context_lens, *, num_q_heads: int,
             query_lens=None, slot_mapping=None, scale=None, window=None,
             soft_cap=None, alibi_slopes=None, return_lse: bool = False,
             path: str = "auto") -> Plan:
        """Decide a step once: validate its tables, resolve the path, upload what every layer shares.

        pool: any pool of the step's geometry (every layer's pool must share it).
        block_tables: int [B, max_blocks]; entries past ceil(context_lens[b] / block_size) are ignored.
        context_lens: int [B], every cached token of sequence b including this step's new ones.
        num_q_heads: Hq, a multiple of the pool's num_kv_heads.
        query_lens: int [B] (default all 1): sequence b contributes query_lens[b] consecutive query
            rows, its newest tokens; q is [sum(query_lens), Hq, D], sequences in order. Query j of
            sequence b sees positions < context_lens[b] - query_lens[b] + j + 1 (causal), so one
            batch can mix decode rows and prefill chunks.
        slot_mapping: int [S] distinct slots where `run(..., k, v)` writes k, v [S, Hkv, D].
        window: each query sees only its last `window` positions. scale: default 1/sqrt(D).
        soft_cap, alibi_slopes, return_lse: the attention variant (ADR 0010). Logits are
            s = scale * q.k; soft_cap (float > 0): s = soft_cap * tanh(s / soft_cap);
            alibi_slopes (float [Hq]): s += slope[h] * (key_pos - query_pos), after the cap;
            return_lse: run() returns (out, lse) with lse float32 [N, Hq] the NATURAL log of each
            row's softmax denominator (FlashInfer and TensorRT-LLM return base 2).
        Raises InvalidInput (naming the argument) or UnsupportedPath before anything is touched.
        """
        self._check_pool(pool)
        hq = check_num_q_heads(pool.spec, num_q_heads)
        return self._make_plan(pool.spec, block_tables, context_lens, hq, query_lens,
                               slot_mapping, scale, window, path,
                               variant=PLAIN if soft_cap is None and alibi_slopes is None and
                               return_lse is False else
                               check_variant(soft_cap, alibi_slopes, return_lse, hq))

    def run(self, plan: Plan, q, pool: KVPool, k=None, v=None, *, sinks=None):
        """One layer of a planned step: write k, v at the plan's slot_mapping (if given), then attend.

        q: [N, Hq, D] with N = plan.num_rows; k, v: [S, Hkv, D]. Only O(1) checks run here (the
        plan's owner, the pool's geometry, shapes and dtypes): no host sync, no per-block work.
        sinks: float [Hq], this layer's attention sinks (gpt-oss): exp(sinks[h]) joins each
        softmax denominator as a key with no value (Hq values are read on the host).
        Returns [N, Hq, D] in q's dtype, as this backend's array type (`array_type`); with the
        plan's return_lse, (out, lse): lse float32 [N, Hq], the natural log of each row's
        denominator, sinks included (-inf, or sinks[h], for a row that sees nothing).
        """
        with self._call_lock:
            self._check_run(plan, q, pool, k, v)
            if sinks is None and plan.args.variant is PLAIN:   # the plain kernels, unchanged
                return self._run(plan, q, pool, k, v)
            if sinks is not None:
                if "sinks" not in self.variants.get(plan.path, ()):
                    raise UnsupportedPath(self._variant_reason(plan.path, ("sinks",)))
                sinks = check_sinks(sinks, plan.num_q_heads)
            out, lse = self._run_variant(plan, q, pool, k, v, sinks)
            return (out, lse) if plan.args.variant.return_lse else out

    @_serialized
    def merge_states(self, out_a, lse_a, out_b, lse_b):
        """Attention over the union of two disjoint key sets from the partial results of each:
        out_x [N, Hq, D] and lse_x [N, Hq] (natural log, as run() returns with return_lse).
        Returns (out in out_a's dtype, lse float32), this backend's arrays. (Give sinks to one
        of the two calls only: each partial result counts the sinks it was given.)"""
        check_states(out_a, lse_a, out_b, lse_b, self.q_dtypes)
        return self._merge_states(out_a, lse_a, out_b, lse_b)

    @_serialized
    def decode(self, q, pool: KVPool, block_tables, context_lens, *, scale=None, window=None,
               path: str = "auto"):
        """Decode attention for one new token per sequence: plan + run of one layer.

        q: [B, Hq, D] (Hq a multiple of the pool's Hkv); block_tables: int32 [B, max_blocks];
        context_lens: int32 [B], each <= max_blocks * block_size; window: attend to the last
        `window` positions only. Returns [B, Hq, D] in q's dtype (`array_type`).
        """
        self._check_pool(pool)
        batch, hq = check_q(q, pool.spec, self.q_dtypes)
        plan = self._make_plan(pool.spec, block_tables, context_lens, hq, None, None, scale,
                               window, path, batch=batch)
        return self._run(plan, q, pool, None, None)

    @_serialized
    def prefill(self, q, pool: KVPool, block_table, start_pos: int = 0, *, scale=None, window=None,
                path: str = "auto"):
        """Causal attention for a prompt chunk of one sequence, over its own (possibly shared) blocks.

        q: [T, Hq, D], the queries of positions [start_pos, start_pos + T), whose K/V must already
        be written (`write_kv`); positions < start_pos may sit in prefix-cached blocks. block_table:
        int [max_blocks]. Returns [T, Hq, D] in q's dtype. A one-sequence ragged plan.
        """
        self._check_pool(pool)
        t, hq, table = check_prefill(q, pool.spec, block_table, start_pos, self.q_dtypes)
        # An empty chunk sees nothing: context 0 keeps its table out of the id checks, as before.
        plan = self._make_plan(pool.spec, table[None], np.array([start_pos + t if t else 0]), hq,
                               np.array([t]), None, scale, window, path)
        return self._run(plan, q, pool, None, None)

    @_serialized
    def decode_step(self, layers: Sequence[LayerStep], slot_mapping, block_tables, context_lens, *,
                    scale=None, window=None, path: str = "auto") -> list:
        """One decode step across layers: append each layer's new K/V at `slot_mapping`, then
        attend; plan once per distinct pool geometry, run per layer. context_lens already count
        the appended tokens. Every layer is validated before any is written."""
        if not layers:
            raise InvalidInput("layers: expected at least one LayerStep")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerStep):
                raise InvalidInput(f"layers[{i}]: expected a LayerStep, got {type(layer).__name__}")
            self._check_pool(layer.pool)
        # Resolve one path against every geometry first, so 'auto' steps around a path any layer
        # cannot run and an explicit path is refused before any layer is written.
        specs = list(dict.fromkeys(layer.pool.spec for layer in layers))
        q0 = layers[0].q
        batch, hq = check_q(q0, specs[0], self.q_dtypes)
        first = self._make_plan(specs[0], block_tables, context_lens, hq, None, slot_mapping,
                                scale, window, path, batch=batch, more_specs=specs[1:])
        plans = {specs[0]: first}
        for spec in specs[1:]:
            plans[spec] = self._make_plan(spec, block_tables, context_lens, hq, None, slot_mapping,
                                          scale, window, first.path, batch=batch)
        chosen = [plans[layer.pool.spec] for layer in layers]
        for layer, plan in zip(layers, chosen):
            self._check_run(plan, layer.q, layer.pool, layer.k, layer.v)
        return self._decode_step(list(layers), chosen)

    @property
    def array_type(self) -> type:
        """The array type this backend's outputs have (np.ndarray; mx.array on MLX). Inputs may
        be numpy arrays or this type; `to_numpy` turns an output into numpy."""
        return np.ndarray

    def to_numpy(self, x) -> np.ndarray:
        """A host numpy copy of one of this backend's arrays (bfloat16 comes back as float32)."""
        return host_arrays.host(x)

    def _make_plan(self, spec: PoolSpec, block_tables, context_lens, num_q_heads: int, query_lens,
                   slot_mapping, scale, window, path: str, batch: int | None = None,
                   more_specs: Sequence[PoolSpec] = (), variant: Variant = PLAIN) -> Plan:
        args = check_query_lens(query_lens, check_tables(spec, block_tables, context_lens, batch,
                                                         scale, window, num_q_heads))
        if variant is not PLAIN:
            args = dataclasses.replace(args, variant=variant)
        slots = None if slot_mapping is None else check_slots(spec, slot_mapping)
        chosen = self.resolve_path(path, args, spec, *more_specs)
        _frozen(args.block_tables)
        _frozen(args.context_lens)
        if not args.decode_only:   # a decode step's qo_indptr is a shared read-only array
            _frozen(args.qo_indptr)
        plan = Plan(backend=self, spec=spec, path=chosen, args=args,
                    slots=None if slots is None else _frozen(slots),
                    q_shape=(args.num_rows, num_q_heads, spec.head_dim),
                    kv_shape=None if slots is None else (int(slots.shape[0]), spec.num_kv_heads,
                                                         spec.head_dim))
        device = self._prepare(plan)
        if device is not None:   # set once, before anyone else sees the plan (no second copy)
            object.__setattr__(plan, "device", device)
        return plan

    def _check_run(self, plan: Plan, q, pool: KVPool, k, v) -> None:
        """The O(1) checks of `run`: nothing here reads device data or walks a table. The common
        case (arrays of the plan's shapes and accepted dtypes) costs a few attribute reads; the
        full checks run only to name what is wrong."""
        if type(plan) is not Plan or plan.backend is not self:
            raise InvalidInput(f"plan: expected a Plan made by this {self.name!r} backend's plan(), "
                               f"got {type(plan).__name__}")
        if getattr(pool, "_owner_token", None) is not self._pool_token or (
                pool.spec is not plan.spec and pool.spec != plan.spec):
            self._check_pool(pool)
            raise InvalidInput(f"pool: geometry {pool.spec} does not match the plan's {plan.spec}")
        if _shape(q) != plan.q_shape or dtype_name(q) not in self.q_dtypes:
            check_q(q, plan.spec, self.q_dtypes, rows=plan.num_rows, num_q_heads=plan.num_q_heads,
                    form="[N, Hq, D]")
        if k is None and v is None:
            return
        if k is None or v is None:
            raise InvalidInput("k, v: give both new keys and values, or neither")
        if plan.slots is None:
            raise InvalidInput("k, v: the plan has no slot_mapping to write them at; pass "
                               "slot_mapping to plan()")
        kv_dtypes = self.kv_dtypes
        if (_shape(k) != plan.kv_shape or _shape(v) != plan.kv_shape
                or dtype_name(k) not in kv_dtypes or dtype_name(v) not in kv_dtypes):
            check_kv(plan.spec, plan.slots.shape[0], k, v, kv_dtypes)

    def close(self) -> None:
        """Release device resources. The backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
