"""Vulkan KV pools: two eStorage uint32 tensors per layer (K, V), each [num_blocks, block_size,
Hkv, DP] words, and the pool kernels (zero fill, bulk writes, block copies, download).

fp16 pools hold two halves per word (numpy's float16 -> uint32 view equals packHalf2x16), fp32
pools hold float bits, bf16 pools bfloat16 bit patterns. DP is the head dim padded to 8 (16-bit)
or 4 (fp32) elements so every row can be read with 16-byte loads; padding stays zero.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np

from paged_attention.errors import InvalidInput
from paged_attention.host_arrays import host, to_bf16_bits
from paged_attention.interface import KVPool
from paged_attention.validation import PoolSpec

from .device import VulkanDevice
from .geometry import padded_dim

FILL_WG = 256
APPEND_WG = 256


class VulkanPool(KVPool):
    """K and V pools of one layer as device-resident eStorage tensors."""

    _next_uid = 0

    def __init__(self, backend, spec: PoolSpec):
        super().__init__(spec, "vulkan")
        self._backend = backend
        self._dev: VulkanDevice = backend._dev
        VulkanPool._next_uid += 1
        self.uid = VulkanPool._next_uid
        self.f16 = spec.dtype in ("float16", "bfloat16")  # 16-bit elements, two per word
        self.bf16 = spec.dtype == "bfloat16"
        self.dp = padded_dim(spec)
        self.row_words = spec.num_kv_heads * self.dp * (2 if self.f16 else 4) // 4
        self.block_words = spec.block_size * self.row_words
        self.nwords = spec.num_blocks * self.block_words
        if self.nwords >= 2 ** 32:
            raise InvalidInput(f"pool of {self.nwords * 4} bytes exceeds the Vulkan backend's 16 GiB "
                               "per-tensor limit; use fewer blocks")
        self.k = self._dev.new_tensor(self.nwords, np.uint32, "storage")
        self.v = self._dev.new_tensor(self.nwords, np.uint32, "storage")
        self.algos: dict = {}
        self.recorded: OrderedDict = OrderedDict()  # single-layer recordings (recording.py)
        self.fill_zero()
        # Recorded plans bind this pool's tensors: drop them as soon as the pool is dropped, so
        # its device memory is given back at once rather than when the plan LRU evicts them.
        weakref.finalize(self, backend._forget_pool, self.uid, self.algos)

    def to_numpy(self):
        # Same lock as the backend's public calls: a download records on the shared manager.
        with self._backend._call_lock:
            self._backend._check_open()
            return self.download()

    # -- pool kernels ----------------------------------------------------------------------------
    def fill_zero(self) -> None:
        dev, ops = self._dev, []
        for tag, t in (("k", self.k), ("v", self.v)):
            algo = dev.algorithm(self.algos, "pool_ops.comp", {"WG": FILL_WG, "OP_FILL": 1},
                                 [t, t, dev.sync], dev.grid(self.nwords, FILL_WG), 4, tag)
            ops.append(dev.dispatch(algo, [self.nwords, 0, 0, 0]))
        dev.run(ops, ["fill_k", "fill_v"])

    def download(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies (k, v) in the pool's dtype (bfloat16 as float32), padding cut off."""
        dev, s, out = self._dev, self.spec, []
        tmp = dev.new_tensor(self.nwords, np.uint32, "device")
        try:
            for t in (self.k, self.v):
                algo = dev.mgr.algorithm([tmp, t, dev.sync], dev.compiler.compile(
                    "pool_ops.comp", WG=FILL_WG, OP_COPY=1)[1], dev.grid(self.nwords, FILL_WG),
                    np.zeros(0, np.float32), np.zeros(4, np.float32))
                dev.run([dev.dispatch(algo, [self.nwords, 0, 0, 0]), dev.download([tmp])],
                        ["copy", "download"])
                words = np.array(tmp.data(), dtype=np.uint32)
                algo.destroy()
                if self.bf16:
                    arr = (words.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = words.view(np.float16 if self.f16 else np.float32)
                arr = arr.reshape(s.num_blocks, s.block_size, s.num_kv_heads, self.dp)[..., :s.head_dim]
                out.append(np.ascontiguousarray(arr))
        finally:
            tmp.destroy()
        return out[0], out[1]

    def rows(self, words: np.ndarray) -> np.ndarray:
        """[N, Hkv, DP] view of pool-layout uint32 words in the pool's element type (float16,
        float32, or bfloat16 bit patterns as uint16)."""
        dt = np.uint16 if self.bf16 else np.float16 if self.f16 else np.float32
        return words.view(dt).reshape(-1, self.spec.num_kv_heads, self.dp)

    def put_rows(self, rows: np.ndarray, x) -> None:
        """x [N, Hkv, D] (array-like) into rows (a `rows` view of mapped staging), converted to
        the pool's element type in one copy. Staging is shared by pools of other row layouts, so
        the padding is written too."""
        d = self.spec.head_dim
        x = host(x)
        rows[..., :d] = to_bf16_bits(x) if self.bf16 else x
        if self.dp != d:
            rows[..., d:] = 0

    def write(self, slots: np.ndarray, k, v) -> None:
        """Bulk write of k, v [N, Hkv, D] at slots, one submission."""
        dev, n = self._dev, int(slots.shape[0])
        # Own staging, so that bulk writes do not inflate what every decode step uploads.
        kt, kview = dev.staging("w_knew", n * self.row_words, np.uint32)
        vt, vview = dev.staging("w_vnew", n * self.row_words, np.uint32)
        st, sview = dev.staging("w_slots", n, np.int32)
        self.put_rows(self.rows(kview[:n * self.row_words]), k)
        self.put_rows(self.rows(vview[:n * self.row_words]), v)
        sview[:n] = slots
        ops = [dev.upload([kt, vt, st])]
        if dev.patched:
            ops.append(dev.barrier("full"))
        ops.append(self.append_op(n, 0, 0, tensors=(kt, vt, st)))
        dev.run(ops, ["upload"] + (["barrier"] if dev.patched else []) + ["append"])

    def append_op(self, n: int, src_off: int, slot_off: int, tensors):
        """The kv_append dispatch: rows [src_off, src_off + n) of the staged k/v at their slots."""
        dev = self._dev
        kt, vt, st = tensors
        algo = dev.algorithm(self.algos, "kv_append.comp", {"ROWW": self.row_words, "WG": APPEND_WG},
                             [self.k, self.v, kt, vt, st], dev.grid(n * self.row_words, APPEND_WG),
                             4, "append")
        return dev.dispatch(algo, [n, src_off, slot_off, self.spec.num_slots])

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        dev, p = self._dev, int(src.shape[0])
        pt, pview = dev.staging("pairs", 2 * p, np.int32)
        pview[:2 * p] = np.stack([src, dst], axis=1).reshape(-1)
        ops = [dev.upload([pt])] + ([dev.barrier("full")] if dev.patched else [])
        for tag, t in (("k", self.k), ("v", self.v)):
            algo = dev.algorithm(self.algos, "pool_ops.comp", {"WG": FILL_WG, "OP_BLOCKS": 1},
                                 [t, t, pt], dev.grid(p * self.block_words, FILL_WG), 4, tag)
            ops.append(dev.dispatch(algo, [p, 0, self.block_words, self.spec.num_blocks]))
        dev.run(ops, ["upload"] + (["barrier"] if dev.patched else []) + ["copy_k", "copy_v"])
