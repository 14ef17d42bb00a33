"""Vulkan backend on Kompute: pools resident on the device, one submission per decode step.

The backend keeps plan/run semantics; its rooms:
  device.py      the Kompute device layer: manager, tensors, staging, pipelines and their cache,
                 barriers, recording and (polled) submission, timestamps, counters
  pools.py       VulkanPool and the pool kernels (zero fill, writes, block copies, download)
  plan_state.py  plan.device: a step's tables in their size-class buffers, and their residency
  recording.py   the recorded attention sequences (per pool, and whole steps in an LRU)
  geometry.py    shader geometry and path heuristics (split-K, query tiles, compute units)
  bench_hooks.py what the lab's Vulkan bench needs beyond the public API
Plan / run (ADR 0008): plan() builds the step's tables (plan_state.py); each run makes them
resident, stages q (and k/v) in mapped memory, submits the recorded sequence and copies the used
rows out once.
"""
from __future__ import annotations

import math
import time
import weakref

import numpy as np

from paged_attention import settings, tuning
from paged_attention.errors import PagedAttentionError
from paged_attention.host_arrays import cast_out, copy_into, host, out_dtype
from paged_attention.interface import LayerStep, PagedAttention, Plan
from paged_attention.kv_formats import KV_DTYPES
from paged_attention.validation import PoolSpec, StepArgs

from . import KNOWN_PATHS, geometry
from .device import DeviceOutOfMemory, VulkanDevice  # noqa: F401 - DeviceOutOfMemory is public here
from .plan_state import PlanTables, _PlanState
from .pools import VulkanPool
from .recording import Recorder, _Recorded

_F16 = np.dtype(np.float16)


class VulkanBackend(PagedAttention):
    name = "vulkan"
    paths = KNOWN_PATHS
    pool_dtypes = ("float16", "bfloat16", "float32")
    # bfloat16 inputs: MLX arrays (mx.bfloat16) or ml_dtypes.bfloat16 numpy arrays (numpy has no
    # bfloat16 of its own). The output keeps q's dtype and kind: an MLX bfloat16 q gives an
    # mx.array back (the one exception to numpy outputs), an ml_dtypes q an ml_dtypes array.
    q_dtypes = ("float16", "bfloat16", "float32")
    # Every variant is a compile-time form of the shaders (ADR 0010); split-K's reduce applies
    # the sinks and writes the LSE.
    variants = {p: frozenset({"soft_cap", "alibi_slopes", "return_lse", "sinks"}) for p in KNOWN_PATHS}
    # Quantized pools (ADR 0011): quantized on write by kv_quant.comp, dequantized on load by
    # both attention shaders (kv_read.glsl).
    kv_formats = {p: frozenset(KV_DTYPES) for p in KNOWN_PATHS}
    # Shader division is not correctly rounded (Vulkan allows 2.5 ulp): at a rounding tie a
    # group's scale or a code may land one step from the reference's (ADR 0011).
    kv_quantization_exact = False

    def __init__(self, device_index: int | None = None):
        s = settings.get()
        self._dev = VulkanDevice(s.vk_device if device_index is None else device_index,
                                 stock_barriers=bool(s.vk_stock_barriers), spin_us=s.vk_spin_us,
                                 host_io=bool(s.vk_host_io))
        self.compute_units = geometry.compute_units(self._dev.name)
        self.last_host_s: dict | None = None  # host seconds of the last run: prepare/submit_wait/outputs
        self._pool_refs: set = set()
        self._recorder = Recorder(self._dev, self._pools_alive)
        self._tables = PlanTables(self._dev, self)

    # -- device facts and counters -----------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._dev.name

    timestamps_supported = property(lambda self: self._dev.timestamps_supported)
    subgroup_size = property(lambda self: self._dev.subgroup_size)
    submissions = property(lambda self: self._dev.submissions, doc="queue submissions so far")
    recordings = property(lambda self: self._recorder.recordings,
                          doc="kp Sequences recorded for attention so far")
    last_submit_wait_ns = property(lambda self: self._dev.last_submit_wait_ns,
                                   doc="(submit, wait) host ns of the last polled submission")
    last_timestamps = property(lambda self: self._dev.last_timestamps,
                               doc="(label, ticks) per op of the last timestamped submission")

    @property
    def compiler(self):
        """The ShaderCompiler (GLSL -> SPIR-V, cached) new pipelines are compiled with."""
        return self._dev.compiler

    @compiler.setter
    def compiler(self, compiler) -> None:
        self._dev.compiler = compiler

    @property
    def record_timestamps(self) -> bool:
        """While True, every submission latches a timestamp after each op (`last_timestamps`)."""
        return self._dev.record_timestamps

    @record_timestamps.setter
    def record_timestamps(self, on: bool) -> None:
        self._dev.record_timestamps = bool(on)

    def counters(self) -> dict:
        """submissions (queue submits), recordings (attention sequences recorded), pipelines
        (kp.Algorithm objects alive), staging_bytes, patched (Kompute patch in use)."""
        return {"submissions": self._dev.submissions, "recordings": self._recorder.recordings,
                "pipelines": self._dev.algos_live, "staging_bytes": self._dev.staging_bytes(),
                "patched": self._dev.patched}

    def _check_open(self):
        if self._dev.closed:
            raise PagedAttentionError("the Vulkan backend is closed")

    def close(self) -> None:
        with self._call_lock:
            if self._dev.closed:
                return
            self._recorder.clear()   # the manager's destroy frees what they reference
            self._tables.clear()
            self._dev.close()

    # -- pools ------------------------------------------------------------------------------------
    def _create_pool(self, spec: PoolSpec) -> VulkanPool:
        self._check_open()
        pool = VulkanPool(self, spec)
        self._pool_refs.add(weakref.ref(pool, self._pool_refs.discard))
        return pool

    def _pools_alive(self):
        return [p for p in (r() for r in self._pool_refs) if p is not None]

    def _forget_pool(self, uid: int, algos: dict) -> None:
        self._recorder.forget_pool(uid, algos)

    def _write_kv(self, pool: VulkanPool, slots: np.ndarray, k, v) -> None:
        self._check_open()
        pool.write(slots, k, v)

    def _copy_blocks(self, pool: VulkanPool, src: np.ndarray, dst: np.ndarray) -> None:
        self._check_open()
        pool.copy_blocks(src, dst)

    # -- path heuristics (geometry.py) --------------------------------------------------------------
    def _auto_path(self, args: StepArgs, spec: PoolSpec) -> str:
        """The calibrated choice for this device when a selector table exists, else the heuristic."""
        return self.selector.choose(args, spec, fallback=self.heuristic_path)

    def heuristic_path(self, args: StepArgs, spec: PoolSpec) -> str:
        return geometry.heuristic_path(args, spec, self.compute_units,
                                       self.tuning_rule(args.batch))

    def split_geometry(self, args: StepArgs, spec: PoolSpec) -> tuple[int, int]:
        return geometry.split_geometry(args, spec, self.compute_units,
                                       self.tuning_rule(args.batch))

    def tuning_rule(self, batch: int) -> tuning.Rule:
        """This device's tuning-table rule for a B=`batch` step (memoised; paged_attention/tuning.py)."""
        return tuning.rule("vulkan", self._dev.name, batch)

    def query_tile(self, group: int, spec: PoolSpec) -> int:
        return geometry.query_tile(group, spec)

    def prefill_kernel(self, group: int, spec: PoolSpec, plain: bool) -> str:
        return geometry.prefill_kernel(spec, group, plain, self._dev.coop_missing)

    @property
    def coop_missing(self) -> str | None:
        """Why this device cannot run the cooperative-matrix prefill (prefill_coop.comp), or None."""
        return self._dev.coop_missing

    heuristic_path.__doc__ = geometry.heuristic_path.__doc__
    prefill_kernel.__doc__ = geometry.prefill_kernel.__doc__
    split_geometry.__doc__ = geometry.split_geometry.__doc__
    query_tile.__doc__ = geometry.query_tile.__doc__

    # -- plan / run ------------------------------------------------------------------------------
    def _prepare(self, plan: Plan):
        # The upload itself waits for the first run (`make_resident`): a whole-step submission
        # carries it in its own upload, a per-layer run pays one extra submission per step.
        self._check_open()
        return self._tables.state(plan.args, plan.spec, plan.path, plan.slots)

    def _run(self, plan: Plan, q, pool: VulkanPool, k, v):
        return self._execute([(pool, q, k, v)], plan.device, k is not None)[0]

    def _run_variant(self, plan: Plan, q, pool: VulkanPool, k, v, sinks):
        lse: list = []
        out = self._execute([(pool, q, k, v)], plan.device, k is not None, sinks=sinks,
                            lse_out=lse)[0]
        return out, (lse[0] if lse else None)

    def _decode_repeated(self, q, pool: VulkanPool, args: StepArgs, path: str, repeat: int,
                         sinks=None):
        """The attention recorded `repeat` times back to back (a barrier between repetitions) in
        one submission, so the GPU stays busy and each repetition is timed (bench_hooks.py)."""
        st = self._tables.state(args, pool.spec, path, None)
        return self._execute([(pool, q, None, None)], st, False, repeat=repeat, sinks=sinks)[0]

    def _decode_step(self, layers: list[LayerStep], plans: list[Plan]) -> list:
        plan = plans[0]
        writes = plan.slots is not None and all(layer.k is not None for layer in layers)
        if any(p is not plan for p in plans) or (plan.slots is not None and not writes):
            # Heterogeneous layers (geometries, or some without new rows): one submission each.
            return super()._decode_step(layers, plans)
        return self._execute([(l.pool, l.q, l.k, l.v) for l in layers], plan.device, writes)

    def _execute(self, items, st: _PlanState, writes: bool, repeat: int = 1, sinks=None,
                 lse_out: list | None = None) -> list:
        """KV append (when `writes`) + attention for every layer in items: one submission of a
        recorded sequence. The steps: stage inputs, find or record the sequence, submit, read.
        sinks: float32 [Hq] for the variant forms; the plan's LSE rows go to `lse_out`."""
        self._check_open()
        t0 = time.perf_counter()
        pool0: VulkanPool = items[0][0]
        hq, d = items[0][1].shape[1], pool0.head_dim
        qdt = [out_dtype(it[1]) for it in items]
        if st.rows == 0:
            # Nothing to attend; still store the new tokens.
            for pool, _q, k, v in items:
                if writes and st.n:
                    pool.write(st.slots_host.astype(np.int64), k, v)
            if st.lse and lse_out is not None:
                lse_out.extend(np.zeros((0, hq), np.float32) for _ in items)
            return [cast_out(np.zeros((0, hq, d), np.float32), dt) for dt in qdt]
        fold = len(items) > 1  # a whole step uploads its tables in its one submission
        self._tables.make_resident(st, submit=not fold)
        f16_io = all(dt is _F16 for dt in qdt)  # a byte-swapped float16 q takes the float32 path
        rec = self._recorder.get([it[0] for it in items], st, hq, writes, f16_io, repeat,
                                 sinks is not None)
        self._stage_inputs(rec, items, st, writes)
        if rec.varp is not None:   # this run's slopes and sinks (layers share the plan's slopes)
            if st.slopes is not None:
                rec.varp[:hq] = st.slopes
            if sinks is not None:
                rec.varp[hq:2 * hq] = sinks
        t1 = time.perf_counter()
        self._dev.submit(rec.seq, rec.labels)
        t2 = time.perf_counter()
        outs = self._read_outputs(rec, st, d, qdt)
        if rec.lserows is not None and lse_out is not None:
            lse_out.extend(rows[:st.rows].copy() for rows in rec.lserows)
        self.last_host_s = {"prepare": t1 - t0, "submit_wait": t2 - t1, "outputs": time.perf_counter() - t2}
        return outs

    @staticmethod
    def _stage_inputs(rec: _Recorded, items, st: _PlanState, writes: bool) -> None:
        """q (padded head dim; fp16 when every q is fp16, else float32) and the new k/v rows into
        the mapped staging memory."""
        d, rows = items[0][0].head_dim, st.rows
        for i, (pool, q, k, v) in enumerate(items):
            copy_into(rec.qrows[i][:rows, :, :d], host(q))
            if writes and st.n:
                pool.put_rows(rec.krows[i], k)
                pool.put_rows(rec.vrows[i], v)

    @staticmethod
    def _read_outputs(rec: _Recorded, st: _PlanState, d: int, qdt) -> list:
        """One copy of the used rows out of the mapped staging memory per layer (fp16 words when
        every q is fp16), straight into the caller's dtype."""
        return [cast_out(rec.orows[i][:st.rows, :, :d], dt) for i, dt in enumerate(qdt)]

    # -- internals for tests ---------------------------------------------------------------------
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
        st = self._tables.state(args, pool.spec, path, None)
        return self._execute([(pool, q, None, None)], st, False)[0]

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
