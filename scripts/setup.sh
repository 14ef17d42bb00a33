#!/usr/bin/env bash
# Idempotent setup from nothing: system packages, .venv, the package with its extras, Kompute.
# A second run checks and returns without reinstalling anything.
#   Debian/Ubuntu (as root or with sudo): Vulkan loader + lavapipe, headers, glslc, fmt, a toolchain.
#   macOS: Homebrew's Vulkan loader + MoltenVK, shaderc (glslc), fmt, cmake; MLX from PyPI (Metal).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*"; }

debian_packages() {
  local want=() sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  command -v glslc >/dev/null || want+=(glslc)
  command -v cmake >/dev/null || want+=(cmake)
  command -v g++ >/dev/null || want+=(g++)
  command -v make >/dev/null || want+=(make)
  [ -f /usr/include/vulkan/vulkan.h ] || want+=(libvulkan-dev)
  [ -f /usr/include/fmt/core.h ] || want+=(libfmt-dev)
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || want+=(mesa-vulkan-drivers)
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || want+=(python3-venv)
  "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || want+=(python3-dev)
  if [ ${#want[@]} -gt 0 ]; then
    log "installing Debian packages: ${want[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  fi
}

macos_packages() {
  command -v brew >/dev/null || { echo "[setup] Homebrew is required on macOS: https://brew.sh" >&2; exit 1; }
  local want=()
  for f in vulkan-loader molten-vk vulkan-headers shaderc fmt cmake; do
    brew list --versions "$f" >/dev/null 2>&1 || want+=("$f")
  done
  [ ${#want[@]} -eq 0 ] || { log "brew install ${want[*]}"; brew install "${want[@]}"; }
  # Homebrew's headers and loader live outside /usr: tell Kompute's CMake where (not yet tried on
  # a Mac here; CI proves the Debian branch only).
  export KP_CMAKE_ARGS="${KP_CMAKE_ARGS:-} -DVulkan_INCLUDE_DIR=$(brew --prefix vulkan-headers)/include \
    -DVulkan_LIBRARY=$(brew --prefix vulkan-loader)/lib/libvulkan.dylib -Dfmt_DIR=$(brew --prefix fmt)/lib/cmake/fmt"
}

case "$(uname -s)" in
  Linux) command -v apt-get >/dev/null && debian_packages ;;
  Darwin) macos_packages ;;
esac

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | cksum | cut -d" " -f1)"
if [ ! -f "$stamp" ]; then
  log "installing paged-attention and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[mlx,mlx-lm,dev]" pybind11
  rm -f "$VENV"/.installed-* && touch "$stamp"
fi

bash scripts/build_kompute.sh "$VENV/bin/python"
log "ready: $("$VENV/bin/python" -c 'import paged_attention as p; print("backends", p.available_backends())')"
