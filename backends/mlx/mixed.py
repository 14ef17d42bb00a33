"""A ragged step on the fused path: decode rows through the fused kernel, prefill chunks through
one causal SDPA each over the chunk's blocks gathered once.

The fused kernel serves any row as a decode query, so a prompt chunk of T queries could run as T
rows; but each row then reads its whole context, O(T x context) bytes per layer, where a
prompt's attention is compute-bound and reads its context once. So a step that mixes both
(continuous batching: running decodes and prompt chunks in one plan) splits its rows once per
step, here, and every layer runs one kernel launch for all decode rows plus one SDPA per chunk.
Measurements: ADR 0009, "Prefill chunks".
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from paged_attention.validation import PLAIN, StepArgs, Variant

from .gather import attend_variant, sdpa_dtype, step_mask, take_blocks


class Chunk:
    """T consecutive queries of one sequence whose context ends at `context` (its last query's
    position + 1): keys [0, context) gathered from its blocks, causal with the queries aligned
    to the end (query j sees positions < context - T + j + 1), optionally windowed."""

    def __init__(self, table: np.ndarray, context: int, queries: int, block_size: int,
                 window: int | None, scale: float, variant: Variant = PLAIN):
        self.queries, self.scale, self.variant, self.window = queries, scale, variant, window
        first = 0 if window is None else max(0, context - queries + 1 - window)
        # Blocks before the first visible position of the first query are never read.
        b0, b1 = first // block_size, -(-context // block_size)
        # The variant form (with_lse) sees the whole blocks b0..b1, so its positions count
        # from b0's first: query j's keys end at context - T + j + 1 - b0 * block_size there
        # (ALiBi needs only differences of positions, the window only the ends).
        self.ends_at = np.arange(context - queries + 1, context + 1) - b0 * block_size
        self._variant_masks = None
        self._dtype = None                               # (dtype, fused), on the first call
        self.offset = first - b0 * block_size            # keys to drop from the first block
        self.keys = context - first                      # keys kept
        self.table = mx.array(np.ascontiguousarray(table[b0:b1], np.int32))
        self.mask = "causal"     # MLX aligns it to the end of the keys when T < keys
        if window is not None and window < context:
            q_pos = np.arange(context - queries, context)[:, None]
            k_pos = np.arange(first, context)[None, :]
            self.mask = mx.array((k_pos <= q_pos) & (k_pos > q_pos - window))

    def __call__(self, q: mx.array, k_pool, v_pool) -> mx.array:
        """q [T, Hq, D] -> [T, Hq, D] in q's dtype. k_pool, v_pool: the pools' arrays or a
        quantized pool's sources (backend.QuantizedSource: dequantized as gather does)."""
        _, _, hkv, d = k_pool.shape
        if self._dtype is None:   # once per step: every layer's pools share dtype and shape
            self._dtype = (mx.float32, False) if q.dtype == mx.float32 else sdpa_dtype(
                k_pool.dtype, q.shape[1], hkv, self.queries, self.keys, d,
                self.mask if isinstance(self.mask, str) else "array")
        dtype, fused = self._dtype

        def keys(pool):   # a quantized pool's source dequantizes only the blocks taken
            kv = take_blocks(pool, self.table).reshape(-1, hkv, d)
            kv = kv[self.offset:self.offset + self.keys]
            return kv.transpose(1, 0, 2)[None].astype(dtype)   # [1, Hkv, keys, D]
        out = mx.fast.scaled_dot_product_attention(
            q.transpose(1, 0, 2)[None].astype(dtype), keys(k_pool), keys(v_pool),
            scale=self.scale, mask=self.mask, force_fused=fused)
        return out[0].transpose(1, 0, 2).astype(q.dtype)

    def with_lse(self, q: mx.array, k_pool: mx.array, v_pool: mx.array,
                 sinks: mx.array | None) -> tuple[mx.array, mx.array]:
        """The chunk with its Variant and `sinks` (float32 [Hq] or None), through the gather
        path's variant attention (MLX's SDPA has no cap, positional bias or LSE): (out [T, Hq,
        D] in q's dtype, lse float32 [T, Hq], natural log)."""
        if self._variant_masks is None:   # made on first use: a plain run never needs them
            ends = mx.array(self.ends_at.astype(np.int32)[None])                    # [1, T]
            valid = step_mask(ends, self.table.shape[0] * k_pool.shape[1], self.window)
            self._variant_masks = (ends, valid)
        ends, valid = self._variant_masks
        out, lse = attend_variant(q.transpose(1, 0, 2)[None], k_pool, v_pool, self.table[None],
                                  valid, ends, self.scale, self.variant, sinks)
        return out[0].transpose(1, 0, 2), lse[0].transpose(1, 0)


class MixedPlan:
    """One ragged step on the fused path. `decode` builds the fused kernel's plan for the
    one-query sequences (a callable q [Nd, Hq, D] -> [Nd, Hq, D], with the step's write indices
    as `.write` and the variant form as `.with_lse`), or is not called when there are none."""

    def __init__(self, args: StepArgs, block_size: int, decode):
        qlens = args.query_lens.astype(np.int64)
        first = args.qo_indptr[:-1].astype(np.int64)
        dec_seqs = np.flatnonzero(qlens == 1)
        dec = first[dec_seqs]                                       # their rows
        self.decode = decode(args.select(dec_seqs)) if dec.size else None
        self.dec_rows = dec.size
        self.return_lse = args.variant.return_lse
        self.dec_prefix = bool(dec.size == 0 or dec[-1] == dec.size - 1)
        self.dec_index = None if self.dec_prefix else mx.array(dec.astype(np.int32))
        self.chunks = []        # (first row, Chunk)
        for b in np.flatnonzero(qlens > 1):
            self.chunks.append((int(first[b]), Chunk(args.block_tables[b], int(args.context_lens[b]),
                                                     int(qlens[b]), block_size, args.window,
                                                     args.scale, args.variant)))
        # Output rows in order: decode rows first, then the chunks; `order` puts them back.
        n = args.num_rows
        pos = np.empty(n, np.int64)
        pos[dec] = np.arange(dec.size)
        at = dec.size
        for r0, c in self.chunks:
            pos[r0:r0 + c.queries] = np.arange(at, at + c.queries)
            at += c.queries
        self.order = None if np.array_equal(pos, np.arange(n)) else mx.array(pos.astype(np.int32))

    def __call__(self, q: mx.array, k_pool: mx.array, v_pool: mx.array) -> mx.array:
        """q [N, Hq, D] -> [N, Hq, D] in q's dtype."""
        parts = []
        if self.decode is not None:
            qd = q[:self.dec_rows] if self.dec_prefix else mx.take(q, self.dec_index, axis=0)
            parts.append(self.decode(qd, k_pool, v_pool))
        parts += [c(q[r0:r0 + c.queries], k_pool, v_pool) for r0, c in self.chunks]
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        return out if self.order is None else mx.take(out, self.order, axis=0)

    def with_lse(self, q: mx.array, k_pool: mx.array, v_pool: mx.array,
                 sinks: mx.array | None) -> tuple[mx.array, mx.array | None]:
        """The step with its Variant and `sinks` (float32 [Hq] or None): (out [N, Hq, D] in q's
        dtype, lse float32 [N, Hq] (natural log) when the Variant asks for it, else None)."""
        outs, lses = [], []
        if self.decode is not None:
            qd = q[:self.dec_rows] if self.dec_prefix else mx.take(q, self.dec_index, axis=0)
            out, lse = self.decode.with_lse(qd, k_pool, v_pool, sinks)
            outs.append(out)
            lses.append(lse)
        for r0, c in self.chunks:
            out, lse = c.with_lse(q[r0:r0 + c.queries], k_pool, v_pool, sinks)
            outs.append(out)
            lses.append(lse)

        def rows(parts):
            a = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
            return a if self.order is None else mx.take(a, self.order, axis=0)
        return rows(outs), (rows(lses) if self.return_lse else None)
