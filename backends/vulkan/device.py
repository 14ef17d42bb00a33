"""The Kompute device layer of the Vulkan backend: everything that talks to `kp`, and nothing
about attention.

`VulkanDevice` owns the kp.Manager and gives the backend a small surface:

  tensors     new_tensor(n, dtype, kind), staging(name, n, dtype, kind) (power-of-two size
              classes kept until close), view(tensor)
  pipelines   algorithm(cache, shader, defines, tensors, wg, n_push, tag) (kp.Algorithm cached
              per caller-owned dict), drop_algorithms(cache), grid(n, wg)
  ops         dispatch(algo, push), barrier(kind), upload(tensors), download(tensors)
  submission  run(ops, labels) (a fresh sequence), run_recorded(key, make_ops, labels) (recorded
              once per key, re-submitted), record(ops) (a sequence the caller keeps),
              submit(seq, labels) (polled fence wait where the Kompute patch has it)
  timestamps  record_timestamps (latch a timestamp after every op), last_timestamps
  counters    submissions, algos_live, staging_bytes(), patched, host_io, spin_ns
  facts       name, timestamps_supported, subgroup_size, compiler (ShaderCompiler), coop_missing
              (why prefill_coop.comp cannot run here; None where it can)
  lifetime    close(), closed
`kp` and `mgr` (the module and the kp.Manager) are there for what this surface lacks (a pool's
one-off download kernel); `sync` is the 4-byte tensor of stock kp's compute->compute barrier.

Barriers
  With the patched Kompute (scripts/build_kompute.sh, `kp.pa_patch_level`), a sequence records
  one global barrier per phase (uploads -> appends -> attention -> reduce -> download) and
  dispatches record none. With a stock kp, OpAlgoDispatch records a transfer->compute barrier per
  bound tensor, and compute->compute ordering (append before attention, split-K partials before
  the reduce) comes from an OpTensorSyncLocal on a 4-byte tensor, which records a compute->transfer
  barrier that the next dispatch's transfer->compute barrier chains into an execution dependency.
"""
from __future__ import annotations

import numpy as np

from paged_attention.errors import PagedAttentionError

from .shaders import ShaderCompiler

MAX_GRID = 4096  # workgroups of the grid-stride shaders

# Vulkan stage and access bits for kp.OpGlobalBarrier (patched Kompute).
_TRANSFER, _COMPUTE, _HOST = 0x1000, 0x800, 0x4000
_HOST_READ = 0x2000
_SHADER_READ, _SHADER_WRITE, _TRANSFER_READ, _TRANSFER_WRITE = 0x20, 0x40, 0x800, 0x1000
BARRIERS = {
    # Opens every patched sequence: orders this submission's uploads and every earlier
    # submission's shader writes before anything that follows.
    "full": (_TRANSFER | _COMPUTE, _TRANSFER | _COMPUTE, _TRANSFER_WRITE | _SHADER_WRITE,
             _SHADER_READ | _SHADER_WRITE | _TRANSFER_READ | _TRANSFER_WRITE),
    "compute->compute": (_COMPUTE, _COMPUTE, _SHADER_WRITE, _SHADER_READ | _SHADER_WRITE),
    "compute->transfer": (_COMPUTE, _TRANSFER, _SHADER_WRITE, _TRANSFER_READ),
    # Closes a host-I/O sequence: shader writes to host memory, then read by the host.
    "compute->host": (_COMPUTE, _HOST, _SHADER_WRITE, _HOST_READ),
}


# What prefill_coop.comp needs of a device: the extensions (asked for at device creation; Kompute
# drops those the device lacks, patch level 5 enables their features), one fp16 x fp16 -> fp32
# 16x16x16 subgroup shape, and 32-lane subgroups (its rows are laid out per 32-lane subgroup).
COOP_EXTENSIONS = ("VK_NV_cooperative_matrix", "VK_KHR_shader_float16_int8",
                   "VK_KHR_vulkan_memory_model")
_FP16, _FP32, _SCOPE_SUBGROUP = 0, 1, 3   # VkComponentTypeNV, VkScopeNV
COOP_SHAPE = (16, 16, 16, _FP16, _FP16, _FP32, _FP32, _SCOPE_SUBGROUP)


def coop_missing(name: str, subgroup_size: int, patch_level: int, extensions, enabled: bool,
                 shapes) -> str | None:
    """Why the cooperative-matrix prefill cannot run on a device, or None when it can.
    extensions: the device's extension names; enabled: patch level 5 enabled the features;
    shapes: its VkCooperativeMatrixPropertiesNV as (M, N, K, A, B, C, D type, scope)."""
    label = "lavapipe" if "llvmpipe" in name.lower() or "lavapipe" in name.lower() else name
    if patch_level < 5:
        return ("the Kompute build cannot enable cooperative matrices (kp patch level "
                f"{patch_level} < 5; scripts/build_kompute.sh builds level 5)")
    if "VK_NV_cooperative_matrix" not in extensions:
        return f"the device has no VK_NV_cooperative_matrix ({label})"
    lacking = [e for e in COOP_EXTENSIONS if e not in extensions]
    if lacking:
        return f"the device lacks {', '.join(lacking)} ({label})"
    if not enabled:
        return (f"the device does not report the cooperativeMatrix, shaderFloat16 and "
                f"vulkanMemoryModel features together ({label})")
    if COOP_SHAPE not in {tuple(int(x) for x in sh) for sh in shapes}:
        return f"the device has no fp16 x fp16 -> fp32 16x16x16 subgroup cooperative matrix ({label})"
    if subgroup_size != 32:
        return f"the device's subgroups have {subgroup_size} lanes, the coop kernel needs 32 ({label})"
    return None


class DeviceOutOfMemory(PagedAttentionError):
    """A device buffer could not be allocated (needs the patched Kompute; stock 0.9 crashes)."""


def pow2_ceil(x: int) -> int:
    return 1 << (max(1, int(x)) - 1).bit_length()


class VulkanDevice:
    """One Vulkan device through Kompute (see the module docstring for the surface).

    stock_barriers: record Kompute's own per-tensor barriers even when the patch is there (A/B).
    spin_us: microseconds a submission polls its fence before a blocking wait (patch level 4).
    host_io: bind host-memory staging to the shaders (patched Kompute) instead of copying."""

    def __init__(self, device_index: int, *, stock_barriers: bool = False, spin_us: int = 0,
                 host_io: bool = True):
        import kp
        self.kp = kp
        level = int(getattr(kp, "pa_patch_level", 0))
        # Patch level 5 enables the cooperative-matrix features of the extensions asked for here.
        self.mgr = kp.Manager(device_index, [], list(COOP_EXTENSIONS)) if level >= 5 \
            else kp.Manager(device_index)
        props = self.mgr.get_device_properties()
        self.name = str(props["device_name"])
        self.timestamps_supported = bool(props["timestamps_supported"])
        self.compiler = ShaderCompiler()
        self.submissions = 0            # queue submissions (kp Sequence evals) so far
        self.algos_live = 0             # kp.Algorithm objects alive (pipelines)
        # Patched Kompute (scripts/build_kompute.sh, ADR 0008): one global barrier per phase
        # instead of a barrier per bound tensor per dispatch.
        self.patched = hasattr(kp, "OpAlgoDispatchBare") and hasattr(kp, "OpGlobalBarrier") \
            and not stock_barriers
        self.spin_ns = spin_us * 1000 if hasattr(kp.Sequence, "pa_eval_poll") else 0
        # Patched Kompute: recorded attention binds q, new k/v and the output in host memory
        # (cached system memory, kp's eHost tensors) to the shaders, so a layer's submission has
        # no upload or download copy and no transfer barriers (ADR 0008).
        self.host_io = self.patched and bool(host_io)
        self.last_submit_wait_ns = None  # host ns submitting / waiting, last polled submission
        self.record_timestamps = False   # latch a timestamp after every recorded op
        self.last_timestamps: list[tuple[str, int]] | None = None
        self._staging: dict[tuple, tuple] = {}
        self._recorded: dict[tuple, tuple] = {}  # run_recorded's (sequence, labels)
        self.closed = False
        self.sync = self.new_tensor(1, np.uint32, "device")  # stock kp's compute->compute barrier
        self.subgroup_size = self._probe_subgroup_size()
        self.coop_missing = coop_missing(
            self.name, self.subgroup_size, level,
            self.mgr.pa_device_extensions() if level >= 5 else [],
            level >= 5 and bool(self.mgr.pa_cooperative_matrix()),
            self.mgr.pa_cooperative_matrix_properties() if level >= 5 else [])

    def _probe_subgroup_size(self) -> int:
        _, spirv = self.compiler.compile("subgroup_probe.comp")
        t = self.new_tensor(1, np.uint32, "device")
        algo = self.mgr.algorithm([t], spirv, [1, 1, 1], np.zeros(0, np.float32), np.zeros(1, np.float32))
        seq = self.mgr.sequence()
        seq.record(self.kp.OpAlgoDispatch(algo, np.zeros(1, np.uint32)))
        seq.record(self.kp.OpTensorSyncLocal([t]))
        seq.eval()
        self.submissions += 1
        size = int(t.data()[0])
        algo.destroy()
        t.destroy()
        return size if size > 0 else 1

    # -- tensors ---------------------------------------------------------------------------------
    def new_tensor(self, n: int, dtype, kind: str):
        """A zeroed kp tensor of n elements: kind "storage" (device-only), "device" (device
        memory with a host staging copy) or "host" (host memory the shaders bind)."""
        kp = self.kp
        tt = {"storage": kp.TensorTypes.storage, "device": kp.TensorTypes.device,
              "host": kp.TensorTypes.host}[kind]
        try:
            return self.mgr.tensor_t(np.zeros(max(int(n), 1), dtype=dtype), tt)
        except RuntimeError as exc:
            # Patched Kompute (ADR 0008) reports failed allocations instead of binding a null
            # VkDeviceMemory, which segfaulted once the GPU was full (e.g. MLX in the process).
            if "vkAllocateMemory" in str(exc) or "vkCreateBuffer" in str(exc):
                raise DeviceOutOfMemory(
                    f"Vulkan device memory exhausted allocating {int(n) * np.dtype(dtype).itemsize} "
                    f"bytes on {self.name} ({exc}); free pools, use fewer blocks, or give "
                    "other GPU users in this process (e.g. MLX's cache) less memory") from exc
            raise

    def staging(self, name: str, n: int, dtype=np.float32, kind: str = "device"):
        """Staging tensor `name` of the power-of-two size class holding n elements; (tensor, host
        view). One tensor per (name, class), kept until close: recordings bind them, and a copy
        (OpTensorSyncDevice/Local moves the whole tensor) never moves more than 2x the data."""
        cap = max(64, pow2_ceil(n))
        cur = self._staging.get((name, cap, kind))
        if cur is None:
            t = self.new_tensor(cap, dtype, kind)
            cur = self._staging[(name, cap, kind)] = (t, None if kind == "storage" else t.data())
        return cur

    @staticmethod
    def view(t):
        return t.data()

    def staging_bytes(self) -> int:
        return sum(int(t.size()) * 4 for t, _v in self._staging.values())

    # -- pipelines -------------------------------------------------------------------------------
    def algorithm(self, cache: dict, shader: str, defines: dict, tensors, wg, n_push: int, tag=""):
        """Cached kp.Algorithm; `tag` names the role, the tensors' ids the buffers it binds. The
        caller bounds its cache (drop_algorithms) before it records, never here: an op list
        being recorded may already hold algorithms of this cache."""
        key_s, spirv = self.compiler.compile(shader, **defines)
        key = (key_s, tuple(wg), tag, tuple(id(t) for t in tensors))
        algo = cache.get(key)
        if algo is None:
            algo = self.mgr.algorithm(list(tensors), spirv, list(wg), np.zeros(0, np.float32),
                                      np.zeros(n_push, np.float32))
            cache[key] = algo
            self.algos_live += 1
        return algo

    def drop_algorithms(self, cache: dict, destroy: bool = True) -> None:
        """Forget a cache's algorithms (destroyed unless the manager is gone). Recordings that
        use them must be forgotten first."""
        if destroy and not self.closed:
            for a in cache.values():
                a.destroy()
        self.algos_live -= len(cache)
        cache.clear()

    @staticmethod
    def grid(n: int, wg: int) -> list[int]:
        return [max(1, min(MAX_GRID, -(-int(n) // wg))), 1, 1]

    # -- ops -------------------------------------------------------------------------------------
    def dispatch(self, algo, push):
        push = np.asarray(push, dtype=np.uint32)
        if self.patched:
            return self.kp.OpAlgoDispatchBare(algo, push)
        return self.kp.OpAlgoDispatch(algo, push)

    def barrier(self, kind: str = "compute->compute"):
        if self.patched:
            src, dst, sa, da = BARRIERS[kind]
            return self.kp.OpGlobalBarrier(src, dst, sa, da)
        if kind == "compute->compute":
            # compute -> transfer barrier (+ a 4-byte copy); see the module docstring.
            return self.kp.OpTensorSyncLocal([self.sync])
        raise AssertionError(kind)  # stock dispatch/sync ops record their own barriers

    def upload(self, tensors):
        return self.kp.OpTensorSyncDevice(list(tensors))

    def download(self, tensors):
        return self.kp.OpTensorSyncLocal(list(tensors))

    # -- submission ------------------------------------------------------------------------------
    def record(self, ops):
        """A kp.Sequence recording ops (with a query pool when timestamps are recorded)."""
        seq = self.mgr.sequence(0, len(ops) + 1) if self.record_timestamps else self.mgr.sequence()
        for op in ops:
            seq.record(op)
        return seq

    def _sequence(self, ops, labels=None):
        """(a kp.Sequence recording ops, their labels); a patched submission opens with the full
        barrier."""
        labels = labels or ["op"] * len(ops)
        if self.patched and not isinstance(ops[0], self.kp.OpGlobalBarrier):
            ops, labels = [self.barrier("full")] + list(ops), ["barrier"] + list(labels)
        return self.record(ops), labels

    def run(self, ops, labels=None):
        """Record ops in a fresh sequence and submit it; waits for it."""
        seq, labels = self._sequence(ops, labels)
        self.submit(seq, labels)
        return seq

    def run_recorded(self, key, make_ops, labels):
        """`run` for op lists that bind only staging tensors (kept until close): recorded once
        per key and re-submitted. A new kp.Sequence costs a command pool, a command buffer and a
        recording, far more than re-submitting a recorded one (ADR 0008, "Figures behind the
        code's constants")."""
        if self.record_timestamps:  # timestamps need a sequence with a query pool
            return self.run(make_ops(), labels)
        if key not in self._recorded:
            self._recorded[key] = self._sequence(make_ops(), labels)
        seq, labels = self._recorded[key]
        self.submit(seq, labels)
        return seq

    def submit(self, seq, labels):
        """Submit a recorded sequence and wait for it; with record_timestamps, last_timestamps
        holds (label, ticks) of every op."""
        if self.spin_ns:
            # Patched Kompute: a fence kept by the sequence, polled before a blocking wait; a
            # per-layer loop pays a submission's round trip once per layer (ADR 0008).
            self.last_submit_wait_ns = seq.pa_eval_poll(self.spin_ns)
        else:
            seq.eval()
        self.submissions += 1
        if self.record_timestamps:
            ts = [int(t) for t in seq.get_timestamps()]
            self.last_timestamps = [("begin", ts[0])] + list(zip(labels, ts[1:]))

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy the manager and with it every tensor, pipeline and sequence; callers forget
        their own references to them first."""
        if self.closed:
            return
        self.closed = True
        self._recorded.clear()
        self._staging.clear()
        self.algos_live = 0
        self.mgr.destroy()
        self.mgr = None
