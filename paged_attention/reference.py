"""Numpy reference for paged decode attention, computed in float64.

This is the ground truth every backend is checked against. It is written for clarity,
not speed: one sequence at a time, the blocks of each sequence gathered explicitly.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidInput
from .validation import PoolSpec, StepArgs, check_q, check_query_lens, check_tables

_Q_DTYPES = ("float16", "float32", "float64", "bfloat16")


def gather_sequence(pool: np.ndarray, block_table, context_len: int) -> np.ndarray:
    """Contiguous [context_len, Hkv, D] copy of one sequence's cached keys or values."""
    block_size = pool.shape[1]
    n_blocks = -(-int(context_len) // block_size)
    ids = np.asarray(block_table[:n_blocks], dtype=np.int64)
    return pool[ids].reshape(-1, *pool.shape[2:])[:context_len]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention of q [Hq, D] over k, v [T, Hkv, D] with GQA; float64 [Hq, D].

    T == 0 gives zeros: an empty context contributes nothing.
    """
    return attend_lse(q, k, v, scale)[0]


def attend_lse(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, *,
               soft_cap: float | None = None, alibi: np.ndarray | None = None,
               sinks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attention of one query q [Hq, D] over k, v [T, Hkv, D] (GQA) with the variants of ADR
    0010, in float64: logits s = scale * q.k, then s = soft_cap * tanh(s / soft_cap), then
    s += alibi [Hq, T] (slope[h] * (key_pos - query_pos)); exp(sinks[h]) joins each head's
    denominator as a key without a value. Returns (out [Hq, D], lse [Hq]): lse is the natural
    log of the denominator; with nothing to attend to, out is 0 and lse -inf (or sinks[h])."""
    hq, d = q.shape
    t, hkv, _ = k.shape
    sink = None if sinks is None else np.asarray(sinks, np.float64)
    if t == 0:
        return np.zeros((hq, d)), (np.full(hq, -np.inf) if sink is None else sink.copy())
    qg = q.astype(np.float64).reshape(hkv, hq // hkv, d)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf inputs give NaN rows, quietly
        s = np.einsum("hgd,thd->hgt", qg, k.astype(np.float64)).reshape(hq, t) * scale
        if soft_cap is not None:
            s = soft_cap * np.tanh(s / soft_cap)
        if alibi is not None:
            s = s + alibi
        m = s.max(axis=-1) if sink is None else np.maximum(s.max(axis=-1), sink)
        p = np.exp(s - m[:, None])
        denom = p.sum(axis=-1) + (0.0 if sink is None else np.exp(sink - m))
        out = np.einsum("hgt,thd->hgd", p.reshape(hkv, hq // hkv, t),
                        v.astype(np.float64)).reshape(hq, d) / denom[:, None]
    return out, m + np.log(denom)


def step(q, k_pool, v_pool, args: StepArgs, sinks=None) -> tuple[np.ndarray, np.ndarray]:
    """Reference attention of a validated step (StepArgs, per sequence, its Variant applied):
    for each sequence, its context gathered once, then each of its queries over its causal,
    windowed prefix. q: [args.num_rows, Hq, D]; sinks: float [Hq] or None.
    Returns (out float64 [N, Hq, D], lse float64 [N, Hq], natural log)."""
    q = np.asarray(q, dtype=np.float64)
    var = args.variant
    out = np.zeros(q.shape, dtype=np.float64)
    lse = np.full(q.shape[:2], -np.inf) if sinks is None else \
        np.tile(np.asarray(sinks, np.float64), (q.shape[0], 1))
    indptr = args.qo_indptr
    for b in range(args.batch):
        r0, r1 = int(indptr[b]), int(indptr[b + 1])
        length = int(args.context_lens[b])
        if r0 == r1:
            continue
        k = gather_sequence(k_pool, args.block_tables[b], length)
        v = gather_sequence(v_pool, args.block_tables[b], length)
        for r in range(r0, r1):
            end = length - (r1 - r) + 1          # the row's causal end: its own position + 1
            begin = 0 if args.window is None else max(0, end - args.window)
            alibi = None
            if var.alibi_slopes is not None:
                alibi = np.asarray(var.alibi_slopes, np.float64)[:, None] * \
                    (np.arange(begin, end) - (end - 1))[None, :]
            out[r], lse[r] = attend_lse(q[r], k[begin:end], v[begin:end], args.scale,
                                        soft_cap=var.soft_cap, alibi=alibi, sinks=sinks)
    return out, lse


def merge_states(out_a, lse_a, out_b, lse_b) -> tuple[np.ndarray, np.ndarray]:
    """Attention over the union of two disjoint key sets from the partial results of each
    (out [N, Hq, D], lse [N, Hq], natural log), in float64: weights exp(lse_x - lse)."""
    la, lb = np.asarray(lse_a, np.float64), np.asarray(lse_b, np.float64)
    m = np.maximum(la, lb)
    m = np.where(np.isfinite(m), m, 0.0)
    wa, wb = np.exp(la - m), np.exp(lb - m)
    total = wa + wb
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (np.asarray(out_a, np.float64) * wa[..., None] +
               np.asarray(out_b, np.float64) * wb[..., None]) / total[..., None]
        lse = m + np.log(total)
    out = np.where((total > 0)[..., None], out, 0.0)
    return out, lse


def decode(q, k_pool, v_pool, block_tables, context_lens, scale=None, window=None) -> np.ndarray:
    """Reference decode attention.

    q: [B, Hq, D]; k_pool, v_pool: [num_blocks, block_size, Hkv, D]; block_tables: int [B, max_blocks];
    context_lens: int [B]; window: attend to the last `window` positions only.
    Returns float64 [B, Hq, D]. Inputs are validated like any backend's.
    """
    return ragged(q, k_pool, v_pool, block_tables, context_lens, None, scale, window)


def ragged(q, k_pool, v_pool, block_tables, context_lens, query_lens, scale=None, window=None
           ) -> np.ndarray:
    """Reference attention for a ragged batch: q [sum(query_lens), Hq, D], sequence b's
    query_lens[b] rows in order (None: one each); query j of sequence b sees positions
    < context_lens[b] - query_lens[b] + j + 1 of b's table. Returns float64 [N, Hq, D]."""
    k_pool = np.asarray(k_pool)
    v_pool = np.asarray(v_pool)
    spec = PoolSpec(*k_pool.shape, dtype=str(k_pool.dtype))
    _, hq = check_q(q, spec, _Q_DTYPES)
    args = check_query_lens(query_lens, check_tables(spec, block_tables, context_lens,
                                                     None, scale, window, hq))
    if args.num_rows != np.shape(q)[0]:
        raise InvalidInput(f"q: expected {args.num_rows} rows (sum(query_lens)), got {np.shape(q)[0]}")
    return step(q, k_pool, v_pool, args)[0]


def prefill(q, k_pool, v_pool, block_table, start_pos=0, scale=None, window=None) -> np.ndarray:
    """Reference causal prefill over one sequence's blocks.

    q: [T, Hq, D], the queries of positions [start_pos, start_pos + T) whose K/V are already in
    the pools; block_table: int [max_blocks]. Position p attends to [max(0, p+1-window), p].
    Returns float64 [T, Hq, D].
    """
    q = np.asarray(q, dtype=np.float64)
    k_pool, v_pool = np.asarray(k_pool), np.asarray(v_pool)
    t, _, d = q.shape
    length = int(start_pos) + t
    k = gather_sequence(k_pool, block_table, length)
    v = gather_sequence(v_pool, block_table, length)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros(q.shape)
    for i in range(t):
        end = int(start_pos) + i + 1
        begin = 0 if window is None else max(0, end - window)
        out[i] = attend(q[i], k[begin:end], v[begin:end], scale)
    return out


def dense_causal(q, k, v, scale=None) -> np.ndarray:
    """Causal attention of q [T, Hq, D] over contiguous k, v [T, Hkv, D] (no pool, no paging):
    the dense path that paged prefill must agree with. float64 [T, Hq, D]."""
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    return np.stack([attend(q[i], k[:i + 1], v[:i + 1], scale) for i in range(q.shape[0])]) \
        if q.shape[0] else np.zeros(q.shape)


def rms(a, b) -> float:
    """Root-mean-square difference, the error metric of every parity test."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(d * d))) if d.size else 0.0
