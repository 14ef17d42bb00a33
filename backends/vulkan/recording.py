"""Recorded attention sequences of the Vulkan backend (ADR 0008).

A run uploads only q (and k/v), re-submits a sequence recorded once per (pool, batch class,
table width, scale, window, split geometry) and copies the used rows out once. Single-layer
recordings live on their pool (4 per pool), so any number of layers stays recorded; whole-step
recordings sit in an 8-entry LRU. kp.Algorithm objects are cached per pool, keyed by the buffers
they bind, at most MAX_POOL_ALGOS per pool, and destroyed with their pool.

Staging: tensors in power-of-two size classes, one per (role, class, kind), shared by all
layers: q and out (float32, or fp16 pairs in uint32 words when every q is fp16) and knew/vnew
(uint32 words), eHost tensors the shaders read and write in place with the patched Kompute
(VK_HOST_IO, the default), else eDevice tensors copied in and out; the split-K scratch
part_o/part_ml (eStorage).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import geometry
from .device import VulkanDevice
from .plan_state import PlanTables, _PlanState

MAX_POOL_ALGOS = 48  # kp.Algorithm objects per pool before its recordings and kernels are rebuilt
REDUCE_WG = 128
# Push-constant words of the attention and reduce shaders (their Params blocks): every pipeline
# declares all of them, variant or not, so the block always lies inside the pushed range.
ATTN_PUSH, REDUCE_PUSH = 13, 5
POOL_RECORDINGS, STEP_RECORDINGS = 4, 8


class _Recorded:
    """A recorded kp.Sequence and the mapped staging views its inputs and outputs go through
    (`varp`: the variant's slopes and sinks, float32 [2 Hq]; `lserows`: per layer [rcls, Hq])."""
    __slots__ = ("seq", "labels", "ops", "qrows", "krows", "vrows", "orows", "varp", "lserows")


class _Io:
    """The staging tensors and host views one recording binds."""
    __slots__ = ("q", "qview", "out", "oview", "k", "kview", "v", "vview", "part_o", "part_ml",
                 "varp", "varpview", "lse", "lseview")


class _Variant:
    """What a recording compiles in beyond plain attention (ADR 0010): the shaders' defines,
    whether it binds the slopes/sinks buffer and the LSE output."""
    __slots__ = ("cap_bits", "alibi", "sinks", "lse")

    def __init__(self, st: _PlanState, sinks: bool):
        self.cap_bits, self.alibi, self.sinks, self.lse = \
            st.cap_bits, st.slopes is not None, bool(sinks), st.lse

    @property
    def key(self) -> tuple:
        return (self.cap_bits, self.alibi, self.sinks, self.lse)

    @property
    def varp(self) -> bool:
        return self.alibi or self.sinks

    def defines(self) -> dict:
        return {"SOFTCAP": int(self.cap_bits != 0), "ALIBI": int(self.alibi),
                "SINKS": int(self.sinks), "LSE": int(self.lse)}


_PLAIN_KEY = (0, False, False, False)


class Recorder:
    """Finds or records the attention sequence of a step's shape on some pools."""

    def __init__(self, dev: VulkanDevice, pools_alive):
        self._dev = dev
        self._pools_alive = pools_alive   # () -> the backend's live VulkanPools
        self._steps: OrderedDict = OrderedDict()  # whole-step recordings (several pools)
        self._algos: dict = {}            # the split-K reduce kernels
        self.recordings = 0               # kp Sequences recorded for attention so far

    def get(self, pools, st: _PlanState, hq: int, writes: bool, f16_io: bool, repeat: int,
            sinks: bool = False) -> _Recorded:
        """The recorded sequence for these pools and this batch shape. It binds only size-class
        buffers, so every later step with the same shape re-runs it with new tables, lengths, q
        and k/v written into those buffers."""
        var = _Variant(st, sinks)
        memo = (hq, writes, f16_io, repeat, len(pools), var.key)
        key = st.keys.get(memo)
        if key is None:
            key = st.keys[memo] = (st.path, st.rcls, st.bcls, st.maxb, hq, st.n if writes else 0, st.window,
                                   st.scale_bits, st.nsplit, st.chunk, f16_io, repeat, len(pools),
                                   st.qt, st.tcls, st.kernel, var.key, st.rule)
        full = key if len(pools) == 1 else key + (tuple(p.uid for p in pools),)
        cache = pools[0].recorded if len(pools) == 1 else self._steps
        timed = self._dev.record_timestamps   # a timestamped sequence is recorded for one use
        rec = None if timed else cache.get(full)
        if rec is not None:
            cache.move_to_end(full)
            return rec
        rec = self._record(pools, st, hq, writes, f16_io, repeat, var)
        if not timed:
            cache[full] = rec
            while len(cache) > (POOL_RECORDINGS if len(pools) == 1 else STEP_RECORDINGS):
                cache.popitem(last=False)
        return rec

    def forget_pool(self, uid: int, algos: dict) -> None:
        """A pool is gone: its step recordings and its kernels with it."""
        for sig in [sig for sig in self._steps if uid in sig[-1]]:
            del self._steps[sig]
        self._dev.drop_algorithms(algos)

    def clear(self) -> None:
        """Forget every recording and kernel (the device is closing and destroys them)."""
        self._steps.clear()
        for pool in self._pools_alive():
            pool.recorded.clear()
            pool.algos.clear()
        self._algos.clear()

    def _bound_algos(self, pools) -> None:
        # A recording adds at most 2 algorithms per pool (append, attention) and one reduce;
        # recorded command buffers reference the pipelines: forget every recording first.
        for cache in [p.algos for p in pools] + [self._algos]:
            if len(cache) > MAX_POOL_ALGOS - 3:
                self._steps.clear()
                for pool in self._pools_alive():
                    pool.recorded.clear()
                self._dev.drop_algorithms(cache)

    def _io(self, pool0, nl: int, per_layer: int, n: int, st: _PlanState, f16_io: bool,
            var: _Variant, hq: int) -> _Io:
        dev, io, b = self._dev, _Io(), "host" if self._dev.host_io else "device"
        if f16_io:
            # Every q is fp16: q goes up and the output comes back as fp16 pairs, so the host
            # neither widens q nor narrows the output (numpy's float16 casts cost more than the
            # copies: ADR 0008).
            io.q, io.qview = dev.staging("q16", nl * per_layer // 2, np.uint32, b)
            io.qview = io.qview.view(np.float16)
            io.out, io.oview = dev.staging("out16", nl * per_layer // 2, np.uint32, b)
            io.oview = io.oview.view(np.float16)
        else:
            io.q, io.qview = dev.staging("q", nl * per_layer, np.float32, b)
            io.out, io.oview = dev.staging("out", nl * per_layer, np.float32, b)
        io.k = io.v = io.kview = io.vview = io.part_o = io.part_ml = None
        if n:
            io.k, io.kview = dev.staging("knew", nl * n * pool0.stage_words, np.uint32, b)
            io.v, io.vview = dev.staging("vnew", nl * n * pool0.stage_words, np.uint32, b)
        io.varp = io.varpview = io.lse = io.lseview = None
        if var.varp:    # slopes [Hq], then sinks [Hq]
            io.varp, io.varpview = dev.staging("varp", 2 * hq, np.float32, b)
        if var.lse:
            io.lse, io.lseview = dev.staging("lse", nl * st.rcls * hq, np.float32, b)
        if st.path == "splitk":
            rows = per_layer // pool0.dp
            io.part_o = dev.staging("part_o", nl * rows * st.nsplit * pool0.dp, np.float32, "storage")[0]
            io.part_ml = dev.staging("part_ml", nl * rows * st.nsplit * 2, np.float32, "storage")[0]
        return io

    def _record(self, pools, st: _PlanState, hq: int, writes: bool, f16_io: bool, repeat: int,
                var: _Variant):
        self._bound_algos(pools)
        dev, pool0, nl = self._dev, pools[0], len(pools)
        per_layer = st.rcls * hq * pool0.dp
        n = st.n if writes else 0
        io = self._io(pool0, nl, per_layer, n, st, f16_io, var, hq)
        ops, labels = [], []

        def add(op, label):
            ops.append(op)
            labels.append(label)

        tables = PlanTables.table_bufs(st) if nl > 1 else []
        uploads = ([] if dev.host_io else [io.q] + ([io.k, io.v] if n else []) +
                   ([io.varp] if var.varp else [])) + tables
        if uploads:
            add(dev.upload(uploads), "upload")
        if dev.patched:
            add(dev.barrier("full"), "barrier")
        if n:
            for i, pool in enumerate(pools):
                add(pool.append_op(n, i * n * pool.stage_words, 0, tensors=(io.k, io.v, st.slots)),
                    f"append{i}")
            add(dev.barrier(), "barrier")
        for r in range(repeat):
            if r:
                add(dev.barrier(), "barrier")
            self._attention_ops(add, pools, st, hq, f16_io, io, r, var)
        if dev.host_io:
            add(dev.barrier("compute->host"), "barrier")
        else:
            if dev.patched:
                add(dev.barrier("compute->transfer"), "barrier")
            add(dev.download([io.out] + ([io.lse] if var.lse else [])), "download")
        self.recordings += 1
        return self._recorded(dev.record(ops), labels, ops, pool0, st, hq, n, nl, io)

    def _attention_ops(self, add, pools, st: _PlanState, hq: int, f16_io: bool, io: _Io, r: int,
                       var: _Variant):
        """One repetition's attention dispatch per layer (and the split-K reduce)."""
        dev, spec, dp = self._dev, pools[0].spec, pools[0].dp
        group, splitk = hq // spec.num_kv_heads, st.path == "splitk"
        rows = st.rcls * hq
        per_layer = rows * dp
        for i, pool in enumerate(pools):
            tensors = [pool.k, pool.v, io.q, st.tables, st.lens] + \
                ([io.part_o, io.part_ml] if splitk else [io.out])
            if st.qt > 1:  # ragged plan: one workgroup per (query tile, KV head)
                shader = geometry.run_kernel(st.kernel, f16_io)
                defines = geometry.coop_defines(pool, group, st.qt) if shader == "prefill_coop.comp" \
                    else geometry.prefill_defines(pool, group, st.qt)
                tensors.append(st.tiles)
                wgx = st.tcls * spec.num_kv_heads
            else:
                shader, defines = "decode.comp", geometry.decode_defines(
                    pool, group, splitk, dev.subgroup_size, st.rule)
                wgx = st.rcls * spec.num_kv_heads
            defines["OUT_F16"] = int(f16_io and not splitk)
            defines["Q_F16"] = int(f16_io)
            if var.key != _PLAIN_KEY:   # the plain kernels keep their exact defines
                defines.update(var.defines())
                # Split-K: the partial kernel applies cap and ALiBi, the reduce sinks and LSE.
                if var.alibi or (var.sinks and not splitk):
                    tensors.append(io.varp)
                if var.lse and not splitk:
                    tensors.append(io.lse)
            if pool.affine:            # the format's scales bind last (ADR 0011)
                tensors += [pool.ks, pool.vs]
            algo = dev.algorithm(pool.algos, shader, defines, tensors, [wgx, st.nsplit, 1],
                                 ATTN_PUSH, "attn")
            out_off = i * rows * st.nsplit if splitk else i * per_layer
            add(dev.dispatch(algo, [i * per_layer, out_off, 0, st.maxb, spec.num_blocks,
                                    st.window, st.scale_bits, st.nsplit, st.chunk, 0, st.rcls,
                                    st.cap_bits, i * st.rcls * hq]),
                f"attn{i}.{r}")
        if splitk:
            add(dev.barrier(), "barrier")
            defines = {"DP": dp, "WG": REDUCE_WG, "OUT_F16": int(f16_io)}
            tensors = [io.part_o, io.part_ml, io.out]
            if var.sinks or var.lse:
                defines.update(SINKS=int(var.sinks), LSE=int(var.lse), HQ=hq)
                tensors += ([io.varp] if var.sinks else []) + ([io.lse] if var.lse else [])
            ralgo = dev.algorithm(self._algos, "splitk_reduce.comp", defines, tensors,
                                  [rows, 1, 1], REDUCE_PUSH, "reduce")
            for i in range(len(pools)):
                add(dev.dispatch(ralgo, [i * rows * st.nsplit, i * per_layer, st.nsplit, rows,
                                         i * rows]),
                    f"reduce{i}.{r}")

    @staticmethod
    def _recorded(seq, labels, ops, pool0, st: _PlanState, hq: int, n: int, nl: int, io: _Io):
        rec = _Recorded()
        rec.seq, rec.labels, rec.ops = seq, labels, ops
        rcls, dp = st.rcls, pool0.dp
        per_layer = rcls * hq * dp
        # Per-layer views of the mapped staging, made once: [rcls, Hq, DP] q and output rows,
        # [n, Hkv, DP] new k/v rows in the pool's element type.
        rec.qrows = [io.qview[i * per_layer:(i + 1) * per_layer].reshape(rcls, hq, dp) for i in range(nl)]
        rec.orows = [io.oview[i * per_layer:(i + 1) * per_layer].reshape(rcls, hq, dp) for i in range(nl)]
        rec.varp = io.varpview
        rec.lserows = None if io.lseview is None else \
            [io.lseview[i * rcls * hq:(i + 1) * rcls * hq].reshape(rcls, hq) for i in range(nl)]
        rec.krows = rec.vrows = None
        if n:
            w = n * pool0.stage_words
            rec.krows, rec.vrows = ([pool0.rows(view[i * w:(i + 1) * w]) for i in range(nl)]
                                    for view in (io.kview, io.vview))
        return rec
