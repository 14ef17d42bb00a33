"""Tensor-parallel decoding on two ranks over mx.distributed's ring backend on localhost (what
`mlx.launch -n 2 --backend ring` starts), random weights, float32: the sharded engine's tokens
equal the single-process run's under continuous batching, ragged prompts, a shared prefix,
n=2 forks and preemption; ranks that disagree, raise or die end every rank, naming the rank,
within a timeout. Each rank's exit status and output are checked on its own (mlx.launch exits
0 when a rank fails). Design: adr/0012-tensor-parallel.md."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core", reason="tensor parallelism needs mlx")
pytest.importorskip("mlx_lm", reason="tensor parallelism needs mlx-lm")

from paged_attention.integrations import distributed  # noqa: E402
from paged_attention.integrations.mlx_lm import random_model  # noqa: E402

WORKER = Path(__file__).with_name("tp_worker.py")
pytestmark = pytest.mark.skipif(not mx.distributed.is_available("ring"),
                                reason="this mlx build has no ring backend")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(argv: list[str], tmp_path: Path, n: int = 2, timeout: float = 60) -> list[dict]:
    """Start n ranks over ring on localhost, as mlx.launch does (a hostfile, MLX_RANK); each
    rank's exit status, stdout, stderr and RESULT line. Ranks still running at the timeout are
    killed and the test fails."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    procs = [subprocess.Popen([sys.executable, *argv], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=dict(os.environ, MLX_HOSTFILE=str(hostfile), MLX_RANK=str(r)))
             for r in range(n)]
    t0 = time.monotonic()
    ranks = []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {r} still running after {timeout} s: a collective hung")
        res = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
        ranks.append(dict(rc=p.returncode, out=out, err=err, result=res[0] if res else None,
                          seconds=time.monotonic() - t0))
    return ranks


def _show(ranks) -> str:
    return "\n".join(f"--- rank {r}: rc {d['rc']}\n{d['out'][-1500:]}\n{d['err'][-3000:]}"
                     for r, d in enumerate(ranks))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_sharded_tokens_equal_the_single_process_run(tmp_path, model_type):
    ranks = launch([str(WORKER), "tokens", model_type], tmp_path, timeout=120)
    assert all(d["rc"] == 0 and d["result"] for d in ranks), _show(ranks)
    r0, r1 = (d["result"] for d in ranks)
    # Greedy: every sample of every prompt equals the unsharded engine's, on both ranks.
    assert r0["equal"] and r1["equal"], _show(ranks)
    assert r0["tokens"] == r1["tokens"] and len(r0["tokens"]) == 10
    # The run exercised what it claims: forks, prefix hits, a pool too small (preemption).
    assert r0["prefix_hits"] > 0 and r0["preemptions"] > 0
    # Each rank holds its own KV heads only: half the heads, half the bytes per block.
    assert (r0["tp_heads"], r0["alone_heads"]) == (1, 2)
    assert r0["block_bytes"] * 2 == r0["alone_block_bytes"]
    assert r0["peak_kv"] == r0["peak_blocks"] * r0["block_bytes"]
    # The plan digests were compared on the first steps; scheduling matched on both ranks.
    assert r0["checked"] == r1["checked"] == 8
    for key in ("preemptions", "prefix_hits", "peak_running", "peak_blocks"):
        assert r0[key] == r1[key], key
    # Seeded sampling with a different seed per rank: every rank has rank 0's tokens.
    assert r0["sampled"] == r1["sampled"]


def test_ranks_that_plan_differently_all_raise(tmp_path):
    ranks = launch([str(WORKER), "mismatch"], tmp_path, timeout=60)
    for r, d in enumerate(ranks):
        assert d["rc"] == 3 and d["result"], _show(ranks)
        assert "step 0: the plan of rank(s) [1] differs from rank 0's" in d["result"]["error"]


@pytest.mark.parametrize("fault", ["raise", "die"])
def test_a_failing_rank_ends_the_other_naming_it(tmp_path, fault):
    ranks = launch([str(WORKER), fault], tmp_path, timeout=60)
    r0, r1 = ranks
    assert r0["rc"] != 0 and r0["result"] is None, _show(ranks)
    why = ("RuntimeError: injected fault on rank 1" if fault == "raise"
           else "exited without a word (killed or crashed)")
    assert f"paged-attn: error: rank 0: stopping: rank 1 failed: {why}" in r0["err"], _show(ranks)
    if fault == "raise":
        assert r1["rc"] == 1 and "rank 1 failed: RuntimeError: injected fault" in r1["err"]
    else:
        assert r1["rc"] == -9
    # Bounded: the side channel, not the 20 s watchdog, ended rank 0.
    assert r0["seconds"] < 20, _show(ranks)


def test_heads_that_do_not_divide_are_refused_before_sharding():
    with pytest.raises(distributed.Unshardable, match="num_key_value_heads = 2 does not split "
                                                      "over 4 ranks"):
        distributed.check_heads(8, 2, 4)
    distributed.check_heads(8, 2, 2)


def test_a_model_without_shard_is_refused_by_name():
    cfg = dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=2,
               intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, vocab_size=64, sliding_window=8, sliding_window_pattern=2)
    with pytest.raises(distributed.Unshardable, match="gemma3_text has no shard"):
        distributed.shard(random_model(cfg), mx.distributed.init())


def test_one_process_is_no_group():
    assert distributed.launched_group() is None
    with distributed.fail_fast(None) as guard:
        assert guard is None


def test_bench_tp_outside_mlx_launch_says_how_to_launch(tmp_path, capsys):
    from paged_attention.lab.experiments.runner import bench_cli
    assert bench_cli("generate", ["--tp", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--tp 2: this process is one of 1 rank(s); run it as `mlx.launch -n 2 -- paged-attn " \
           "bench generate --tp 2`" in err
