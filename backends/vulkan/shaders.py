"""GLSL -> SPIR-V compilation, cached in memory and on disk across processes.

Sources live in `shaders/vulkan/*.comp`; each is specialised with `-D` defines (head dim, block
size, group size, workgroup size, dtype, ...) and compiled with `glslc` on first use. A process
keeps what it compiled in memory; the SPIR-V is also written to a directory shared by every
process ($PAGED_ATTENTION_VK_SPIRV_CACHE, default `${XDG_CACHE_HOME:-~/.cache}/paged-attention/
spirv`, `off`: memory only), so a fresh process loads its kernels instead of running glslc once
per shader form (ADR 0008, "SPIR-V disk cache").

A file is `<key>.spv`: the SPIR-V words, then the sha256 of those bytes (32 bytes). The key is
the sha256 of the source after #include expansion, the sorted defines, glslc's own version text,
the target environment and the flags, so editing a shader or an included file, changing a
define or upgrading the compiler recompiles, and nothing else does. Writes are atomic (a
temporary file in the same directory, then os.replace), so a concurrent reader sees a whole file
or none; a file that fails its checks (magic, word size, checksum) is recompiled and replaced;
a directory that cannot be created, read or written leaves the compiler in memory only, without
an error (`disk_error` says why).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from paged_attention import settings
from paged_attention.errors import BackendUnavailable, PagedAttentionError

# Package data (paged_attention.shaders), so installed wheels find their kernels too.
SHADER_DIR = Path(str(resources.files("paged_attention.shaders") / "vulkan"))
TARGET_ENV = "vulkan1.1"  # subgroup shuffles need SPIR-V 1.3
FLAGS = ("-O", "-fshader-stage=compute")
SPIRV_MAGIC = b"\x03\x02\x23\x07"   # 0x07230203, little-endian
_HEADER_BYTES = 20                     # magic, version, generator, bound, schema
_DIGEST_BYTES = 32
# Bumped when the file layout changes, so files of another layout are never read as this one.
_FORMAT = "pa-spirv-cache-2"


_INCLUDE = re.compile(r'\s*#\s*include\s+"([^"]+)"')


class ShaderCompileError(PagedAttentionError):
    """glslc rejected a shader; the message carries the compiler's diagnostics."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paged-attention" / "spirv"


def cache_dir() -> Path | None:
    """The SPIR-V directory the settings name ($PAGED_ATTENTION_VK_SPIRV_CACHE); None: `off`."""
    value = settings.get().vk_spirv_cache
    if value is None:
        return default_cache_dir()
    if value.strip().lower() == "off":
        return None
    return Path(os.path.expanduser(value))


@functools.cache
def _glslc_version(glslc: str) -> str:
    # Part of every key: another compiler build may emit other SPIR-V for the same source.
    proc = subprocess.run([glslc, "--version"], capture_output=True, text=True)
    return proc.stdout.strip() or f"{glslc}: --version exit {proc.returncode}"


def pack(spirv: bytes) -> bytes:
    """A cache file's bytes: the SPIR-V, then its sha256."""
    return spirv + hashlib.sha256(spirv).digest()


def unpack(data: bytes) -> bytes | None:
    """The SPIR-V of a cache file's bytes; None when they are not a whole file this module
    wrote (truncated, corrupted, another layout)."""
    spirv, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if len(spirv) < _HEADER_BYTES or len(spirv) % 4 or spirv[:4] != SPIRV_MAGIC:
        return None
    return spirv if hashlib.sha256(spirv).digest() == digest else None


class ShaderCompiler:
    """Compiles and caches shaders. `compiles` counts glslc invocations (misses of both caches),
    `disk_hits` shaders read from the disk cache, `disk_error` the reason the disk cache was
    given up on (None: in use, or `off`).

    cache: the SPIR-V directory; None: the settings' (`cache_dir()`); "off": memory only."""

    def __init__(self, shader_dir: Path | str = SHADER_DIR, cache: Path | str | None = None):
        self.shader_dir = Path(shader_dir)
        if cache is None:
            self.cache = cache_dir()
        else:
            self.cache = None if str(cache).strip().lower() == "off" else Path(cache)
        self.compiles = 0
        self.disk_hits = 0
        self.disk_error: str | None = None
        self._memo: dict[str, bytes] = {}
        self._version: str | None = None

    @staticmethod
    def glslc() -> str:
        path = shutil.which("glslc")
        if path is None:
            raise BackendUnavailable(
                "glslc (the GLSL to SPIR-V compiler) is not on PATH; install it with "
                "'apt-get install glslc' (Debian/Ubuntu) or the LunarG Vulkan SDK")
        return path

    def key(self, source: str, defines: dict) -> str:
        h = hashlib.sha256(_FORMAT.encode())
        h.update(b"\0" + source.encode())
        for name in sorted(defines):
            h.update(f"\0-D{name}={defines[name]}".encode())
        h.update(f"\0--target-env={TARGET_ENV} {' '.join(FLAGS)}".encode())
        if self._version is None:     # resolved once per compiler: key() runs on every compile()
            self._version = _glslc_version(self.glslc())
        h.update(b"\0" + self._version.encode())
        return h.hexdigest()

    def compile_source(self, source: str, defines: dict, name: str = "shader.comp") -> tuple[str, bytes]:
        """(key, SPIR-V bytes) for GLSL `source` with `defines`; compiles on a cache miss."""
        key = self.key(source, defines)
        spirv = self._memo.get(key)
        if spirv is None:
            spirv = self._read(key)
            if spirv is None:
                spirv = self._glslc(source, defines, name)
                self._write(key, spirv)
            self._memo[key] = spirv
        return key, spirv

    def _glslc(self, source: str, defines: dict, name: str) -> bytes:
        glslc = self.glslc()
        with tempfile.TemporaryDirectory(prefix="pa-glslc-") as tmp:
            src = Path(tmp) / name
            src.write_text(source)
            out = Path(tmp) / "out.spv"
            cmd = [glslc, f"--target-env={TARGET_ENV}", *FLAGS,
                   *[f"-D{k}={v}" for k, v in sorted(defines.items())], str(src), "-o", str(out)]
            self.compiles += 1
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                defs = " ".join(f"-D{k}={v}" for k, v in sorted(defines.items()))
                raise ShaderCompileError(
                    f"glslc failed to compile {name} ({defs}):\n{(proc.stderr or proc.stdout).strip()}")
            return out.read_bytes()

    def _read(self, key: str) -> bytes | None:
        if self.cache is None or self.disk_error is not None:
            return None
        try:
            data = (self.cache / f"{key}.spv").read_bytes()
        except OSError:     # absent (the common miss), or unreadable: compile
            return None
        spirv = unpack(data)
        if spirv is not None:
            self.disk_hits += 1
        return spirv        # None: a damaged file, replaced by the compile that follows

    def _write(self, key: str, spirv: bytes) -> None:
        if self.cache is None or self.disk_error is not None:
            return
        tmp = None
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.cache)
            with os.fdopen(fd, "wb") as f:
                f.write(pack(spirv))
            os.replace(tmp, self.cache / f"{key}.spv")
        except OSError as e:
            # A cache that cannot be written must not fail a kernel that compiled: this
            # process keeps its SPIR-V in memory and stops trying the disk.
            self.disk_error = f"{self.cache}: {type(e).__name__}: {e}"
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

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
