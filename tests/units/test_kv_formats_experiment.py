"""The kv_formats experiment (ADR 0011): the shipped file's --quick grid, run through the CLI,
checked against what the formats and the backends' capabilities say it must contain."""
from __future__ import annotations

import json
import os

import pytest
import yaml

import paged_attention as pa
from paged_attention.lab import cli
from paged_attention.lab.experiments import config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(REPO, "experiments", "kv_formats.yaml")
FORMATS = (None, "int8", "int4", "float8_e4m3")
with open(SHIPPED) as _f:
    MODEL_HEAD_DIM = yaml.safe_load(_f)["greedy"]["model"]["head_dim"]


def expected_bytes_per_token(kv, hkv, d, group, itemsize=2):
    """K and V of one token, from the format's definition (ADR 0011), not from the code."""
    if kv is None:
        return 2 * hkv * d * itemsize
    if kv == "float8_e4m3":
        return 2 * hkv * d
    bits = {"int8": 8, "int4": 4}[kv]
    return 2 * hkv * (d * bits // 8 + 2 * (d // group) * itemsize)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("matplotlib")   # the experiments extra (plots)
    out = tmp_path_factory.mktemp("kv") / "run"
    backends = [b for b in ("numpy", "mlx", "vulkan") if b in pa.available_backends()]
    argv = ["run", SHIPPED, "--quick", "--out", str(out), "--no-progress"]
    for b in backends:
        argv += ["--backend", b]
    code = cli.main(argv)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return code, out, rows, backends


def test_quick_writes_table_and_plots(quick_run):
    code, out, rows, _ = quick_run
    assert code == 0
    for f in ("summary.md", "results.jsonl", "results.csv", "config.yaml", "latency.png",
              "gbs.png", "formats.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    summary = (out / "summary.md").read_text()
    assert "| bytes/token | RMS vs plain | RMS vs exact |" in summary
    assert "not meaningful for speed claims" in summary        # every device here is a CPU
    assert "formats.png" in summary
    snap = yaml.safe_load((out / "config.yaml").read_text())
    assert snap["quick_applied"] and snap["greedy"]["steps"] == 64


def test_every_path_runs_exactly_the_formats_it_lists(quick_run):
    """A path listing a format in backend.kv_formats measures it; any other path (and the
    dense baseline) is skipped with a reason naming the format: when Vulkan or the MLX fused
    kernel lists a format, the experiment picks it up with no change."""
    _, _, rows, backends = quick_run
    exp = config.load(SHIPPED, quick=True)
    shapes = {(p["batch"], p["context"]) for p in exp.points()}
    decode = [r for r in rows if not r.get("measurement")]
    for name in backends:
        be = pa.get_backend(name)
        for path in list(be.paths) + (["dense"] if be.has_dense_attention else []):
            for kv in FORMATS:
                got = [r for r in decode if (r["backend"], r["path"], r["kv_dtype"]) ==
                       (name, path, kv)]
                assert {(r["batch"], r["context"]) for r in got} == shapes, (name, path, kv)
                reads = kv is None or (path != "dense" and kv in be.kv_formats.get(path, ()))
                if reads:
                    assert {r["status"] for r in got} == {"ok"}, [r["note"] for r in got]
                else:
                    assert all(r["status"] == "skipped" and repr(kv) in r["note"] for r in got)
        be.close()


def test_bytes_gbs_and_errors(quick_run):
    _, _, rows, _ = quick_run
    ok = [r for r in rows if not r.get("measurement") and r["status"] == "ok"]
    plain = {(r["backend"], r["path"], r["batch"], r["context"]): r for r in ok
             if r["kv_dtype"] is None}
    by_point: dict = {}
    for r in ok:
        kv, group = r["kv_dtype"], r["kv_group_size"]
        assert (group is None) == (kv in (None, "float8_e4m3"))
        bpt = expected_bytes_per_token(kv, r["num_kv_heads"], r["head_dim"], group)
        assert r["bytes_per_token"] == bpt
        assert r["kv_bytes"] == r["batch"] * r["context"] * bpt        # scales included
        assert r["gbs"] == pytest.approx(r["kv_bytes"] / (r["us_median"] * 1e-6) / 1e9)
        assert r["rms_ok"] is True          # the kernel vs float64 over what the pool holds
        if kv is None:
            assert r["rms_vs_plain"] is None and r["rms_vs_exact"] == r["rms"]
            continue
        # The triangle inequality ties the two errors: they differ by at most the plain
        # pool's own error on the same path (same values, same queries).
        base = plain[(r["backend"], r["path"], r["batch"], r["context"])]
        assert abs(r["rms_vs_plain"] - r["rms_vs_exact"]) <= base["rms"] * 1.001 + 1e-12
        by_point.setdefault((r["backend"], r["path"], r["batch"], r["context"]), {}) \
            .setdefault(kv, []).append(r["rms_vs_exact"])
    assert by_point
    for errs in by_point.values():
        # N(0, 1) K/V: int8 (255 steps per group) < fp8 (3 mantissa bits) < int4 (15 steps),
        # at every group size.
        assert max(errs["int8"]) < min(errs["float8_e4m3"]) <= max(errs["float8_e4m3"]) \
            < min(errs["int4"]), errs


def test_greedy_agreement_records(quick_run):
    _, out, rows, backends = quick_run
    greedy = [r for r in rows if r.get("measurement") == "greedy"]
    exp = config.load(SHIPPED, quick=True)
    formats = {(p["kv_dtype"], p["kv_group_size"]) for p in exp.points() if p["kv_dtype"]}
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        assert greedy and all(r["status"] == "skipped" and "mlx-lm" in r["note"] for r in greedy)
        return
    for name in backends:
        be = pa.get_backend(name)
        for path in be.paths:
            mine = [r for r in greedy if (r["backend"], r["path"]) == (name, path)]
            assert sorted((r["kv_dtype"], r["kv_group_size"]) for r in mine) == sorted(formats)
            for r in mine:
                kv, group = r["kv_dtype"], r["kv_group_size"]
                if kv not in be.kv_formats.get(path, ()):
                    assert r["status"] == "skipped" and repr(kv) in r["note"]
                    continue
                if group is not None and MODEL_HEAD_DIM % group:
                    assert r["status"] == "skipped" and "kv_group_size" in r["note"]
                    continue
                assert r["status"] == "ok", r["note"]
                assert r["steps"] == 64 and len(r["first_divergences"]) == r["prompts"] == 3
                assert 0 <= r["tokens_equal"] <= 1
                assert (r["first_divergence"] is None) == (r["tokens_equal"] == 1)
                parted = [f for f in r["first_divergences"] if f is not None]
                assert r["first_divergence"] == (min(parted) if parted else None)
        be.close()
    assert "## Greedy agreement with plain KV" in (out / "summary.md").read_text()


def test_points_group_sizes(tmp_path):
    data = {"grid": {"head_dim": 64, "kv_dtype": [None, "int8", "float8_e4m3"],
                     "kv_group_size": [32, 64, 128]}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    pts = [(p["kv_dtype"], p["kv_group_size"]) for p in config.load(str(path)).points()]
    # No group for formats without one; 128 does not divide head_dim 64.
    assert pts == [(None, None), ("int8", 32), ("int8", 64), ("float8_e4m3", None)]


@pytest.mark.parametrize("grid, greedy, needle", [
    ({"kv_dtype": "int3"}, None, "grid.kv_dtype: expected null or one of"),
    ({"kv_group_size": 48}, None, "grid.kv_group_size: expected one of [32, 64, 128]"),
    ({}, {"steps": 4}, "greedy.model: expected an mlx-lm config mapping"),
    ({}, {"model": {"model_type": "llama"}, "prompts": [0]}, "greedy.prompts: expected"),
])
def test_format_config_errors(tmp_path, grid, greedy, needle):
    data = {"grid": grid} if greedy is None else {"grid": grid, "greedy": greedy}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(config.ConfigError, match=None) as exc:
        config.load(str(path))
    assert needle in str(exc.value), exc.value
