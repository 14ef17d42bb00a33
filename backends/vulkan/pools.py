"""Vulkan KV pools: two eStorage uint32 tensors per layer (K, V), each [num_blocks, block_size,
Hkv, DP] words, and the pool kernels (zero fill, bulk writes, block copies, download).

fp16 pools hold two halves per word (numpy's float16 -> uint32 view equals packHalf2x16), fp32
pools hold float bits, bf16 pools bfloat16 bit patterns. DP is the head dim padded to 8 (16-bit)
or 4 (fp32) elements so every row can be read with 16-byte loads; padding stays zero.

Quantized pools (ADR 0011) hold the format's data words, [num_blocks, block_size, Hkv, DP * bits
/ 32] (MLX's packing: element j of a word in bits [j * bits, (j + 1) * bits); DP padded to 8), and
for the affine formats two more tensors with each (token, head, group)'s (scale, bias) pair in the
pool's dtype (fp16 / bf16 halves of one word, or a float32 pair): indexed like the data, so a slot
or a block addresses both. New rows are staged as float32 (rounded to the pool's dtype) and
quantized on the device (kv_quant.comp); to_numpy dequantizes with the reference arithmetic.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np

from paged_attention.errors import InvalidInput
from paged_attention.host_arrays import host, to_bf16_bits
from paged_attention.kv_formats import QuantizedRows, round_to
from paged_attention.interface import KVPool
from paged_attention.validation import PoolSpec

from .device import VulkanDevice
from .geometry import padded_dim

FILL_WG = 256
APPEND_WG = 256
KVQ = {"int8": 1, "int4": 2, "float8_e4m3": 3}   # the shaders' KVQ define per format


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
        self.fmt = spec.kv_format
        self.kvq = 0 if self.fmt is None else KVQ[self.fmt.name]
        self.affine = self.fmt is not None and self.fmt.affine
        self.dp = padded_dim(spec)
        hkv = spec.num_kv_heads
        if self.fmt is None:
            self.row_words = hkv * self.dp * (2 if self.f16 else 4) // 4
            self.stage_words = self.row_words        # staged new rows: the pool's own layout
        else:
            self.row_words = hkv * self.dp * self.fmt.bits // 32
            self.stage_words = hkv * self.dp         # float32, quantized on the device
        self.block_words = spec.block_size * self.row_words
        self.nwords = spec.num_blocks * self.block_words
        # Affine scales: one (scale, bias) pair per (token, head, group); 16-bit pools keep it
        # in one word, float32 pools in two.
        self.scale_words = hkv * (self.dp // self.fmt.group_size) * (1 if self.f16 else 2) \
            if self.affine else 0
        self.scale_block_words = spec.block_size * self.scale_words
        if self.nwords >= 2 ** 32:
            raise InvalidInput(f"pool of {self.nwords * 4} bytes exceeds the Vulkan backend's 16 GiB "
                               "per-tensor limit; use fewer blocks")
        self.k = self._dev.new_tensor(self.nwords, np.uint32, "storage")
        self.v = self._dev.new_tensor(self.nwords, np.uint32, "storage")
        self.ks = self.vs = None
        if self.affine:
            n = spec.num_blocks * self.scale_block_words
            self.ks = self._dev.new_tensor(n, np.uint32, "storage")
            self.vs = self._dev.new_tensor(n, np.uint32, "storage")
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
    def tensors(self) -> list:
        """Every device tensor of the pool: K and V data, then (affine formats) their scales."""
        return [self.k, self.v] + ([self.ks, self.vs] if self.affine else [])

    def fill_zero(self) -> None:
        dev, ops, labels = self._dev, [], []
        for tag, t in zip(("k", "v", "ks", "vs"), self.tensors()):
            n = self.nwords if tag in ("k", "v") else self.spec.num_blocks * self.scale_block_words
            algo = dev.algorithm(self.algos, "pool_ops.comp", {"WG": FILL_WG, "OP_FILL": 1},
                                 [t, t, dev.sync], dev.grid(n, FILL_WG), 4, tag)
            ops.append(dev.dispatch(algo, [n, 0, 0, 0]))
            labels.append(f"fill_{tag}")
        dev.run(ops, labels)

    def _download_words(self, t, n: int) -> np.ndarray:
        dev = self._dev
        tmp = dev.new_tensor(n, np.uint32, "device")
        try:
            algo = dev.mgr.algorithm([tmp, t, dev.sync], dev.compiler.compile(
                "pool_ops.comp", WG=FILL_WG, OP_COPY=1)[1], dev.grid(n, FILL_WG),
                np.zeros(0, np.float32), np.zeros(4, np.float32))
            dev.run([dev.dispatch(algo, [n, 0, 0, 0]), dev.download([tmp])], ["copy", "download"])
            algo.destroy()
            return np.array(tmp.data(), dtype=np.uint32)
        finally:
            tmp.destroy()

    def download(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies (k, v) in the pool's dtype (bfloat16 as float32), padding cut off; a
        quantized pool's dequantized values (float32, the reference arithmetic)."""
        s, out = self.spec, []
        lead = (s.num_blocks, s.block_size, s.num_kv_heads)
        for which, t in (("k", self.k), ("v", self.v)):
            words = self._download_words(t, self.nwords)
            if self.fmt is not None:
                arr = self._dequantize(which, words, lead)
            elif self.bf16:
                arr = (words.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = words.view(np.float16 if self.f16 else np.float32)
            arr = arr.reshape(*lead, self.dp)[..., :s.head_dim]
            out.append(np.ascontiguousarray(arr))
        return out[0], out[1]

    def _dequantize(self, which: str, words: np.ndarray, lead: tuple) -> np.ndarray:
        fmt, s = self.fmt, self.spec
        if not fmt.affine:
            return fmt.dequantize(QuantizedRows(words.view(np.uint8).reshape(*lead, self.dp)),
                                  s.dtype, which)
        pairs = self._download_words(self.ks if which == "k" else self.vs,
                                     s.num_blocks * self.scale_block_words)
        if self.bf16:
            sb = (pairs.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            sb = pairs.view(np.float16 if self.f16 else np.float32).astype(np.float32)
        sb = sb.reshape(*lead, self.dp // fmt.group_size, 2)
        rows = QuantizedRows(words.reshape(*lead, -1), sb[..., 0], sb[..., 1])
        return fmt.dequantize(rows, s.dtype, which)

    def rows(self, words: np.ndarray) -> np.ndarray:
        """[N, Hkv, DP] view of staged rows: pool-layout uint32 words in the pool's element type
        (float16, float32, or bfloat16 bit patterns as uint16); float32 for a quantized pool."""
        dt = np.float32 if self.fmt is not None else \
            np.uint16 if self.bf16 else np.float16 if self.f16 else np.float32
        return words.view(dt).reshape(-1, self.spec.num_kv_heads, self.dp)

    def put_rows(self, rows: np.ndarray, x) -> None:
        """x [N, Hkv, D] (array-like) into rows (a `rows` view of mapped staging), converted to
        the pool's element type in one copy (a quantized pool: float32 rounded to its dtype, as
        the reference quantizes). Staging is shared by pools of other row layouts, so the
        padding is written too."""
        d = self.spec.head_dim
        x = host(x)
        if self.fmt is not None:
            rows[..., :d] = x if self.spec.dtype == "float32" else round_to(x, self.spec.dtype)
        else:
            rows[..., :d] = to_bf16_bits(x) if self.bf16 else x
        if self.dp != d:
            rows[..., d:] = 0

    def write(self, slots: np.ndarray, k, v) -> None:
        """Bulk write of k, v [N, Hkv, D] at slots, one submission."""
        dev, n = self._dev, int(slots.shape[0])
        # Own staging, so that bulk writes do not inflate what every decode step uploads.
        kt, kview = dev.staging("w_knew", n * self.stage_words, np.uint32)
        vt, vview = dev.staging("w_vnew", n * self.stage_words, np.uint32)
        st, sview = dev.staging("w_slots", n, np.int32)
        self.put_rows(self.rows(kview[:n * self.stage_words]), k)
        self.put_rows(self.rows(vview[:n * self.stage_words]), v)
        sview[:n] = slots
        ops = [dev.upload([kt, vt, st])]
        if dev.patched:
            ops.append(dev.barrier("full"))
        ops.append(self.append_op(n, 0, 0, tensors=(kt, vt, st)))
        dev.run(ops, ["upload"] + (["barrier"] if dev.patched else []) + ["append"])

    def append_op(self, n: int, src_off: int, slot_off: int, tensors):
        """The kv_append dispatch: rows [src_off, src_off + n) of the staged k/v at their slots
        (src_off in staged words); a quantized pool's quantizes them (kv_quant.comp)."""
        dev = self._dev
        kt, vt, st = tensors
        if self.fmt is None:
            algo = dev.algorithm(self.algos, "kv_append.comp", {"ROWW": self.row_words,
                                                                "WG": APPEND_WG},
                                 [self.k, self.v, kt, vt, st],
                                 dev.grid(n * self.row_words, APPEND_WG), 4, "append")
            return dev.dispatch(algo, [n, src_off, slot_off, self.spec.num_slots])
        fmt, s = self.fmt, self.spec
        chunks = self.dp // (fmt.group_size if fmt.affine else 4)
        defines = {"KVQ": self.kvq, "DP": self.dp, "GS": fmt.group_size, "HKV": s.num_kv_heads,
                   "F16": int(self.f16), "BF16": int(self.bf16), "WG": APPEND_WG}
        algo = dev.algorithm(self.algos, "kv_quant.comp", defines,
                             [self.k, self.v, kt, vt, st] + ([self.ks, self.vs] if self.affine else []),
                             dev.grid(n * s.num_kv_heads * chunks, APPEND_WG), 6, "append")
        bits = [int(np.float32(x).view(np.uint32)) for x in (fmt.k_scale, fmt.v_scale)]
        return dev.dispatch(algo, [n, src_off, slot_off, s.num_slots, *bits])

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        dev, p = self._dev, int(src.shape[0])
        pt, pview = dev.staging("pairs", 2 * p, np.int32)
        pview[:2 * p] = np.stack([src, dst], axis=1).reshape(-1)
        ops = [dev.upload([pt])] + ([dev.barrier("full")] if dev.patched else [])
        tags = ("k", "v", "ks", "vs")
        for tag, t in zip(tags, self.tensors()):   # the scales travel with their blocks
            bw = self.block_words if tag in ("k", "v") else self.scale_block_words
            algo = dev.algorithm(self.algos, "pool_ops.comp", {"WG": FILL_WG, "OP_BLOCKS": 1},
                                 [t, t, pt], dev.grid(p * bw, FILL_WG), 4, tag)
            ops.append(dev.dispatch(algo, [p, 0, bw, self.spec.num_blocks]))
        dev.run(ops, ["upload"] + (["barrier"] if dev.patched else []) +
                [f"copy_{t}" for t in tags[:len(self.tensors())]])
