"""The Vulkan backend's SPIR-V disk cache (backends/vulkan/shaders.py, ADR 0008): what one
process compiles, the next one loads; damaged files are recompiled; `off` and an unwritable
directory keep the kernels in memory. These need glslc, not a Vulkan device."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("glslc") is None, reason="glslc is not on PATH")

ROOT = Path(__file__).resolve().parents[2]
# A small real kernel of the backend (one #include-free shader, one glslc run each).
SHADER, DEFINES = "kv_append.comp", dict(ROWW=4, WG=64)


def test_a_second_compiler_loads_from_disk(tmp_path, monkeypatch):
    from paged_attention.backends.vulkan.shaders import SPIRV_MAGIC, ShaderCompiler, unpack
    c1 = ShaderCompiler(cache=tmp_path)
    key, spirv = c1.compile(SHADER, **DEFINES)
    assert c1.compiles == 1 and c1.disk_hits == 0 and spirv[:4] == SPIRV_MAGIC
    assert unpack((tmp_path / f"{key}.spv").read_bytes()) == spirv
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".spv"]   # no temporary left
    c2 = ShaderCompiler(cache=tmp_path)
    monkeypatch.setattr(ShaderCompiler, "_glslc", lambda *a: pytest.fail("glslc ran on a hit"))
    assert c2.compile(SHADER, **DEFINES) == (key, spirv)
    assert c2.compiles == 0 and c2.disk_hits == 1
    assert c2.compile(SHADER, **DEFINES) == (key, spirv) and c2.disk_hits == 1   # then memory


def test_a_fresh_process_compiles_nothing(tmp_path):
    code = textwrap.dedent(f"""
        from paged_attention.backends.vulkan.shaders import ShaderCompiler
        c = ShaderCompiler()
        c.compile({SHADER!r}, **{DEFINES!r})
        print(c.cache, c.compiles, c.disk_hits)
    """)
    env = dict(os.environ, PAGED_ATTENTION_VK_SPIRV_CACHE=str(tmp_path / "spirv"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=120) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    assert [r.stdout.split() for r in runs] == [[str(tmp_path / "spirv"), "1", "0"],
                                                [str(tmp_path / "spirv"), "0", "1"]]


@pytest.mark.parametrize("damage", ["truncated", "truncated-to-words", "flipped-byte", "empty",
                                    "not-spirv"])
def test_a_damaged_file_is_recompiled_and_replaced(tmp_path, damage):
    from paged_attention.backends.vulkan.shaders import ShaderCompiler, unpack
    key, spirv = ShaderCompiler(cache=tmp_path).compile(SHADER, **DEFINES)
    f = tmp_path / f"{key}.spv"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2 + 1],
                   "truncated-to-words": data[:len(data) // 8 * 4],
                   "flipped-byte": data[:40] + bytes([data[40] ^ 1]) + data[41:],
                   "empty": b"",
                   "not-spirv": b"\0" * len(data)}[damage])
    c = ShaderCompiler(cache=tmp_path)
    assert c.compile(SHADER, **DEFINES) == (key, spirv)
    assert c.compiles == 1 and c.disk_hits == 0
    assert unpack(f.read_bytes()) == spirv                  # replaced by a good file


def test_off_keeps_spirv_in_memory_only(tmp_path, monkeypatch):
    from paged_attention import settings
    from paged_attention.backends.vulkan.shaders import ShaderCompiler
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with settings.override(vk_spirv_cache="off"):
        c1, c2 = ShaderCompiler(), ShaderCompiler()
    assert c1.cache is None and ShaderCompiler(cache="off").cache is None
    _, spirv = c1.compile(SHADER, **DEFINES)
    c1.compile(SHADER, **DEFINES)
    assert c1.compiles == 1                                  # the process's own memory
    assert c2.compile(SHADER, **DEFINES)[1] == spirv and c2.compiles == 1
    assert not (tmp_path / "xdg").exists()


def test_the_setting_names_the_directory(tmp_path, monkeypatch):
    from paged_attention import settings
    from paged_attention.backends.vulkan.shaders import ShaderCompiler
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ShaderCompiler().cache == tmp_path / "xdg" / "paged-attention" / "spirv"
    with settings.override(vk_spirv_cache=str(tmp_path / "mine")):
        assert ShaderCompiler().cache == tmp_path / "mine"


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_directory_falls_back_to_memory(tmp_path, where):
    from paged_attention.backends.vulkan.shaders import ShaderCompiler
    if where == "under-a-file":      # mkdir fails, even as root
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "spirv"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory; 'under-a-file' covers root")
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o555)
    c = ShaderCompiler(cache=cache)
    key, spirv = c.compile(SHADER, **DEFINES)
    assert c.compiles == 1 and c.disk_error and str(cache) in c.disk_error
    assert c.compile(SHADER, **DEFINES) == (key, spirv) and c.compiles == 1


def test_the_key_covers_includes_defines_and_the_compiler(tmp_path):
    from paged_attention.backends.vulkan.shaders import SHADER_DIR, ShaderCompiler
    shutil.copytree(SHADER_DIR, tmp_path / "src")
    c = ShaderCompiler(shader_dir=tmp_path / "src", cache=tmp_path / "cache")
    defines = dict(DP=64, G=2, HKV=2, BS=16, WG=64, TPT=8, F16=1, U=2, SPLITK=0)
    base = c.key(c.source("decode.comp"), defines)
    assert c.key(c.source("decode.comp"), dict(defines, WG=128)) != base
    inc = tmp_path / "src" / "kv_read.glsl"                  # decode.comp's #include
    inc.write_text(inc.read_text() + "\n// edited\n")
    assert c.key(c.source("decode.comp"), defines) != base
    inc.write_text(inc.read_text().replace("\n// edited\n", ""))
    assert c.key(c.source("decode.comp"), defines) == base
    other = ShaderCompiler(shader_dir=tmp_path / "src", cache=tmp_path / "cache")
    other._version = "shaderc vNext"                         # another glslc build
    assert other.key(other.source("decode.comp"), defines) != base
