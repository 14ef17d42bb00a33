"""The cooperative-matrix prefill (prefill_coop.comp, ADR 0008): its SPIR-V, the selection between
it and prefill.comp, and (on a device with VK_NV_cooperative_matrix only) its results."""
from __future__ import annotations

import shutil
import struct
import types

import numpy as np
import pytest

from paged_attention import reference, settings
from paged_attention.errors import InvalidInput, PagedAttentionError
from paged_attention.registry import unavailable_reason
from paged_attention.validation import PoolSpec

from paged_attention.backends.vulkan import device as vkdevice
from paged_attention.backends.vulkan import geometry

REASON = unavailable_reason("vulkan")
needs_vulkan = pytest.mark.skipif(REASON is not None, reason=f"vulkan backend unavailable: {REASON}")
BS = 16
LAVAPIPE = "the device has no VK_NV_cooperative_matrix (lavapipe)"


def spec(dtype="float16", d=128, hkv=2, kv_format=None):
    return PoolSpec(num_blocks=8, block_size=BS, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                    kv_format=kv_format)


def capabilities(spirv: bytes) -> set[int]:
    words = struct.unpack(f"<{len(spirv) // 4}I", spirv)
    i, caps = 5, set()
    while i < len(words):
        op, n = words[i] & 0xFFFF, words[i] >> 16
        if op == 17:  # OpCapability
            caps.add(words[i + 1])
        i += n
    return caps


# -- the shader ---------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("glslc") is None, reason="glslc is not on PATH")
@pytest.mark.parametrize("d", geometry.COOP_HEAD_DIMS)
def test_coop_shader_compiles_every_variant(tmp_path, d):
    """Every define set the host can pass (head dims, group sizes 1..32 as tiles of 64 rows,
    both output types) compiles with the local glslc, and the SPIR-V uses cooperative matrices
    (CooperativeMatrixNV) in fp16 (Float16) under the Vulkan memory model, the three features
    Kompute patch level 5 enables."""
    from paged_attention.backends.vulkan.shaders import ShaderCompiler
    c = ShaderCompiler(cache=tmp_path)
    for group in (1, 2, 3, 4, 8, 32):
        pool = types.SimpleNamespace(spec=spec(d=d), dp=d)
        for out_f16 in (0, 1):
            defines = {**geometry.coop_defines(pool, group, geometry.coop_query_tile(group)),
                       "OUT_F16": out_f16, "Q_F16": 1}
            _, spirv = c.compile("prefill_coop.comp", **defines)
            assert {9, 5345, 5357} <= capabilities(spirv)  # Float16, VulkanMemoryModel, CoopMatNV


def test_coop_tiles_fit_and_the_fallback_runs_on_them():
    """The coop kernel's shared arrays fit 48 KiB (head dim 64: key tiles of 64; 128: of 32), and
    prefill.comp fits every query tile the coop selection makes (a run whose q is not fp16 runs
    prefill.comp on the plan's coop tiles)."""
    assert geometry.coop_layout(64)["BC"] == 64
    assert geometry.coop_layout(128)["BC"] == 32
    for d in geometry.COOP_HEAD_DIMS:
        for group in range(1, geometry.COOP_ROWS // 2 + 1):
            qt = geometry.coop_query_tile(group)
            assert qt >= 2 and qt * group <= geometry.COOP_ROWS
            assert geometry.prefill_layout(group, d, qt) is not None, (d, group)
    assert geometry.run_kernel("coop", True) == "prefill_coop.comp"
    assert geometry.run_kernel("coop", False) == "prefill.comp"
    assert geometry.run_kernel("flash", True) == "prefill.comp"


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sp, group, plain, why", [
    (spec(), 4, True, None),
    (spec(d=64), 1, True, None),
    (spec(d=64), 32, True, None),
    (spec(dtype="bfloat16"), 4, True, "the pool is bfloat16"),
    (spec(dtype="float32"), 4, True, "the pool is float32"),
    (spec(kv_format="int8"), 4, True, "quantized"),
    (spec(d=96), 4, True, "head_dim 96"),
    (spec(d=256), 4, True, "head_dim 256"),
    (spec(), 33, True, "33 query heads per KV head"),
    (spec(), 4, False, "attention variant"),
])
def test_coop_unsupported_names_the_reason(sp, group, plain, why):
    got = geometry.coop_unsupported(sp, group, plain, None)
    assert (got is None) if why is None else (why in got)
    assert geometry.coop_unsupported(sp, group, plain, LAVAPIPE) == LAVAPIPE


def test_prefill_kernel_modes():
    """auto: coop exactly where nothing speaks against it; flash: always prefill.comp; coop: the
    reason as an error instead of a fallback; anything else: InvalidInput naming the variable."""
    sp = spec()
    assert geometry.prefill_kernel(sp, 4, True, None) == "coop"
    assert geometry.prefill_kernel(sp, 4, True, LAVAPIPE) == "flash"
    assert geometry.prefill_kernel(spec(d=80), 4, True, None) == "flash"
    with settings.override(vk_prefill="flash"):
        assert geometry.prefill_kernel(sp, 4, True, None) == "flash"
    with settings.override(vk_prefill="coop"):
        assert geometry.prefill_kernel(sp, 4, True, None) == "coop"
        with pytest.raises(PagedAttentionError, match=r"VK_PREFILL=coop, but the device has no"):
            geometry.prefill_kernel(sp, 4, True, LAVAPIPE)
        with pytest.raises(PagedAttentionError, match="the pool is float32"):
            geometry.prefill_kernel(spec(dtype="float32"), 4, True, None)
    with settings.override(vk_prefill="tensor"):
        with pytest.raises(InvalidInput, match="PAGED_ATTENTION_VK_PREFILL: expected one of"):
            geometry.prefill_kernel(sp, 4, True, None)


def test_coop_missing_reads_the_device_facts():
    ok = dict(name="NVIDIA H200", subgroup_size=32, patch_level=5,
              extensions=list(vkdevice.COOP_EXTENSIONS) + ["VK_KHR_16bit_storage"], enabled=True,
              shapes=[(8, 8, 16, 0, 0, 0, 0, 3), vkdevice.COOP_SHAPE])
    assert vkdevice.coop_missing(**ok) is None
    cases = [({"patch_level": 4}, "kp patch level 4 < 5"),
             ({"name": "llvmpipe (LLVM 15.0.6, 256 bits)", "extensions": ["VK_KHR_16bit_storage"]},
              LAVAPIPE),
             ({"extensions": ["VK_NV_cooperative_matrix"]}, "lacks VK_KHR_shader_float16_int8"),
             ({"enabled": False}, "does not report the cooperativeMatrix"),
             ({"shapes": [(8, 8, 16, 0, 0, 0, 0, 3)]}, "no fp16 x fp16 -> fp32 16x16x16"),
             ({"subgroup_size": 64}, "subgroups have 64 lanes")]
    for change, why in cases:
        got = vkdevice.coop_missing(**{**ok, **change})
        assert got is not None and why in got, (change, got)


# -- the backend on this machine's device ---------------------------------------------------------
@pytest.fixture(scope="module")
def vk():
    from paged_attention.backends.vulkan import Backend
    be = Backend()
    yield be
    be.close()


def ragged_case(vk, rng, d, hq, hkv, dtype="float16", prompt=300, cached=37, width=24):
    """A prompt chunk of `prompt` tokens after `cached` ones beside a decode row and an idle
    sequence, K/V written for every position; (pool, tables, lens, query_lens, host K, V)."""
    pool = vk.create_pool(3 * width, BS, hkv, d, dtype)
    tables = rng.permutation(3 * width).astype(np.int32).reshape(3, width)
    ql = np.array([prompt, 1, 0])
    lens = np.array([cached + prompt, 90, 5])
    slots = np.concatenate([tables[i, np.arange(n) // BS] * BS + np.arange(n) % BS
                            for i, n in enumerate(lens)])
    vk.write_kv(pool, slots, rng.standard_normal((slots.size, hkv, d)).astype(np.float32),
                rng.standard_normal((slots.size, hkv, d)).astype(np.float32))
    kh, vh = pool.to_numpy()
    return pool, tables, lens, ql, kh, vh


@needs_vulkan
def test_this_device_says_why_it_has_no_coop_or_plans_it(vk):
    """lavapipe: the reason names the missing extension (with Kompute patch level 5; an older kp
    names the patch), auto plans keep prefill.comp and a forced coop plan is refused before
    anything runs. A device with the extension plans coop tiles."""
    rng = np.random.default_rng(1)
    pool, tables, lens, ql, _, _ = ragged_case(vk, rng, 64, 8, 2, prompt=40)
    plan = vk.plan(pool, tables, lens, num_q_heads=8, query_lens=ql, path="fused")
    if vk.coop_missing is None:
        assert plan.device.kernel == "coop" and plan.device.qt == 16
        return
    assert "VK_NV_cooperative_matrix" in vk.coop_missing or "patch level" in vk.coop_missing
    if "llvmpipe" in vk.device.lower():
        import kp
        if kp.pa_patch_level >= 5:
            assert vk.coop_missing == LAVAPIPE
    assert plan.device.kernel == "flash"
    with settings.override(vk_prefill="coop"):
        with pytest.raises(PagedAttentionError, match="VK_PREFILL=coop, but"):
            vk.plan(pool, tables, lens, num_q_heads=8, query_lens=ql, path="fused")


@needs_vulkan
def test_fake_coop_device_selects_the_coop_kernel_and_falls_back_per_run(vk, monkeypatch):
    """With a fake capability (coop_missing None) a ragged fp16 plan gets the coop kernel's tiles
    (64 rows: 32 queries at G=2); an fp16 q records prefill_coop.comp with its defines (stopped
    before the pipeline: this device cannot build it), a float32 q runs prefill.comp on those
    same tiles and matches the reference. Variants, decode-only plans and other pools keep
    prefill.comp's own tiles."""
    rng = np.random.default_rng(2)
    hq, hkv, d = 4, 2, 64
    pool, tables, lens, ql, kh, vh = ragged_case(vk, rng, d, hq, hkv, prompt=100)
    monkeypatch.setattr(vk._dev, "coop_missing", None)
    plan = vk.plan(pool, tables, lens, num_q_heads=hq, query_lens=ql, path="fused")
    assert plan.device.kernel == "coop" and plan.device.qt == 32

    compiled = []
    compile_ = vk.compiler.compile
    monkeypatch.setattr(vk.compiler, "compile",
                        lambda name, **defines: compiled.append((name, defines)) or compile_(name, **defines))
    q = rng.standard_normal((int(ql.sum()), hq, d)).astype(np.float32)
    out = vk.run(plan, q, pool)
    assert [n for n, _ in compiled] == ["prefill.comp"]
    assert compiled[0][1]["QT"] == 32
    assert reference.rms(out, reference.ragged(q, kh, vh, tables, lens, ql)) < 1e-4

    class Stop(Exception):
        pass

    def algorithm(cache, shader, defines, *a, **k):
        compiled.append((shader, defines))
        raise Stop
    compiled.clear()
    with monkeypatch.context() as m, pytest.raises(Stop):
        m.setattr(vk._dev, "algorithm", algorithm)
        vk.run(plan, q.astype(np.float16), pool)
    shader, defines = compiled[0]
    assert shader == "prefill_coop.comp"
    assert defines == {**geometry.coop_defines(pool, hq // hkv, 32), "OUT_F16": 1, "Q_F16": 1}

    # What keeps prefill.comp's own tiles although the device "has" the extension.
    capped = vk.plan(pool, tables, lens, num_q_heads=hq, query_lens=ql, path="fused", soft_cap=30.0)
    assert capped.device.kernel == "flash"
    assert capped.device.qt == vk.query_tile(hq // hkv, pool.spec)
    bf = vk.create_pool(8, BS, hkv, d, "bfloat16")
    table = np.arange(8, dtype=np.int32)[None]
    assert vk.plan(bf, table, np.array([100]), num_q_heads=hq, query_lens=np.array([50]),
                   path="fused").device.kernel == "flash"


# -- on a device with VK_NV_cooperative_matrix ----------------------------------------------------
@needs_vulkan
@pytest.mark.parametrize("d", geometry.COOP_HEAD_DIMS)
@pytest.mark.parametrize("hq, hkv", [(8, 8), (16, 2), (32, 4)])
@pytest.mark.parametrize("window", [None, 100])
def test_coop_prefill_matches_the_reference(vk, monkeypatch, d, hq, hkv, window):
    """prefill_coop.comp itself (forced: no silent fallback) on ragged plans: a 300-token chunk
    after 37 cached tokens (key tiles past the causal end, a window starting mid-tile, rows of a
    tile with different ranges) beside a decode row and an idle sequence, fp16 pool and q, GQA
    groups 1, 8 and 8 x 4 KV heads, vs the numpy reference."""
    if vk.coop_missing is not None:
        pytest.skip(vk.coop_missing)
    rng = np.random.default_rng(d + hq + (window or 0))
    pool, tables, lens, ql, kh, vh = ragged_case(vk, rng, d, hq, hkv)
    q = rng.standard_normal((int(ql.sum()), hq, d)).astype(np.float16)
    compiled = []
    compile_ = vk.compiler.compile
    monkeypatch.setattr(vk.compiler, "compile",
                        lambda name, **defines: compiled.append(name) or compile_(name, **defines))
    with settings.override(vk_prefill="coop"):
        plan = vk.plan(pool, tables, lens, num_q_heads=hq, query_lens=ql, window=window, path="fused")
    out = vk.run(plan, q, pool)
    assert compiled == ["prefill_coop.comp"], compiled
    want = reference.ragged(q, kh, vh, tables, lens, ql, window=window)
    assert reference.rms(out, want) < 5e-3
