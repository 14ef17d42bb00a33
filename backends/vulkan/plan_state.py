"""Plan state of the Vulkan backend (ADR 0008): what `plan()` keeps for a step and how its
tables reach the device.

plan() keeps the step's tables/lengths/slots (plan.device, a _PlanState); its first run writes
them into their class buffers (a whole decode_step carries them in its own upload, a run pays
one extra submission per step) and marks the buffers as holding that plan. A batch of N rows
runs as its class (next power of two); rows past N have length 0 and give zeros never read.
Ragged plans on the fused path also carry `tiles` (first row, count per query tile; built per
plan, longest contexts first) for prefill.comp.
"""
from __future__ import annotations

import functools

import numpy as np

from paged_attention.validation import PLAIN, PoolSpec, StepArgs

from . import geometry
from .device import VulkanDevice, pow2_ceil


@functools.lru_cache(maxsize=64)
def _decode_lens(rows: int, rcls: int) -> np.ndarray:
    """A decode step's lens buffer less its lengths: zeros [rcls], then the row -> sequence map
    0..rows-1 and zeros to rcls (made once per batch size; each plan copies it)."""
    a = np.zeros(2 * rcls, np.int32)
    a[rcls:rcls + rows] = np.arange(rows, dtype=np.int32)
    a.flags.writeable = False
    return a


class _PlanState:
    """plan.device: a step's tables/lengths/slots (host copies and their size-class device
    buffers), its batch size class and split geometry. `token` marks whose tables a buffer holds."""
    __slots__ = ("token", "rows", "rcls", "bcls", "maxb", "path", "window", "scale_bits", "nsplit", "chunk",
                 "rule", "n", "tables_host", "lens_host", "slots_host", "tables", "lens", "slots", "qt",
                 "tcls", "tiles_host", "tiles", "keys", "cap_bits", "slopes", "lse", "kernel")


class PlanTables:
    """Builds plans' device state and keeps track of which plan's tables the shared size-class
    buffers hold. `backend` supplies the split geometry and the query tile."""

    def __init__(self, dev: VulkanDevice, backend):
        self._dev = dev
        self._backend = backend
        self._resident: dict[int, object] = {}
        self._resident_last = None  # token of the plan whose tables were uploaded last

    def clear(self) -> None:
        self._resident.clear()
        self._resident_last = None

    def state(self, args: StepArgs, spec: PoolSpec, path: str, slots) -> _PlanState:
        """Device metadata of one step, built from its sequence form: the tables [B, maxb] as
        they are, per query row its context length (causal mask applied) and its sequence (the
        table row it reads), written into size-class staging buffers (uploaded by
        `make_resident`); split geometry and the batch's size classes."""
        st = _PlanState()
        st.token = object()
        st.keys = {}  # recording.py's cache keys, per (hq, writes, f16_io, repeat, layers)
        st.rows, st.maxb = args.num_rows, int(args.block_tables.shape[1])
        st.rcls = pow2_ceil(st.rows)
        st.bcls = st.rcls if args.decode_only else pow2_ceil(args.batch)
        st.path, st.window = path, args.window or 0
        st.scale_bits = int(np.float32(args.scale).view(np.uint32))
        # The attention variant (ADR 0010): compiled into the kernels, so part of every key.
        var = args.variant
        if var is PLAIN:
            st.cap_bits, st.slopes, st.lse = 0, None, False
        else:
            st.cap_bits = 0 if var.soft_cap is None else \
                int(np.float32(var.soft_cap).view(np.uint32))
            st.slopes, st.lse = var.alibi_slopes, bool(var.return_lse)
        # The device's tuning for this batch (memoised): the split geometry and decode.comp's
        # shape (recording.py) follow it.
        st.rule = self._backend.tuning_rule(args.batch)
        st.nsplit, st.chunk = geometry.split_geometry(args, spec, self._backend.compute_units,
                                                      st.rule) if path == "splitk" else (1, 0)
        st.n = 0 if slots is None else int(slots.shape[0])
        st.tables_host = np.ascontiguousarray(args.block_tables, dtype=np.int32).reshape(-1)
        # [rcls] row lengths, then [rcls] row sequences; rows past N see nothing (zeros out).
        if args.decode_only:   # row b is sequence b: the second half is a shared template
            st.lens_host = _decode_lens(st.rows, st.rcls).copy()
            st.lens_host[:st.rows] = args.context_lens
        else:
            st.lens_host = np.zeros(2 * st.rcls, np.int32)
            st.lens_host[:st.rows] = args.row_context_lens()
            st.lens_host[st.rcls:st.rcls + st.rows] = args.row_sequences()
        st.slots_host = None if slots is None else np.ascontiguousarray(slots, dtype=np.int32)
        st.tables = self._dev.staging("tables", st.bcls * max(1, st.maxb), np.int32)[0]
        st.lens = self._dev.staging("lens", 2 * st.rcls, np.int32)[0]
        st.slots = self._dev.staging("slots", st.n, np.int32)[0] if st.n else None
        self._prefill_tiles(st, args, spec, path, var is PLAIN)
        return st

    def _prefill_tiles(self, st: _PlanState, args: StepArgs, spec: PoolSpec, path: str,
                       plain: bool) -> None:
        # Ragged plans (prefill chunks) on the fused path: tiles of up to QT queries of one
        # sequence share each K/V load (prefill.comp, or prefill_coop.comp on tensor cores:
        # `kernel`); qt 1 keeps decode.comp, one query each.
        st.qt, st.tcls, st.tiles_host, st.tiles, st.kernel = 1, 0, None, None, "flash"
        query_lens = None if args.decode_only else args.query_lens
        if path == "fused" and query_lens is not None and int(np.max(query_lens, initial=0)) > 1:
            group = args.num_q_heads // spec.num_kv_heads
            st.kernel = self._backend.prefill_kernel(group, spec, plain)
            st.qt = geometry.coop_query_tile(group) if st.kernel == "coop" else \
                self._backend.query_tile(group, spec)
        if st.qt > 1:
            tiles = []
            for r0, n in zip(args.qo_indptr[:-1].tolist(), query_lens.tolist()):
                tiles += [(r0 + i, min(st.qt, n - i)) for i in range(0, n, st.qt)]
            tiles = np.array(tiles, np.int32).reshape(-1, 2)
            # Longest contexts first (a tile's last row has the longest): the GPU starts
            # workgroups roughly in index order, so the heaviest ones do not trail the grid.
            tiles = tiles[np.argsort(-st.lens_host[tiles[:, 0] + tiles[:, 1] - 1], kind="stable")]
            st.tcls = pow2_ceil(len(tiles))
            st.tiles_host = np.zeros((st.tcls, 2), np.int32)  # padding tiles: count 0
            st.tiles_host[:len(tiles)] = tiles
            st.tiles_host = st.tiles_host.reshape(-1)
            st.tiles = self._dev.staging("tiles", 2 * st.tcls, np.int32)[0]

    @staticmethod
    def table_bufs(st: _PlanState) -> list:
        return [st.tables, st.lens] + ([st.slots] if st.n else []) + ([st.tiles] if st.qt > 1 else [])

    def make_resident(self, st: _PlanState, submit: bool = True) -> None:
        """Write the plan's tables/lengths/slots into their device buffers unless they hold them
        already (another plan of the same size class may have overwritten them). submit=False:
        the caller's own sequence uploads them."""
        if self._resident_last is st.token:  # nothing has been uploaded since this plan's tables
            return
        bufs = self.table_bufs(st)
        if all(self._resident.get(id(t)) is st.token for t in bufs):
            self._resident_last = st.token
            return
        view = self._dev.view
        view(st.tables)[:st.tables_host.size] = st.tables_host
        view(st.lens)[:st.lens_host.size] = st.lens_host
        if st.n:
            view(st.slots)[:st.n] = st.slots_host
        if st.qt > 1:
            view(st.tiles)[:st.tiles_host.size] = st.tiles_host
        if submit:
            self._dev.run_recorded(("upload",) + tuple(id(t) for t in bufs),
                                   lambda: [self._dev.upload(bufs)], ["upload_tables"])
        for t in bufs:
            self._resident[id(t)] = st.token
        self._resident_last = st.token
