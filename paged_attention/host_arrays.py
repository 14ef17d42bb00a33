"""Host-side array conversions shared by the backends that compute from numpy (numpy, Vulkan):
bfloat16 in and out. numpy has no bfloat16; such pools hold its bit patterns as uint16, and
bfloat16 inputs (MLX arrays or ml_dtypes numpy arrays) are widened to float32, exactly."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

from .validation import dtype_name

# Copies at least this large are split across threads: a single core's copy rate bounds a
# large prefill's host time (figures: ADR 0008, "Figures behind the code's constants"). numpy
# releases the GIL while it copies, so the threads run in parallel.
PARALLEL_COPY_BYTES = 4 << 20
COPY_THREADS = max(2, min(8, os.cpu_count() or 1))
_pool = None
_pool_lock = threading.Lock()


def _copy_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="paged-attention-copy")
        return _pool


def copy_into(dst: np.ndarray, src) -> None:
    """dst[...] = src (same shape; dtype converted as numpy assignment does), in slabs along the
    first axis on several threads when the copy is large."""
    src = np.asarray(src)
    if dst.nbytes < PARALLEL_COPY_BYTES or dst.ndim == 0 or dst.shape[0] < 2 or src.shape != dst.shape:
        np.copyto(dst, src, casting="unsafe")
        return
    pool = _copy_pool()
    n = dst.shape[0]
    step = -(-n // COPY_THREADS)
    jobs = [pool.submit(np.copyto, dst[i:i + step], src[i:i + step], casting="unsafe")
            for i in range(0, n, step)]
    for j in jobs:
        j.result()


def host(x) -> np.ndarray:
    """A numpy view/copy of an input array; bfloat16 (MLX or ml_dtypes) is widened to float32."""
    if dtype_name(x) == "bfloat16":
        if isinstance(x, np.ndarray):   # ml_dtypes
            return x.astype(np.float32)
        # Another library's array (MLX): widened by that library, which numpy cannot read
        # bfloat16 from; its module is loaded already, since x exists.
        return np.asarray(x.astype(_library(x).float32))
    return np.asarray(x)


def _library(x):
    """The module of x's array type (e.g. mlx.core for an mx.array), without importing it."""
    return sys.modules[type(x).__module__]


def out_dtype(q):
    """What an output for q is cast to: a numpy dtype, or (library module, dtype) for a bfloat16
    q of another array library (MLX), which numpy cannot hold."""
    if dtype_name(q) == "bfloat16" and not isinstance(q, np.ndarray):
        return (_library(q), q.dtype)
    return np.asarray(q).dtype


def cast_out(o: np.ndarray, dt):
    """o in `out_dtype(q)`: outputs keep q's dtype and kind (an MLX bfloat16 q gets an MLX
    bfloat16 array back, as `run` promises q's dtype)."""
    if isinstance(dt, tuple):
        lib, dtype = dt
        return lib.array(np.ascontiguousarray(o, dtype=np.float32)).astype(dtype)
    out = np.empty(o.shape, dtype=dt)
    copy_into(out, o)
    return out


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
