"""Host-side argument checks shared by every backend.

All checks run before any kernel is dispatched or any pool is touched, so a rejected call
leaves pools and tables exactly as they were. Only the small integer inputs (block tables,
context lengths, slot mappings) are read on the host; q, k and v are checked by shape and
dtype alone so no device array is copied back.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput
from .kv_formats import KVFormat, check_kv_format

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
FLOAT32_MAX = float(np.finfo(np.float32).max)


_DTYPE_NAMES: dict = {}


def dtype_name(x) -> str:
    """'float16' for numpy, MLX ('mlx.core.float16') and plain strings alike. Memoised per dtype
    object: str() of a numpy dtype costs microseconds, and run() asks several times per layer."""
    dt = getattr(x, "dtype", x)
    try:
        return _DTYPE_NAMES[dt]
    except KeyError:
        name = _DTYPE_NAMES[dt] = str(dt).rsplit(".", 1)[-1]
        return name
    except TypeError:  # unhashable: name it without the memo
        return str(dt).rsplit(".", 1)[-1]


def shape_of(x, name: str) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            shape = np.asarray(x).shape
        except Exception as exc:  # noqa: BLE001 - anything not array-like is bad input
            raise InvalidInput(f"{name}: expected an array, got {type(x).__name__}") from exc
    return tuple(int(s) for s in shape)


def host_ints(x, name: str, ndim: int, cast: bool = True) -> np.ndarray:
    """A small integer array on the host as int64 (cast=False: in its own integer dtype),
    checking rank and integrality."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"{name}: expected an integer array, got {type(x).__name__}") from exc
    if arr.ndim != ndim:
        raise InvalidInput(f"{name}: expected {ndim}-D integer array, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":   # (bool is not an integer here)
        raise InvalidInput(f"{name}: expected an integer dtype, got {arr.dtype}")
    return arr.astype(np.int64, copy=False) if cast or not arr.size else arr


@dataclass(frozen=True)
class PoolSpec:
    """Geometry of one layer's K and V pools: each is [num_blocks, block_size, num_kv_heads, head_dim]
    of `dtype`, or, with a `kv_format` (paged_attention.kv_formats), that format's storage of
    them; `dtype` is then the compute dtype of q, the output and the format's scales."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    kv_format: KVFormat | None = None

    @property
    def kv_dtype(self) -> str | None:
        """The quantized format's name (create_pool's kv_dtype), None for a plain pool."""
        return None if self.kv_format is None else self.kv_format.name

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in this pool: K and V, and their scales when quantized."""
        if self.kv_format is None:
            return 2 * self.num_kv_heads * self.head_dim * self.itemsize
        return self.kv_format.bytes_per_token(self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of K plus V (and their scales, when quantized)."""
        return self.num_slots * self.bytes_per_token


def check_pool_spec(num_blocks, block_size, num_kv_heads, head_dim, dtype, supported,
                    kv_dtype=None, kv_group_size=64, k_scale=1.0, v_scale=1.0) -> PoolSpec:
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidInput(f"{name}: expected a positive int, got {value!r}")
    dt = dtype_name(dtype)
    if dt not in supported:
        raise InvalidInput(f"dtype: expected one of {supported}, got {dt!r}")
    fmt = check_kv_format(kv_dtype, kv_group_size, k_scale, v_scale, int(head_dim))
    return PoolSpec(int(num_blocks), int(block_size), int(num_kv_heads), int(head_dim), dt, fmt)


@dataclass(frozen=True, eq=False)
class Variant:
    """The attention a step computes beyond plain softmax(scale * q.k) v (ADR 0010). Logits are
    s = scale * q.k; with `soft_cap` s = soft_cap * tanh(s / soft_cap) (gemma2; FlashInfer's
    logits_soft_cap); with `alibi_slopes` (float32 [Hq]) s += slope[h] * (key_pos - query_pos),
    after the cap. `return_lse`: run() also returns the natural log of each row's softmax
    denominator. Per-layer attention sinks are run()'s argument, not the plan's."""

    soft_cap: float | None = None
    alibi_slopes: np.ndarray | None = None
    return_lse: bool = False

    @property
    def plain(self) -> bool:
        return self.soft_cap is None and self.alibi_slopes is None and not self.return_lse

    def features(self, sinks: bool = False) -> tuple[str, ...]:
        """The names of what this step (and a run with sinks) adds to plain attention."""
        return tuple(n for n, on in (("soft_cap", self.soft_cap is not None),
                                     ("alibi_slopes", self.alibi_slopes is not None),
                                     ("return_lse", self.return_lse), ("sinks", sinks)) if on)


PLAIN = Variant()


def _host_floats(x) -> np.ndarray:
    """x on the host; a bfloat16 array (MLX's, which has no numpy view, or ml_dtypes') widened
    to float32 by its own library, exactly."""
    if dtype_name(x) == "bfloat16":
        lib = sys.modules.get(type(x).__module__.split(".")[0] + ".core")
        if lib is not None and hasattr(lib, "float32"):
            return np.asarray(x.astype(lib.float32))
        return np.asarray(x).astype(np.float32)
    return np.asarray(x)


def _finite_floats(x, name: str, n: int, what: str) -> np.ndarray:
    """A float [n] array on the host, checked: shape, a float dtype, finite values."""
    try:
        arr = _host_floats(x)
    except Exception as exc:  # noqa: BLE001 - not array-like
        raise InvalidInput(f"{name}: expected a float array [{what}={n}], got "
                           f"{type(x).__name__}") from exc
    if arr.shape != (n,):
        raise InvalidInput(f"{name}: expected shape [{what}={n}], got {arr.shape}")
    if arr.dtype.kind != "f":
        raise InvalidInput(f"{name}: expected a float dtype, got {dtype_name(x)}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InvalidInput(f"{name}: expected finite values, entry [{i}] is {arr[i]}")
    return arr


def check_variant(soft_cap, alibi_slopes, return_lse, num_q_heads: int) -> Variant:
    """plan()'s attention-variant arguments -> a Variant (PLAIN when none is set)."""
    if soft_cap is not None:
        if (isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float, np.integer,
                                                                     np.floating))
                or not math.isfinite(soft_cap) or soft_cap <= 0 or soft_cap > FLOAT32_MAX):
            raise InvalidInput(f"soft_cap: expected None or a finite float > 0, got {soft_cap!r}")
        soft_cap = float(soft_cap)
    if alibi_slopes is not None:
        alibi_slopes = _finite_floats(alibi_slopes, "alibi_slopes", num_q_heads, "Hq")
        alibi_slopes.flags.writeable = False
    if not isinstance(return_lse, (bool, np.bool_)):
        raise InvalidInput(f"return_lse: expected a bool, got {return_lse!r}")
    if soft_cap is None and alibi_slopes is None and not return_lse:
        return PLAIN
    return Variant(soft_cap, alibi_slopes, bool(return_lse))


def check_states(out_a, lse_a, out_b, lse_b, out_dtypes=FLOAT_DTYPES) -> None:
    """merge_states' inputs: out_x [N, Hq, D] of one shape and float dtype, lse_x [N, Hq] float
    (shape and dtype only: nothing is read)."""
    want = shape_of(out_a, "out_a")
    if len(want) != 3:
        raise InvalidInput(f"out_a: expected [N, Hq, D], got shape {want}")
    if shape_of(out_b, "out_b") != want:
        raise InvalidInput(f"out_b: expected shape {want} (out_a's), got {shape_of(out_b, 'out_b')}")
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if shape_of(x, name) != want[:2]:
            raise InvalidInput(f"{name}: expected shape [N={want[0]}, Hq={want[1]}], got "
                               f"{shape_of(x, name)}")
    for name, x in (("out_a", out_a), ("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if dtype_name(x) not in out_dtypes:
            raise InvalidInput(f"{name}: expected a float dtype in {out_dtypes}, got {dtype_name(x)}")


def check_sinks(sinks, num_q_heads: int) -> np.ndarray:
    """run()'s per-layer sinks float [Hq] -> float32 [Hq] on the host (Hq values: cheap)."""
    return _finite_floats(sinks, "sinks", num_q_heads, "Hq")


@functools.lru_cache(maxsize=512)
def _decode_indptr(batch: int) -> np.ndarray:
    """qo_indptr of a plain decode step (one query per sequence), made once per batch size."""
    a = np.arange(batch + 1, dtype=np.int32)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, init=False)
class StepArgs:
    """One validated step, per sequence (FlashInfer's form): sequence b owns the query rows
    [qo_indptr[b], qo_indptr[b + 1]) of q, its newest tokens, and query j of it sees positions
    < context_lens[b] - query_lens[b] + j + 1 (causal) through its block table.

    batch         B, the number of sequences
    num_q_heads   Hq
    block_tables  int32 [B, max_blocks]: every entry is a block id of the pool (unused entries
                  that were not are replaced by 0)
    context_lens  int32 [B]: every cached token of sequence b, this step's included
    qo_indptr     int32 [B + 1]: row offsets of each sequence's queries; N = qo_indptr[B]
    scale, window the softmax scale; attend to the last `window` positions only (None: all)
    decode_only   every sequence has exactly one query (plain decode: row b is sequence b)
    """

    batch: int
    num_q_heads: int
    block_tables: np.ndarray
    context_lens: np.ndarray
    scale: float
    window: int | None
    qo_indptr: np.ndarray = None  # type: ignore[assignment]  (default: one query each)
    decode_only: bool = True
    variant: "Variant" = None     # type: ignore[assignment]  (default: plain attention)
    num_rows: int = dataclasses.field(default=0, init=False)

    def __init__(self, batch: int, num_q_heads: int, block_tables: np.ndarray,
                 context_lens: np.ndarray, scale: float, window: int | None,
                 qo_indptr: np.ndarray | None = None, decode_only: bool = True,
                 variant: "Variant | None" = None):
        # plan() makes one per step: the fields go in as one dict (a frozen dataclass's own
        # __init__ sets them one object.__setattr__ at a time, twice the cost).
        object.__setattr__(self, "__dict__", {
            "batch": batch, "num_q_heads": num_q_heads, "block_tables": block_tables,
            "context_lens": context_lens, "scale": scale, "window": window,
            "qo_indptr": _decode_indptr(batch) if qo_indptr is None else qo_indptr,
            "decode_only": decode_only, "variant": PLAIN if variant is None else variant,
            # N, the query rows (rows of q and of the output), taken out of the array once.
            "num_rows": batch if qo_indptr is None else int(qo_indptr[-1])})

    @property
    def query_lens(self) -> np.ndarray:
        """int32 [B]: queries per sequence."""
        return np.diff(self.qo_indptr)

    @property
    def max_context(self) -> int:
        return int(self.context_lens.max()) if self.batch else 0

    def attended_tokens(self) -> np.ndarray:
        """Per-sequence number of positions its newest query attends to (window applied)."""
        if self.window is None:
            return self.context_lens.astype(np.int64)
        return np.minimum(self.context_lens, self.window).astype(np.int64)

    def row_sequences(self) -> np.ndarray:
        """int32 [N]: the sequence each query row belongs to (a derived, per-row index a kernel
        that runs one workgroup per row reads; the tables stay per sequence)."""
        return np.repeat(np.arange(self.batch, dtype=np.int32), self.query_lens)

    def row_context_lens(self) -> np.ndarray:
        """int32 [N]: positions each query row sees (the causal mask applied)."""
        if self.decode_only:
            return self.context_lens
        ql = self.query_lens
        seq = self.row_sequences()
        j = np.arange(seq.size, dtype=np.int64) - self.qo_indptr[:-1][seq]
        return (self.context_lens[seq].astype(np.int64) - ql[seq] + j + 1).astype(np.int32)

    def select(self, seqs: np.ndarray) -> "StepArgs":
        """The sub-step of sequences `seqs` (int indices, in order), their queries in order."""
        seqs = np.asarray(seqs, dtype=np.int64)
        ql = self.query_lens[seqs]
        indptr = np.zeros(seqs.size + 1, np.int32)
        np.cumsum(ql, out=indptr[1:])
        return StepArgs(batch=int(seqs.size), num_q_heads=self.num_q_heads,
                        block_tables=np.ascontiguousarray(self.block_tables[seqs]),
                        context_lens=np.ascontiguousarray(self.context_lens[seqs]),
                        scale=self.scale, window=self.window, qo_indptr=indptr,
                        decode_only=bool(np.all(ql == 1)))


def check_q(q, spec: PoolSpec, q_dtypes=FLOAT_DTYPES, rows: int | None = None,
            num_q_heads: int | None = None, form: str = "[B, Hq, D]") -> tuple[int, int]:
    """O(1) checks of a query array (shape and dtype only: nothing is read); returns (rows, Hq)."""
    q_shape = shape_of(q, "q")
    if len(q_shape) != 3:
        raise InvalidInput(f"q: expected {form}, got shape {q_shape}")
    n, hq, d = q_shape
    if d != spec.head_dim:
        raise InvalidInput(f"q: head_dim {d} does not match the pool's head_dim {spec.head_dim}")
    if hq < 1 or hq % spec.num_kv_heads:
        raise InvalidInput(
            f"q: Hq={hq} must be a positive multiple of the pool's num_kv_heads={spec.num_kv_heads}")
    if num_q_heads is not None and hq != num_q_heads:
        raise InvalidInput(f"q: expected Hq={num_q_heads} (the plan's num_q_heads), got {hq}")
    if rows is not None and n != rows:
        raise InvalidInput(f"q: expected {rows} rows ({form}, rows = sum(query_lens)), got {n}")
    qd = dtype_name(q)
    if qd not in q_dtypes:
        raise InvalidInput(f"q: expected dtype in {q_dtypes}, got {qd}")
    return n, hq


def _out_of_range(a: np.ndarray, n: int) -> bool:
    """Any entry outside [0, n)? One pass for signed ints: negatives read as unsigned are huge."""
    if a.dtype.kind == "i" and a.dtype.itemsize in (4, 8):
        return bool(a.view(np.dtype(f"u{a.dtype.itemsize}")).max() >= n)
    return bool(a.min() < 0 or a.max() >= n)


def check_tables(spec: PoolSpec, block_tables, context_lens, batch: int | None, scale, window,
                 num_q_heads: int) -> StepArgs:
    """Block tables [B, max_blocks], context lengths [B], scale and window (host-side, O(B * max_blocks)).
    `batch` None takes B from the tables."""
    # The table keeps its integer dtype (no int64 copy): it is the one large input, checked once
    # per step, so every pass over it counts (ADR 0007).
    tables = host_ints(block_tables, "block_tables", 2, cast=False)
    lens = host_ints(context_lens, "context_lens", 1, cast=False)
    if batch is None:
        batch = tables.shape[0]
    if tables.shape[0] != batch:
        raise InvalidInput(f"block_tables: expected [B={batch}, max_blocks], got shape {tables.shape}")
    if lens.shape[0] != batch:
        raise InvalidInput(f"context_lens: expected [B={batch}], got shape {lens.shape}")
    capacity = tables.shape[1] * spec.block_size
    if batch and _out_of_range(lens, capacity + 1):
        raise InvalidInput(
            f"context_lens: expected values in [0, {capacity}] (max_blocks {tables.shape[1]} x "
            f"block_size {spec.block_size}), got range [{lens.min()}, {lens.max()}]")
    # Entries past ceil(context / block_size) may hold anything. A table whose every entry is a
    # block id (the usual case) is taken as it is; otherwise the unused entries are zeroed and
    # then every entry must be a block id. Either way every entry a kernel may read is in range.
    masked = tables
    if masked.size and _out_of_range(masked, spec.num_blocks):
        used_blocks = -(-lens.astype(np.int64) // spec.block_size)
        masked = np.where(np.arange(tables.shape[1])[None, :] < used_blocks[:, None], tables, 0)
        if _out_of_range(masked, spec.num_blocks):
            b, j = map(int, np.argwhere((masked < 0) | (masked >= spec.num_blocks))[0])
            raise InvalidInput(
                f"block_tables: entry [{b}, {j}] = {tables[b, j]} is outside [0, {spec.num_blocks})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                               or window < 1):
        raise InvalidInput(f"window: expected None or an int >= 1, got {window!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(spec.head_dim)
    elif (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
          or not (math.isfinite(scale) and scale > 0) or scale > FLOAT32_MAX):
        # Kernels take the scale as float32: larger values would silently become inf.
        raise InvalidInput(f"scale: expected a finite float in (0, {FLOAT32_MAX:.4g}], got {scale!r}")
    return StepArgs(
        batch=batch,
        num_q_heads=num_q_heads,
        # Checked in its own dtype above, then int32; a copy, so the plan never aliases the
        # caller's array.
        block_tables=masked.astype(np.int32, copy=masked is tables),
        context_lens=lens.astype(np.int32),
        scale=float(scale),
        # A window wider than the table's capacity attends to everything, like the capacity:
        # clamping keeps huge windows (>= 2**31) out of kernels' int32/uint32 parameters.
        window=None if window is None else int(min(window, max(capacity, 1))),
    )


def check_decode(q, spec: PoolSpec, block_tables, context_lens, scale, window,
                 q_dtypes=FLOAT_DTYPES) -> StepArgs:
    batch, hq = check_q(q, spec, q_dtypes)
    return check_tables(spec, block_tables, context_lens, batch, scale, window, hq)


def check_num_q_heads(spec: PoolSpec, num_q_heads) -> int:
    if (isinstance(num_q_heads, bool) or not isinstance(num_q_heads, (int, np.integer))
            or num_q_heads < 1 or num_q_heads % spec.num_kv_heads):
        raise InvalidInput(f"num_q_heads: expected a positive multiple of the pool's num_kv_heads="
                           f"{spec.num_kv_heads}, got {num_q_heads!r}")
    return int(num_q_heads)


def check_query_lens(query_lens, args: StepArgs) -> StepArgs:
    """query_lens [B] (None: one query per sequence) -> `args` with its qo_indptr. Each must lie
    in [0, context_lens[b]]: a query's own position is part of its context."""
    if query_lens is None:
        return args
    lens = args.context_lens
    ql = host_ints(query_lens, "query_lens", 1)
    if ql.shape[0] != lens.shape[0]:
        raise InvalidInput(f"query_lens: expected [B={lens.shape[0]}], got shape {ql.shape}")
    if ql.size and (ql.min() < 0 or np.any(ql > lens)):
        b = int(np.argmax((ql < 0) | (ql > lens)))
        raise InvalidInput(f"query_lens: expected 0 <= query_lens[b] <= context_lens[b]; entry [{b}] "
                           f"is {ql[b]} with context_lens[{b}] = {lens[b]}")
    if np.all(ql == 1):
        return args
    if int(ql.sum()) >= 2 ** 31:
        raise InvalidInput(f"query_lens: the step's {int(ql.sum())} query rows exceed int32")
    indptr = np.zeros(ql.size + 1, np.int32)
    np.cumsum(ql, out=indptr[1:])
    return dataclasses.replace(args, qo_indptr=indptr, decode_only=False)


def check_slots(spec: PoolSpec, slot_mapping) -> np.ndarray:
    """slot_mapping [N]: distinct slots inside the pool; int64 [N]."""
    slots = host_ints(slot_mapping, "slot_mapping", 1)
    n = slots.shape[0]
    if n and _out_of_range(slots, spec.num_slots):
        raise InvalidInput(
            f"slot_mapping: expected values in [0, {spec.num_slots}), got range "
            f"[{slots.min()}, {slots.max()}]")
    if n > 1:
        ordered = np.sort(slots)
        if (ordered[1:] == ordered[:-1]).any():
            raise InvalidInput("slot_mapping: slots must be distinct within one call")
    return slots


def check_kv(spec: PoolSpec, n: int, k, v, kv_dtypes=FLOAT_DTYPES) -> None:
    """O(1) checks of new keys/values [N, Hkv, D] (shape and dtype only)."""
    want = (n, spec.num_kv_heads, spec.head_dim)
    for name, x in (("k", k), ("v", v)):
        got = shape_of(x, name)
        if got != want:
            raise InvalidInput(f"{name}: expected shape [N={n}, Hkv={want[1]}, D={want[2]}], got {got}")
        if dtype_name(x) not in kv_dtypes:
            raise InvalidInput(f"{name}: expected a float dtype in {kv_dtypes}, got {dtype_name(x)}")


def check_prefill(q, spec: PoolSpec, block_table, start_pos, q_dtypes=FLOAT_DTYPES
                  ) -> tuple[int, int, np.ndarray]:
    """A prefill call's own checks: q [T, Hq, D], block_table [max_blocks] and a start_pos whose
    chunk fits the table. Returns (T, Hq, table); the table's ids are checked by the plan (the
    chunk is a one-sequence ragged step: query i sees context start_pos + i + 1)."""
    t, hq = check_q(q, spec, q_dtypes, form="[T, Hq, D]")
    table = host_ints(block_table, "block_table", 1)
    if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
        raise InvalidInput(f"start_pos: expected an int >= 0, got {start_pos!r}")
    capacity = table.shape[0] * spec.block_size
    if start_pos + t > capacity:  # also for T = 0: a start past the table is a caller's bug
        raise InvalidInput(f"start_pos + T: {start_pos} + {t} tokens exceed block_table's capacity "
                           f"of {capacity} ({table.shape[0]} blocks x {spec.block_size})")
    return t, hq, table


def check_write(spec: PoolSpec, slot_mapping, k, v, kv_dtypes=FLOAT_DTYPES) -> np.ndarray:
    """Validate a write_kv call; returns the slots as int64 [N]."""
    slots = host_ints(slot_mapping, "slot_mapping", 1)
    check_kv(spec, slots.shape[0], k, v, kv_dtypes)
    return check_slots(spec, slots)


def check_copy_pairs(spec: PoolSpec, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Validate copy_blocks pairs [(src, dst), ...]; returns (src, dst) int64 arrays."""
    try:
        arr = np.asarray(pairs)
    except Exception as exc:  # noqa: BLE001 - ragged or not array-like
        raise InvalidInput(f"pairs: expected integer (src, dst) pairs of shape [P, 2], "
                           f"got {type(pairs).__name__}") from exc
    if arr.size == 0:
        arr = np.zeros((0, 2), dtype=np.int64)
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr)))
        and bool(np.all(arr == np.round(arr))))
    if arr.ndim != 2 or arr.shape[1] != 2 or not integral:
        raise InvalidInput(f"pairs: expected integer (src, dst) pairs of shape [P, 2], got "
                           f"shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and _out_of_range(arr, spec.num_blocks):
        raise InvalidInput(f"pairs: block ids must lie in [0, {spec.num_blocks})")
    src, dst = arr[:, 0], arr[:, 1]
    if np.unique(dst).size != dst.size:
        raise InvalidInput("pairs: each destination block may appear once")
    if np.intersect1d(src, dst).size:
        raise InvalidInput("pairs: a block cannot be both a source and a destination")
    return src, dst
