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


# Unsigned words by size, widest first: what take_wide moves a row as.
_WORDS = ((8, mx.uint64), (4, mx.uint32), (2, mx.uint16))


def take_wide(a: mx.array, index: mx.array) -> mx.array:
    """mx.take(a, index, axis=0) for a 2-D row-contiguous a [N, W]: [*index.shape, W]. Each row
    moves as the widest unsigned words its byte size divides into, a bit-exact copy: MLX's
    gather spends one thread and one round of index arithmetic per element it writes, so an
    fp16 row moved as uint64 costs a quarter of the threads (ADR 0002, "Wide-word takes")."""
    row = a.shape[-1] * a.itemsize
    for size, word in _WORDS:
        if size > a.itemsize and row % size == 0:
            return mx.take(a.view(word), index, axis=0).view(a.dtype)
    return mx.take(a, index, axis=0)
