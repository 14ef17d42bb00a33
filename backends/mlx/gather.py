"""Gather path: copy the keys and values a step attends to into contiguous arrays, then SDPA.

Simple and always available, but it re-materialises the attended context every step: the cost
the fused kernel removes (adr/0002-gather-vs-fused.md). A step's plan (`GatherPlan`) does every
index computation once: it cuts the ragged rows into SDPA calls (decode rows grouped so that
most calls need no mask, each prompt chunk its own causal call), builds each call's flat row
index into the pools on the device, and picks each call's dtype; every layer then runs one take
of K, one of V and one SDPA per call. Dtypes, masks and when MLX's fused SDPA kernels take a
call: ADR 0002, "Gather in the pool's dtype".
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from paged_attention import settings
from paged_attention.errors import InvalidInput
from paged_attention.validation import StepArgs, Variant

from .arrays import DTYPES, take_wide


DTYPE_MODES = ("auto", "float32", "pool")
# Ragged decode rows where MLX's fused SDPA takes no array mask (CUDA): at most this many SDPA
# calls of equal-length rows per layer (2 takes + 1 SDPA launch each; launch costs: ADR 0004),
# else one masked call in float32. Not yet calibrated on a GPU (ADR 0002).
MAX_LENGTH_GROUPS = 8


def gather_mode() -> str:
    mode = settings.get().mlx_gather_dtype
    if mode not in DTYPE_MODES:
        raise InvalidInput(f"$PAGED_ATTENTION_MLX_GATHER_DTYPE: expected one of {DTYPE_MODES}, "
                           f"got {mode!r}")
    return mode


_FUSED: dict = {}


def has_fused_sdpa(dtype, num_q_heads: int, num_kv_heads: int, queries: int, keys: int,
                   head_dim: int, mask: str | None) -> bool:
    """Whether MLX runs `mx.fast.scaled_dot_product_attention` for q [B, Hq, queries, D] over
    [B, Hkv, keys, D] with this mask kind (None, "causal", "array": a boolean array) as one of
    its fused kernels on the default device. Asked of MLX itself: the call built lazily with
    force_fused=True raises where MLX would run its unfused ops instead (the CPU always).
    Nothing is evaluated. Cached per shape, the key count by powers of two (MLX 0.32's
    thresholds on it, 256 and 1024, and keys >= queries, which every call here meets)."""
    key = (str(mx.default_device()), dtype, num_q_heads, num_kv_heads, queries,
           int(keys).bit_length(), head_dim, mask)
    hit = _FUSED.get(key)
    if hit is None:
        q = mx.zeros((1, num_q_heads, queries, head_dim), dtype)
        k = mx.zeros((1, num_kv_heads, keys, head_dim), dtype)
        m = mx.zeros((1, 1, queries, keys), mx.bool_) if mask == "array" else mask
        try:
            mx.fast.scaled_dot_product_attention(q, k, k, scale=1.0, mask=m, force_fused=True)
            hit = True
        except ValueError:
            hit = False
        _FUSED[key] = hit
    return hit


def sdpa_dtype(pool_dtype, num_q_heads: int, num_kv_heads: int, queries: int, keys: int,
               head_dim: int, mask: str | None) -> tuple:
    """(dtype, fused) of one SDPA call of the gather path: the pool's dtype where MLX runs a
    fused kernel for it (they accumulate q.k and the softmax in float32; `fused`: call with
    force_fused=True, so a wrong guess raises instead of losing precision), else float32: MLX's
    unfused ops compute q.k in the input dtype (fp16: |q.k| > 65504 -> inf -> NaN).
    $PAGED_ATTENTION_MLX_GATHER_DTYPE=float32|pool forces one or the other."""
    mode = gather_mode()
    if pool_dtype == mx.float32 or mode == "float32":
        return mx.float32, False
    if mode == "pool":
        return pool_dtype, False
    if has_fused_sdpa(pool_dtype, num_q_heads, num_kv_heads, queries, keys, head_dim, mask):
        return pool_dtype, True
    return mx.float32, False


def take_blocks(pool, table: mx.array) -> mx.array:
    """pool[table] ([*table.shape, BS, Hkv, D]); a quantized pool's source (backend.py)
    dequantizes only the blocks it takes."""
    take = getattr(pool, "take", None)
    if take is not None:
        return take(table)
    return take_wide(pool.reshape(pool.shape[0], -1), table).reshape(*table.shape,
                                                                        *pool.shape[1:])


def take_rows(pool, index: mx.array) -> mx.array:
    """[*index.shape, D]: rows of the pool seen as [NB * BS * Hkv, D] (row = token * Hkv +
    head); a quantized pool's source dequantizes only the rows it takes."""
    take = getattr(pool, "take_rows", None)
    return take_wide(pool.reshape(-1, pool.shape[-1]), index) if take is None else take(index)


def row_index(tables: np.ndarray, first: np.ndarray, count: np.ndarray, keys: int,
              block_size: int, num_kv_heads: int) -> mx.array:
    """int32 [S, Hkv, keys] pool rows of keys first[s] .. first[s] + count[s] - 1 of each
    table's sequence, head-major, so that one take gives the [S, Hkv, keys, D] layout MLX's SDPA
    reads without another copy; key slots past count[s] repeat the last key (a mask hides
    them). Built on the device from the tables: the host uploads O(blocks), not O(tokens)."""
    j = mx.arange(keys)[None, :]
    pos = mx.array(first.astype(np.int32))[:, None] + \
        mx.minimum(j, mx.array((count - 1).astype(np.int32))[:, None])
    blocks = mx.take_along_axis(mx.array(np.ascontiguousarray(tables, np.int32)),
                                pos // block_size, axis=1)
    token = blocks * block_size + pos % block_size                     # [S, keys]
    return token[:, None, :] * num_kv_heads + mx.arange(num_kv_heads)[None, :, None]


def step_mask(ends: mx.array, span: int, window: int | None) -> mx.array:
    """valid [S, 1, T, span] for queries whose visible positions end at ends int32 [S, T]: made
    once per step, shared by every layer."""
    pos = mx.arange(span)[None, None, :]
    lim = ends[:, :, None]
    valid = pos < lim
    if window is not None:
        valid = valid & (pos >= lim - window)
    return valid[:, None]


def attend_variant(q: mx.array, k_pool: mx.array, v_pool: mx.array, table: mx.array,
                   valid: mx.array, ends: mx.array, scale: float, variant: Variant,
                   sinks: mx.array | None) -> tuple[mx.array, mx.array]:
    """`attend` with the attention variants of ADR 0010 (soft-cap, ALiBi, sinks) and the
    log-sum-exp, written out in float32 (MLX's fused SDPA has neither cap, bias by position nor
    LSE). q [S, Hq, T, D]; ends int32 [S, T] (each query's causal end); sinks float32 [Hq] or
    None. Returns (out [S, Hq, T, D] in q's dtype, lse float32 [S, Hq, T], natural log)."""
    s, hq, t, d = q.shape
    _, block_size, hkv, _ = k_pool.shape
    span = table.shape[1] * block_size
    g = hq // hkv

    def contiguous(pool):
        blocks = take_blocks(pool, table)  # [S, n_blocks, BS, Hkv, D]
        return blocks.reshape(s, span, hkv, d).transpose(0, 2, 1, 3).astype(mx.float32)

    k, v = contiguous(k_pool), contiguous(v_pool)
    qg = q.astype(mx.float32).reshape(s, hkv, g * t, d)         # head h = kv * G + g
    logits = ((qg @ k.transpose(0, 1, 3, 2)) * scale).reshape(s, hq, t, span)
    if variant.soft_cap is not None:
        logits = variant.soft_cap * mx.tanh(logits / variant.soft_cap)
    if variant.alibi_slopes is not None:
        slopes = mx.array(variant.alibi_slopes)[None, :, None, None]
        rel = mx.arange(span)[None, None, None, :] - (ends - 1)[:, None, :, None]
        logits = logits + slopes * rel.astype(mx.float32)
    logits = mx.where(valid, logits, -mx.inf)
    m = logits.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = mx.maximum(m, sinks[None, :, None, None])
    m = mx.where(mx.isinf(m), 0.0, m)       # a row that sees nothing (and has no sink)
    p = mx.exp(logits - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + mx.exp(sinks[None, :, None, None] - m)
    out = (p.reshape(s, hkv, g * t, span) @ v).reshape(s, hq, t, d)
    out = mx.where(denom > 0, out / mx.where(denom > 0, denom, 1.0), 0.0)
    return out.astype(q.dtype), (m + mx.log(denom))[..., 0]


class _Call:
    """One SDPA call of a step: S sequences x T queries each over `keys` gathered keys.

    rows    q's rows (a slice, or an int32 index when the call takes rows out of order), in
            the call's order: sequence-major, query-minor
    index   `row_index` of the keys, [S, Hkv, keys]
    mask    None, "causal" (a prompt chunk: its queries end the keys) or a boolean array
    """

    __slots__ = ("rows", "s", "t", "keys", "index", "mask", "dtype", "fused")

    def __init__(self, rows, s, t, keys, index, mask):
        self.rows, self.s, self.t, self.keys, self.index, self.mask = rows, s, t, keys, index, mask
        self.dtype, self.fused = None, False

    def mask_kind(self):
        return self.mask if self.mask is None or isinstance(self.mask, str) else "array"

    def __call__(self, q: mx.array, k_pool, v_pool, scale: float) -> mx.array:
        """[S * T, Hq, D] in the compute dtype."""
        _, hq, d = q.shape
        rows = q[self.rows] if isinstance(self.rows, slice) else mx.take(q, self.rows, axis=0)
        if self.t == 1:                   # [S, Hq, 1, D] is q's own layout: no transpose
            q4 = rows.reshape(self.s, hq, 1, d)
        else:
            q4 = rows.reshape(self.s, self.t, hq, d).transpose(0, 2, 1, 3)
        dt = self.dtype
        k, v = take_rows(k_pool, self.index), take_rows(v_pool, self.index)
        if k.dtype != dt:
            k, v = k.astype(dt), v.astype(dt)
        kw = {"force_fused": True} if self.fused else {}
        out = mx.fast.scaled_dot_product_attention(q4.astype(dt), k, v, scale=scale,
                                                   mask=self.mask, **kw)
        if self.t != 1:
            out = out.transpose(0, 2, 1, 3)
        return out.reshape(self.s * self.t, hq, d)


def length_groups(count: np.ndarray, pool_dtype, hq: int, hkv: int, d: int) -> list:
    """How decode rows attending count[i] keys become SDPA calls: a list of row-index arrays,
    one unmasked call per length, or [None], one masked call over every row. Rows of one
    length need no mask; otherwise one masked call where MLX fuses a masked SDPA (Metal), else
    a call per length (up to MAX_LENGTH_GROUPS, where MLX fuses the unmasked ones: CUDA), else
    one masked call (unfused, float32)."""
    lengths = np.unique(count)
    if lengths.size <= 1:
        return [np.arange(count.size)]
    if has_fused_sdpa(pool_dtype, hq, hkv, 1, int(lengths[-1]), d, "array"):
        return [None]
    if lengths.size <= MAX_LENGTH_GROUPS and \
            has_fused_sdpa(pool_dtype, hq, hkv, 1, int(lengths[-1]), d, None):
        return [np.flatnonzero(count == n) for n in lengths]
    return [None]


class GatherPlan:
    """A step's rows cut into SDPA calls once; every layer reuses the calls' device indices.

    Decode rows (one query each) see keys [first, end) of their sequence, first = end - window
    where a window cuts. Rows that see the same number of keys share one call with no mask:
    each row's own keys are gathered, so a window is a shorter span, not a mask. Rows of
    different counts share one call padded to the longest with a boolean mask where MLX's fused
    SDPA takes one (Metal); else, where it takes them unmasked (CUDA), one call per count up to
    MAX_LENGTH_GROUPS; else one masked call. A prompt chunk of T queries is one causal call
    over keys [first of its first query, end); a window that cuts inside it is a boolean mask.
    A row that sees nothing gets zeros. Each call's dtype: `sdpa_dtype`, decided once, at plan
    time when the pool's spec is given, else on the first call (from that layer's pools).
    """

    def __init__(self, args: StepArgs, block_size: int, spec=None):
        self.args, self.block_size = args, block_size
        self.scale = args.scale
        self.variant = args.variant
        self.calls: list[_Call] | None = None
        self.order = None          # int32 [N]: output row of each q row, when calls reorder
        self._variant_segments = None
        if spec is not None:
            self._build(DTYPES[spec.dtype], spec.num_kv_heads, spec.head_dim)

    # -- the plain step -------------------------------------------------------------------------
    def _build(self, pool_dtype, hkv: int, d: int) -> None:
        args, bs, hq = self.args, self.block_size, self.args.num_q_heads
        qlens = args.query_lens.astype(np.int64)
        first_row = args.qo_indptr.astype(np.int64)
        window = args.window
        calls, zero_rows, placed = [], [], []     # placed: q rows of each call, in call order

        def call(rows, seqs, t, first, count, keys, mask):
            c = _Call(rows, len(seqs), t, keys,
                      row_index(args.block_tables[seqs], first, count, keys, bs, hkv), mask)
            c.dtype, c.fused = sdpa_dtype(pool_dtype, hq, hkv, t, keys, d, c.mask_kind())
            calls.append(c)

        dec = np.flatnonzero(qlens == 1)
        if dec.size:
            ends = args.context_lens[dec].astype(np.int64)
            first = np.zeros_like(ends) if window is None else np.maximum(0, ends - window)
            count = ends - first
            rows = first_row[dec]
            zero_rows.append(rows[count == 0])
            live = count > 0
            dec, first, count, rows = dec[live], first[live], count[live], rows[live]
            for g in length_groups(count, pool_dtype, hq, hkv, d):
                sel = np.arange(dec.size) if g is None else g
                if not sel.size:
                    continue
                keys = int(count[sel].max())
                mask = None if g is not None else \
                    mx.array((np.arange(keys)[None, :] < count[sel, None])[:, None, None, :])
                r = rows[sel]
                q_rows = slice(int(r[0]), int(r[0]) + r.size) \
                    if np.array_equal(r, np.arange(r[0], r[0] + r.size)) else \
                    mx.array(r.astype(np.int32))
                call(q_rows, dec[sel], 1, first[sel], count[sel], keys, mask)
                placed.append(r)
        for b in np.flatnonzero(qlens > 1):
            t, end = int(qlens[b]), int(args.context_lens[b])
            # Query j sees [end - t + j + 1 - window, end - t + j + 1); the keys start at the
            # first query's first.
            first = 0 if window is None else max(0, end - t + 1 - window)
            keys = end - first
            mask = "causal"     # MLX aligns it to the end of the keys (keys >= t)
            if window is not None and window < end:
                q_pos = np.arange(end - t, end)[:, None]
                k_pos = np.arange(first, end)[None, :]
                mask = mx.array((k_pos <= q_pos) & (k_pos > q_pos - window))
            r0 = int(first_row[b])
            call(slice(r0, r0 + t), np.array([b]), t, np.array([first]), np.array([keys]),
                 keys, mask)
            placed.append(np.arange(r0, r0 + t))
        zero_rows = np.concatenate(zero_rows) if zero_rows else np.zeros(0, np.int64)
        self.zero_rows = int(zero_rows.size)
        order = np.concatenate(placed + [zero_rows]) if placed or zero_rows.size else \
            np.zeros(0, np.int64)
        if not np.array_equal(order, np.arange(order.size)):
            pos = np.empty(order.size, np.int64)     # output row i comes from part row pos[i]
            pos[order] = np.arange(order.size)
            self.order = mx.array(pos.astype(np.int32))
        self.calls = calls

    def __call__(self, q: mx.array, k_pool, v_pool) -> mx.array:
        """q [N, Hq, D] -> [N, Hq, D] in q's dtype."""
        if self.calls is None:
            self._build(k_pool.dtype, k_pool.shape[2], k_pool.shape[3])
        _, hq, d = q.shape
        parts = [c(q, k_pool, v_pool, self.scale).astype(q.dtype) for c in self.calls]
        if self.zero_rows:
            parts.append(mx.zeros((self.zero_rows, hq, d), dtype=q.dtype))
        if not parts:   # no rows at all (sequences with no queries contribute none)
            return mx.zeros(q.shape, dtype=q.dtype)
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        return out if self.order is None else mx.take(out, self.order, axis=0)

    # -- the variant step (ADR 0010): written out in float32 ----------------------------------
    def _segments(self):
        """(row_begin, row_end, sequences, queries per sequence, table, valid, ends) per run of
        one-query sequences or per chunk, made on the first variant call."""
        args, block_size = self.args, self.block_size
        qlens = args.query_lens.astype(np.int64)
        first = args.qo_indptr.astype(np.int64)
        segments = []
        b = 0
        while b < len(qlens):
            e = b + 1
            if qlens[b] == 1:
                while e < len(qlens) and qlens[e] == 1:
                    e += 1
            if qlens[b] > 0:
                r0, r1 = int(first[b]), int(first[e])
                lens = args.context_lens[b:e]
                n_blocks = -(-int(lens.max(initial=0)) // block_size)
                if n_blocks:
                    # A decode run: one query per sequence, each seeing its whole context. A
                    # chunk: T queries of one sequence, query j seeing < context - T + j + 1.
                    ends = lens[:, None] if qlens[b] == 1 else \
                        (lens[0] - qlens[b] + 1 + np.arange(qlens[b]))[None, :].astype(np.int32)
                    ends = mx.array(np.ascontiguousarray(ends))
                    valid = step_mask(ends, n_blocks * block_size, args.window)
                    segments.append((r0, r1, e - b, ends.shape[1], mx.array(
                        np.ascontiguousarray(args.block_tables[b:e, :n_blocks])), valid, ends))
                else:
                    segments.append((r0, r1, 0, 0, None, None, None))
            b = e
        return segments

    def with_lse(self, q: mx.array, k_pool: mx.array, v_pool: mx.array,
                 sinks: mx.array | None) -> tuple[mx.array, mx.array]:
        """The step with its Variant and `sinks` (float32 [Hq] or None): (out [N, Hq, D] in q's
        dtype, lse float32 [N, Hq])."""
        if self._variant_segments is None:
            self._variant_segments = self._segments()
        n, hq, d = q.shape
        outs, lses = [], []
        for r0, r1, s, t, table, valid, ends in self._variant_segments:
            if table is None:
                outs.append(mx.zeros((r1 - r0, hq, d), dtype=q.dtype))
                lses.append(mx.full((r1 - r0, hq), -mx.inf) if sinks is None else
                            mx.broadcast_to(sinks[None], (r1 - r0, hq)))
                continue
            q4 = q[r0:r1].reshape(s, t, hq, d).transpose(0, 2, 1, 3)
            out, lse = attend_variant(q4, k_pool, v_pool, table, valid, ends, self.scale,
                                      self.variant, sinks)
            outs.append(out.transpose(0, 2, 1, 3).reshape(r1 - r0, hq, d))
            lses.append(lse.transpose(0, 2, 1).reshape(r1 - r0, hq))
        if not outs:
            return mx.zeros(q.shape, dtype=q.dtype), mx.zeros((n, hq), dtype=mx.float32)
        return mx.concatenate(outs, axis=0), mx.concatenate(lses, axis=0).astype(mx.float32)


def gather_decode(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: np.ndarray,
                  context_lens: np.ndarray, scale: float, window: int | None) -> mx.array:
    """One decode query per sequence: q [B, Hq, D]; pools [NB, BS, Hkv, D]; block_tables int32
    [B, max_blocks] (unused entries already 0); context_lens int32 [B]. Returns [B, Hq, D]."""
    return GatherPlan(decode_args(q.shape[0], q.shape[1], block_tables, context_lens, scale,
                                  window), k_pool.shape[1])(q, k_pool, v_pool)


def decode_args(batch: int, num_q_heads: int, block_tables, context_lens, scale: float,
                window: int | None) -> StepArgs:
    """StepArgs of a decode step built without validation (benchmarks, `gather_decode`)."""
    return StepArgs(batch=batch, num_q_heads=num_q_heads,
                    block_tables=np.asarray(block_tables, np.int32),
                    context_lens=np.asarray(context_lens, np.int32), scale=scale, window=window)
