"""Choice of decode path for path="auto".

Uncalibrated rule: the fused kernel when the backend has one (it reads each K/V byte once,
where gather copies the context first), otherwise the backend's first path.
"""
from __future__ import annotations

from .validation import DecodeArgs, PoolSpec


def choose_path(backend, args: DecodeArgs, spec: PoolSpec) -> str:
    return "fused" if "fused" in backend.paths else backend.paths[0]
