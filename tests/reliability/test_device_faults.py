"""Device faults give clear errors and leave the process (and pools) intact.

- a Vulkan shader that fails to compile -> ShaderCompileError carrying glslc's diagnostics,
  nothing cached, the pool untouched, the backend still usable afterwards;
- no Vulkan driver / a device index that does not exist -> the probe (run in a subprocess)
  reports the backend unavailable and the process that asked survives;
- an MLX device without custom kernels -> path='fused' raises UnsupportedPath naming the device;
- close() releases the Kompute manager; use after close is a clear error, not a crash, and
  dropping pools after close does not crash at garbage collection.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import paged_attention as pa
from paged_attention.registry import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
VK_REASON = unavailable_reason("vulkan")
needs_vulkan = pytest.mark.skipif(VK_REASON is not None,
                                  reason=f"vulkan backend unavailable: {VK_REASON}")
needs_glslc = pytest.mark.skipif(shutil.which("glslc") is None, reason="glslc is not on PATH")
HAVE_KP = importlib.util.find_spec("kp") is not None
HAVE_MLX = unavailable_reason("mlx") is None


def run_python(code: str, env_extra: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# -- shader compile failure ---------------------------------------------------------------------
@needs_glslc
def test_shader_compile_error_is_clear_and_not_cached(tmp_path):
    from paged_attention.backends.vulkan.shaders import ShaderCompileError, ShaderCompiler
    comp = ShaderCompiler(shader_dir=tmp_path, cache=tmp_path / "cache")
    src = "#version 450\nlayout(local_size_x = 1) in;\nvoid main() { undefined_function(WG); }\n"
    for attempt in (1, 2):
        with pytest.raises(ShaderCompileError) as err:
            comp.compile_source(src, {"WG": 64}, "broken.comp")
        msg = str(err.value)
        assert "broken.comp" in msg and "-DWG=64" in msg and "undefined_function" in msg, msg
        assert isinstance(err.value, pa.PagedAttentionError)
        assert comp.compiles == attempt          # a failure is never served from the cache
    assert not list((tmp_path / "cache").glob("*.spv"))


@needs_vulkan
def test_backend_survives_a_broken_decode_shader(tmp_path):
    from paged_attention.backends.vulkan.backend import VulkanBackend
    from paged_attention.backends.vulkan.shaders import SHADER_DIR, ShaderCompileError, ShaderCompiler
    broken = tmp_path / "shaders"
    shutil.copytree(SHADER_DIR, broken)
    (broken / "decode.comp").write_text((broken / "decode.comp").read_text()
                                        .replace("void main()", "void main() { no_such_call(); }\nvoid unused()", 1))
    be = VulkanBackend()
    try:
        good = be.compiler
        pool = be.create_pool(4, 16, 2, 64, "float32")
        rng = np.random.default_rng(0)
        k = rng.standard_normal((64, 2, 64)).astype(np.float32)
        be.write_kv(pool, np.arange(64), k, k)
        q = rng.standard_normal((1, 8, 64)).astype(np.float32)
        be.compiler = ShaderCompiler(shader_dir=broken, cache=tmp_path / "cache")
        with pytest.raises(ShaderCompileError, match="decode.comp.*\n.*no_such_call"):
            be.decode(q, pool, [[0, 1]], [20], path="fused")
        kk, vv = pool.to_numpy()
        assert np.array_equal(kk.reshape(64, 2, 64), k) and np.array_equal(vv.reshape(64, 2, 64), k)
        be.compiler = good                       # fixed shader: the same backend works again
        out = np.asarray(be.decode(q, pool, [[0, 1]], [20], path="fused"))
        from paged_attention import reference
        ref = reference.decode(q, kk, vv, [[0, 1]], [20])
        assert reference.rms(out, ref) < 1e-4
    finally:
        be.close()


# -- missing device -----------------------------------------------------------------------------
PROBE = """
    import paged_attention as pa
    from paged_attention.registry import unavailable_reason
    print("REASON", unavailable_reason("vulkan"))
    print("AVAILABLE", pa.available_backends())
    try:
        pa.get_backend("vulkan")
    except pa.BackendUnavailable as exc:
        print("RAISED", exc)
    print("ALIVE")
"""


@pytest.mark.parametrize("env", [
    {"VK_ICD_FILENAMES": "/nonexistent/pa_icd.json", "VK_DRIVER_FILES": "/nonexistent/pa_icd.json"},
    {"PAGED_ATTENTION_VK_DEVICE": "97"},
], ids=["no-driver", "bad-device-index"])
def test_missing_vulkan_device_is_reported_not_fatal(env):
    proc = run_python(PROBE, env)
    out = proc.stdout
    assert proc.returncode == 0 and "ALIVE" in out, (proc.returncode, out, proc.stderr[-2000:])
    reason = out.split("REASON ", 1)[1].splitlines()[0]
    assert reason != "None", out
    assert "'vulkan'" not in out.split("AVAILABLE ", 1)[1].splitlines()[0]
    assert "RAISED backend 'vulkan' is unavailable" in out
    if HAVE_KP:  # with Kompute installed, the reason is the device, with what to install
        assert "Vulkan device" in reason and "install" in reason, reason


# -- MLX without custom kernels -----------------------------------------------------------------
@pytest.mark.skipif(not HAVE_MLX, reason=f"mlx unavailable: {unavailable_reason('mlx')}")
def test_mlx_fused_on_a_device_without_kernels_names_the_device():
    import mlx.core as mx
    from paged_attention.backends.mlx.backend import MLXBackend
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)                # no custom kernels on the CPU, on any machine
    try:
        be = MLXBackend()
        assert be.paths == ("gather",) and "fused" in be.known_paths
        pool = be.create_pool(2, 16, 2, 64, "float16")
        q = np.zeros((1, 8, 64), np.float16)
        with pytest.raises(pa.UnsupportedPath) as err:
            be.decode(q, pool, [[0]], [4], path="fused")
        msg = str(err.value)
        assert "fused" in msg and "Metal or CUDA" in msg and be.device in msg and "gather" in msg, msg
        assert np.asarray(be.decode(q, pool, [[0]], [4])).shape == q.shape  # auto -> gather
    finally:
        mx.set_default_device(previous)


# -- close() ------------------------------------------------------------------------------------
def test_close_is_idempotent_and_a_context_manager(backend):
    """`with get_backend(...) as be` yields the backend and closes it once on exit, also when the
    body raises; a second close() is a no-op, not an error."""
    closes = []
    with pytest.raises(RuntimeError, match="body failed"):
        with pa.get_backend(backend.name) as be:
            real_close = be.close
            be.close = lambda: (closes.append(be), real_close())[1]
            pool = be.create_pool(2, 4, 2, 8, "float32")
            out = be.to_numpy(be.decode(np.zeros((1, 2, 8), np.float32), pool, [[0]], [3]))
            assert out.shape == (1, 2, 8)
            raise RuntimeError("body failed")
    assert closes == [be]
    assert be.close() is None
    assert closes == [be, be]


@needs_vulkan
def test_vulkan_close_releases_the_manager_and_fails_cleanly():
    """close() releases what the backend held (staging buffers, pipelines: its counters say 0
    after, and said more before), every later call is a clear 'closed' error, and closing twice
    changes nothing."""
    be = pa.get_backend("vulkan")
    pool = be.create_pool(4, 16, 2, 64, "float16")
    q = np.ones((1, 8, 64), np.float16)
    np.asarray(be.decode(q, pool, [[0]], [8]))
    held = be.counters()
    assert held["staging_bytes"] > 0 and held["pipelines"] > 0, held
    for _ in range(2):
        be.close()
        after = be.counters()
        assert (after["staging_bytes"], after["pipelines"]) == (0, 0), after
        for call in (lambda: be.decode(q, pool, [[0]], [8]), pool.to_numpy,
                     lambda: be.create_pool(4, 16, 2, 64),
                     lambda: be.write_kv(pool, [0], q[:, :2], q[:, :2]),
                     lambda: be.copy_blocks(pool, [(0, 1)]),
                     lambda: be.plan(pool, [[0]], [8], num_q_heads=8)):
            with pytest.raises(pa.PagedAttentionError, match="closed"):
                call()


@needs_vulkan
def test_vulkan_objects_outliving_close_do_not_crash_and_cycles_do_not_leak():
    """In a subprocess (a crash must not take the test session down): pools dropped after their
    backend's close(), then 12 create/use/close cycles with flat RSS."""
    proc = run_python("""
        import gc
        import numpy as np
        import paged_attention as pa
        from paged_attention.lab.soak import rss_bytes, settle, MB

        def cycle():
            be = pa.get_backend("vulkan")
            pool = be.create_pool(512, 16, 2, 64, "float16")      # 4 MB
            be.write_kv(pool, np.arange(1024), np.ones((1024, 2, 64), np.float16),
                        np.ones((1024, 2, 64), np.float16))
            np.asarray(be.decode(np.ones((2, 8, 64), np.float16), pool, [[0, 1], [2, 3]], [20, 32]))
            be.close()
            return pool                                            # outlives its backend

        stale = [cycle() for _ in range(3)]
        del stale
        gc.collect()
        settle(pa.get_backend("numpy"))
        before = rss_bytes()
        for _ in range(12):
            cycle()
        settle(pa.get_backend("numpy"))
        print("GROWTH_MB", (rss_bytes() - before) / MB)
    """, {})
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    growth = float(proc.stdout.split("GROWTH_MB ")[1].split()[0])
    print(f"\nvulkan: 12 backend create/use/close cycles: RSS {growth:+.2f} MB")
    assert growth < 8.0
