"""The lab's benchmarks at toy sizes: they run end to end and report what they claim."""
from __future__ import annotations

import json

from paged_attention.lab import e2e
from paged_attention.lab.generate import sequences_fitting

# One block of this config is 2 (K and V) x 16 tokens x 1 head x 1 dim x 1 byte x 1 layer.
CONFIG = dict(num_key_value_heads=1, head_dim=1, num_hidden_layers=1, vocab_size=1000)


def test_sequences_fitting_counts_shared_prefix_blocks_once():
    """64-token prompts with room for 8 new tokens need 5 blocks each; 20 blocks hold 4. With a
    32-token common prefix (2 full blocks), every request after the first reuses both: 3 new
    blocks each, so 1 + (20 - 5) // 3 = 6 fit."""
    budget = 20 * 2 * 16
    own = [[i * 100 + j for j in range(64)] for i in range(3)]
    assert sequences_fitting(own, 8, 16, budget, CONFIG, 1) == 4
    shared = [list(range(32)) + p[32:] for p in own]
    assert sequences_fitting(shared, 8, 16, budget, CONFIG, 1) == 6


def test_bench_e2e_reports_every_variant(tmp_path, capsys):
    """`paged-attn bench e2e` on the numpy backend: one row per point with every variant timed,
    ratios consistent with the times."""
    out = tmp_path / "e2e.json"
    assert e2e.main(["--preset", "cpu", "--backends", "numpy", "--batches", "1,2",
                     "--contexts", "48", "--layers", "2", "--steps", "1",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in data["rows"]] == [(1, 48), (2, 48)]
    for r in data["rows"]:
        for key in ("api_ms", "overlap_ms", "fresh_ms", "run_ms", "inputs_ms", "kernel_ms",
                    "pipe_ms", "pipe_kernel_ms"):
            assert r[key] > 0
        assert abs(r["pipe_over_kernel"] - r["pipe_ms"] / r["pipe_kernel_ms"]) < 1e-9
        assert abs(r["api_over_kernel"] - r["api_ms"] / r["kernel_ms"]) < 1e-9
        assert abs(r["api_over_inputs"] - r["api_ms"] / r["inputs_ms"]) < 1e-9
    assert "numpy/reference" in capsys.readouterr().out


def test_host_costs_caps_slow_calls_at_the_time_budget(monkeypatch):
    """`--host` figures: every call is timed; once the calls have taken budget_s together only
    5 are made (a synchronous backend runs the attention in run() and decode()), while calls
    well inside the budget are made `repeats` times."""
    import paged_attention as pa
    be = pa.get_backend("numpy")
    calls = {"decode": 0}
    real_decode = be.decode

    def counted(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(be, "decode", counted)
    out = e2e.host_costs(be, "reference", batch=2, blocks=4, repeats=50, budget_s=0.0)
    assert calls["decode"] == 5
    for key in ("plan_us", "run_us", "check_us", "kernel_call_us", "decode_us"):
        assert out[key] > 0
    assert abs(out["run_over_decode"] - out["run_us"] / out["decode_us"]) < 1e-9
    calls["decode"] = 0
    e2e.host_costs(be, "reference", batch=2, blocks=4, repeats=12, budget_s=60.0)
    assert calls["decode"] == 12
