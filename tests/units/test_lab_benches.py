"""The lab's benchmarks at toy sizes: they run end to end and report what they claim."""
from __future__ import annotations

import csv
import json
import time

import numpy as np
import yaml

from paged_attention.lab import cli, e2e
from paged_attention.lab.generate import sequences_fitting

# One block of this config is 2 (K and V) x 16 tokens x 1 head x 1 dim x 2 bytes x 1 layer.
CONFIG = dict(num_key_value_heads=1, head_dim=1, num_hidden_layers=1, vocab_size=1000)


def test_sequences_fitting_counts_shared_prefix_blocks_once():
    """64-token prompts with room for 8 new tokens need 5 blocks each; 20 blocks hold 4. With a
    32-token common prefix (2 full blocks), every request after the first reuses both: 3 new
    blocks each, so 1 + (20 - 5) // 3 = 6 fit."""
    budget = 20 * 2 * 16 * 2
    own = [[i * 100 + j for j in range(64)] for i in range(3)]
    assert sequences_fitting(own, 8, 16, budget, CONFIG, "float16") == 4
    shared = [list(range(32)) + p[32:] for p in own]
    assert sequences_fitting(shared, 8, 16, budget, CONFIG, "float16") == 6


def test_sequences_fitting_counts_quantized_blocks():
    """head_dim 64: a float16 token-layer is 2 x 128 bytes, an int8 one 2 x (64 + 2 x 2) (its
    group's fp16 scale and bias): 20 float16 blocks' bytes hold 37 int8 blocks, 7 requests."""
    cfg = dict(CONFIG, head_dim=64)
    budget = 20 * 16 * 256
    own = [[i * 100 + j for j in range(64)] for i in range(3)]
    assert sequences_fitting(own, 8, 16, budget, cfg, "float16") == 4
    assert sequences_fitting(own, 8, 16, budget, cfg, "float16", kv_bits=8) == 7


def _slowed(monkeypatch, be, method: str, seconds: float) -> None:
    """be.<method> takes `seconds` longer than it does."""
    real = getattr(be, method)

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    monkeypatch.setattr(be, method, slow)


def test_bench_e2e_variants_time_what_they_claim(tmp_path, capsys, monkeypatch):
    """`paged-attn bench e2e` on the numpy backend, with plan() made 40 ms slower: the variants
    that call plan() in their timed step (api, overlap, pipe) take at least 40 ms a step and
    the others (fresh, run, inputs, kernel: plans made before timing) do not; host us/plan
    sees the 40 ms. Then run() made 15 ms slower: run and fresh pay it per layer, kernel and
    inputs (the backend's own hooks) do not."""
    import paged_attention as pa
    be = pa.get_backend("numpy")
    monkeypatch.setattr(pa, "get_backend", lambda name: be)
    argv = ["--preset", "cpu", "--backends", "numpy", "--batches", "1,2", "--contexts", "48",
            "--layers", "2", "--steps", "2"]
    _slowed(monkeypatch, be, "plan", 0.040)
    out = tmp_path / "e2e.json"
    assert e2e.main(argv + ["--out", str(tmp_path / "a"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 48), (2, 48)]
    for r in rows:
        for key in ("api_ms", "overlap_ms", "pipe_ms"):
            assert r[key] >= 40, (key, r)
        for key in ("fresh_ms", "run_ms", "inputs_ms", "kernel_ms", "pipe_kernel_ms"):
            assert r[key] < 40, (key, r)
        assert r["host_us_per_plan"] >= 40e3 and r["api_over_kernel"] > 1
    assert "numpy/reference" in capsys.readouterr().out

    monkeypatch.undo()
    monkeypatch.setattr(pa, "get_backend", lambda name: be)
    _slowed(monkeypatch, be, "run", 0.015)
    assert e2e.main(argv + ["--out", str(tmp_path / "b"), "--json", str(out)]) == 0
    for r in json.loads(out.read_text())["rows"]:
        for key in ("run_ms", "fresh_ms", "api_ms"):
            assert r[key] >= 2 * 15, (key, r)       # two layers
        for key in ("kernel_ms", "inputs_ms"):
            assert r[key] < 15, (key, r)
        assert r["host_us_per_run"] >= 15e3


def test_host_costs_caps_slow_calls_at_the_time_budget(monkeypatch):
    """`--host` figures: every call is timed; once the calls have taken budget_s together only
    5 are made (a synchronous backend runs the attention in run() and decode()), while calls
    well inside the budget are made `repeats` times. A decode() 20 ms slower shows in
    decode_us alone, so run/decode drops below 1."""
    import paged_attention as pa
    be = pa.get_backend("numpy")
    calls = {"decode": 0}
    real_decode = be.decode

    def counted(*args, **kwargs):
        calls["decode"] += 1
        time.sleep(0.020)
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(be, "decode", counted)
    out = e2e.host_costs(be, "reference", batch=2, blocks=4, repeats=50, budget_s=0.0)
    assert calls["decode"] == 5
    assert out["decode_us"] >= 20e3 and out["run_us"] < 20e3 and out["run_over_decode"] < 1
    assert 0 < out["check_us"] < out["run_us"] and out["plan_us"] > 0
    calls["decode"] = 0
    e2e.host_costs(be, "reference", batch=2, blocks=4, repeats=12, budget_s=60.0)
    assert calls["decode"] == 12


# -- one measurement system: a bench is an experiment ----------------------------------------------
E2E_FLAGS = ["--preset", "cpu", "--backends", "numpy", "--batches", "1,2", "--contexts", "32",
             "--layers", "2", "--steps", "1"]
E2E_YAML = {"name": "e2e_tiny", "kind": "bench", "bench": "e2e",
            "options": {"preset": "cpu", "backends": "numpy", "batches": [1, 2],
                        "contexts": [32], "layers": 2, "steps": 1}}


def test_bench_through_yaml_and_cli_gives_the_same_run(tmp_path, capsys):
    """The e2e bench written as an experiment file (`paged-attn run FILE`) and given as flags
    (`paged-attn bench e2e ...`): the same resolved options in both config snapshots, the same
    artefacts, and `paged-attn compare` matches every point of one run in the other."""
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(E2E_YAML))
    a, b = tmp_path / "yaml-run", tmp_path / "cli-run"
    assert cli.main(["run", str(path), "--out", str(a), "--no-progress"]) == 0
    assert cli.main(["bench", "e2e", *E2E_FLAGS, "--out", str(b)]) == 0
    for run in (a, b):
        for f in ("config.yaml", "env.json", "results.jsonl", "results.csv", "summary.md"):
            assert (run / f).stat().st_size > 0, (run, f)
    snap_a, snap_b = (yaml.safe_load((r / "config.yaml").read_text()) for r in (a, b))
    assert snap_a["bench"] == snap_b["bench"] == "e2e"
    assert snap_a["options"] == snap_b["options"]
    assert snap_a["options"]["budget_gib"] == 1.0            # the preset's, resolved
    rows = [json.loads(x) for x in (a / "results.jsonl").read_text().splitlines()]
    assert [(r["measurement"], r["backend"], r["batch"]) for r in rows] == [
        ("e2e", "numpy", 1), ("e2e", "numpy", 2)]
    with open(a / "results.csv") as f:
        assert [r["api_ms"] for r in csv.DictReader(f)] == [str(r["api_ms"]) for r in rows]
    assert "## e2e" in (a / "summary.md").read_text()
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "2 matched point(s); 0 only in A, 0 only in B." in text
    assert "api ms B/A" in text


def test_bench_experiment_options_are_checked_by_the_bench(tmp_path, capsys):
    for options, needle in (({"colour": "blue"}, "options.colour: unknown option"),
                            ({"batches": "many"}, "argument --batches"),
                            ({"host": "yes"}, "options.host: expected true or false")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**E2E_YAML, "options": options}))
        assert cli.main(["run", str(path), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and needle in err, err
    assert not (tmp_path / "never").exists()


def test_compare_matches_nothing_across_measurements(tmp_path, capsys):
    """A bench run against a sweep: no point in common, said so, exit 1."""
    a = tmp_path / "a"
    assert cli.main(["bench", "e2e", *E2E_FLAGS, "--out", str(a)]) == 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.jsonl").write_text(json.dumps(
        {"backend": "numpy", "path": "reference", "status": "ok", "us_median": 1.0}) + "\n")
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(tmp_path / "b")]) == 1
    assert "0 matched point(s); 2 only in A, 1 only in B." in capsys.readouterr().out


def test_generate_kv_bits_list_and_rows_per_format(tmp_path):
    """--kv-bits 16,8 runs each paged impl on plain and on int8 pools in one run: one row per
    format (kv_bits None / 8, the same backend and path), and a bad value is refused by name."""
    import argparse

    import pytest

    from paged_attention.lab.generate import kv_bits_list
    assert kv_bits_list("16,8") == [None, 8] and kv_bits_list("4") == [4]
    with pytest.raises(argparse.ArgumentTypeError, match="--kv-bits"):
        kv_bits_list("2")
    pytest.importorskip("mlx_lm")
    out = tmp_path / "run"
    assert cli.main(["bench", "generate", "--batches", "1", "--max-tokens", "2", "--impls",
                     "numpy:reference", "--kv-bits", "16,8", "--lengths", "8-8", "--no-warmup",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("measurement") == "generate"]
    assert {(r["path"], r["kv_bits"]) for r in rows} == {("reference", None), ("reference", 8)}


def test_serial_layers_feed_each_output_to_the_next_layer():
    """timing.serial: layer i > 0 takes layer i-1's output (so a device cannot overlap them),
    and every step starts again from first(0)."""
    from paged_attention.lab import timing
    seen = []

    def layer(i, x):
        seen.append((i, x))
        return f"out{i}({x})"
    fn = timing.serial(layer, lambda i: f"q{i}")
    assert [fn(i) for i in range(3)][-1] == "out2(out1(out0(q0)))"
    assert [fn(i) for i in range(2)][-1] == "out1(out0(q0))"
    assert [x for _, x in seen[:3]] == ["q0", "out0(q0)", "out1(out0(q0))"]


def test_e2e_new_rows_are_a_contiguous_view_of_the_previous_output():
    """bench e2e's K/V rows depend on the previous layer's output without a copy kernel: a
    row-contiguous view of it (a strided one is copied by MLX before a custom kernel)."""
    x = np.arange(3 * e2e.HQ * e2e.D, dtype=np.float16).reshape(3, e2e.HQ, e2e.D)
    rows = e2e.new_rows(x)
    assert rows.shape == (3, e2e.HKV, e2e.D) and rows.flags.c_contiguous
    assert np.shares_memory(rows, x) and rows[2, 1, 0] == x.reshape(-1, e2e.D)[2 * e2e.HKV + 1, 0]


def test_parse_sizes_reads_k_suffixes_in_order_and_names_bad_input():
    """The one parser of --batches/--contexts (benches, bench e2e, paged-attn tune)."""
    import pytest

    from paged_attention.errors import InvalidInput
    from paged_attention.lab.benches import parse_sizes
    assert parse_sizes(" 32k, 1,4K ") == [32768, 1, 4096]
    for bad, match in (("1,x", "comma list"), ("0,4", "positive"), ("4k,-1", "positive")):
        with pytest.raises(InvalidInput, match=match):
            parse_sizes(bad)
