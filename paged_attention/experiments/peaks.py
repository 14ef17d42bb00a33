"""Peak memory bandwidth of known devices, to report measured GB/s as a fraction of peak.

Values are the vendors' published peak DRAM/HBM bandwidths in bytes per second. Matching is by
case-insensitive whole-word substring of the backend's device string; the first match wins, so more
specific names come first. Unknown devices (CPUs, lavapipe, anything not listed) report no
fraction rather than a guess.
"""
from __future__ import annotations

import re

PEAK_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2.0e12),        # NVIDIA H100 PCIe 80 GB, HBM2e
    ("H100 NVL", 3.9e12),         # NVIDIA H100 NVL 94 GB
    ("H100", 3.35e12),            # NVIDIA H100 SXM5 80 GB, HBM3
    ("H200", 4.8e12),             # NVIDIA H200 141 GB, HBM3e
    ("H800", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),           # A100 40 GB
    ("M1 Ultra", 800e9),          # Apple unified memory (LPDDR5)
    ("M1 Max", 400e9),
    ("M1 Pro", 200e9),
    ("M2 Ultra", 800e9),
    ("M2 Max", 400e9),
    ("M2 Pro", 200e9),
    ("M3 Max", 400e9),            # the 16-core-CPU M3 Max; the 14-core one has 300 GB/s
    ("M3 Pro", 150e9),
    ("M4 Max", 546e9),
    ("M4 Pro", 273e9),
    ("M1", 68.25e9),
    ("M2", 100e9),
    ("M3", 100e9),
    ("M4", 120e9),
)


def peak_bandwidth(device: str) -> float | None:
    """Peak bytes/s of `device` (a backend's device string), or None when unknown."""
    for key, value in PEAK_BYTES_PER_S:
        # Whole words only: "M2" must not match "HBM2e".
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", device, re.I):
            return value
    return None
