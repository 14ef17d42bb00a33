"""GLSL -> SPIR-V compilation with an on-disk cache.

Sources live in `shaders/vulkan/*.comp`; each is specialised with `-D` defines (head dim, block
size, group size, workgroup size, dtype, ...) and compiled with `glslc` on first use. The SPIR-V
is cached under `${XDG_CACHE_HOME:-~/.cache}/paged-attention/spirv/<sha256>.spv`, keyed by the
sha256 of the source text, the sorted defines and the compiler flags, so editing a shader or
changing a define recompiles and nothing else does.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from paged_attention.errors import BackendUnavailable, PagedAttentionError

# Package data (paged_attention.shaders), so installed wheels find their kernels too.
SHADER_DIR = Path(str(resources.files("paged_attention.shaders") / "vulkan"))
TARGET_ENV = "vulkan1.1"  # subgroup shuffles need SPIR-V 1.3


_INCLUDE = re.compile(r'\s*#\s*include\s+"([^"]+)"')


class ShaderCompileError(PagedAttentionError):
    """glslc rejected a shader; the message carries the compiler's diagnostics."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paged-attention" / "spirv"


class ShaderCompiler:
    """Compiles and caches shaders. `compiles` counts glslc invocations (cache misses)."""

    def __init__(self, shader_dir: Path | str = SHADER_DIR, cache: Path | str | None = None):
        self.shader_dir = Path(shader_dir)
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.compiles = 0
        self._memo: dict[str, bytes] = {}

    @staticmethod
    def glslc() -> str:
        path = shutil.which("glslc")
        if path is None:
            raise BackendUnavailable(
                "glslc (the GLSL to SPIR-V compiler) is not on PATH; install it with "
                "'apt-get install glslc' (Debian/Ubuntu) or the LunarG Vulkan SDK")
        return path

    def key(self, source: str, defines: dict) -> str:
        h = hashlib.sha256()
        h.update(source.encode())
        for name in sorted(defines):
            h.update(f"\0-D{name}={defines[name]}".encode())
        h.update(f"\0--target-env={TARGET_ENV} -O".encode())
        return h.hexdigest()

    def compile_source(self, source: str, defines: dict, name: str = "shader.comp") -> tuple[str, bytes]:
        """(key, SPIR-V bytes) for GLSL `source` with `defines`; compiles on a cache miss."""
        key = self.key(source, defines)
        if key in self._memo:
            return key, self._memo[key]
        path = self.cache / f"{key}.spv"
        if path.is_file():
            spirv = path.read_bytes()
            self._memo[key] = spirv
            return key, spirv
        glslc = self.glslc()
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pa-glslc-") as tmp:
            src = Path(tmp) / name
            src.write_text(source)
            out = Path(tmp) / "out.spv"
            cmd = [glslc, f"--target-env={TARGET_ENV}", "-O", "-fshader-stage=compute",
                   *[f"-D{k}={v}" for k, v in sorted(defines.items())], str(src), "-o", str(out)]
            self.compiles += 1
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                defs = " ".join(f"-D{k}={v}" for k, v in sorted(defines.items()))
                raise ShaderCompileError(
                    f"glslc failed to compile {name} ({defs}):\n{(proc.stderr or proc.stdout).strip()}")
            spirv = out.read_bytes()
        tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_bytes(spirv)
        os.replace(tmp_path, path)  # atomic: concurrent processes never see a partial file
        self._memo[key] = spirv
        return key, spirv

    def compile(self, name: str, **defines) -> tuple[str, bytes]:
        """(key, SPIR-V) of `shaders/vulkan/<name>` specialised with `defines`."""
        return self.compile_source(self.source(name), defines, name)

    def source(self, name: str) -> str:
        """The shader's text with its `#include "file"` lines replaced by those files (from the
        shader folder), so the cache key covers every line glslc compiles."""
        out = []
        for line in (self.shader_dir / name).read_text().splitlines(keepends=True):
            m = _INCLUDE.match(line)
            if m:
                out.append(self.source(m.group(1)) + "\n")
            elif "GL_GOOGLE_include_directive" not in line:
                out.append(line)
        return "".join(out)
