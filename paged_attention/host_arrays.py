"""Host-side array conversions shared by the backends that compute from numpy (numpy, Vulkan):
bfloat16 in and out. numpy has no bfloat16; such pools hold its bit patterns as uint16, and
bfloat16 inputs (MLX arrays or ml_dtypes numpy arrays) are widened to float32, exactly."""
from __future__ import annotations

import numpy as np

from .validation import dtype_name


def host(x) -> np.ndarray:
    """A numpy view/copy of an input array; bfloat16 (MLX or ml_dtypes) is widened to float32."""
    if dtype_name(x) == "bfloat16":
        if type(x).__module__.startswith("mlx"):
            import mlx.core as mx
            return np.asarray(x.astype(mx.float32))
        return np.asarray(x).astype(np.float32)
    return np.asarray(x)


def out_dtype(q):
    """What an output for q is cast to: a numpy dtype, or "mlx-bf16" for an MLX bfloat16 q."""
    if dtype_name(q) == "bfloat16":
        return "mlx-bf16" if type(q).__module__.startswith("mlx") else np.asarray(q).dtype
    return np.asarray(q).dtype


def cast_out(o: np.ndarray, dt):
    """o in `out_dtype(q)`: outputs keep q's dtype and kind (an MLX bfloat16 q gets an MLX
    bfloat16 array back, as `run` promises q's dtype)."""
    if isinstance(dt, str):
        import mlx.core as mx
        return mx.array(np.ascontiguousarray(o, dtype=np.float32)).astype(mx.bfloat16)
    return np.array(o, dtype=dt, copy=True)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)
