"""MLX array facts shared by the backend and its kernels: dtypes, conversion, kernel API."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def gpu_kind() -> str | None:
    """'metal', 'cuda' or None: which custom-kernel API the default device supports."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def as_mx(x) -> mx.array:
    """x as an mx.array (no copy when it already is one)."""
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x))
