"""Vulkan backend specifics: shader cache and errors, split-K, one-submission decode steps, clamps.

The shared decode matrix (tests/matrix/test_decode_matrix.py) already runs every path of this backend;
these tests cover what only the Vulkan backend has. Kept small for lavapipe.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paged_attention import reference
from paged_attention.errors import BackendUnavailable, PagedAttentionError
from paged_attention.interface import LayerStep
from paged_attention.registry import unavailable_reason

REASON = unavailable_reason("vulkan")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"vulkan backend unavailable: {REASON}")
ROOT = Path(__file__).resolve().parents[2]
TOL = 5e-3


@pytest.fixture(scope="module")
def vk():
    from paged_attention.backends.vulkan import Backend
    be = Backend()
    yield be
    be.close()


def fill(be, pool, tables, lens, rng):
    """Random K/V for every position of every sequence; returns the host mirror (k, v)."""
    s = pool.spec
    dt = np.dtype(s.dtype)
    k = np.zeros(s.shape, dt)
    v = np.zeros(s.shape, dt)
    slots = np.concatenate([tables[b, np.arange(n) // s.block_size] * s.block_size + np.arange(n) % s.block_size
                            for b, n in enumerate(lens)]).astype(np.int64)
    nk = rng.standard_normal((slots.size, s.num_kv_heads, s.head_dim)).astype(dt)
    nv = rng.standard_normal((slots.size, s.num_kv_heads, s.head_dim)).astype(dt)
    be.write_kv(pool, slots, nk, nv)
    b_, o_ = np.divmod(slots, s.block_size)
    k[b_, o_], v[b_, o_] = nk, nv
    return k, v


def disjoint_tables(batch, nblocks_per_seq, num_blocks, rng):
    return rng.permutation(num_blocks)[:batch * nblocks_per_seq].reshape(batch, nblocks_per_seq).astype(np.int32)


# -- shader pipeline ---------------------------------------------------------------------------------
def test_shader_cache_hit_skips_glslc(tmp_path, monkeypatch):
    from paged_attention.backends.vulkan.shaders import ShaderCompiler, unpack
    defines = dict(DP=64, G=2, HKV=2, BS=16, WG=64, TPT=8, F16=1, U=2, SPLITK=0)
    c1 = ShaderCompiler(cache=tmp_path)
    key, spirv = c1.compile("decode.comp", **defines)
    assert c1.compiles == 1 and unpack((tmp_path / f"{key}.spv").read_bytes()) == spirv
    assert spirv[:4] == b"\x03\x02\x23\x07"  # SPIR-V magic
    # A fresh compiler (new process, say) finds it on disk and never runs glslc.
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("glslc ran on a cache hit"))
    c2 = ShaderCompiler(cache=tmp_path)
    assert c2.compile("decode.comp", **defines) == (key, spirv) and c2.compiles == 0
    # A different define is a different key.
    assert c2.key("x", {"A": 1}) != c2.key("x", {"A": 2})


def test_compile_error_carries_compiler_message(tmp_path):
    from paged_attention.backends.vulkan.shaders import ShaderCompileError, ShaderCompiler
    src = "#version 450\nlayout(local_size_x = 1) in;\nvoid main() { float x = no_such_symbol; }\n"
    with pytest.raises(ShaderCompileError, match="no_such_symbol") as info:
        ShaderCompiler(cache=tmp_path).compile_source(src, {"WG": 1}, "broken.comp")
    assert isinstance(info.value, PagedAttentionError) and "broken.comp" in str(info.value)


def test_missing_glslc_is_a_clear_error(tmp_path, monkeypatch):
    from paged_attention.backends.vulkan.shaders import ShaderCompiler
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="glslc.*apt-get install glslc"):
        ShaderCompiler(cache=tmp_path / "cache").compile("kv_append.comp", ROWW=4, WG=64)


# -- probe and lifecycle ------------------------------------------------------------------------------
def test_probe_reports_the_device(vk):
    from paged_attention.backends.vulkan import device_info, probe
    assert probe() is None
    info = device_info()
    assert info["device_name"] == vk.device and vk.device
    assert device_info() is info  # cached: one subprocess per process


def test_close_releases_the_manager():
    from paged_attention.backends.vulkan import Backend
    be = Backend()
    pool = be.create_pool(4, 16, 1, 8, "float32")
    be.close()
    assert be._dev.mgr is None
    be.close()  # idempotent
    with pytest.raises(PagedAttentionError, match="closed"):
        be.create_pool(4, 16, 1, 8)
    with pytest.raises(PagedAttentionError, match="closed"):
        pool.to_numpy()


# -- pools -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,head_dim", [("float16", 72), ("float32", 6)])
def test_pool_roundtrip_copy_blocks_padded_head_dim(vk, dtype, head_dim):
    rng = np.random.default_rng(1)
    pool = vk.create_pool(8, 16, 2, head_dim, dtype)
    k, v = pool.to_numpy()
    assert k.shape == (8, 16, 2, head_dim) and k.dtype == np.dtype(dtype) and not k.any() and not v.any()
    slots = np.array([0, 5, 17, 40, 127])
    nk = rng.standard_normal((5, 2, head_dim)).astype(dtype)
    nv = rng.standard_normal((5, 2, head_dim)).astype(dtype)
    vk.write_kv(pool, slots, nk, nv)
    vk.copy_blocks(pool, [(1, 6), (0, 3)])
    k, v = pool.to_numpy()
    ek = np.zeros_like(k)
    ev = np.zeros_like(v)
    ek.reshape(-1, 2, head_dim)[slots] = nk
    ev.reshape(-1, 2, head_dim)[slots] = nv
    ek[[6, 3]] = ek[[1, 0]]
    ev[[6, 3]] = ev[[1, 0]]
    np.testing.assert_array_equal(k, ek)
    np.testing.assert_array_equal(v, ev)


# -- attention ---------------------------------------------------------------------------------------
def test_splitk_matches_fused_and_reference_at_long_context(vk, setenv):
    setenv("PAGED_ATTENTION_VK_CHUNK", "1024")  # several splits whatever the device
    rng = np.random.default_rng(2)
    bs, hkv, g, d = 16, 2, 4, 64
    lens = np.array([3000, 1777], dtype=np.int32)
    nbps = -(-int(lens.max()) // bs)
    pool = vk.create_pool(2 * nbps + 3, bs, hkv, d, "float16")
    tables = disjoint_tables(2, nbps, 2 * nbps + 3, rng)
    k, v = fill(vk, pool, tables, lens, rng)
    q = rng.standard_normal((2, hkv * g, d)).astype(np.float16)
    from paged_attention.validation import check_decode
    a = check_decode(q, pool.spec, tables, lens, None, None)
    nsplit, chunk = vk.split_geometry(a, pool.spec)
    assert nsplit > 1 and nsplit * chunk >= 3000
    for window in (None, 1000):
        want = reference.decode(q, k, v, tables, lens, window=window)
        fused = vk.decode(q, pool, tables, lens, window=window, path="fused")
        split = vk.decode(q, pool, tables, lens, window=window, path="splitk")
        assert fused.dtype == split.dtype == np.float16
        assert reference.rms(fused, want) < TOL and reference.rms(split, want) < TOL
        assert reference.rms(fused, split) < 1e-3


def test_auto_path_prefers_splitk_for_long_contexts_and_small_batches(vk, setenv):
    from paged_attention.validation import PoolSpec, check_decode
    setenv("PAGED_ATTENTION_PATH", "")   # empty: unset
    spec = PoolSpec(4096, 16, 2, 64, "float16")
    def choice(batch, ctx):
        nb = -(-ctx // 16)
        a = check_decode(np.zeros((batch, 8, 64), np.float16), spec, np.zeros((batch, nb), np.int32),
                         np.full(batch, ctx, np.int32), None, None)
        return vk.resolve_path("auto", a, spec)
    assert choice(1, 8192) == "splitk"
    assert choice(1, 64) == "fused"
    assert choice(4 * vk.compute_units, 4096) == "fused"
    setenv("PAGED_ATTENTION_PATH", "fused")
    assert choice(1, 8192) == "fused"


def test_fp32_q_on_fp16_pool_and_empty_inputs(vk):
    rng = np.random.default_rng(3)
    pool = vk.create_pool(8, 16, 1, 64, "float16")
    tables = np.array([[2, 5], [1, 0]], dtype=np.int32)
    lens = np.array([20, 0], dtype=np.int32)
    k, v = fill(vk, pool, tables, lens, rng)
    q = rng.standard_normal((2, 2, 64)).astype(np.float32)
    out = vk.decode(q, pool, tables, lens)
    assert out.dtype == np.float32 and not out[1].any()
    assert reference.rms(out, reference.decode(q, k, v, tables, lens)) < TOL
    empty = vk.decode(np.zeros((0, 2, 64), np.float16), pool, np.zeros((0, 2), np.int32), np.zeros(0, np.int32))
    assert empty.shape == (0, 2, 64)


def test_decode_step_is_one_submission_and_matches_reference(vk):
    rng = np.random.default_rng(4)
    nl, b, hkv, g, d, bs = 4, 3, 2, 4, 64, 16
    lens = np.array([33, 1, 70], dtype=np.int32)  # already counting the token appended this step
    nbps = -(-int(lens.max()) // bs)
    pools = [vk.create_pool(b * nbps + 2, bs, hkv, d, "float16") for _ in range(nl)]
    tables = disjoint_tables(b, nbps, b * nbps + 2, rng)
    prev = lens - 1
    mirrors = [fill(vk, p, tables, prev, rng) for p in pools]
    slots = (tables[np.arange(b), prev // bs].astype(np.int64) * bs + prev % bs)
    for step in range(2):  # the second step resubmits the recorded command buffer
        qs = [rng.standard_normal((b, hkv * g, d)).astype(np.float16) for _ in range(nl)]
        # New keys aligned with q so the appended token dominates: a missing append would show.
        ks = [np.repeat(q.reshape(b, hkv, g, d)[:, :, :1], 1, 2).reshape(b, hkv, d) * 2 for q in qs]
        vs = [rng.standard_normal((b, hkv, d)).astype(np.float16) for _ in range(nl)]
        before = vk.submissions
        outs = vk.decode_step([LayerStep(q, p, kk, vv) for q, p, kk, vv in zip(qs, pools, ks, vs)],
                              slots, tables, lens)
        assert vk.submissions - before == 1, "a multi-layer decode step must be one submission"
        for i, (mk, mv) in enumerate(mirrors):
            bb, oo = np.divmod(slots, bs)
            mk[bb, oo], mv[bb, oo] = ks[i], vs[i]
            want = reference.decode(qs[i], mk, mv, tables, lens)
            assert reference.rms(outs[i], want) < TOL, f"step {step} layer {i}"
        np.testing.assert_array_equal(pools[-1].to_numpy()[0], mirrors[-1][0])


def test_decode_step_splitk_is_one_submission(vk):
    rng = np.random.default_rng(5)
    nl, b, hkv, g, d, bs = 2, 1, 1, 2, 64, 32
    lens = np.array([1500], dtype=np.int32)
    nbps = -(-1500 // bs)
    pools = [vk.create_pool(nbps, bs, hkv, d, "float32") for _ in range(nl)]
    tables = disjoint_tables(b, nbps, nbps, rng)
    mirrors = [fill(vk, p, tables, lens - 1, rng) for p in pools]
    slots = np.array([tables[0, 1499 // bs] * bs + 1499 % bs])
    qs = [rng.standard_normal((b, hkv * g, d)).astype(np.float32) for _ in range(nl)]
    ks = [rng.standard_normal((b, hkv, d)).astype(np.float32) for _ in range(nl)]
    vs = [rng.standard_normal((b, hkv, d)).astype(np.float32) for _ in range(nl)]
    before = vk.submissions
    outs = vk.decode_step([LayerStep(*x) for x in zip(qs, pools, ks, vs)], slots, tables, lens, path="splitk")
    assert vk.submissions - before == 1
    for i, (mk, mv) in enumerate(mirrors):
        mk.reshape(-1, hkv, d)[slots], mv.reshape(-1, hkv, d)[slots] = ks[i], vs[i]
        assert reference.rms(outs[i], reference.decode(qs[i], mk, mv, tables, lens)) < TOL


@pytest.mark.parametrize("path", ["fused", "splitk"])
def test_shader_clamps_bad_tables(vk, path):
    """Bypassing validation, out-of-range block ids and lengths must not read outside the pool."""
    rng = np.random.default_rng(6)
    pool = vk.create_pool(4, 16, 1, 64, "float16")
    fill(vk, pool, np.array([[0, 1, 2, 3]], np.int32), np.array([64]), rng)
    before = pool.to_numpy()
    q = rng.standard_normal((3, 2, 64)).astype(np.float16)
    tables = np.array([[2 ** 31 - 1, -5, 3, 999], [7, 7, 7, 7], [-1, -1, -1, -1]], dtype=np.int32)
    lens = np.array([64, 10 ** 6, -3], dtype=np.int32)
    out = vk._decode_unchecked(q, pool, tables, lens, path=path)
    assert out.shape == (3, 2, 64) and np.isfinite(out).all() and not out[2].any()
    after = pool.to_numpy()
    np.testing.assert_array_equal(before[0], after[0])


# -- build script -----------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("kp") is None or not os.access(sys.executable, os.X_OK),
                    reason="kp not installed in this interpreter")
def test_build_script_is_a_no_op_when_kp_is_installed():
    import importlib.metadata as md
    try:
        version = md.version("kp")
    except md.PackageNotFoundError:
        pytest.skip("kp is importable but was not installed as a package (no metadata)")
    if version != "0.9.0+pa4":
        pytest.skip(f"kp {version} installed, the script builds the patched 0.9.0+pa4 (ADR 0008)")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build_kompute.sh"), sys.executable],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr


# -- per-device tuning (paged_attention/tuning.py, paged-attn tune) -----------------------------------
def candidate_rows(cands, backend):
    return {"rows": {c.label: {backend: {"rules": [{"max_batch": None, "params": c.params}]}}
                     for c in cands}}


@pytest.fixture(scope="module")
def vk64():
    """A backend that assumes 64 compute units (lavapipe has the CPU count): small batches then
    split, as on a GPU."""
    from paged_attention import settings
    from paged_attention.backends.vulkan import Backend
    with settings.override(vk_compute_units=64):
        be = Backend()
    yield be
    be.close()


def test_every_full_tuning_candidate_matches_the_reference(vk64, tmp_path):
    """Each candidate of `paged-attn tune --backend vulkan --candidates full` read as a table row:
    fused and split-K on a ragged batch (lens 1..2000, split counts 2..16) within the bound."""
    import json

    from paged_attention import settings
    from paged_attention.lab.tune import vulkan_candidates
    from paged_attention.validation import check_decode
    vk = vk64
    cands = vulkan_candidates("full")
    table = tmp_path / "candidates.json"
    table.write_text(json.dumps(candidate_rows(cands, "vulkan")))
    rng = np.random.default_rng(7)
    bs, hkv, g, d = 16, 2, 4, 64
    lens = np.array([2000, 1, 333], dtype=np.int32)
    nbps = -(-int(lens.max()) // bs)
    pool = vk.create_pool(3 * nbps + 2, bs, hkv, d, "float16")
    tables = disjoint_tables(3, nbps, 3 * nbps + 2, rng)
    k, v = fill(vk, pool, tables, lens, rng)
    q = rng.standard_normal((3, hkv * g, d)).astype(np.float16)
    want = reference.decode(q, k, v, tables, lens)
    splits = set()
    for c in cands:
        with settings.override(tuning_table=str(table), tuning_device=c.label):
            a = check_decode(q, pool.spec, tables, lens, None, None)
            splits.add(vk.split_geometry(a, pool.spec)[0])
            for path in ("fused", "splitk"):
                got = vk.decode(q, pool, tables, lens, path=path)
                err = reference.rms(got, want)
                assert err < TOL, f"{c.label} {path}: RMS {err:.2e}"
    assert max(splits) > 1 and len(splits) > 1   # the split geometry did follow the candidates


def test_tune_writes_a_row_the_backend_then_uses(vk, tmp_path, capsys):
    """`paged-attn tune --backend vulkan --write` on lavapipe (a tiny grid): the row it writes
    is what the backend's rule lookup, split geometry and decode.comp shape then follow."""
    import json

    from paged_attention import settings, tuning
    from paged_attention.backends.vulkan import geometry
    from paged_attention.lab import cli
    from paged_attention.validation import check_decode
    table = tmp_path / "tuning.json"
    table.write_text((ROOT / "paged_attention" / "tuning.json").read_text())
    argv = ["tune", "--backend", "vulkan", "--batches", "1,2", "--contexts", "256,1k", "--hq", "4",
            "--hkv", "2", "--head-dim", "64", "--layers", "2", "--repeats", "2",
            "--device-key", "H200", "--table", str(table), "--write", "--json",
            str(tmp_path / "report.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote the vulkan row of 'H200'" in out and "B=2 ctx=1024" in out
    doc = json.loads(table.read_text())
    row = doc["rows"]["H200"]["vulkan"]
    assert row["provenance"]["grid"]["batches"] == [1, 2]
    assert row["provenance"]["chosen"][0]["default_us"]       # the default's times beside
    shipped = json.loads((ROOT / "paged_attention" / "tuning.json").read_text())
    assert doc["rows"]["H100"] == shipped["rows"]["H100"]      # only its own row changed
    pool = vk.create_pool(64, 16, 2, 64, "float16")
    tables = np.arange(64, dtype=np.int32).reshape(2, 32)
    lens = np.array([512, 300], np.int32)
    q = np.zeros((2, 8, 64), np.float16)
    a = check_decode(q, pool.spec, tables, lens, None, None)
    with settings.override(tuning_table=str(table), tuning_device="H200"):
        for batch in (1, 2, 5):
            want = next(r for r in row["rules"] if r["max_batch"] is None or r["max_batch"] >= batch)
            assert vk.tuning_rule(batch).as_dict() == want["params"]
        rule = vk.tuning_rule(2)
        params = rule.as_dict()
        forced = {f"vk_{k}": v for k, v in params.items() if k in ("wg", "tpt")}
        if "unroll" in params:
            forced["vk_unroll"] = params["unroll"]
        got = geometry.decode_defines(pool, 4, False, vk.subgroup_size, rule)
        with settings.override(**forced):   # the same shape, forced through the settings
            assert got == geometry.decode_defines(pool, 4, False, vk.subgroup_size)
        assert vk.split_geometry(a, pool.spec) == geometry.split_geometry(
            a, pool.spec, vk.compute_units, tuning.Rule(None, tuple(sorted(params.items()))))
    with settings.override(tuning_table=str(table), tuning_device="H200", vk_wg=64):
        defines = geometry.decode_defines(pool, 4, False, vk.subgroup_size, vk.tuning_rule(2))
        assert defines["WG"] <= 64                              # a setting wins over the table


def test_tune_refuses_to_write_an_unknown_device_and_settings_that_win(tmp_path, capsys):
    from paged_attention import settings
    from paged_attention.lab import cli
    small = ["--batches", "1", "--contexts", "256", "--hq", "4", "--hkv", "2", "--head-dim", "64",
             "--layers", "1", "--repeats", "1", "--table", str(tmp_path / "t.json")]
    assert cli.main(["tune", "--backend", "vulkan", "--write", *small]) == 2   # llvmpipe: no key
    assert "--device-key" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
    with settings.override(vk_wg=256):
        assert cli.main(["tune", "--backend", "vulkan", *small]) == 2
    assert "PAGED_ATTENTION_VK_WG" in capsys.readouterr().err
