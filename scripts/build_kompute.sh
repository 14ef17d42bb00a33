#!/usr/bin/env bash
# Build and install Kompute's Python module `kp` (the Vulkan backend's runtime) into a venv.
#
#   scripts/build_kompute.sh PYTHON
#
# PYTHON is the venv's interpreter. Builds a real wheel from the kp sdist against the system
# Vulkan headers (libvulkan-dev), system fmt (libfmt-dev) and pip's pybind11, caches it in
# ${XDG_CACHE_HOME:-$HOME/.cache}/paged-attention/wheels/ and installs it with --no-deps (numpy is
# never touched, so numpy 2 stays). Idempotent: does nothing when `kp` already imports at the
# right version, and installs the cached wheel without rebuilding when one exists.
#
# Environment: KP_VERSION (default 0.9.0); KP_SDIST (path to a kp-*.tar.gz to use instead of
# `pip download`, for offline machines); JOBS (parallel compile jobs, default nproc);
# KP_CMAKE_ARGS (extra CMake arguments, e.g. -DVulkan_INCLUDE_DIR=... for headers outside /usr).
# Needs: cmake, a C++ compiler, libvulkan-dev, libfmt-dev (and glslc to run the shaders).
set -euo pipefail

PY=${1:?usage: scripts/build_kompute.sh PYTHON}
# Absolute, because the build runs in another directory (the venv's symlink itself is kept).
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
KP_VERSION=${KP_VERSION:-0.9.0}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/paged-attention/wheels
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

log() { echo "[build_kompute] $*"; }

installed=$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
try:
    import kp  # noqa: F401
    print(md.version("kp"))
except Exception:
    pass
EOF
)
if [ "$installed" = "$KP_VERSION" ]; then
  log "kp $KP_VERSION already importable by $PY; nothing to do"
  exit 0
fi

pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/kp-"$KP_VERSION"-"$pytag"-*.whl 2>/dev/null | head -1 || true)

if [ -z "$wheel" ]; then
  for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required to build kp" >&2; exit 1; }
  done
  [ -f /usr/include/vulkan/vulkan.hpp ] || [ -n "${KP_CMAKE_ARGS:-}" ] || {
    echo "error: Vulkan headers missing; install libvulkan-dev (apt-get install libvulkan-dev)" >&2; exit 1; }
  "$PY" -m pip --version >/dev/null
  "$PY" -c 'import pybind11' 2>/dev/null || "$PY" -m pip install -q pybind11
  # --no-build-isolation builds with the venv's own tools: old venv setuptools lack bdist_wheel.
  "$PY" -c 'import setuptools, wheel' 2>/dev/null || "$PY" -m pip install -q wheel 'setuptools>=68'

  work=$(mktemp -d "${TMPDIR:-/tmp}/kpbuild.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  if [ -n "${KP_SDIST:-}" ]; then
    cp "$KP_SDIST" "$work/kp-$KP_VERSION.tar.gz"
  else
    log "downloading the kp $KP_VERSION sdist"
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$work" "kp==$KP_VERSION"
  fi
  tar xzf "$work"/kp-"$KP_VERSION".tar.gz -C "$work"
  src="$work/kp-$KP_VERSION"

  # Patch setup.py: drop the numpy<2 pin, replace its CMake arguments (upstream misses a comma and
  # would download Vulkan headers/fmt/pybind11) with offline ones, avoid distutils (gone in 3.12).
  "$PY" - "$src/setup.py" "$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" <<'EOF'
import re, sys
path, pybind_dir = sys.argv[1], sys.argv[2]
s = open(path).read()
s = s.replace('from distutils.version import LooseVersion\n', '')
s = re.sub(r"cmake_version = LooseVersion\(.*?\n\s*if cmake_version < '3.15':\n\s*raise RuntimeError\(\"CMake >= 3.15 is required\"\)\n",
           "", s, flags=re.S)
s = re.sub(r'install_requires=\[\s*"numpy<2.0.0"\s*\]', 'install_requires=["numpy"]', s)
start = s.index("cmake_args = ['-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=' + extdir,")
end = s.index("]", s.index("'-DPYTHON_LIBRARY='", start)) + 1
args = ["-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=' + extdir + '",
        "-DKOMPUTE_OPT_BUILD_PYTHON=ON", "-DKOMPUTE_OPT_LOG_LEVEL=Off", "-DKOMPUTE_OPT_USE_SPDLOG=Off",
        "-DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON", "-DKOMPUTE_OPT_INSTALL=OFF",
        "-DKOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER=OFF", "-DKOMPUTE_OPT_USE_BUILT_IN_FMT=OFF",
        "-DKOMPUTE_OPT_USE_BUILT_IN_PYBIND11=OFF", "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
        "-DFETCHCONTENT_FULLY_DISCONNECTED=ON", "-Dpybind11_DIR=" + pybind_dir,
        "-DPYTHON_EXECUTABLE=' + sys.executable + '", "-DPython_EXECUTABLE=' + sys.executable + '"]
s = (s[:start] + "cmake_args = [" + ", ".join("'" + a + "'" for a in args) + "]"
     + " + os.environ.get('KP_CMAKE_ARGS', '').split()" + s[end:])
s = s.replace("build_args += ['--', '-j']", "build_args += ['--', '-j' + os.environ.get('JOBS', '2')]")
s = s.replace("build_args += env['KOMPUTE_PYTHON_NUM_PARALLEL_THREADS']", "pass")
assert "numpy<2" not in s and "LooseVersion" not in s
open(path, "w").write(s)

EOF
  log "building kp $KP_VERSION wheel (offline, $JOBS jobs; a few minutes)"
  mkdir -p "$work/dist"
  (cd "$src" && JOBS=$JOBS "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/dist" .) \
    > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; echo "error: kp build failed" >&2; exit 1; }
  built=$(ls "$work"/dist/kp-"$KP_VERSION"-*.whl | head -1)
  cp "$built" "$CACHE/"
  wheel="$CACHE/$(basename "$built")"
  log "cached $wheel"
else
  log "using cached wheel $wheel"
fi

"$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
"$PY" -c 'import kp, importlib.metadata as md; print("[build_kompute] kp", md.version("kp"), "installed")'
