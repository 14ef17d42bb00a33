"""The per-device tuning table (paged_attention/tuning.py) and the selection logic of
`paged-attn tune` (paged_attention/lab/tune.py), with fake timings; the measurement itself runs
in tests/backends/test_vulkan.py (lavapipe) and tests/backends/test_mlx_fused.py (GPU)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from paged_attention import settings, tuning
from paged_attention.errors import InvalidInput
from paged_attention.lab import tune

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = json.loads((ROOT / "paged_attention" / "tuning.json").read_text())


def write(tmp_path, rows) -> str:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"rows": rows}))
    return str(path)


def test_the_h100_rows_hold_the_built_in_constants():
    """"H100 rows unchanged": the shipped rows are exactly the constants next to the kernels
    (what a device without a row runs)."""
    mx = pytest.importorskip("mlx.core")  # noqa: F841 - fused.py imports it
    from paged_attention.backends.mlx import fused
    from paged_attention.backends.vulkan import geometry
    for backend, built_in in (("mlx", fused.BUILT_IN), ("vulkan", geometry.BUILT_IN)):
        rules = SHIPPED["rows"]["H100"][backend]["rules"]
        assert rules == [{"max_batch": None, "params": built_in}], backend
        assert tuning.rule(backend, "NVIDIA H100 80GB HBM3", 32).as_dict() == built_in


def test_the_h100_rule_decides_what_no_row_decides():
    pytest.importorskip("mlx.core")
    import mlx.core as mx
    from paged_attention.backends.mlx import fused
    h100 = tuning.rule("mlx", "NVIDIA H100 80GB HBM3", 8)
    for d, group, dtype in ((128, 4, mx.float16), (64, 8, mx.float32), (256, 1, mx.bfloat16)):
        assert fused.kernel_config(d, 16, 8, group, dtype, rule=h100) == \
            fused.kernel_config(d, 16, 8, group, dtype)
    for batch in (1, 4, 8, 32, 96):
        for tokens in (100, 4096, 32768, 131072):
            assert fused.choose_partitions(batch, 8, tokens, 256, 132, rule=h100) == \
                fused.choose_partitions(batch, 8, tokens, 256, 132)


def test_a_rule_drives_the_mlx_config_and_settings_win():
    pytest.importorskip("mlx.core")
    import mlx.core as mx
    from paged_attention.backends.mlx import fused
    rule = tuning.Rule(None, (("ctas_per_unit", 6), ("iters", 4), ("stream", 2), ("warps", 8)))
    cfg = fused.kernel_config(128, 16, 8, 4, mx.float16, rule=rule)
    assert (cfg.iters, cfg.stream, cfg.warps) == (4, 2, 8)
    # More resident threadgroups per SM: more partitions to fill them at B=1.
    assert fused.choose_partitions(1, 8, 32768, 256, 132, rule=rule)[0] > \
        fused.choose_partitions(1, 8, 32768, 256, 132)[0]
    with settings.override(mlx_variant="pf1i2nc0"):
        cfg = fused.kernel_config(128, 16, 8, 4, mx.float16, rule=rule)
        assert (cfg.prefetch, cfg.iters, cfg.stream) == (True, 2, 0)
    with settings.override(mlx_splitk="off"):
        assert fused.choose_partitions(1, 8, 32768, 256, 132, rule=rule)[0] == 1


def test_the_first_rule_whose_max_batch_fits_applies(tmp_path):
    path = write(tmp_path, {"H200": {"vulkan": {"rules": [
        {"max_batch": 4, "params": {"wg": 256}}, {"max_batch": 16, "params": {"unroll": 2}},
        {"max_batch": None, "params": {}}]}}})
    with settings.override(tuning_table=path):
        got = {b: tuning.rule("vulkan", "NVIDIA H200", b).as_dict() for b in (1, 4, 5, 16, 17)}
        assert got == {1: {"wg": 256}, 4: {"wg": 256}, 5: {"unroll": 2}, 16: {"unroll": 2}, 17: {}}
        assert tuning.rule("vulkan", "NVIDIA H200", 3) is tuning.rule("vulkan", "NVIDIA H200", 3)
        assert tuning.rule("vulkan", "NVIDIA H100 PCIe", 1) == tuning.EMPTY   # no row
        assert tuning.rule("mlx", "NVIDIA H200", 1) == tuning.EMPTY           # no mlx row
        with settings.override(tuning_device="H200"):
            assert tuning.rule("vulkan", "llvmpipe", 1).as_dict() == {"wg": 256}


def test_a_last_rule_with_a_bound_leaves_larger_batches_built_in(tmp_path):
    path = write(tmp_path, {"H200": {"mlx": {"rules": [{"max_batch": 8, "params": {"l2": 1}}]}}})
    with settings.override(tuning_table=path):
        assert tuning.rule("mlx", "H200", 8).as_dict() == {"l2": 1}
        assert tuning.rule("mlx", "H200", 9) == tuning.EMPTY


@pytest.mark.parametrize("rules,match", [
    ([{"max_batch": None, "params": {"wgs": 256}}], "unknown vulkan parameter 'wgs'"),
    ([{"max_batch": None, "params": {"wg": "256"}}], "wg must be int"),
    ([{"max_batch": None, "params": {"wg": True}}], "wg must be int"),
    ([{"max_batch": 8, "params": {}}, {"max_batch": 4, "params": {}}], "rules rise"),
    ([{"max_batch": None, "params": {}}, {"max_batch": 4, "params": {}}], "only allowed on the last"),
    ([], "non-empty list"),
    ([{"batch": 1}], "expected"),
])
def test_a_malformed_table_names_what_is_wrong(tmp_path, rules, match):
    path = write(tmp_path, {"H200": {"vulkan": {"rules": rules}}})
    with settings.override(tuning_table=path), pytest.raises(InvalidInput, match=match):
        tuning.rule("vulkan", "H200", 1)


def test_a_missing_table_is_a_clear_error(tmp_path):
    with settings.override(tuning_table=str(tmp_path / "nope.json")):
        with pytest.raises(InvalidInput, match="no such file"):
            tuning.rule("vulkan", "H200", 1)


def test_write_row_replaces_only_its_own_row(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text((ROOT / "paged_attention" / "tuning.json").read_text())
    rules = [{"max_batch": 4, "params": {"wg": 256}}, {"max_batch": None, "params": {}}]
    tuning.write_row(path, "H200", "vulkan", rules, {"command": "test"})
    tuning.write_row(path, "H200", "mlx", [{"max_batch": None, "params": {"l2": 1}}], {})
    tuning.write_row(path, "H200", "vulkan", rules[1:], {"command": "again"})
    doc = json.loads(path.read_text())
    assert doc["rows"]["H100"] == SHIPPED["rows"]["H100"]
    assert doc["rows"]["H200"]["vulkan"] == {"rules": rules[1:], "provenance": {"command": "again"}}
    assert doc["rows"]["H200"]["mlx"]["rules"][0]["params"] == {"l2": 1}
    with settings.override(tuning_table=str(path)):   # the rewritten file is read again
        assert tuning.rule("mlx", "NVIDIA H200", 1).as_dict() == {"l2": 1}
    before = path.read_text()
    with pytest.raises(InvalidInput, match="not a devices.DEVICES key"):
        tuning.write_row(path, "llvmpipe", "vulkan", rules, {})
    with pytest.raises(InvalidInput, match="unknown vulkan parameter"):
        tuning.write_row(path, "H200", "vulkan", [{"max_batch": None, "params": {"x": 1}}], {})
    assert path.read_text() == before


def test_select_takes_the_lowest_geometric_mean_of_time_over_best():
    times = {"default": {1: 10.0, 2: 10.0, 3: 10.0},
             "a": {1: 5.0, 2: 20.0, 3: 10.0},     # best at 1, far off at 2
             "b": {1: 6.0, 2: 9.0, 3: 9.0},       # never far from the best
             "c": {1: 1.0, 3: 1.0}}               # failed at 2: out
    s = tune.scores(times, [1, 2, 3])
    assert math.isinf(s["c"])
    # The best at a point is over every candidate that ran there (c too); the ranking of the
    # complete candidates does not depend on that (a constant factor per point).
    assert s["b"] == pytest.approx((6 / 1 * 9 / 9 * 9 / 1) ** (1 / 3))
    assert tune.select(times, [1, 2, 3]) == "b"
    assert tune.select({"default": {1: 2.0}, "x": {1: 2.0}}, [1]) == "default"   # ties: earlier
    assert tune.select({"x": {}}, [1]) is None


def test_merge_joins_adjacent_batches_with_the_same_winner():
    assert tune.merge([(1, "a"), (4, "a"), (8, "b"), (32, "a")]) == \
        [(4, "a"), (8, "b"), (None, "a")]
    assert tune.merge([(32, "x"), (1, "x")]) == [(None, "x")]


def test_candidate_sets():
    for backend in ("mlx", "vulkan"):
        quick, full = tune.CANDIDATES[backend]("quick"), tune.CANDIDATES[backend]("full")
        assert quick[0].label == full[0].label == "default" and not quick[0].params
        assert 10 <= len(quick) <= 24 and len(full) > len(quick)
        for c in full + quick:   # every candidate is a valid rule
            tuning.parse_rules(backend, [{"max_batch": None, "params": c.params}])
        assert len({c.label for c in full}) == len(full)
    assert len(tune.vulkan_candidates("full")) == 1 + 3 * 3 * 5 * 3 * 2


class FakeMeasurer:
    """Times from a formula: candidate 'wg=256' wins at B <= 4, 'unroll=2' above; 'wg=1024'
    fails to build everywhere."""
    backend, device, peak, versions = "vulkan", "NVIDIA H200", 4.8e12, {"fake": "1"}

    def kv_bytes(self, batch, ctx):
        return batch * ctx * 4096

    def point(self, batch, ctx, cands, use):
        secs, errors = {}, {}
        for c in cands:
            with use(c.label):   # the candidate's row is what the backend reads
                assert tuning.rule("vulkan", self.device, batch).as_dict() == c.params
            if c.label == "wg=1024":
                errors[c.label] = "RuntimeError: does not compile"
                continue
            fast = c.label == ("wg=256" if batch <= 4 else "unroll=2")
            secs[c.label] = batch * ctx * 1e-9 * (0.8 if fast else 1.0)
        return secs, errors, {}


def test_tune_picks_merges_and_records_the_default_beside(capsys):
    a = argparse.Namespace(candidates="quick", hq=32, hkv=8, head_dim=128, block_size=16,
                           dtype="float16", layers=8, repeats=5)
    report = tune.tune(FakeMeasurer(), tune.vulkan_candidates("quick"), [1, 4, 8, 32],
                       [4096, 16384], a)
    assert report["rules"] == [{"max_batch": 4, "params": {"wg": 256}},
                               {"max_batch": None, "params": {"unroll": 2}}]
    w = report["winners"][0]
    assert w["candidate"] == "wg=256" and w["us"]["4096"] == pytest.approx(0.8 * w["default_us"]["4096"])
    out = capsys.readouterr().out
    assert "skipped: RuntimeError: does not compile" in out and "B=32 ctx=16384" in out
    tuning.parse_rules("vulkan", report["rules"])
