"""The decode benches' comparisons with plain (lab/bench/against_plain.py): --attention and
--kv-dtype lists in `paged-attn bench vulkan` (run on lavapipe at toy sizes: ratios and parity
against the numpy reference) and `paged-attn bench mlx` (its fused kernels need a Metal or CUDA
device: here they are a stand-in returning zeros, so what runs is the bench's own code: options,
cases, interleaved timing, ratios, records and target lines), and the targets' arithmetic."""
from __future__ import annotations

import json

import pytest

from paged_attention.errors import InvalidInput
from paged_attention.kv_formats import KVFormat
from paged_attention.lab import benches
from paged_attention.lab.bench import against_plain as ap
from paged_attention.lab.experiments.runner import bench_cli
from paged_attention.registry import unavailable_reason

VARIANTS = ["sinks", "softcap", "alibi", "lse"]
FORMATS = ["int8", "int4", "float8_e4m3"]


def test_attention_and_kv_dtype_lists_parse_and_bad_names_are_refused(capsys):
    p = benches.parser("vulkan")
    a = p.parse_args(["--attention", "plain,all", "--kv-dtype", "fp16, int8,int4,float8_e4m3"])
    assert a.attention == "sinks,softcap,alibi,lse"
    assert a.kv_dtype == "float16,int8,int4,float8_e4m3"
    assert p.parse_args(["--attention", "lse,plain"]).attention == "lse"
    for flag, bad in (("--attention", "sinks,bias"), ("--kv-dtype", "int8,int5")):
        with pytest.raises(SystemExit):
            p.parse_args([flag, bad])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and bad.split(",")[1] in err


def test_a_single_format_keeps_its_meaning_and_a_list_compares_with_the_pool_dtype():
    assert ap.split_kv_dtypes("int8", "float16") == ("int8", [])
    assert ap.split_kv_dtypes(None, "float16") == (None, [])
    assert ap.split_kv_dtypes("float16,int8,int4", "float16") == (None, ["int8", "int4"])
    assert ap.split_kv_dtypes("int4,float8_e4m3", "float16") == (None, ["int4", "float8_e4m3"])
    with pytest.raises(InvalidInput, match="--kv-dtype: .*--dtype bfloat16.*float16"):
        ap.split_kv_dtypes("float16,int8", "bfloat16")


def test_targets_apply_from_the_issues_sizes_and_the_worst_case_decides():
    assert ap.verdict("sinks", 4, 16384, 1.09) == (1.10, True)
    assert ap.verdict("alibi", 8, 8192, 1.11) == (1.10, False)
    assert ap.verdict("lse", 2, 16384, 3.0) == (None, None)          # B*ctx 32k < 64k
    assert ap.verdict("int8", 4, 16384, 0.61) == (None, None)        # 64k: formats not yet held
    assert ap.verdict("int8", 8, 16384, 0.61) == (0.60, False)       # 128k: held
    assert ap.verdict("int8", 8, 16384 * 2, 0.60) == (0.60, True)
    assert ap.verdict("float8_e4m3", 32, 4096, 0.61) == (0.60, False)
    assert ap.verdict("int4", 32, 4096, 0.41) == (0.40, False)
    line = ap.summary_line(4, 16384, {"softcap": 1.2, "int4": 0.3}, "splitk")
    assert line == ("targets B=4 ctx=16384 splitk: softcap 1.20x <= 1.10 FAIL; "
                    "int4 0.30x (no target below B*ctx 128k)")
    entries = [{"name": "sinks", "batch": 8, "context": 8192, "ratio": 1.02, "where": "fused"},
               {"name": "alibi", "batch": 32, "context": 4096, "ratio": 1.08, "where": "splitk"},
               {"name": "alibi", "batch": 1, "context": 4096, "ratio": 2.0, "where": "splitk"},
               {"name": "int4", "batch": 32, "context": 4096, "ratio": 0.45, "where": "fused"}]
    got = {title.split(" ")[0]: (ok, detail) for title, ok, detail in ap.overall(entries)}
    assert got["attention"] == (True, "worst alibi 1.08x at (32, 4096) splitk, over 2 case(s)")
    assert got["int4"] == (False, "worst int4 0.45x at (32, 4096) fused, over 1 case(s)")
    assert set(got) == {"attention", "int4"}   # no int8 / fp8 case: no verdict


VK_REASON = unavailable_reason("vulkan")


@pytest.mark.skipif(VK_REASON is not None, reason=f"vulkan backend unavailable: {VK_REASON}")
def test_bench_vulkan_times_variants_and_formats_against_plain_with_parity(tmp_path, capsys):
    """Every variant and format on both paths: its kernel time over plain's as `x plain` and
    ratio_vs_plain, its output (and LSE) against the numpy reference over what its pool holds,
    its bytes (a format's data + scales), and a targets line per point and path."""
    out = tmp_path / "vk.json"
    argv = ["--batch", "2", "--context", "80", "--layers", "0", "--iters", "2", "--rounds", "2",
            "--warmup", "0", "--prefill-tokens", "16", "--q-heads", "4", "--kv-heads", "2",
            "--head-dim", "64", "--attention", "all", "--kv-dtype", "fp16,int8,int4,float8_e4m3",
            "--out", str(tmp_path / "run"), "--json", str(out)]
    assert bench_cli("vulkan", argv) == 0
    text = capsys.readouterr().out
    assert "| B | ctx | path | case | auto | kernel us | GB/s | % peak | x plain |" in text
    for path in ("fused", "splitk"):
        assert f"targets B=2 ctx=80 {path}: sinks " in text
    rows = [r for r in json.loads(out.read_text())["rows"] if r["measurement"] == "vulkan.point"]
    for path in ("fused", "splitk"):
        mine = {r["attention"] or r["kv_dtype"] or "plain": r for r in rows if r["path"] == path}
        assert sorted(mine) == sorted(["plain"] + VARIANTS + FORMATS)
        plain = mine["plain"]
        assert plain["ratio_vs_plain"] is None and plain["rms"] < 1e-3
        for name, r in mine.items():
            if name == "plain":
                continue
            assert r["ratio_vs_plain"] == pytest.approx(r["kernel_us"] / plain["kernel_us"])
            assert r["target"] is None and r["target_ok"] is None   # B*ctx 160: held to nothing
            assert r["rms"] < 1e-3, (path, name, r["rms"])
        assert mine["lse"]["lse_rms"] < 1e-4
        assert mine["alibi"]["mbytes"] == plain["mbytes"] == 2 * 80 * 2 * 2 * 64 * 2 / 1e6
        for name in FORMATS:
            assert mine[name]["mbytes"] == \
                2 * 80 * KVFormat(name, 64).bytes_per_token(2, 64, "float16") / 1e6


def stub_kernels(monkeypatch, seen):
    """The bench's host side on the CPU: the fused kernels replaced by a stand-in returning
    zeros, `seen(kernel, split, features, kv, inputs, outputs)` called at each launch."""
    import mlx.core as mx
    from paged_attention.backends.mlx import fused
    from paged_attention.lab.bench import mlx_decode

    def stand_in(api, kernel, split, features=frozenset(), kv=None):
        def launch(inputs, output_shapes, output_dtypes, template, grid, threadgroup):
            outs = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
            seen(kernel, split, features, kv, inputs, outs)
            return outs
        return launch
    monkeypatch.setattr(fused, "_kernel", stand_in)
    monkeypatch.setattr(mlx_decode, "gpu_kind", lambda: "cuda")


def test_bench_mlx_compares_variants_and_formats_with_plain_fused(tmp_path, capsys, monkeypatch):
    """The MLX bench's host side on the CPU: the fused kernels replaced by a stand-in that
    checks each launch's inputs against its form's signature and returns zeros. Each variant
    and format is a record of path fused with its ratio to plain fused, a format's bytes are
    its own, --check runs for every case, and each point prints its targets line."""
    pytest.importorskip("mlx.core")
    from paged_attention.backends.mlx import kernel_source as ks
    launched = []

    def seen(kernel, split, features, kv, inputs, outs):
        ins = ks.input_names(kernel, split, features, kv)
        assert len(inputs) == len(ins), (kernel, ins)
        launched.append(ks.kernel_name(kernel, split, features, kv))
    stub_kernels(monkeypatch, seen)
    out = tmp_path / "mlx.json"
    argv = ["--batches", "1,2", "--contexts", "64", "--layers", "2", "--repeats", "2",
            "--warmup", "0", "--hq", "8", "--hkv", "2", "--head-dim", "64", "--paths", "fused",
            "--attention", "all", "--kv-dtype", "fp16,int8,int4,float8_e4m3", "--check",
            "--out", str(tmp_path / "run"), "--json", str(out)]
    assert bench_cli("mlx", argv) == 0
    text = capsys.readouterr().out
    assert "targets B=2 ctx=64 fused: sinks " in text and " int4 " in text
    assert {"pa_paged_decode_sinks", "pa_paged_decode_cap", "pa_paged_decode_alibi",
            "pa_paged_decode_lse", "pa_paged_decode_int8", "pa_paged_decode_int4",
            "pa_paged_decode_fp8", "pa_paged_decode"} <= set(launched)
    rows = json.loads(out.read_text())["rows"]
    for batch in (1, 2):
        mine = {r["attention"] or r["kv_dtype"] or "plain": r for r in rows if r["batch"] == batch}
        assert sorted(mine) == sorted(["plain"] + VARIANTS + FORMATS)
        assert {r["path"] for r in mine.values()} == {"fused"}
        plain = mine.pop("plain")
        assert plain["ratio_vs_plain"] is None and plain["kv_bytes"] == batch * 64 * 2 * 64 * 2 * 2
        for name, r in mine.items():
            assert r["ratio_vs_plain"] == pytest.approx(r["us_per_layer"] / plain["us_per_layer"])
            assert r["rms_vs_gather"] is not None
            want = batch * 64 * (KVFormat(name, 64).bytes_per_token(2, 64, "float16")
                                 if name in FORMATS else 2 * 64 * 2 * 2)
            assert r["kv_bytes"] == want, name
        assert mine["lse"]["lse_rms_vs_gather"] is not None


def test_bench_mlx_refuses_comparisons_without_the_fused_path():
    pytest.importorskip("mlx.core")
    from paged_attention.lab.bench import mlx_decode
    a = benches.parser("mlx").parse_args(["--paths", "gather,sdpa", "--attention", "lse"])
    with pytest.raises(InvalidInput, match="--paths: .*fused.*gather,sdpa"):
        mlx_decode.resolve(a)
    a = benches.parser("mlx").parse_args(["--kv-dtype", "int8"])   # one format: no comparison
    mlx_decode.resolve(a)


@pytest.mark.parametrize("order", ["--serial", "--independent"])
def test_bench_mlx_times_serial_layers_unless_told(monkeypatch, tmp_path, order):
    """Serial (the default): each layer's kernel reads the previous layer's output as its q, as
    a model's step does; --independent: never (each layer its own q). The records say which."""
    pytest.importorskip("mlx.core")
    fed, made = [], set()

    def seen(kernel, split, features, kv, inputs, outs):
        if kernel == "decode":
            fed.append(id(inputs[0]) in made)
        made.update(id(o) for o in outs)
    stub_kernels(monkeypatch, seen)
    out = tmp_path / "mlx.json"
    argv = ["--batches", "1", "--contexts", "64", "--layers", "3", "--repeats", "1",
            "--warmup", "0", "--hq", "8", "--hkv", "2", "--head-dim", "64", "--paths", "fused",
            "--partitions", "1", order, "--out", str(tmp_path / "run"), "--json", str(out)]
    assert bench_cli("mlx", argv) == 0
    serial = order == "--serial"
    assert fed and any(fed) == serial and fed.count(True) == (2 * fed.count(False) if serial else 0)
    rows = json.loads(out.read_text())["rows"]
    assert {r["layer_order"] for r in rows} == {order[2:]}
