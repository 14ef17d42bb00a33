"""Gather path: take a sequence's blocks into a contiguous [S, Hkv, span, D] copy, then SDPA.

Simple and always available, but it re-materialises the whole context every step: the cost the
fused kernel removes (see adr/0002-gather-vs-fused.md). One primitive, `attend`, serves decode
rows (S sequences, one query each) and prefill chunks (one sequence, T queries): a step's plan
cuts its ragged rows into such segments once (`GatherPlan`), and every layer reuses them.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from paged_attention.validation import StepArgs, Variant


def compute_dtype(pool_dtype):
    """dtype the attention runs in: float32 on every device. In fp16/bf16, MLX's SDPA loses the
    precision of large logits or overflows (q.k > 65504 -> inf -> NaN); the gather path is the
    correctness reference and fallback, so it pays the wider copy. Measurements: ADR 0002,
    "Gather computes in float32"."""
    return mx.float32


def take_blocks(pool, table: mx.array) -> mx.array:
    """pool[table] ([*table.shape, BS, Hkv, D]); a quantized pool's source (backend.py)
    dequantizes only the blocks it takes."""
    take = getattr(pool, "take", None)
    return mx.take(pool, table, axis=0) if take is None else take(table)


def step_mask(ends: mx.array, span: int, window: int | None) -> tuple[mx.array, mx.array]:
    """(valid [S, 1, T, span], seen [S, 1, T, 1]) for queries whose visible positions end at
    ends int32 [S, T]: made once per step, shared by every layer."""
    pos = mx.arange(span)[None, None, :]
    lim = ends[:, :, None]
    valid = pos < lim
    if window is not None:
        valid = valid & (pos >= lim - window)
    return valid[:, None], (ends > 0)[:, None, :, None]


def attend(q: mx.array, k_pool: mx.array, v_pool: mx.array, table: mx.array, valid: mx.array,
           seen: mx.array, scale: float) -> mx.array:
    """q [S, Hq, T, D]: T queries of each of S sequences; table int32 [S, n_blocks] (the blocks
    every query of a sequence may see); valid, seen from `step_mask`. Returns [S, Hq, T, D] in
    q's dtype; a query with nothing to see gets zeros."""
    s, _, _, d = q.shape
    _, block_size, hkv, _ = k_pool.shape
    span = table.shape[1] * block_size
    dtype = compute_dtype(k_pool.dtype)

    def contiguous(pool):
        blocks = take_blocks(pool, table)  # [S, n_blocks, BS, Hkv, D]
        return blocks.reshape(s, span, hkv, d).transpose(0, 2, 1, 3).astype(dtype)

    out = mx.fast.scaled_dot_product_attention(q.astype(dtype), contiguous(k_pool),
                                               contiguous(v_pool), scale=scale, mask=valid)
    # SDPA gives NaN (0/0) for a query with nothing to attend to.
    return mx.where(seen, out, 0).astype(q.dtype)


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


class GatherPlan:
    """A step's sequences cut into segments once: each run of one-query sequences is one batched
    decode segment, each longer chunk its own segment. Every layer reuses the device tables."""

    def __init__(self, args: StepArgs, block_size: int):
        self.scale = args.scale
        self.variant = args.variant
        self.num_rows = args.num_rows
        qlens = args.query_lens.astype(np.int64)
        first = args.qo_indptr.astype(np.int64)
        # (row_begin, row_end, sequences, queries per sequence, table, valid mask, seen mask)
        self.segments = []
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
                    valid, seen = step_mask(ends, n_blocks * block_size, args.window)
                    self.segments.append((r0, r1, e - b, ends.shape[1], mx.array(
                        np.ascontiguousarray(args.block_tables[b:e, :n_blocks])), valid, seen,
                        ends))
                else:
                    self.segments.append((r0, r1, 0, 0, None, None, None, None))
            b = e
        self.whole = len(self.segments) == 1 and self.segments[0][:2] == (0, self.num_rows)

    def __call__(self, q: mx.array, k_pool: mx.array, v_pool: mx.array) -> mx.array:
        """q [N, Hq, D] -> [N, Hq, D] in q's dtype."""
        _, hq, d = q.shape
        parts = []
        for r0, r1, s, t, table, valid, seen, _ in self.segments:
            rows = q if self.whole else q[r0:r1]
            if table is None:
                parts.append(mx.zeros(rows.shape, dtype=q.dtype))
                continue
            q4 = rows.reshape(s, t, hq, d).transpose(0, 2, 1, 3)
            out = attend(q4, k_pool, v_pool, table, valid, seen, self.scale)
            parts.append(out.transpose(0, 2, 1, 3).reshape(r1 - r0, hq, d))
        if not parts:  # no rows at all (sequences with no queries contribute none)
            return mx.zeros(q.shape, dtype=q.dtype)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


    def with_lse(self, q: mx.array, k_pool: mx.array, v_pool: mx.array,
                 sinks: mx.array | None) -> tuple[mx.array, mx.array]:
        """The step with its Variant and `sinks` (float32 [Hq] or None): (out [N, Hq, D] in q's
        dtype, lse float32 [N, Hq])."""
        n, hq, d = q.shape
        outs, lses = [], []
        for r0, r1, s, t, table, valid, _, ends in self.segments:
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
    args = StepArgs(batch=q.shape[0], num_q_heads=q.shape[1],
                    block_tables=np.asarray(block_tables, np.int32),
                    context_lens=np.asarray(context_lens, np.int32), scale=scale, window=window)
    return GatherPlan(args, k_pool.shape[1])(q, k_pool, v_pool)
