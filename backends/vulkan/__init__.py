"""Vulkan backend: Kompute (`kp`) + GLSL compute shaders compiled with glslc.

`probe()` never touches Vulkan in this process: `kp.Manager()` aborts the whole interpreter when no
driver exists, so a short subprocess creates the manager and reports the device as JSON.
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

from paged_attention.settings import get as _settings

from . import settings as _knobs  # noqa: F401 - declares the PAGED_ATTENTION_VK_* settings

KNOWN_PATHS = ("fused", "splitk")

SETUP_HINT = ("run the README setup (scripts/build_kompute.sh $VENV/bin/python builds Kompute's "
              "'kp' module; apt-get install mesa-vulkan-drivers libvulkan-dev glslc libfmt-dev)")

_PROBE_CODE = r"""
import json, os, sys
import kp
m = kp.Manager(int(sys.argv[1]))
p = m.get_device_properties()
print("PA_VK_PROBE " + json.dumps({"device_name": p["device_name"],
      "timestamps_supported": bool(p["timestamps_supported"]),
      "max_work_group_count": list(p["max_work_group_count"])}))
m.destroy()
"""


@functools.cache
def device_info() -> dict | str:
    """The Vulkan device's properties as a dict, or a sentence saying why there is none."""
    try:
        import importlib.util
        if importlib.util.find_spec("kp") is None:
            return f"the Kompute Python module 'kp' is not installed; {SETUP_HINT}"
    except (ImportError, ValueError) as exc:  # pragma: no cover - broken installs
        return f"cannot look up 'kp' ({exc}); {SETUP_HINT}"
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE, str(_settings().vk_device)],
                              capture_output=True, text=True,
                              timeout=_settings().vk_probe_timeout_s)
    except subprocess.TimeoutExpired:
        return "creating a Vulkan device timed out (is the Vulkan driver hung?)"
    for line in proc.stdout.splitlines():
        if line.startswith("PA_VK_PROBE "):
            return json.loads(line[len("PA_VK_PROBE "):])
    err = (proc.stderr or "").strip().splitlines()
    detail = err[-1] if err else f"exit status {proc.returncode}"
    if "No module named" in detail:
        return f"the Kompute Python module 'kp' cannot be imported ({detail}); {SETUP_HINT}"
    return (f"no usable Vulkan device ({detail}); install a Vulkan driver (CPU: apt-get install "
            "mesa-vulkan-drivers for lavapipe; NVIDIA: the driver's Vulkan ICD) and check 'vulkaninfo'")


def probe() -> str | None:
    info = device_info()
    if isinstance(info, str):
        return info
    if shutil.which("glslc") is None:
        return ("glslc (GLSL to SPIR-V compiler) is not on PATH; install it with 'apt-get install glslc' "
                "or the LunarG Vulkan SDK")
    return None


def __getattr__(name):
    # Import lazily so that probing does not import kp in this process.
    if name == "Backend":
        from .backend import VulkanBackend
        return VulkanBackend
    raise AttributeError(name)
