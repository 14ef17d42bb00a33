"""The prefix_sharing experiment kind: memory saved and prefill time with shared prompt prefixes.

Per point, `batch` prompts of `context` tokens are registered with a prefix-caching
BlockManager through `add_sequence(seq_id, token_ids=...)`; the first `shared_prefix` fraction
of every prompt is the same token ids, the rest unique. Sequences are added one after the
other, as requests arrive, so every prompt after the first finds the shared full blocks in the
cache and only its remaining tokens are written.

Reported: blocks used (`stats().used`) against the blocks the same prompts need without sharing,
the memory saved, `stats().prefix_hit_tokens`, and the prefill time = block bookkeeping, the
K/V writes (`write_kv`) of the tokens not served from the cache and, where the backend has
`prefill`, the causal attention of those tokens (`prefill(q, pool, table, start_pos)`, chunks
of up to 4096 queries), synchronised: the work prefix caching removes. (K/V are random, not
computed from the queries: the experiment measures cost, not a model.) Decode over the
resulting shared block tables is then timed like any decode point.
"""
from __future__ import annotations

import inspect
import time

import numpy as np

from ...block_manager import BlockManager
from ..workload import representable
from . import measure as M


def api_missing() -> str | None:
    """None when BlockManager has the prefix-caching API this experiment needs, else why not."""
    try:
        sig = inspect.signature(BlockManager.add_sequence)
    except (TypeError, ValueError):
        return "cannot inspect BlockManager.add_sequence"
    if "token_ids" not in sig.parameters:
        return "BlockManager.add_sequence has no token_ids parameter (prefix caching not available yet)"
    stats = BlockManager(1, 1).stats()
    if not hasattr(stats, "prefix_hit_tokens"):
        return "BlockManager.stats() reports no prefix_hit_tokens (prefix caching not available yet)"
    return None


def prompts(params: dict, seed: int = 0) -> list[list[int]]:
    b, ctx, f = params["batch"], params["context"], params["shared_prefix"]
    shared = int(round(f * ctx))
    base = list(range(1, shared + 1))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(b):
        # Unique suffix ids: offset per sequence so no two suffixes (or a suffix and the
        # shared prefix) can hash alike.
        suffix = (rng.integers(0, 1 << 20, ctx - shared) + (i + 1) * (1 << 21)).tolist()
        out.append(base + suffix)
    return out


def run_point(backend, params: dict, measure: dict, seed: int = 0):
    """Prefill with prefix caching; returns (metrics dict, Setup for timing decode)."""
    p = params
    bs = p["block_size"]
    ids = prompts(p, seed)
    nbps = -(-p["context"] // bs)
    no_share_blocks = p["batch"] * nbps
    num_blocks = no_share_blocks
    if p["dtype"] not in backend.pool_dtypes:
        raise M.Skip(f"backend {backend.name!r} has no {p['dtype']} pools")
    pool = backend.create_pool(num_blocks, bs, p["num_kv_heads"], p["head_dim"], p["dtype"],
                               **M.format_args(p))
    rng = np.random.default_rng(seed)
    tile = max(1, min(p["context"], 4096))
    kt = representable(rng.standard_normal((tile, p["num_kv_heads"], p["head_dim"])), p["dtype"])
    vt = representable(rng.standard_normal((tile, p["num_kv_heads"], p["head_dim"])), p["dtype"])

    has_prefill = callable(getattr(backend, "prefill", None))
    q_tile = backend.from_numpy(representable(
        rng.standard_normal((tile, p["num_q_heads"], p["head_dim"])), p["dtype"]), p["dtype"])

    def prefill():
        bm = BlockManager(num_blocks, bs, fragmented=p["fragmentation"] == "fragmented", seed=seed)
        written, outs = 0, []
        t0 = time.perf_counter()
        for i, tok in enumerate(ids):
            slots = bm.add_sequence(i, token_ids=tok)
            for s0 in range(0, len(slots), tile):
                chunk = slots[s0:s0 + tile]
                backend.write_kv(pool, chunk, kt[:len(chunk)], vt[:len(chunk)])
            if has_prefill:   # causal attention of the tokens not served from the cache
                table = np.asarray(bm.block_table(i), dtype=np.int32)
                start = len(tok) - len(slots)
                for s0 in range(0, len(slots), tile):
                    n = min(tile, len(slots) - s0)
                    outs.append(backend.prefill(q_tile[:n], pool, table, start + s0))
            written += len(slots)
        backend.synchronize(outs, pools=[pool])
        return time.perf_counter() - t0, bm, written

    for _ in range(measure["warmup"]):
        prefill()
    times, spent = [], 0.0
    for _ in range(max(1, min(measure["iterations"], 5))):
        dt, bm, written = prefill()
        times.append(dt)
        spent += dt
        if spent > measure["max_seconds"]:
            break
    st = bm.stats()
    block_bytes = pool.nbytes // num_blocks       # K, V and (quantized pools) their scales
    metrics = {
        "prefill_ms": float(np.median(times)) * 1e3,
        "prefill_attention": has_prefill,
        "tokens_written": int(written),
        "prefix_hit_tokens": int(st.prefix_hit_tokens),
        "blocks_used": int(st.used),
        "blocks_no_sharing": int(no_share_blocks),
        "memory_saved": 1.0 - st.used / no_share_blocks,
        "kv_mb_used": st.used * block_bytes / 1e6,
        "kv_mb_no_sharing": no_share_blocks * block_bytes / 1e6,
    }
    seqs = list(range(p["batch"]))
    tables, lens = bm.block_tables(seqs), bm.context_lens(seqs)
    host_qs = [representable(rng.standard_normal((p["batch"], p["num_q_heads"], p["head_dim"])),
                             p["dtype"]) for _ in range(p["layers"])]
    qs = [backend.from_numpy(q, p["dtype"]) for q in host_qs]
    setup = M.Setup(p, tables, lens, [pool], qs, host_qs[0].astype(np.float64), M.kv_bytes(p, pool),
                    num_blocks * block_bytes)
    return metrics, setup
