"""Facts about known devices, kept in one table: peak memory bandwidth, compute units (NVIDIA SMs,
Apple GPU cores) and the Vulkan timestamp period; beside it the streaming-read ceilings measured
on the devices this project ran on.

Used by the MLX fused kernel's split-K heuristic (compute units), the Vulkan backend's split
geometry (compute units), and the lab's reports (measured bandwidth as a fraction of peak). A
backend's `device_facts` looks its device string up here.

Values are vendors' published figures. Matching is a case-insensitive whole-word search for the
key in the device string ("M2" does not match "HBM2e", "H200" does not match "GH200", "A10" does
not match "A100"); the first key that matches wins, so more specific names come first. An unknown
device has no facts (None), never a guess: callers that need a number choose their own fallback.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Vulkan timestamp ticks are `timestampPeriod` ns. Kompute 0.9 does not expose the period;
# NVIDIA and lavapipe report 1 ns, the value assumed for every device (the Vulkan bench
# cross-checks it against wall-clock time).
DEFAULT_TIMESTAMP_PERIOD_NS = 1.0


@dataclass(frozen=True)
class DeviceFacts:
    key: str | None                   # the table row that matched, None when unknown
    peak_bytes_per_s: float | None    # peak DRAM/HBM bandwidth
    compute_units: int | None         # NVIDIA SMs / Apple GPU cores
    l2_bytes: int | None = None
    timestamp_period_ns: float = DEFAULT_TIMESTAMP_PERIOD_NS


UNKNOWN = DeviceFacts(None, None, None)

# (key, peak bytes/s, compute units, L2 bytes)
DEVICES: tuple[tuple[str, float | None, int | None, int | None], ...] = (
    ("H100 PCIe", 2.0e12, 114, 50 << 20),       # H100 PCIe 80 GB, HBM2e
    ("H100 NVL", 3.9e12, 132, 50 << 20),        # H100 NVL 94 GB
    ("H100", 3.35e12, 132, 50 << 20),           # H100 SXM5 80 GB, HBM3
    ("GH200", None, 132, 50 << 20),             # 96 GB HBM3 and 144 GB HBM3e versions differ
    ("H200", 4.8e12, 132, 50 << 20),            # H200 141 GB, HBM3e
    ("H800", 3.35e12, 132, 50 << 20),
    ("B200", 8.0e12, 148, None),
    ("A100-SXM4-80GB", 2.039e12, 108, 40 << 20),
    ("A100", 1.555e12, 108, 40 << 20),          # A100 40 GB
    ("A800", None, 108, 40 << 20),
    ("L40S", 864e9, 142, None),
    ("L40", 864e9, 142, None),
    ("L4", 300e9, 58, None),
    ("A10", 600e9, 72, None),
    ("4090", 1008e9, 128, None),
    ("3090", 936e9, 82, None),
    # Apple unified memory (LPDDR5). Compute units: the product tier's estimate the fused
    # kernel's split-K heuristic has always used (Pro 16, Max 32, Ultra 64, base 8), not each
    # chip's exact core count; no Apple device has been measured yet (README).
    ("M1 Ultra", 800e9, 64, None),
    ("M1 Max", 400e9, 32, None),
    ("M1 Pro", 200e9, 16, None),
    ("M2 Ultra", 800e9, 64, None),
    ("M2 Max", 400e9, 32, None),
    ("M2 Pro", 200e9, 16, None),
    ("M3 Ultra", 819e9, 64, None),
    ("M3 Max", 400e9, 32, None),                # the 16-core-CPU M3 Max; the 14-core one has 300 GB/s
    ("M3 Pro", 150e9, 16, None),
    ("M4 Max", 546e9, 32, None),
    ("M4 Pro", 273e9, 16, None),
    ("M1", 68.25e9, 8, None),
    ("M2", 100e9, 8, None),
    ("M3", 100e9, 8, None),
    ("M4", 120e9, 8, None),
)

# Measured streaming-read ceilings: what a kernel that reads memory once, with the decode
# kernels' own 16-byte loads, reaches on the device (`paged-attn bench mlx-ceiling`). Decode is
# memory-bound, so every TB/s figure is read against this as well as against the datasheet
# peak. Only devices measured here have a row: (bytes/s, where the figure comes from).
CEILINGS: dict[str, tuple[float, str]] = {
    "H100": (2.96e12, "ADR 0004: paged-attn bench mlx-ceiling, 2.93-3.02 TB/s in three runs"),
    "H200": (4.16e12, "ADR 0004: paged-attn bench mlx-ceiling on the H200, 2026-12-05: 4.14-4.16 "
                      "TB/s over 2-16 threadgroups per SM (87% of the 4.8 TB/s peak)"),
}

# When the device is not in the table: the split-K heuristics still need a count.
FALLBACK_COMPUTE_UNITS = {"cuda": 132, "metal": 8, "vulkan-discrete": 108, "vulkan": 32}


@functools.lru_cache(maxsize=64)
def lookup(device: str) -> DeviceFacts:
    """The facts of `device` (a backend's device string); UNKNOWN when no row matches."""
    for key, peak, units, l2 in DEVICES:
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", device or "", re.I):
            return DeviceFacts(key, peak, units, l2)
    return UNKNOWN


def peak_bandwidth(device: str) -> float | None:
    """Peak bytes/s of `device`, or None when unknown."""
    return lookup(device).peak_bytes_per_s


def ceiling_bandwidth(device: str) -> float | None:
    """The measured streaming-read bytes/s of `device` (CEILINGS), or None when not measured."""
    row = CEILINGS.get(lookup(device).key)
    return None if row is None else row[0]
