"""Vulkan backend on Kompute: pools resident on the device, one submission per decode step.

Device tensors
  pools      two eStorage uint32 tensors per layer (K, V), each [num_blocks, block_size, Hkv, DP]
             words; fp16 pools hold two halves per word (numpy's float16 -> uint32 view equals
             packHalf2x16), fp32 pools hold float bits. DP is the head dim padded to 8 (fp16) or
             4 (fp32) elements so every row can be read with 16-byte loads; padding stays zero.
  staging    tensors in power-of-two size classes, one per (role, class, kind), kept until
             close and shared by all layers: q and out (float32, or fp16 pairs in uint32 words
             when every q is fp16) and knew/vnew (uint32 words), eHost tensors the shaders read
             and write in place with the patched Kompute (VK_HOST_IO, the default), else
             eDevice tensors copied in and out; tables, lens, slots, tiles (int32, eDevice);
             the split-K scratch part_o/part_ml (eStorage). A batch of N rows runs as its
             class (next power of two); rows past N have length 0 and give zeros never read.
Kernels
  decode.comp   one workgroup per (query row, KV head[, split]): decode rows and the split-K pass.
  prefill.comp  ragged plans (any query_lens > 1) on the fused path: one workgroup per (query
                tile, KV head), flash-attention style. A tile is up to QT queries of one sequence
                (`tiles`: first row, count; built per plan, longest contexts first); QT*G rows
                share each K/V load (`query_tile`: PREFILL_ROWS rows, within 48 KiB of shared
                memory). QT 1 (PAGED_ATTENTION_VK_QT=1, or a head too wide) keeps decode.comp.
Plan / run (ADR 0008)
  plan() keeps the step's tables/lengths/slots (plan.device, a _PlanState); its first run writes
  them into their class buffers (a whole decode_step carries them in its own upload, a run pays
  one extra submission per step) and marks the buffers as holding that plan. Each run uploads
  only q (and k/v), re-submits a sequence recorded once per (pool, batch class, table width,
  scale, window, split geometry) and copies the used rows out once. Single-layer recordings live
  on their pool (4 per pool), so any number of layers stays recorded; whole-step recordings sit
  in an 8-entry LRU. kp.Algorithm objects are cached per pool, keyed by the buffers they bind, at
  most MAX_POOL_ALGOS per pool, and destroyed with their pool. `counters()` reports them.
Barriers
  With the patched Kompute (scripts/build_kompute.sh, `kp.pa_patch_level`), a sequence records
  one global barrier per phase (uploads -> appends -> attention -> reduce -> download) and
  dispatches record none. With a stock kp, OpAlgoDispatch records a transfer->compute barrier per
  bound tensor, and compute->compute ordering (append before attention, split-K partials before
  the reduce) comes from an OpTensorSyncLocal on a 4-byte tensor, which records a compute->transfer
  barrier that the next dispatch's transfer->compute barrier chains into an execution dependency.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from collections import OrderedDict

import numpy as np

from paged_attention import devices, settings
from paged_attention.errors import InvalidInput, PagedAttentionError
from paged_attention.host_arrays import cast_out, copy_into, host, out_dtype, to_bf16_bits
from paged_attention.interface import KVPool, LayerStep, PagedAttention, Plan
from paged_attention.validation import StepArgs, PoolSpec

from . import KNOWN_PATHS
from .shaders import ShaderCompiler

FILL_WG = 256
APPEND_WG = 256
REDUCE_WG = 128
MAX_GRID = 4096  # workgroups of the grid-stride shaders
MIN_CHUNK = 512  # split-K: fewest tokens per split
_F16 = np.dtype(np.float16)


class DeviceOutOfMemory(PagedAttentionError):
    """A device buffer could not be allocated (needs the patched Kompute; stock 0.9 crashes)."""


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << (max(1, int(x)) - 1).bit_length()


# Vulkan stage and access bits for kp.OpGlobalBarrier (patched Kompute).
_TRANSFER, _COMPUTE, _HOST = 0x1000, 0x800, 0x4000
_HOST_READ = 0x2000
_SHADER_READ, _SHADER_WRITE, _TRANSFER_READ, _TRANSFER_WRITE = 0x20, 0x40, 0x800, 0x1000
_BARRIERS = {
    # Opens every patched sequence: orders this submission's uploads and every earlier
    # submission's shader writes before anything that follows.
    "full": (_TRANSFER | _COMPUTE, _TRANSFER | _COMPUTE, _TRANSFER_WRITE | _SHADER_WRITE,
             _SHADER_READ | _SHADER_WRITE | _TRANSFER_READ | _TRANSFER_WRITE),
    "compute->compute": (_COMPUTE, _COMPUTE, _SHADER_WRITE, _SHADER_READ | _SHADER_WRITE),
    "compute->transfer": (_COMPUTE, _TRANSFER, _SHADER_WRITE, _TRANSFER_READ),
    # Closes a host-I/O sequence: shader writes to host memory, then read by the host.
    "compute->host": (_COMPUTE, _HOST, _SHADER_WRITE, _HOST_READ),
}
MAX_POOL_ALGOS = 48  # kp.Algorithm objects per pool before its recordings and kernels are rebuilt
PREFILL_WG = 128            # prefill.comp workgroup size
PREFILL_ROWS = 32           # prefill.comp query rows (queries x heads) per workgroup, the default
PREFILL_SHARED = 48 * 1024  # shared-memory budget: the most NVIDIA gives a workgroup without opt-in


def _padded_dim(spec: PoolSpec) -> int:
    """Head dim padded to whole 16-byte vectors: 8 16-bit elements or 4 float32 (VulkanPool.dp)."""
    vec = 8 if spec.dtype in ("float16", "bfloat16") else 4
    return -(-spec.head_dim // vec) * vec


def _prefill_layout(group: int, dp: int, qt: int) -> dict | None:
    """prefill.comp's tile geometry for QT queries of G heads at padded head dim DP, or None when
    it does not fit PREFILL_SHARED. The S = QK^T phase splits the workgroup into 8 key groups x
    WG/8 row groups (rows padded to RWP, a multiple of WG/8); the PV phase into NDG vec4-column
    groups x NRG row groups. KT (keys per tile) is the largest of 32/16/8 that fits: Q and the
    K/V tile stay fp32 in shared memory, so wide heads get short key tiles."""
    nsr = PREFILL_WG // 8
    rwp = -(-qt * group // nsr) * nsr
    if rwp > PREFILL_WG:  # bounds the per-thread register blocks (RB, ORB rows)
        return None
    ndv = dp // 4
    qsv = ndv | 1
    for kt in (32, 16, 8):
        if 16 * qsv * (rwp + kt) + 4 * rwp * (kt + 10) <= PREFILL_SHARED:  # prefill.comp's arrays
            break
    else:
        return None
    ndg = min(_pow2_floor(ndv), 16)
    nrg = math.gcd(PREFILL_WG // ndg, rwp)
    return {"QT": qt, "KT": kt, "WG": PREFILL_WG, "NDG": ndg, "NRG": nrg}


class VulkanPool(KVPool):
    """K and V pools of one layer as device-resident eStorage tensors."""

    _next_uid = 0

    def __init__(self, backend: "VulkanBackend", spec: PoolSpec):
        super().__init__(spec, "vulkan")
        self._backend = backend
        VulkanPool._next_uid += 1
        self.uid = VulkanPool._next_uid
        self.f16 = spec.dtype in ("float16", "bfloat16")  # 16-bit elements, two per word
        self.bf16 = spec.dtype == "bfloat16"
        self.dp = _padded_dim(spec)
        self.row_words = spec.num_kv_heads * self.dp * (2 if self.f16 else 4) // 4
        self.block_words = spec.block_size * self.row_words
        self.nwords = spec.num_blocks * self.block_words
        if self.nwords >= 2 ** 32:
            raise InvalidInput(f"pool of {self.nwords * 4} bytes exceeds the Vulkan backend's 16 GiB "
                               "per-tensor limit; use fewer blocks")
        self.k = backend._new_tensor(self.nwords, np.uint32, "storage")
        self.v = backend._new_tensor(self.nwords, np.uint32, "storage")
        self.algos: dict = {}
        self.recorded: OrderedDict = OrderedDict()  # single-layer recordings (backend._recording)
        backend._fill_zero(self)
        # Recorded plans bind this pool's tensors: drop them as soon as the pool is dropped, so
        # its device memory is given back at once rather than when the plan LRU evicts them.
        weakref.finalize(self, backend._forget_pool, self.uid, self.algos)

    def to_numpy(self):
        # Same lock as the backend's public calls: a download records on the shared manager.
        with self._backend._call_lock:
            return self._backend._download(self)


class _PlanState:
    """plan.device: a step's tables/lengths/slots (host copies and their size-class device
    buffers), its batch size class and split geometry. `token` marks whose tables a buffer holds."""
    __slots__ = ("token", "rows", "rcls", "bcls", "maxb", "path", "window", "scale_bits", "nsplit", "chunk",
                 "n", "tables_host", "lens_host", "slots_host", "tables", "lens", "slots", "qt",
                 "tcls", "tiles_host", "tiles", "keys")


class _Recorded:
    """A recorded kp.Sequence and the mapped staging views its inputs and outputs go through."""
    __slots__ = ("seq", "labels", "ops", "qrows", "krows", "vrows", "orows")


class VulkanBackend(PagedAttention):
    name = "vulkan"
    paths = KNOWN_PATHS
    pool_dtypes = ("float16", "bfloat16", "float32")
    # bfloat16 inputs: MLX arrays (mx.bfloat16) or ml_dtypes.bfloat16 numpy arrays (numpy has no
    # bfloat16 of its own). The output keeps q's dtype and kind: an MLX bfloat16 q gives an
    # mx.array back (the one exception to numpy outputs), an ml_dtypes q an ml_dtypes array.
    q_dtypes = ("float16", "bfloat16", "float32")

    def __init__(self, device_index: int | None = None):
        import kp
        self._kp = kp
        if device_index is None:
            device_index = settings.get().vk_device
        self._mgr = kp.Manager(device_index)
        props = self._mgr.get_device_properties()
        self._device_name = str(props["device_name"])
        self.timestamps_supported = bool(props["timestamps_supported"])
        self.compiler = ShaderCompiler()
        self.submissions = 0            # queue submissions (kp Sequence evals) so far
        self.recordings = 0             # kp Sequences recorded for attention so far
        self.algos_live = 0             # kp.Algorithm objects alive (pipelines)
        # Patched Kompute (scripts/build_kompute.sh, ADR 0008): one global barrier per phase
        # instead of a barrier per bound tensor per dispatch.
        self._bare = hasattr(kp, "OpAlgoDispatchBare") and hasattr(kp, "OpGlobalBarrier") \
            and not settings.get().vk_stock_barriers
        self._poll_ns = settings.get().vk_spin_us * 1000 if hasattr(kp.Sequence, "pa_eval_poll") else 0
        # Patched Kompute: recorded attention binds q, new k/v and the output in host memory
        # (cached system memory, kp's eHost tensors) to the shaders, so a layer's submission has
        # no upload or download copy and no transfer barriers (ADR 0008).
        self._host_io = self._bare and bool(settings.get().vk_host_io)
        self.last_submit_wait_ns = None  # host ns submitting / waiting, last polled submission
        self.record_timestamps = False  # bench: latch a timestamp after every recorded op
        self.last_timestamps: list[tuple[str, int]] | None = None
        self.last_host_s: dict | None = None
        self._staging: dict[tuple, tuple] = {}
        self._uploads: dict[tuple, tuple] = {}  # _run_recorded's (sequence, labels)
        self._resident: dict[int, object] = {}
        self._resident_last = None  # token of the plan whose tables were uploaded last
        self._algos: dict = {}
        self._steps: OrderedDict = OrderedDict()
        self._closed = False
        self._pool_refs: set = set()
        self._sync = self._new_tensor(1, np.uint32, "device")
        self.subgroup_size = self._probe_subgroup_size()
        self.compute_units = self._guess_compute_units()

    # -- device facts ----------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._device_name

    def _guess_compute_units(self) -> int:
        if settings.get().vk_compute_units:
            return settings.get().vk_compute_units
        name = self._device_name.lower()
        if "llvmpipe" in name or "lavapipe" in name:
            return os.cpu_count() or 2
        known = devices.lookup(self._device_name).compute_units
        if known:
            return known
        if "nvidia" in name or "amd" in name or "radeon" in name:
            return devices.FALLBACK_COMPUTE_UNITS["vulkan-discrete"]
        return devices.FALLBACK_COMPUTE_UNITS["vulkan"]

    def _probe_subgroup_size(self) -> int:
        kp = self._kp
        _, spirv = self.compiler.compile("subgroup_probe.comp")
        t = self._new_tensor(1, np.uint32, "device")
        algo = self._mgr.algorithm([t], spirv, [1, 1, 1], np.zeros(0, np.float32), np.zeros(1, np.float32))
        seq = self._mgr.sequence()
        seq.record(kp.OpAlgoDispatch(algo, np.zeros(1, np.uint32)))
        seq.record(kp.OpTensorSyncLocal([t]))
        seq.eval()
        self.submissions += 1
        size = int(t.data()[0])
        algo.destroy()
        t.destroy()
        return size if size > 0 else 1

    # -- resources -----------------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise PagedAttentionError("the Vulkan backend is closed")

    def _new_tensor(self, n: int, dtype, kind: str):
        kp = self._kp
        tt = {"storage": kp.TensorTypes.storage, "device": kp.TensorTypes.device,
              "host": kp.TensorTypes.host}[kind]
        try:
            return self._mgr.tensor_t(np.zeros(max(int(n), 1), dtype=dtype), tt)
        except RuntimeError as exc:
            # Patched Kompute (ADR 0008) reports failed allocations instead of binding a null
            # VkDeviceMemory, which segfaulted once the GPU was full (e.g. MLX in the process).
            if "vkAllocateMemory" in str(exc) or "vkCreateBuffer" in str(exc):
                raise DeviceOutOfMemory(
                    f"Vulkan device memory exhausted allocating {int(n) * np.dtype(dtype).itemsize} "
                    f"bytes on {self._device_name} ({exc}); free pools, use fewer blocks, or give "
                    "other GPU users in this process (e.g. MLX's cache) less memory") from exc
            raise

    def _buf(self, name: str, n: int, dtype=np.float32, kind: str = "device"):
        """Staging tensor `name` of the power-of-two size class holding n elements; (tensor, host
        view). One tensor per (name, class), kept until close: recordings bind them, and a copy
        (OpTensorSyncDevice/Local moves the whole tensor) never moves more than 2x the data."""
        cap = max(64, _pow2_ceil(n))
        cur = self._staging.get((name, cap, kind))
        if cur is None:
            t = self._new_tensor(cap, dtype, kind)
            cur = self._staging[(name, cap, kind)] = (t, None if kind == "storage" else t.data())
        return cur

    def _view(self, t):
        return t.data()

    def counters(self) -> dict:
        """submissions (queue submits), recordings (attention sequences recorded), pipelines
        (kp.Algorithm objects alive), staging_bytes, patched (Kompute patch in use)."""
        return {"submissions": self.submissions, "recordings": self.recordings,
                "pipelines": self.algos_live, "staging_bytes": sum(
                    int(t.size()) * 4 for t, _v in self._staging.values()),
                "patched": self._bare}

    def _forget_pool(self, uid: int, algos: dict) -> None:
        for sig in [sig for sig in self._steps if uid in sig[-1]]:
            del self._steps[sig]
        self.algos_live -= len(algos)
        if not self._closed:
            for a in algos.values():
                a.destroy()
        algos.clear()

    def _algorithm(self, cache: dict, shader: str, defines: dict, tensors, wg, n_push: int, tag=""):
        """Cached kp.Algorithm; `tag` names the role, the tensors' ids the buffers it binds. The
        bound (MAX_POOL_ALGOS) is enforced by `_record` before it starts, never here: an op list
        being recorded may already hold algorithms of this cache."""
        key_s, spirv = self.compiler.compile(shader, **defines)
        key = (key_s, tuple(wg), tag, tuple(id(t) for t in tensors))
        algo = cache.get(key)
        if algo is None:
            algo = self._mgr.algorithm(list(tensors), spirv, list(wg), np.zeros(0, np.float32),
                                       np.zeros(n_push, np.float32))
            cache[key] = algo
            self.algos_live += 1
        return algo

    def _drop_algos(self, cache: dict) -> None:
        # Recorded command buffers reference these pipelines: forget every recording first.
        self._steps.clear()
        for pool in list(self._pools_alive()):
            pool.recorded.clear()
        for a in cache.values():
            a.destroy()
        self.algos_live -= len(cache)
        cache.clear()

    def _pools_alive(self):
        return [p for p in (r() for r in self._pool_refs) if p is not None]

    def _dispatch(self, algo, push):
        push = np.asarray(push, dtype=np.uint32)
        if self._bare:
            return self._kp.OpAlgoDispatchBare(algo, push)
        return self._kp.OpAlgoDispatch(algo, push)

    def _barrier(self, kind: str = "compute->compute"):
        if self._bare:
            src, dst, sa, da = _BARRIERS[kind]
            return self._kp.OpGlobalBarrier(src, dst, sa, da)
        if kind == "compute->compute":
            # compute -> transfer barrier (+ a 4-byte copy); see the module docstring.
            return self._kp.OpTensorSyncLocal([self._sync])
        raise AssertionError(kind)  # stock dispatch/sync ops record their own barriers

    def _sequence(self, ops, labels=None):
        """(a kp.Sequence recording ops, their labels); a patched submission opens with the full
        barrier."""
        labels = labels or ["op"] * len(ops)
        if self._bare and not isinstance(ops[0], self._kp.OpGlobalBarrier):
            ops, labels = [self._barrier("full")] + list(ops), ["barrier"] + list(labels)
        seq = self._mgr.sequence(0, len(ops) + 1) if self.record_timestamps else self._mgr.sequence()
        for op in ops:
            seq.record(op)
        return seq, labels

    def _run_ops(self, ops, labels=None):
        seq, labels = self._sequence(ops, labels)
        self._eval(seq, labels)
        return seq

    def _run_recorded(self, key, make_ops, labels):
        """_run_ops for op lists that bind only staging tensors (kept until close): recorded once
        per key and re-submitted. A new kp.Sequence costs a command pool, a command buffer and a
        recording; on the H200 a fresh sequence's round trip took ~1 ms against ~30 us for a
        recorded one (ADR 0008)."""
        if self.record_timestamps:  # timestamps need a sequence with a query pool
            return self._run_ops(make_ops(), labels)
        if key not in self._uploads:
            self._uploads[key] = self._sequence(make_ops(), labels)
        seq, labels = self._uploads[key]
        self._eval(seq, labels)
        return seq

    def _eval(self, seq, labels):
        if self._poll_ns:
            # Patched Kompute: a fence kept by the sequence, polled before a blocking wait; a
            # per-layer loop pays a submission's round trip once per layer (ADR 0008).
            self.last_submit_wait_ns = seq.pa_eval_poll(self._poll_ns)
        else:
            seq.eval()
        self.submissions += 1
        if self.record_timestamps:
            ts = [int(t) for t in seq.get_timestamps()]
            self.last_timestamps = [("begin", ts[0])] + list(zip(labels, ts[1:]))

    @staticmethod
    def _grid(n: int, wg: int) -> list[int]:
        return [max(1, min(MAX_GRID, -(-int(n) // wg))), 1, 1]

    def close(self) -> None:
        with self._call_lock:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._steps.clear()
        for pool in self._pools_alive():  # the manager's destroy frees what they reference
            pool.recorded.clear()
            pool.algos.clear()
        self._algos.clear()
        self._uploads.clear()
        self._staging.clear()
        self._resident.clear()
        self._resident_last = None
        self.algos_live = 0
        self._mgr.destroy()
        self._mgr = None

    # -- pools ------------------------------------------------------------------------------------
    def _create_pool(self, spec: PoolSpec) -> VulkanPool:
        self._check_open()
        pool = VulkanPool(self, spec)
        self._pool_refs.add(weakref.ref(pool, self._pool_refs.discard))
        return pool

    def _fill_zero(self, pool: VulkanPool):
        ops = []
        for tag, t in (("k", pool.k), ("v", pool.v)):
            algo = self._algorithm(pool.algos, "pool_ops.comp", {"WG": FILL_WG, "OP_FILL": 1},
                                   [t, t, self._sync], self._grid(pool.nwords, FILL_WG), 4, tag)
            ops.append(self._dispatch(algo, [pool.nwords, 0, 0, 0]))
        self._run_ops(ops, ["fill_k", "fill_v"])

    def _download(self, pool: VulkanPool):
        self._check_open()
        s = pool.spec
        out = []
        tmp = self._new_tensor(pool.nwords, np.uint32, "device")
        try:
            for t in (pool.k, pool.v):
                algo = self._mgr.algorithm([tmp, t, self._sync], self.compiler.compile(
                    "pool_ops.comp", WG=FILL_WG, OP_COPY=1)[1], self._grid(pool.nwords, FILL_WG),
                    np.zeros(0, np.float32), np.zeros(4, np.float32))
                self._run_ops([self._dispatch(algo, [pool.nwords, 0, 0, 0]),
                               self._kp.OpTensorSyncLocal([tmp])], ["copy", "download"])
                words = np.array(tmp.data(), dtype=np.uint32)
                algo.destroy()
                if pool.bf16:
                    arr = (words.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = words.view(np.float16 if pool.f16 else np.float32)
                arr = arr.reshape(s.num_blocks, s.block_size, s.num_kv_heads, pool.dp)[..., :s.head_dim]
                out.append(np.ascontiguousarray(arr))
        finally:
            tmp.destroy()
        return out[0], out[1]

    @staticmethod
    def _rows(pool: VulkanPool, words: np.ndarray) -> np.ndarray:
        """[N, Hkv, DP] view of pool-layout uint32 words in the pool's element type (float16,
        float32, or bfloat16 bit patterns as uint16)."""
        dt = np.uint16 if pool.bf16 else np.float16 if pool.f16 else np.float32
        return words.view(dt).reshape(-1, pool.spec.num_kv_heads, pool.dp)

    @staticmethod
    def _put_rows(pool: VulkanPool, rows: np.ndarray, x) -> None:
        """x [N, Hkv, D] (array-like) into rows (a `_rows` view of mapped staging), converted to
        the pool's element type in one copy. Staging is shared by pools of other row layouts, so
        the padding is written too."""
        d = pool.spec.head_dim
        x = host(x)
        rows[..., :d] = to_bf16_bits(x) if pool.bf16 else x
        if pool.dp != d:
            rows[..., d:] = 0

    def _write_kv(self, pool: VulkanPool, slots: np.ndarray, k, v) -> None:
        self._check_open()
        n = int(slots.shape[0])
        # Own staging, so that bulk writes do not inflate what every decode step uploads.
        kt, kview = self._buf("w_knew", n * pool.row_words, np.uint32)
        vt, vview = self._buf("w_vnew", n * pool.row_words, np.uint32)
        st, sview = self._buf("w_slots", n, np.int32)
        self._put_rows(pool, self._rows(pool, kview[:n * pool.row_words]), k)
        self._put_rows(pool, self._rows(pool, vview[:n * pool.row_words]), v)
        sview[:n] = slots
        ops = [self._kp.OpTensorSyncDevice([kt, vt, st])]
        if self._bare:
            ops.append(self._barrier("full"))
        ops.append(self._append_op(pool, n, 0, 0, tensors=(kt, vt, st)))
        self._run_ops(ops, ["upload"] + (["barrier"] if self._bare else []) + ["append"])

    def _append_op(self, pool: VulkanPool, n: int, src_off: int, slot_off: int, tensors):
        kt, vt, st = tensors
        algo = self._algorithm(pool.algos, "kv_append.comp", {"ROWW": pool.row_words, "WG": APPEND_WG},
                               [pool.k, pool.v, kt, vt, st], self._grid(n * pool.row_words, APPEND_WG), 4,
                               "append")
        return self._dispatch(algo, [n, src_off, slot_off, pool.spec.num_slots])

    def _copy_blocks(self, pool: VulkanPool, src: np.ndarray, dst: np.ndarray) -> None:
        self._check_open()
        p = int(src.shape[0])
        pt, pview = self._buf("pairs", 2 * p, np.int32)
        pview[:2 * p] = np.stack([src, dst], axis=1).reshape(-1)
        ops = [self._kp.OpTensorSyncDevice([pt])] + ([self._barrier("full")] if self._bare else [])
        for tag, t in (("k", pool.k), ("v", pool.v)):
            algo = self._algorithm(pool.algos, "pool_ops.comp", {"WG": FILL_WG, "OP_BLOCKS": 1},
                                   [t, t, pt], self._grid(p * pool.block_words, FILL_WG), 4, tag)
            ops.append(self._dispatch(algo, [p, 0, pool.block_words, pool.spec.num_blocks]))
        self._run_ops(ops, ["upload"] + (["barrier"] if self._bare else []) + ["copy_k", "copy_v"])

    # -- attention ---------------------------------------------------------------------------------
    def _auto_path(self, args: StepArgs, spec: PoolSpec) -> str:
        """The calibrated choice for this device when a selector table exists, else the heuristic."""
        return self.selector.choose(args, spec, fallback=self.heuristic_path)

    def heuristic_path(self, args: StepArgs, spec: PoolSpec) -> str:
        """split-K when the (sequence, KV head) workgroups cannot fill the device and the context is
        long enough for the extra reduce to pay; fused otherwise."""
        if args.num_rows == 0:
            return "fused"
        longest = int(args.attended_tokens().max())
        wgs = args.num_rows * spec.num_kv_heads   # decode.comp: one workgroup per (row, KV head)
        if longest >= 1024 and wgs < 2 * self.compute_units and self.split_geometry(args, spec)[0] > 1:
            return "splitk"
        return "fused"

    def split_geometry(self, args: StepArgs, spec: PoolSpec) -> tuple[int, int]:
        """(nsplit, chunk): chunk tokens per split, from the table's capacity so that a decode loop
        with a fixed table width keeps one recorded command buffer while contexts grow."""
        cap = args.block_tables.shape[1] * spec.block_size
        span = max(1, min(cap, args.window) if args.window else cap)
        chunk = settings.get().vk_chunk
        if not chunk:
            wgs = max(1, args.num_rows * spec.num_kv_heads)
            # ~1.5 workgroups per compute unit: fewer, longer splits beat many short ones (each
            # split pays its q load, lane-group merge and partial write). When the (sequence,
            # KV head) workgroups fill under a quarter of the CUs (B=1..4 at Hkv=8), that leaves
            # most of each SM idle, so aim at SPLIT_OCC (default 2) per CU there. Measurements:
            # ADR 0008, section 4.
            per_cu = 1.5 if 4 * wgs > self.compute_units else \
                settings.get().vk_split_occupancy
            want = max(1, math.ceil(per_cu * self.compute_units / wgs))
            chunk = max(MIN_CHUNK, -(-(-(-span // want)) // 256) * 256)
        return max(1, -(-span // chunk)), chunk

    def _decode_defines(self, pool: VulkanPool, group: int, splitk: bool) -> dict:
        s = pool.spec
        vec = 8 if pool.f16 else 4
        nv = pool.dp // vec
        tpt = min(_pow2_floor(nv), _pow2_floor(self.subgroup_size))
        s_ = settings.get()
        tpt = s_.vk_tpt or tpt
        wg = s_.vk_wg or (512 if self.subgroup_size >= 32 else 64)
        ng = max(1, min(wg // tpt, 4096 // pool.dp))  # shared memory: ng * dp floats <= 16 KiB
        nl = -(-nv // tpt)
        regs = group * nl * vec  # per-lane q and accumulator floats per token
        unroll = s_.vk_unroll or (8 if regs <= 32 else 4 if regs <= 64 else 2)
        return {"DP": pool.dp, "G": group, "HKV": s.num_kv_heads, "BS": s.block_size, "WG": ng * tpt,
                "TPT": tpt, "F16": int(pool.f16), "BF16": int(pool.bf16), "U": unroll,
                "SPLITK": int(splitk)}

    # -- plan / run ------------------------------------------------------------------------------
    def _state(self, args: StepArgs, spec: PoolSpec, path: str, slots) -> _PlanState:
        """Device metadata of one step, built from its sequence form: the tables [B, maxb] as
        they are, per query row its context length (causal mask applied) and its sequence (the
        table row it reads), written into size-class staging buffers (uploaded by
        `_make_resident`); split geometry and the batch's size classes."""
        st = _PlanState()
        st.token = object()
        st.keys = {}  # _recording's cache keys, per (hq, writes, f16_io, repeat, layers)
        st.rows, st.maxb = args.num_rows, int(args.block_tables.shape[1])
        st.rcls, st.bcls = _pow2_ceil(st.rows), _pow2_ceil(args.batch)
        st.path, st.window = path, args.window or 0
        st.scale_bits = int(np.float32(args.scale).view(np.uint32))
        st.nsplit, st.chunk = self.split_geometry(args, spec) if path == "splitk" else (1, 0)
        st.n = 0 if slots is None else int(slots.shape[0])
        st.tables_host = np.ascontiguousarray(args.block_tables, dtype=np.int32).reshape(-1)
        # [rcls] row lengths, then [rcls] row sequences; rows past N see nothing (zeros out).
        st.lens_host = np.zeros(2 * st.rcls, np.int32)
        st.lens_host[:st.rows] = args.row_context_lens()
        if args.decode_only:
            st.lens_host[st.rcls:st.rcls + st.rows] = np.arange(st.rows, dtype=np.int32)
        else:
            st.lens_host[st.rcls:st.rcls + st.rows] = args.row_sequences()
        st.slots_host = None if slots is None else np.ascontiguousarray(slots, dtype=np.int32)
        st.tables = self._buf("tables", st.bcls * max(1, st.maxb), np.int32)[0]
        st.lens = self._buf("lens", 2 * st.rcls, np.int32)[0]
        st.slots = self._buf("slots", st.n, np.int32)[0] if st.n else None
        # Ragged plans (prefill chunks) on the fused path: tiles of up to QT queries of one
        # sequence share each K/V load (prefill.comp); qt 1 keeps decode.comp, one query each.
        st.qt, st.tcls, st.tiles_host, st.tiles = 1, 0, None, None
        query_lens = None if args.decode_only else args.query_lens
        if path == "fused" and query_lens is not None and int(np.max(query_lens, initial=0)) > 1:
            st.qt = self.query_tile(args.num_q_heads // spec.num_kv_heads, spec)
        if st.qt > 1:
            tiles = []
            for r0, n in zip(args.qo_indptr[:-1].tolist(), query_lens.tolist()):
                tiles += [(r0 + i, min(st.qt, n - i)) for i in range(0, n, st.qt)]
            tiles = np.array(tiles, np.int32).reshape(-1, 2)
            # Longest contexts first (a tile's last row has the longest): the GPU starts
            # workgroups roughly in index order, so the heaviest ones do not trail the grid.
            tiles = tiles[np.argsort(-st.lens_host[tiles[:, 0] + tiles[:, 1] - 1], kind="stable")]
            st.tcls = _pow2_ceil(len(tiles))
            st.tiles_host = np.zeros((st.tcls, 2), np.int32)  # padding tiles: count 0
            st.tiles_host[:len(tiles)] = tiles
            st.tiles_host = st.tiles_host.reshape(-1)
            st.tiles = self._buf("tiles", 2 * st.tcls, np.int32)[0]
        return st

    def query_tile(self, group: int, spec: PoolSpec) -> int:
        """Queries per prefill.comp workgroup: PREFILL_ROWS query rows (QT*G) share each K/V
        load; PAGED_ATTENTION_VK_QT overrides (1: decode.comp, one query per workgroup). Lowered
        until the tile fits the shared-memory budget; 1 when not even two queries fit."""
        qt = settings.get().vk_query_tile or max(2, PREFILL_ROWS // max(1, group))
        dp = _padded_dim(spec)
        while qt > 1 and _prefill_layout(group, dp, qt) is None:
            qt -= 1
        return max(1, qt)

    def _prefill_defines(self, pool: VulkanPool, group: int, qt: int) -> dict:
        s = pool.spec
        return {"DP": pool.dp, "G": group, "HKV": s.num_kv_heads, "BS": s.block_size,
                "F16": int(pool.f16), "BF16": int(pool.bf16), **_prefill_layout(group, pool.dp, qt)}

    def _prepare(self, plan: Plan):
        # The upload itself waits for the first run (`_make_resident`): a whole-step submission
        # carries it in its own upload, a per-layer run pays one extra submission per step.
        self._check_open()
        return self._state(plan.args, plan.spec, plan.path, plan.slots)

    @staticmethod
    def _table_bufs(st: _PlanState) -> list:
        return [st.tables, st.lens] + ([st.slots] if st.n else []) + ([st.tiles] if st.qt > 1 else [])

    def _make_resident(self, st: _PlanState, submit: bool = True) -> None:
        """Write the plan's tables/lengths/slots into their device buffers unless they hold them
        already (another plan of the same size class may have overwritten them). submit=False:
        the caller's own sequence uploads them."""
        if self._resident_last is st.token:  # nothing has been uploaded since this plan's tables
            return
        bufs = self._table_bufs(st)
        if all(self._resident.get(id(t)) is st.token for t in bufs):
            self._resident_last = st.token
            return
        self._view(st.tables)[:st.tables_host.size] = st.tables_host
        self._view(st.lens)[:st.lens_host.size] = st.lens_host
        if st.n:
            self._view(st.slots)[:st.n] = st.slots_host
        if st.qt > 1:
            self._view(st.tiles)[:st.tiles_host.size] = st.tiles_host
        if submit:
            self._run_recorded(("upload",) + tuple(id(t) for t in bufs),
                               lambda: [self._kp.OpTensorSyncDevice(bufs)], ["upload_tables"])
        for t in bufs:
            self._resident[id(t)] = st.token
        self._resident_last = st.token

    def _run(self, plan: Plan, q, pool: VulkanPool, k, v):
        st = plan.device
        return self._execute([(pool, q, k, v)], st, k is not None)[0]

    def _decode_repeated(self, q, pool: VulkanPool, args: StepArgs, path: str, repeat: int):
        """Benchmark helper: the attention recorded `repeat` times back to back (a barrier between
        repetitions) in one submission, so the GPU stays busy and each repetition is timed."""
        st = self._state(args, pool.spec, path, None)
        return self._execute([(pool, q, None, None)], st, False, repeat=repeat)[0]

    def _decode_step(self, layers: list[LayerStep], plans: list[Plan]) -> list:
        plan = plans[0]
        writes = plan.slots is not None and all(layer.k is not None for layer in layers)
        if any(p is not plan for p in plans) or (plan.slots is not None and not writes):
            # Heterogeneous layers (geometries, or some without new rows): one submission each.
            return super()._decode_step(layers, plans)
        return self._execute([(l.pool, l.q, l.k, l.v) for l in layers], plan.device, writes)

    def _execute(self, items, st: _PlanState, writes: bool, repeat: int = 1) -> list:
        """KV append (when `writes`) + attention for every layer in items: one submission of a
        recorded sequence. The steps: stage inputs, find or record the sequence, submit, read."""
        self._check_open()
        t0 = time.perf_counter()
        pool0: VulkanPool = items[0][0]
        hq, d = items[0][1].shape[1], pool0.head_dim
        qdt = [out_dtype(it[1]) for it in items]
        if st.rows == 0:
            # Nothing to attend; still store the new tokens.
            for pool, _q, k, v in items:
                if writes and st.n:
                    self._write_kv(pool, st.slots_host.astype(np.int64), k, v)
            return [cast_out(np.zeros((0, hq, d), np.float32), dt) for dt in qdt]
        fold = len(items) > 1  # a whole step uploads its tables in its one submission
        self._make_resident(st, submit=not fold)
        f16_io = all(dt is _F16 for dt in qdt)  # a byte-swapped float16 q takes the float32 path
        rec = self._recording([it[0] for it in items], st, hq, writes, f16_io, repeat)
        self._stage_inputs(rec, items, st, writes)
        t1 = time.perf_counter()
        self._eval(rec.seq, rec.labels)
        t2 = time.perf_counter()
        outs = self._read_outputs(rec, st, len(items), hq, d, qdt)
        self.last_host_s = {"prepare": t1 - t0, "submit_wait": t2 - t1, "outputs": time.perf_counter() - t2}
        return outs

    def _stage_inputs(self, rec: _Recorded, items, st: _PlanState, writes: bool) -> None:
        """q (padded head dim; fp16 when every q is fp16, else float32) and the new k/v rows into
        the mapped staging memory."""
        d, rows = items[0][0].head_dim, st.rows
        for i, (pool, q, k, v) in enumerate(items):
            copy_into(rec.qrows[i][:rows, :, :d], host(q))
            if writes and st.n:
                self._put_rows(pool, rec.krows[i], k)
                self._put_rows(pool, rec.vrows[i], v)

    def _read_outputs(self, rec: _Recorded, st: _PlanState, nl: int, hq: int, d: int, qdt) -> list:
        """One copy of the used rows out of the mapped staging memory per layer (fp16 words when
        every q is fp16), straight into the caller's dtype."""
        return [cast_out(rec.orows[i][:st.rows, :, :d], dt) for i, dt in enumerate(qdt)]

    def _recording(self, pools, st: _PlanState, hq: int, writes: bool, f16_io: bool, repeat: int):
        """The recorded sequence for these pools and this batch shape. It binds only size-class
        buffers, so every later step with the same shape re-runs it with new tables, lengths, q
        and k/v written into those buffers. Single-layer recordings live on the pool (any number of
        layers stays recorded); whole-step recordings in a small LRU."""
        memo = (hq, writes, f16_io, repeat, len(pools))
        key = st.keys.get(memo)
        if key is None:
            key = st.keys[memo] = (st.path, st.rcls, st.bcls, st.maxb, hq, st.n if writes else 0, st.window,
                                   st.scale_bits, st.nsplit, st.chunk, f16_io, repeat, len(pools),
                                   st.qt, st.tcls)
        full = key if len(pools) == 1 else key + (tuple(p.uid for p in pools),)
        cache = pools[0].recorded if len(pools) == 1 else self._steps
        rec = None if self.record_timestamps else cache.get(full)
        if rec is not None:
            cache.move_to_end(full)
            return rec
        rec = self._record(pools, st, hq, writes, f16_io, repeat)
        if not self.record_timestamps:
            cache[full] = rec
            while len(cache) > (4 if len(pools) == 1 else 8):
                cache.popitem(last=False)
        return rec

    def _record(self, pools, st: _PlanState, hq: int, writes: bool, f16_io: bool, repeat: int):
        kp = self._kp
        # A recording adds at most 2 algorithms per pool (append, attention) and one reduce.
        for cache in [p.algos for p in pools] + [self._algos]:
            if len(cache) > MAX_POOL_ALGOS - 3:
                self._drop_algos(cache)
        pool0 = pools[0]
        spec = pool0.spec
        nl, dp, rcls = len(pools), pool0.dp, st.rcls
        group = hq // spec.num_kv_heads
        splitk = st.path == "splitk"
        rows = rcls * hq
        per_layer = rows * dp
        n = st.n if writes else 0
        io = "host" if self._host_io else "device"
        if f16_io:
            # Every q is fp16: q goes up and the output comes back as fp16 pairs, so the host
            # neither widens q nor narrows the output (numpy's float16 casts cost more than the
            # copies: ADR 0008).
            qt, qview = self._buf("q16", nl * per_layer // 2, np.uint32, io)
            qview = qview.view(np.float16)
            ot, oview = self._buf("out16", nl * per_layer // 2, np.uint32, io)
        else:
            qt, qview = self._buf("q", nl * per_layer, np.float32, io)
            ot, oview = self._buf("out", nl * per_layer, np.float32, io)
        kt = vt = kview = vview = None
        if n:
            kt, kview = self._buf("knew", nl * n * pool0.row_words, np.uint32, io)
            vt, vview = self._buf("vnew", nl * n * pool0.row_words, np.uint32, io)
        if splitk:
            pot, _ = self._buf("part_o", nl * rows * st.nsplit * dp, np.float32, "storage")
            pmt, _ = self._buf("part_ml", nl * rows * st.nsplit * 2, np.float32, "storage")
        ops, labels = [], []

        def add(op, label):
            ops.append(op)
            labels.append(label)

        tables = self._table_bufs(st) if nl > 1 else []
        uploads = ([] if self._host_io else [qt] + ([kt, vt] if n else [])) + tables
        if uploads:
            add(kp.OpTensorSyncDevice(uploads), "upload")
        if self._bare:
            add(self._barrier("full"), "barrier")
        if n:
            for i, pool in enumerate(pools):
                add(self._append_op(pool, n, i * n * pool.row_words, 0, tensors=(kt, vt, st.slots)),
                    f"append{i}")
            add(self._barrier(), "barrier")
        for r in range(repeat):
            if r:
                add(self._barrier(), "barrier")
            for i, pool in enumerate(pools):
                tensors = [pool.k, pool.v, qt, st.tables, st.lens] + ([pot, pmt] if splitk else [ot])
                if st.qt > 1:  # ragged plan: one workgroup per (query tile, KV head)
                    shader, defines = "prefill.comp", self._prefill_defines(pool, group, st.qt)
                    tensors.append(st.tiles)
                    wgx = st.tcls * spec.num_kv_heads
                else:
                    shader, defines = "decode.comp", self._decode_defines(pool, group, splitk)
                    wgx = rcls * spec.num_kv_heads
                defines["OUT_F16"] = int(f16_io and not splitk)
                defines["Q_F16"] = int(f16_io)
                algo = self._algorithm(pool.algos, shader, defines, tensors,
                                       [wgx, st.nsplit, 1], 11, "attn")
                out_off = i * rows * st.nsplit if splitk else i * per_layer
                add(self._dispatch(algo, [i * per_layer, out_off, 0, st.maxb, spec.num_blocks,
                                          st.window, st.scale_bits, st.nsplit, st.chunk, 0,
                                          rcls]),
                    f"attn{i}.{r}")
            if splitk:
                add(self._barrier(), "barrier")
                ralgo = self._algorithm(self._algos, "splitk_reduce.comp",
                                        {"DP": dp, "WG": REDUCE_WG, "OUT_F16": int(f16_io)},
                                        [pot, pmt, ot], [rows, 1, 1], 4, "reduce")
                for i in range(nl):
                    add(self._dispatch(ralgo, [i * rows * st.nsplit, i * per_layer, st.nsplit, rows]),
                        f"reduce{i}.{r}")
        if self._host_io:
            add(self._barrier("compute->host"), "barrier")
        else:
            if self._bare:
                add(self._barrier("compute->transfer"), "barrier")
            add(kp.OpTensorSyncLocal([ot]), "download")
        seq = self._mgr.sequence(0, len(ops) + 1) if self.record_timestamps else self._mgr.sequence()
        for op in ops:
            seq.record(op)
        self.recordings += 1
        rec = _Recorded()
        rec.seq, rec.labels, rec.ops = seq, labels, ops
        # Per-layer views of the mapped staging, made once: [rcls, Hq, DP] q and output rows,
        # [n, Hkv, DP] new k/v rows in the pool's element type.
        rec.qrows = [qview[i * per_layer:(i + 1) * per_layer].reshape(rcls, hq, dp) for i in range(nl)]
        if f16_io:
            oview = oview.view(np.float16)
        rec.orows = [oview[i * per_layer:(i + 1) * per_layer].reshape(rcls, hq, dp) for i in range(nl)]
        rec.krows = rec.vrows = None
        if n:
            w = n * pool0.row_words
            rec.krows, rec.vrows = ([self._rows(pool0, view[i * w:(i + 1) * w]) for i in range(nl)]
                                    for view in (kview, vview))
        return rec

    # -- internals for tests and benchmarks ---------------------------------------------------------
    def _decode_unchecked(self, q, pool: VulkanPool, block_tables, context_lens, *, scale=None,
                          window=None, path="fused"):
        """Dispatch the attention shader with tables/lens exactly as given (no validation), to check
        that the shader's clamps keep it inside the pool. Test use only."""
        q = np.asarray(q)
        bt = np.asarray(block_tables, dtype=np.int32)
        lens = np.asarray(context_lens, dtype=np.int32)
        args = StepArgs(batch=q.shape[0], num_q_heads=q.shape[1], block_tables=bt, context_lens=lens,
                          scale=float(scale if scale is not None else 1 / math.sqrt(pool.head_dim)),
                          window=window)
        return self._execute([(pool, q, None, None)], self._state(args, pool.spec, path, None), False)[0]

    # -- lab capabilities (interface.py): timestamp queries -------------------------------------
    @property
    def has_device_timer(self) -> bool:
        return self.timestamps_supported

    def device_time(self, fn):
        """Records the calls of fn() with a timestamp after every op; the seconds are those from
        the op before the first attention op to the last attention/reduce op of the last
        submission (KV appends and uploads excluded)."""
        before = self.record_timestamps
        self.record_timestamps = True
        try:
            out = fn()
        finally:
            self.record_timestamps = before
        ts = self.last_timestamps
        if not ts:
            return out, None
        names = [n for n, _ in ts]
        first = next((i for i, n in enumerate(names) if n.startswith("attn")), None)
        if not first:
            return out, None
        last = max(i for i, n in enumerate(names) if n.startswith(("attn", "reduce")))
        ticks = ts[last][1] - ts[first - 1][1]
        return out, ticks * self.device_facts.timestamp_period_ns * 1e-9
