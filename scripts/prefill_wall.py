"""Wall time of one prompt's prefill() on the Vulkan backend through the public API only
(create_pool, write_kv, prefill), so the same script times any tree of this project: ADR 0008
compares this tree with the one issue 14 was filed against (3a20944, stock Kompute 0.9.0).

    python3 scripts/prefill_wall.py LABEL [TOKENS]     # prints one JSON line

Hq=32, Hkv=8, D=128, fp16, block 16, a shuffled block table; the wall time of 5 calls after one
warm-up, and the RMS of the output against the numpy reference.
"""
import json
import sys
import time

import numpy as np

from paged_attention import reference
from paged_attention.registry import get_backend

BS, HKV, HQ, D = 16, 8, 32, 128


def main(label: str, tokens: int = 2048) -> dict:
    be = get_backend("vulkan")
    rng = np.random.default_rng(0)
    nb = -(-tokens // BS)
    pool = be.create_pool(nb, BS, HKV, D, "float16")
    table = rng.permutation(nb).astype(np.int32)
    pos = np.arange(tokens)
    slots = table[pos // BS].astype(np.int64) * BS + pos % BS
    k, v, q = (rng.standard_normal((tokens, h, D)).astype(np.float16) for h in (HKV, HKV, HQ))
    be.write_kv(pool, slots, k, v)
    out = np.asarray(be.prefill(q, pool, table, 0))
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.asarray(be.prefill(q, pool, table, 0))
        walls.append(time.perf_counter() - t0)
    kh = np.zeros((nb * BS, HKV, D), np.float16)
    vh = np.zeros_like(kh)
    kh[slots], vh[slots] = k, v
    shape = (nb, BS, HKV, D)
    rms = float(reference.rms(out, reference.prefill(q, kh.reshape(shape), vh.reshape(shape), table, 0)))
    return {"code": label, "tokens": tokens, "wall_ms": [round(w * 1e3, 2) for w in walls],
            "median_ms": float(np.median(walls)) * 1e3, "rms": rms}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))), flush=True)
