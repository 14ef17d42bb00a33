"""Gather path: take the sequence's blocks into a contiguous [B, Hkv, T, D] copy, then fused SDPA.

Simple and always available, but it re-materialises the whole context every step: the cost the
fused kernel removes (see adr/0001-layout-a.md).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np


def compute_dtype(pool_dtype):
    """dtype the attention runs in: float32 on every device. In fp16/bf16, MLX's SDPA loses the
    precision of large logits (ulp 32 at 4e4) or overflows (q.k > 65504 -> inf -> NaN) on the
    CPU, and measured 0.032 RMS from the float64 reference on CUDA (tests/test_numerics.py,
    huge logits). The gather path is the correctness reference and fallback, so it pays the
    wider copy."""
    return mx.float32


def gather_decode(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: np.ndarray,
                  context_lens: np.ndarray, scale: float, window: int | None) -> mx.array:
    """q [B, Hq, D]; pools [NB, BS, Hkv, D]; block_tables int32 [B, max_blocks] (unused entries
    already 0); context_lens int32 [B]. Returns [B, Hq, D] in q's dtype."""
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_pool.shape
    n_blocks = -(-int(context_lens.max(initial=0)) // block_size)
    if batch == 0 or n_blocks == 0:
        return mx.zeros(q.shape, dtype=q.dtype)
    table = mx.array(block_tables[:, :n_blocks])
    span = n_blocks * block_size

    dtype = compute_dtype(k_pool.dtype)

    def contiguous(pool):
        blocks = mx.take(pool, table, axis=0)  # [B, n_blocks, BS, Hkv, D]
        return blocks.reshape(batch, span, hkv, d).transpose(0, 2, 1, 3).astype(dtype)

    lens = mx.array(context_lens)[:, None]
    pos = mx.arange(span)[None, :]
    valid = pos < lens
    if window is not None:
        valid = valid & (pos >= lens - window)
    out = mx.fast.scaled_dot_product_attention(
        q.astype(dtype)[:, :, None, :], contiguous(k_pool), contiguous(v_pool),
        scale=scale, mask=valid[:, None, None, :])[:, :, 0, :]
    # A sequence with nothing to attend to gets zeros (SDPA would produce NaN from 0/0).
    return mx.where(lens[:, :, None] > 0, out, 0).astype(q.dtype)


def gather_prefill(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_table: np.ndarray,
                   query_lens: np.ndarray, scale: float, window: int | None) -> mx.array:
    """Causal prefill of one sequence: q [T, Hq, D] at positions query_lens - 1 (consecutive);
    gathers the sequence's blocks once and runs one masked SDPA. Returns [T, Hq, D]."""
    t, hq, d = q.shape
    if t == 0:
        return mx.zeros(q.shape, dtype=q.dtype)
    _, block_size, hkv, _ = k_pool.shape
    n_blocks = -(-int(query_lens[-1]) // block_size)
    table = mx.array(block_table[:n_blocks])
    span = n_blocks * block_size

    dtype = compute_dtype(k_pool.dtype)

    def contiguous(pool):
        return mx.take(pool, table, axis=0).reshape(1, span, hkv, d).transpose(0, 2, 1, 3) \
            .astype(dtype)

    ends = mx.array(query_lens)[:, None]          # query i sees positions < ends[i]
    pos = mx.arange(span)[None, :]
    valid = pos < ends
    if window is not None:
        valid = valid & (pos >= ends - window)
    out = mx.fast.scaled_dot_product_attention(
        q.astype(dtype).transpose(1, 0, 2)[None], contiguous(k_pool), contiguous(v_pool),
        scale=scale, mask=valid[None, None])
    return out[0].transpose(1, 0, 2).astype(q.dtype)
