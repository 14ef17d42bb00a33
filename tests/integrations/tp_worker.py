"""One rank of a tensor-parallel test run (tests/integrations/test_tensor_parallel.py starts it on
two ranks over ring on localhost; `mlx.launch -n 2 --backend ring` does the same).

    tp_worker.py tokens     sharded vs unsharded tokens, greedy; seeded sampling across ranks
    tp_worker.py mismatch   rank 1 is given another prompt: both ranks raise RankMismatch
    tp_worker.py raise      rank 1 raises in its third step, inside fail_fast
    tp_worker.py die        rank 1 is killed (SIGKILL) in its third step, inside fail_fast

Each rank prints one JSON line (prefix "RESULT ") with what the test checks."""
from __future__ import annotations

import json
import os
import signal
import sys

import mlx.core as mx

from paged_attention.integrations import distributed
from paged_attention.integrations.mlx_lm import Engine, generate, greedy, random_model

CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              vocab_size=97, max_position_embeddings=1024, rope_theta=10000.0,
              tie_word_embeddings=False)
PREFIX = [5, 17, 33, 2, 61, 8, 44, 90, 12, 71, 3, 29, 50, 66, 19, 7, 38, 81]   # 18 tokens
PROMPTS = [PREFIX + [4, 9], PREFIX + [55], [1, 2, 3], PREFIX + list(range(20, 47)), [88] * 9]
ARGS = dict(max_tokens=12, block_size=4, max_batch_tokens=24, n=2)


def result(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def block_bytes(eng) -> int:
    """Bytes of one block over every layer's pool (K and V)."""
    return sum(p.nbytes // p.num_blocks for g in eng.state.groups for p in g.pools.values())


def main(mode: str) -> None:
    group = mx.distributed.init()
    rank = group.rank()
    if mode == "tokens":
        model_type = sys.argv[2] if len(sys.argv) > 2 else "llama"
        cfg = dict(CONFIG, model_type=model_type)
        alone = []
        ref = generate(random_model(cfg), PROMPTS, engine_out=alone, **ARGS)
        model = distributed.shard(random_model(cfg), group)
        tp = []
        # 40 blocks of 4 hold three of the five requests' samples: admission waits, preempts.
        out = generate(model, PROMPTS, engine_out=tp, num_blocks=40, **ARGS)
        s, s1 = tp[0].stats, alone[0].stats
        # Seeded sampling, each rank seeded differently: rank 0's tokens are every rank's.
        mx.random.seed(1234 + rank)
        sampled = generate(model, PROMPTS[:2], max_tokens=8,
                           sampler=lambda lp: mx.random.categorical(lp * 1.5))
        result(rank=rank, equal=out == ref, tokens=out, sampled=sampled,
               tp_heads=tp[0].state.info.num_kv_heads, alone_heads=alone[0].state.info.num_kv_heads,
               preemptions=s.preemptions, prefix_hits=s.prefix_hit_tokens,
               peak_running=s.peak_running, checked=tp[0].tp.checked,
               block_bytes=block_bytes(tp[0]), alone_block_bytes=block_bytes(alone[0]),
               peak_kv=s.peak_kv_bytes, peak_blocks=s.peak_blocks, alone_preemptions=s1.preemptions)
        return
    model = distributed.shard(random_model(CONFIG), group)
    if mode == "mismatch":
        prompts = [PROMPTS[0] if rank == 0 else PROMPTS[1]]
        try:
            generate(model, prompts, max_tokens=4)
        except distributed.RankMismatch as e:
            result(rank=rank, error=str(e))
            sys.exit(3)
        result(rank=rank, error=None)
        return
    calls = [0]

    def sampler(logprobs):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            if mode == "raise":
                raise RuntimeError("injected fault on rank 1")
            os.kill(os.getpid(), signal.SIGKILL)
        return greedy(logprobs)
    with distributed.fail_fast(group, timeout_s=20, grace_s=0.5):
        eng = Engine(model, block_size=4, num_blocks=64)
        for p in PROMPTS:
            eng.add_request(p, 30)
        eng.sampler = sampler
        eng.run()
    result(rank=rank, finished=True)


if __name__ == "__main__":
    main(sys.argv[1])
