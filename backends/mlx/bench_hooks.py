"""What the lab's MLX benches measure beyond the public API (`paged-attn bench mlx-ceiling`):
the streaming-read probe kernel (shaders/mlx/stream_read.body), built from the same kernel
source and 16-byte loads as the decode kernel, and the device's compute units. The lab calls
these instead of importing the fused path's private kernel factory (tests/units/test_layout.py
keeps it that way)."""
from __future__ import annotations

import mlx.core as mx

from .fused import _kernel, compute_units  # noqa: F401 - compute_units is part of this surface

STREAM_THREADS = 256  # threads per threadgroup of the read probe


def stream_read(api: str, x: mx.array, groups: int) -> mx.array:
    """One launch of the read probe over x (uint32, a multiple of 4 words) with `groups`
    threadgroups of STREAM_THREADS threads: every thread reads its 16-byte vectors of x in a
    grid-stride loop and writes the xor of what it read (so the reads cannot be optimised away;
    tests/backends/test_mlx_fused.py checks the fold against numpy)."""
    threads = groups * STREAM_THREADS
    params = mx.array([x.size // 4, threads], dtype=mx.int32)
    return _kernel(api, "stream_read", False)(
        inputs=[x, params], template=[("NT", STREAM_THREADS)], grid=(threads, 1, 1),
        threadgroup=(STREAM_THREADS, 1, 1), output_shapes=[(threads,)],
        output_dtypes=[mx.uint32])[0]
