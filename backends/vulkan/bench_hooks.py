"""What the lab's Vulkan bench (`paged-attn bench vulkan`) measures beyond the public API, as
functions of a VulkanBackend: repeated attention in one submission, the fence-wait mode, an
empty submission's round trip and the read rate of mapped output memory. The lab calls these
instead of reaching into the backend (tests/units/test_layout.py keeps it that way).

Per-op device timestamps are public on the backend: `record_timestamps`, `last_timestamps`,
`device_time(fn)`; so are `counters()`, `last_host_s` and `last_submit_wait_ns`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from paged_attention.validation import StepArgs


def decode_repeated(be, q, pool, args: StepArgs, path: str, repeat: int, sinks=None):
    """The attention of `args` on `path` recorded `repeat` times back to back (a barrier between
    repetitions) in one submission, so the GPU stays busy and, with `be.record_timestamps`, each
    repetition is timed (its ops are labelled attn<layer>.<rep> / reduce<layer>.<rep>). args may
    carry an attention variant (a plan's `args`); sinks: float32 [Hq] for the sinks form."""
    with be._call_lock:
        return be._decode_repeated(q, pool, args, path, repeat, sinks)


def fence_spin_ns(be) -> int:
    """Nanoseconds a submission polls its fence before a blocking wait; 0: Kompute's own
    blocking eval (stock kp, or PAGED_ATTENTION_VK_SPIN_US=0)."""
    return be._dev.spin_ns


@contextlib.contextmanager
def fence_spin(be, ns: int) -> Iterator[None]:
    """Within the block, submissions poll their fence for `ns` (0: blocking wait). Only a
    backend whose kp has the polled eval (fence_spin_ns > 0) can poll."""
    before = be._dev.spin_ns
    if ns and not before:
        raise ValueError("this kp has no polled fence wait (patch level 4); only ns=0 is possible")
    be._dev.spin_ns = int(ns)
    try:
        yield
    finally:
        be._dev.spin_ns = before


def empty_submission(be) -> Callable[[], None]:
    """A callable that submits a recorded 4-byte download and waits for it: a submission's round
    trip and nothing else. `be.last_submit_wait_ns` splits a polled one."""
    dev = be._dev
    seq = dev.record([dev.download([dev.sync])])
    return lambda: dev.submit(seq, ["download"])


def readback_buffer(be, n: int) -> tuple[np.ndarray, str, int | None]:
    """(host view of n float32, "host" | "device", memory flags or None): the memory a run's
    outputs are read from, made current on the host: a host-memory buffer the shaders write with
    host I/O, else the staging copy of a device buffer after its download. The flags are the
    Vulkan memory property bits of that memory (patched kp only)."""
    dev = be._dev
    kind = "host" if dev.host_io else "device"
    t, view = dev.staging("bench_readback", n, np.float32, kind)
    dev.run([dev.barrier("compute->host")] if dev.host_io else [dev.download([t])],
            ["barrier" if dev.host_io else "download"])
    flags = t.pa_memory_flags() if hasattr(t, "pa_memory_flags") else None
    return view, kind, None if flags is None else flags[0 if dev.host_io else 1]

