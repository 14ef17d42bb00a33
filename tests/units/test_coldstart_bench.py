"""`paged-attn bench coldstart` at a toy size: fresh processes, the second served by the caches
the first filled (ADR 0009, "Cold start")."""
from __future__ import annotations

import json

import pytest

from paged_attention.lab.bench import coldstart
from paged_attention.registry import unavailable_reason

TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--intermediate", "128", "--vocab", "64", "--batch", "2", "--prompt-tokens", "20",
        "--max-tokens", "4"]


def bench(tmp_path, name, *argv) -> list[dict]:
    out = tmp_path / f"{name}.json"
    assert coldstart.main([*TINY, *argv, "--out", str(tmp_path / name), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["process"] for r in rows] == [1, 2]
    for r in rows:
        assert r["same_tokens"] and 0 < r["warm_s"] and 0 < r["first_s"]
        assert r["overhead_s"] == pytest.approx(r["first_s"] - r["warm_s"])
    return rows


@pytest.mark.skipif(unavailable_reason("vulkan") is not None,
                    reason=f"vulkan backend unavailable: {unavailable_reason('vulkan')}")
def test_vulkan_second_process_runs_no_glslc(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))   # must stay untouched
    first, second = bench(tmp_path, "fresh", "--backend", "vulkan", "--fresh-caches")
    assert first["glslc_runs"] > 0 and first["spirv_loaded"] == 0
    assert second["glslc_runs"] == 0 and second["spirv_loaded"] == first["glslc_runs"]
    assert first["glslc_warm"] == second["glslc_warm"] == 0
    assert not (tmp_path / "user-cache").exists()
    assert "process 2: first - warm" in capsys.readouterr().out
    # Without a disk cache every process compiles again: the count above is not a constant.
    monkeypatch.setenv("PAGED_ATTENTION_VK_SPIRV_CACHE", "off")
    first, second = bench(tmp_path, "off", "--backend", "vulkan")
    assert second["glslc_runs"] == first["glslc_runs"] > 0 and second["spirv_loaded"] == 0


@pytest.mark.skipif(unavailable_reason("mlx") is not None,
                    reason=f"mlx backend unavailable: {unavailable_reason('mlx')}")
def test_mlx_runs_with_fresh_caches(tmp_path):
    rows = bench(tmp_path, "mlx", "--backend", "mlx", "--fresh-caches")
    assert all(r["ptx_dir"].startswith(str(coldstart.tempfile.gettempdir())) for r in rows)
    assert rows[0]["ptx_dir"] == rows[1]["ptx_dir"] and rows[0]["ptx_before"] == 0
    # CUDA writes one file per NVRTC compile; the second process writes none (on the CPU
    # neither does, MLX compiles no PTX there).
    assert rows[1]["ptx_written"] == 0
