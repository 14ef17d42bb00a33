"""Fused paged decode attention for MLX: one kernel source (shaders/mlx/) compiled through
mx.fast.metal_kernel on Apple silicon and mx.fast.cuda_kernel on NVIDIA GPUs.

The decode kernel reads K/V straight out of the block pools through the block table (no
gather copy). Long contexts are split across threadgroups (flash-decoding / split-K): each
partition writes unnormalised partial outputs plus (max, sum), and a reduce kernel combines
them. Extra device memory per call is the output plus, when split, the partials:
B * Hq * num_parts * (D + 2) * 4 bytes. See adr/0004-mlx-fused-kernel.md. Quantized pools
(int8, int4, fp8 e4m3) are read in place by the kernel's PA_KV forms, which dequantize in
registers: adr/0011-quantized-kv.md, "MLX fused kernel".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from paged_attention import devices, settings, tuning
from paged_attention.errors import UnsupportedPath
from paged_attention.validation import PLAIN, StepArgs, Variant

from .arrays import DTYPES, as_mx
from .kernel_source import (KERNEL_FEATURES, binary_name, input_names, kernel_source,
                            output_names)

NUM_WARPS = 4            # warps (simdgroups) per decode threadgroup: 128 threads
REDUCE_THREADS = 128     # threads per reduce threadgroup (fixed in paged_reduce.body)
MAX_HEADS_PER_GROUP = 8  # query heads served by one threadgroup (registers: q + acc per head)
CTAS_PER_UNIT = 3        # decode threadgroups resident per SM / GPU core (register-bound; ADR
                         # 0004, "Figures behind the constants"); split-K's wave model
MIN_PART_TOKENS = 256    # ... never partitions shorter than this many tokens
SPLIT_TILE_COST = 0.1    # a partition's partials write + reduce read, in tile iterations
SPLIT_LAUNCH_COST = 15   # the reduce kernel's launch, in tile iterations (ADR 0004, "Figures
                         # behind the constants")
SPLIT_TOLERANCE = 1.03   # take the fewest partitions within 3% of the best modelled cost
KINDS = {mx.float16: 0, mx.bfloat16: 1, mx.float32: 2}
DEFAULT_VARIANT = {"prefetch": False, "stream": 0, "hf": True, "ws": False}
VARIANT_KNOBS = ("prefetch", "iters", "stream", "hf", "warps", "l2", "chunk", "ws")
# The values a device without a row in the tuning table runs (paged_attention/tuning.py; ADR
# 0004, "Per-device tuning"): the constants above, measured on the H100. Its H100 rows hold
# exactly these (tests/units/test_tuning.py); iters and chunk are left to the register budget.
BUILT_IN = {**DEFAULT_VARIANT, "warps": NUM_WARPS, "l2": 0, "ctas_per_unit": CTAS_PER_UNIT,
            "min_part_tokens": MIN_PART_TOKENS, "split_tile_cost": SPLIT_TILE_COST,
            "split_launch_cost": SPLIT_LAUNCH_COST, "split_tolerance": SPLIT_TOLERANCE}

@functools.cache
def device_name(api: str) -> str:
    """MLX's name of the GPU: the tuning table's row is looked up with it."""
    try:
        return str(mx.device_info().get("device_name", api))
    except Exception:  # noqa: BLE001 - informational only
        return api


@functools.cache
def compute_units(api: str) -> int:
    """SMs (CUDA) or GPU cores (Metal) used by the split-K heuristic. MLX's device_info() names
    the GPU but does not report its SM count, so it is looked up in paged_attention.devices;
    unknown GPUs get devices.FALLBACK_COMPUTE_UNITS (override with
    PAGED_ATTENTION_MLX_COMPUTE_UNITS)."""
    if settings.get().mlx_compute_units:
        return max(1, settings.get().mlx_compute_units)
    return devices.lookup(device_name(api)).compute_units or devices.FALLBACK_COMPUTE_UNITS[api]


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time shape of the decode kernel (its MLX template arguments)."""

    head_dim: int
    block_size: int
    num_kv_heads: int
    group: int        # G: query heads per KV head
    chunk: int        # GC: query heads per threadgroup
    kind: int         # 0 float16, 1 bfloat16, 2 float32 pools
    tpt: int          # threads per token row
    nv: int           # 16-byte vectors per thread per row
    iters: int        # tokens per thread per tile
    prefetch: bool = False  # PF: next tile's loads in flight during this tile's math
    stream: int = 0         # LDNC: 0 plain loads; CUDA 1 nc+L1::no_allocate, 2 that + L2::256B,
                            # 3 plain + L2::256B (Metal: all plain)
    warps: int = NUM_WARPS
    heads_fast: bool = True  # HF: KV heads along grid x (the heads of a block run together)
    l2_ahead: int = 0        # L2PF: tiles ahead whose K/V lines are hinted into L2 (0: none)
    kv: str | None = None    # the quantized KV format read (PA_KV; None: a plain pool)
    warp_softmax: bool = False  # WS: each warp's own online softmax, merged once at the end
    group_size: int = 0      # GS: the affine formats' elements per scale and bias

    @property
    def affine(self) -> bool:
        return self.kv in ("int8", "int4")

    @property
    def num_chunks(self) -> int:
        return -(-self.group // self.chunk)

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def tile(self) -> int:
        return self.iters * self.warps * (32 // self.tpt)

    def template(self, pool_dtype, out_dtype, scale_dtype=None) -> list:
        """pool_dtype: the K/V array's dtype (quantized: its storage, uint32 or uint8);
        scale_dtype: the affine formats' scales (the pool's compute dtype)."""
        return [("T", pool_dtype), ("OutT", out_dtype), ("D", self.head_dim),
                ("BS", self.block_size), ("HKV", self.num_kv_heads), ("G", self.group),
                ("GC", self.chunk), ("KIND", self.kind), ("TPT", self.tpt), ("NV", self.nv),
                ("ITER", self.iters), ("NW", self.warps), ("PF", bool(self.prefetch)),
                ("LDNC", int(self.stream)), ("HF", bool(self.heads_fast)),
                ("L2PF", int(self.l2_ahead)), ("WS", bool(self.warp_softmax))] + \
            ([("ST", scale_dtype), ("GS", self.group_size)] if self.affine else [])

    def grid(self, num_parts: int, batch: int) -> tuple[int, int, int]:
        """MLX grid (in threads along x) for num_parts partitions of batch sequences."""
        heads = self.num_kv_heads * self.num_chunks
        if self.heads_fast:
            return (heads * self.threads, num_parts, batch)
        return (num_parts * self.threads, heads, batch)


def supported_head_dim(head_dim: int) -> bool:
    return head_dim % 32 == 0 and 32 <= head_dim <= 256


def head_dim_unsupported_reason(head_dim: int) -> str | None:
    """None when the fused kernel runs this head dim, else why not (an UnsupportedPath text)."""
    if supported_head_dim(head_dim):
        return None
    return (f"the fused MLX kernel supports head_dim in 32..256, a multiple of 32; got {head_dim}: "
            f"use path='gather'")


# Elements in one 16-byte vector of a quantized format's packed data (kernel_source.KV_DEFINES).
KV_ELEMS = {"int8": 16, "int4": 32, "float8_e4m3": 16}


def kernel_config(head_dim: int, block_size: int, num_kv_heads: int, group: int,
                  pool_dtype, variant: dict | None = None, kv_format=None,
                  rule: tuning.Rule = tuning.EMPTY) -> KernelConfig:
    """variant (benchmarking): overrides of prefetch / iters / stream. pool_dtype: the pool's
    (compute) dtype; kv_format: its KVFormat when quantized (paged_attention.kv_formats).
    The knobs come from, last winning: DEFAULT_VARIANT, the device's tuning `rule`,
    PAGED_ATTENTION_MLX_VARIANT, `variant`."""
    why = head_dim_unsupported_reason(head_dim)
    if why:
        raise UnsupportedPath(why)
    if pool_dtype not in KINDS:
        raise UnsupportedPath(f"fused MLX kernel supports float16/bfloat16/float32 pools, got {pool_dtype}")
    kv = None if kv_format is None else kv_format.name
    if kv is not None and kv not in KV_ELEMS:
        raise UnsupportedPath(f"the fused MLX kernel reads kv_dtype {sorted(KV_ELEMS)}, got {kv!r}")
    # Elements per 16-byte vector: loads stay 16 bytes, of packed data when quantized.
    elems = KV_ELEMS[kv] if kv else 4 if pool_dtype == mx.float32 else 8
    nvec = head_dim // elems
    tpt = min(32, 1 << (nvec - 1).bit_length())             # next power of two, at most a warp
    nv = -(-nvec // tpt)
    # A thread holds q and the accumulators of its nv * elems elements for each of GC heads;
    # plain pools give it at most 8 (so 8 heads fit), a packed vector 16 or 32: fewer heads
    # per threadgroup, the same registers (the other chunks re-read K/V, from L2: ADR 0011).
    per_head = MAX_HEADS_PER_GROUP if kv is None else max(1, 64 // (nv * elems))
    env = settings.get().mlx_variant
    tuned = {k: v for k, v in rule.params if k in VARIANT_KNOBS}
    v = {**DEFAULT_VARIANT, **tuned, **(parse_variant(env) if env else {}), **(variant or {})}
    if v.get("chunk"):   # benchmarking: at most this many query heads per threadgroup
        per_head = max(1, min(int(v["chunk"]), per_head))
    chunks = -(-group // per_head)
    chunk = -(-group // chunks)
    regs = 2 * chunk * nv * elems                           # q + accumulators per thread
    iters = 8 if regs <= 64 else 4 if regs <= 128 else 2
    if v["prefetch"]:
        iters = max(2, iters // 2)   # two register stages of ITER tokens each
    if v.get("iters"):
        iters = int(v["iters"])
    return KernelConfig(head_dim, block_size, num_kv_heads, group, chunk, KINDS[pool_dtype],
                        tpt, nv, iters, bool(v["prefetch"]), int(v["stream"]),
                        heads_fast=bool(v["hf"]), warps=int(v.get("warps") or NUM_WARPS),
                        l2_ahead=int(v.get("l2", 0)), kv=kv,
                        warp_softmax=bool(v.get("ws", False)),
                        group_size=kv_format.group_size if kv_format is not None and
                        kv_format.affine else 0)


def parse_variant(text: str) -> dict:
    """'pf1i4nc2hf0' -> {'prefetch': True, 'iters': 4, 'stream': 2, 'hf': False}
    (bench --variants); 'nc' alone means stream mode 1; hf is left at its default unless given;
    a trailing ws1 / ws0 turns the per-warp softmax on / off."""
    import re
    m = re.fullmatch(r"pf([01])(?:i(\d+))?(?:nc([0-3]?))?(?:hf([01]))?(?:w([1248]))?(?:l(\d))?"
                     r"(?:c(\d+))?(?:ws([01]))?", text.strip())
    if m is None:
        raise ValueError(f"variant {text!r}: expected pf0|pf1, optional i<iters>, optional nc[1-3], "
                         f"optional hf0|hf1, optional w<warps>, optional l<tiles of L2 prefetch>, "
                         f"optional c<query heads per threadgroup, at most>, optional ws0|ws1")
    stream = 0 if m.group(3) is None else int(m.group(3) or 1)
    out = {"prefetch": m.group(1) == "1", "iters": int(m.group(2) or 0), "stream": stream}
    if m.group(4) is not None:
        out["hf"] = m.group(4) == "1"
    if m.group(5) is not None:
        out["warps"] = int(m.group(5))
    if m.group(6) is not None:
        out["l2"] = int(m.group(6))
    if m.group(7) is not None:
        out["chunk"] = int(m.group(7))
    if m.group(8) is not None:
        out["ws"] = m.group(8) == "1"
    return out


def choose_partitions(batch: int, groups_per_seq: int, max_tokens: int, tile: int,
                      units: int, partitions: int | None = None,
                      rule: tuning.Rule = tuning.EMPTY) -> tuple[int, int]:
    """(num_parts, part_size): split each sequence's attended range into partitions of
    part_size tokens (a multiple of the tile) for batch * groups_per_seq * num_parts
    threadgroups. `partitions` (or PAGED_ATTENTION_MLX_SPLITK=off|N) forces a count; 1 means no split.

    Otherwise a wave model picks the count: with `slots` = units * CTAS_PER_UNIT threadgroups
    resident at once, a launch takes ceil(threadgroups / slots) waves of part_size / tile tile
    iterations each; a split adds SPLIT_LAUNCH_COST tile-equivalents for the reduce launch.
    Each partition also costs SPLIT_TILE_COST tiles (its partials). The fewest partitions
    within SPLIT_TOLERANCE of the cheapest win; partitions are no shorter than MIN_PART_TOKENS.
    So B=1 at 32k fills every SM in one wave, and a large batch is left unsplit unless a split
    evens out a ragged last wave. The device's tuning `rule` may replace each constant
    (ctas_per_unit, min_part_tokens, split_tile_cost, split_launch_cost, split_tolerance)."""
    if max_tokens <= 0:
        return 1, tile
    if partitions is None:
        env = settings.get().mlx_splitk.lower()
        if env in ("off", "0", "1", "no"):
            partitions = 1
        elif env.isdigit():
            partitions = int(env)
    ctas = max(1, batch * groups_per_seq)

    def shape(n):
        part = -(-(-(-max_tokens // n)) // tile) * tile
        return -(-max_tokens // part), part

    if partitions is not None:
        return shape(max(1, int(partitions)))
    slots = max(1, int(units * rule.get("ctas_per_unit", CTAS_PER_UNIT)))
    tile_cost = rule.get("split_tile_cost", SPLIT_TILE_COST)
    launch_cost = rule.get("split_launch_cost", SPLIT_LAUNCH_COST)
    # Every candidate count at once (numpy): plan() runs this once per step, up to 128 options
    # at 32k tokens, where a Python loop over them was a large share of plan() (ADR 0007).
    n = np.arange(1, max(1, max_tokens // rule.get("min_part_tokens", MIN_PART_TOKENS)) + 1,
                  dtype=np.int64)
    part = -(-(-(-max_tokens // n)) // tile) * tile
    count = -(-max_tokens // part)
    split = (count > 1).astype(np.float64)
    waves = -(-ctas * count // slots)
    cost = waves * (part // tile + tile_cost * split) + launch_cost * split
    ok = np.flatnonzero(cost <= cost.min() * rule.get("split_tolerance", SPLIT_TOLERANCE))
    best = ok[np.lexsort((part[ok], count[ok]))[0]]   # fewest partitions, then the shortest
    count, part = int(count[best]), int(part[best])
    return count, part


@functools.cache
def _kernel(api: str, kernel: str, split: bool, features: frozenset = frozenset(),
            kv: str | None = None):
    """The MLX kernel object of one form (`features`: the attention variants compiled in, ADR
    0010; `kv`: the quantized KV format the decode kernel reads, ADR 0011); MLX compiles (and
    caches) one binary per template-argument set."""
    header, body = kernel_source(api, kernel, split, features, kv)
    kw = dict(name=binary_name(api, kernel, split, features, kv),
              input_names=input_names(kernel, split, features, kv),
              output_names=output_names(kernel, split, features), source=body, header=header,
              ensure_row_contiguous=True)
    if api == "metal":
        return mx.fast.metal_kernel(**kw)
    if api == "cuda":
        return mx.fast.cuda_kernel(**kw)
    raise UnsupportedPath(f"no custom-kernel API {api!r}; expected 'metal' or 'cuda'")


# plan() runs once per decode step and its host time is on the step's critical path (ADR
# 0007): what depends only on the geometry is decided once. The split-K decision is taken for
# the attended length rounded up to whole tiles, so it is reused for `tile` steps in a row
# (partitions past a sequence's end are empty, as they are for the shorter rows of a batch).
# Both are keyed on the step's tuning rule (one memoised lookup per step, tuning.rule).
@functools.lru_cache(maxsize=256)
def _step_config(head_dim, block_size, num_kv_heads, group, pool_dtype, kv_format, rule,
                 _settings) -> KernelConfig:
    return kernel_config(head_dim, block_size, num_kv_heads, group, pool_dtype,
                         kv_format=kv_format, rule=rule)


@functools.lru_cache(maxsize=4096)
def _step_partitions(batch, groups, tiles, tile, units, partitions, rule,
                     _settings) -> tuple[int, int]:
    return choose_partitions(batch, groups, tiles * tile, tile, units, partitions, rule)


# pa_step: [num_blocks, MB, window, part_size, num_parts, scale bits, L, T, soft-cap bits, A,
# k_scale bits, v_scale bits, WB, WO]: L and T the offsets of the lengths and tables, A of the
# ALiBi slopes' bits (0: none), WB and WO of the write slots' blocks and offsets (the append
# form's stores; 0 when the step has none); a plain kernel never reads fields 8-13, the fp8 form
# reads the pool's two scales (paged_decode.body). A plan serves pools of one spec, so of one
# format.
STEP_HEADER = 14


def appends(slots, block_tables, context_lens, block_size: int, kv_format) -> bool:
    """Whether the decode kernel may store the step's new K/V rows itself (PA_APPEND): plain
    pools, and each row's slot is exactly its sequence's position ctx - 1 through the table (the
    token the row attends last), so the kernel can read that position from the new rows. Any
    other step writes with a scatter first (backend.py)."""
    if kv_format is not None or slots is None or block_tables is None or \
            slots.shape[0] != context_lens.shape[0] or not context_lens.size or \
            context_lens.min() < 1:
        return False
    pos = context_lens.astype(np.int64) - 1
    blk = pos // block_size
    if blk.max() >= block_tables.shape[1]:
        return False
    want = block_tables[np.arange(pos.size), blk].astype(np.int64) * block_size + pos % block_size
    return bool(np.array_equal(want, slots))


def step_ints(num_blocks: int, batch: int, block_tables, context_lens, scale: float, window,
              part_size: int, num_parts: int, slots, block_size: int, attention: Variant,
              kv_format, num_q_heads: int, append: bool) -> tuple[np.ndarray, int, int]:
    """The step's one int32 array (layout above; paged_decode.body): (ints, write_at, n)."""
    mb = 1 if block_tables is None else block_tables.shape[1]
    n = 0 if slots is None else slots.shape[0]
    slopes, cap = attention.alibi_slopes, attention.soft_cap
    tables_at = STEP_HEADER + batch
    slopes_at = tables_at + batch * mb
    write_at = slopes_at + (0 if slopes is None else num_q_heads)
    ints = np.zeros(write_at + 2 * n, np.int32) if block_tables is None else \
        np.empty(write_at + 2 * n, np.int32)
    fp8 = kv_format is not None and not kv_format.affine
    ints[:STEP_HEADER] = (num_blocks, mb, window or 0, part_size, num_parts,
                          _float_bits(scale), STEP_HEADER, tables_at,
                          0 if cap is None else _float_bits(cap),
                          0 if slopes is None else slopes_at,
                          _float_bits(kv_format.k_scale) if fp8 else 0,
                          _float_bits(kv_format.v_scale) if fp8 else 0,
                          write_at if append else 0, write_at + n if append else 0)
    ints[STEP_HEADER:tables_at] = context_lens
    if block_tables is not None:
        ints[tables_at:slopes_at].reshape(batch, mb)[...] = block_tables
    if slopes is not None:
        ints[slopes_at:write_at] = np.asarray(slopes, np.float32).view(np.int32)
    if n:
        np.divmod(slots, block_size, out=(ints[write_at:write_at + n], ints[write_at + n:]))
    return ints, write_at, n


@functools.lru_cache(maxsize=64)
def _float_bits(x: float) -> int:
    """The int32 with x's float32 bits (the kernels read the scale out of the int array)."""
    return int(np.array(x, np.float32).view(np.int32))


class DecodePlan:
    """Device inputs shared by every layer of one decode step: block tables, context lengths,
    scalar parameters and the split-K decision. Build once per step, call once per layer."""

    def __init__(self, api: str, block_tables: np.ndarray, context_lens: np.ndarray,
                 scale: float, window: int | None, *, num_blocks: int, block_size: int,
                 num_kv_heads: int, num_q_heads: int, head_dim: int, pool_dtype,
                 partitions: int | None = None, variant: dict | None = None,
                 slots: np.ndarray | None = None, attention: Variant = PLAIN, kv_format=None):
        """slots: int [S], the step's write slots; their (block, offset) ride in the same device
        array and come back as `self.write` (two int32 [S] device views), else None.
        attention: the step's attention variant (ADR 0010), served by `with_lse`; `variant` is
        the kernel's tuning (prefetch, iters, ...), a different thing. kv_format: the pools'
        KVFormat when quantized (ADR 0011): the kernels then take the pools' `sources()`."""
        context_lens, block_tables = np.asarray(context_lens), np.asarray(block_tables)
        self.api, self.attention, self.kv_format = api, attention, kv_format
        self.batch = batch = int(context_lens.shape[0])
        self.num_q_heads = num_q_heads
        group = num_q_heads // num_kv_heads
        rule = tuning.rule("mlx", device_name(api), batch)
        self.cfg = kernel_config(head_dim, block_size, num_kv_heads, group, pool_dtype, variant,
                                 kv_format, rule) \
            if variant else _step_config(head_dim, block_size, num_kv_heads, group, pool_dtype,
                                         kv_format, rule, settings.get())
        max_tokens = int(context_lens.max(initial=0))
        if window is not None:
            max_tokens = min(max_tokens, window)
        self.num_parts, self.part_size = _step_partitions(
            batch, num_kv_heads * self.cfg.num_chunks, -(-max_tokens // self.cfg.tile),
            self.cfg.tile, compute_units(api), partitions, rule, settings.get())
        if block_tables.ndim != 2 or block_tables.shape[1] == 0:
            block_tables = None   # an all-empty step: one zero entry per row
        # ONE device array per step (pa_step, layout in paged_decode.body), filled in place on
        # the host and read by every kernel of the step without a view per input: on CUDA an
        # mx.array made from host data lives in managed memory and costs the step about the same
        # whatever its size, and every MLX op plan() adds costs host time inside the serial
        # loop (ADR 0007; the figures: ADR 0004, "Figures behind the constants").
        self.appends = settings.get().mlx_fused_append == "auto" and \
            appends(slots, block_tables, context_lens, block_size, kv_format)
        ints, write_at, n = step_ints(num_blocks, batch, block_tables, context_lens, scale, window,
                                      self.part_size, self.num_parts, slots, block_size,
                                      attention, kv_format, num_q_heads, self.appends)
        self.ints = mx.array(ints)
        self.write = (self.ints[write_at:write_at + n], self.ints[write_at + n:]) if n else None
        self._launches: dict = {}

    @classmethod
    def from_args(cls, api: str, args: StepArgs, k_pool, partitions=None,
                  variant: dict | None = None):
        """The plan for decode rows `args` (their attention variant included) over k_pool (an
        mx.array, or a quantized pool's source: backend.QuantizedSource)."""
        nb, bs, hkv, d = k_pool.shape
        return cls(api, args.block_tables, args.context_lens, args.scale, args.window,
                   num_blocks=nb, block_size=bs, num_kv_heads=hkv, num_q_heads=args.num_q_heads,
                   head_dim=d, pool_dtype=k_pool.dtype, partitions=partitions, variant=variant,
                   attention=args.variant, kv_format=getattr(k_pool, "fmt", None))

    @classmethod
    def from_spec(cls, api: str, args: StepArgs, spec, partitions=None, slots=None,
                  attention: Variant | None = None):
        """The plan for decode rows `args` over pools of geometry `spec` (a PoolSpec), with
        `attention` (default: args.variant)."""
        return cls(api, args.block_tables, args.context_lens, args.scale, args.window,
                   num_blocks=spec.num_blocks, block_size=spec.block_size,
                   num_kv_heads=spec.num_kv_heads, num_q_heads=args.num_q_heads,
                   head_dim=spec.head_dim, pool_dtype=DTYPES[spec.dtype], partitions=partitions,
                   slots=slots, attention=args.variant if attention is None else attention,
                   kv_format=spec.kv_format)

    def partial_bytes(self) -> int:
        """Device bytes of the split-K partials (0 without a split)."""
        if self.num_parts == 1:
            return 0
        return self.batch * self.num_q_heads * self.num_parts * (self.cfg.head_dim + 2) * 4

    def _inputs(self, ints: mx.array):
        """(k, v) -> the kernel inputs after q, in kernel_source.input_names' order: the pools
        and the step array, or a quantized pool's storage (k, v: backend.QuantizedSource), the
        step array and, affine, the scales and biases."""
        if self.kv_format is None:
            return lambda k, v: [k, v, ints]
        if self.kv_format.affine:
            return lambda k, v: [k.data, v.data, ints, k.scales, k.biases, v.scales, v.biases]
        return lambda k, v: [k.data, v.data, ints]

    def _template(self, k, q_dtype) -> list:
        if self.kv_format is None:
            return self.cfg.template(k.dtype, q_dtype)
        return self.cfg.template(k.data.dtype, q_dtype, k.dtype)

    def __call__(self, q: mx.array, k_pool, v_pool) -> mx.array:
        """q [B, Hq, D] -> [B, Hq, D] in q's dtype. Per call: one (or, split, two) kernel
        launches; everything else was decided at construction (run() is ~1 custom-kernel call).
        k_pool, v_pool: the pools' arrays, or a quantized pool's sources (backend.py)."""
        launch = self._launches.get((k_pool.dtype, q.dtype))
        if launch is None:
            launch = self._launches[(k_pool.dtype, q.dtype)] = self._launch(k_pool, q.dtype)
        return launch(q, k_pool, v_pool)

    def _launch(self, k_pool, q_dtype, features: frozenset = frozenset()):
        """A closure over everything but the arrays: kernels, template, grid, output shapes.
        features: frozenset({"append"}) for the form that stores the step's new rows (its
        closure takes k_new, v_new after the pools; plain pools only)."""
        cfg, batch, hq, d = self.cfg, self.batch, self.num_q_heads, self.cfg.head_dim
        if batch == 0:
            return lambda q, k, v: mx.zeros(q.shape, dtype=q.dtype)
        shape = (batch, hq, d)
        ints, kv = self.ints, cfg.kv
        common = dict(template=self._template(k_pool, q_dtype),
                      grid=cfg.grid(self.num_parts, batch), threadgroup=(cfg.threads, 1, 1))
        pools = self._inputs(ints)
        if self.num_parts == 1:
            decode = _kernel(self.api, "decode", False, features, kv)
            if kv is None and not features:   # the plain launch as it was: no extra call
                return lambda q, k, v: decode(
                    inputs=[q, k, v, ints], output_shapes=[shape],
                    output_dtypes=[q_dtype], **common)[0]
            return lambda q, k, v, *new: decode(
                inputs=[q, *pools(k, v), *new], output_shapes=[shape],
                output_dtypes=[q_dtype], **common)[0]
        decode = _kernel(self.api, "decode", True, features, kv)
        reduce = _kernel(self.api, "reduce", False)
        part_shapes = [(batch, hq, self.num_parts, d), (batch, hq, self.num_parts, 2)]
        reduce_kw = dict(template=[("OutT", q_dtype), ("D", d), ("HQ", hq)],
                         grid=(REDUCE_THREADS, hq, batch), threadgroup=(REDUCE_THREADS, 1, 1),
                         output_shapes=[shape], output_dtypes=[q_dtype])

        def split(q, k, v, *new):
            o_part, ml_part = decode(inputs=[q, *pools(k, v), *new],
                                     output_shapes=part_shapes,
                                     output_dtypes=[mx.float32, mx.float32], **common)
            return reduce(inputs=[o_part, ml_part, ints], **reduce_kw)[0]
        return split

    def append(self, q: mx.array, k_pool, v_pool, k_new: mx.array, v_new: mx.array) -> mx.array:
        """The plain step with its new K/V rows stored by the decode kernel itself (PA_APPEND,
        when `self.appends`): q [B, Hq, D]; k_pool, v_pool the pools' arrays, written in place
        at the step's slots; k_new, v_new [B, Hkv, D] in the pools' dtype. Returns [B, Hq, D]
        in q's dtype. MLX does not know the pools were written: the caller makes every later
        reader of the pools depend on the output (backend.py, mx.depends), which on CUDA orders
        their evaluation, not their execution (ADR 0004, "Append in the kernel")."""
        key = ("append", k_pool.dtype, q.dtype)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._launch(k_pool, q.dtype, frozenset({"append"}))
        return launch(q, k_pool, v_pool, k_new, v_new)

    def with_lse(self, q: mx.array, k_pool, v_pool,
                 sinks: mx.array | None) -> tuple[mx.array, mx.array | None]:
        """The step with its attention variant and `sinks` (float32 [Hq] or None): (out
        [B, Hq, D] in q's dtype, lse float32 [B, Hq] (natural log) when the variant asks for
        it, else None). The kernels are the forms with exactly these features compiled in."""
        features = self.attention.features(sinks is not None)
        key = (k_pool.dtype, q.dtype, features)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._launch_variant(k_pool, q.dtype,
                                                                frozenset(features))
        return launch(q, k_pool, v_pool, sinks)

    def _launch_variant(self, k_pool, q_dtype, features: frozenset):
        cfg, batch, hq, d = self.cfg, self.batch, self.num_q_heads, self.cfg.head_dim
        lse_on = "return_lse" in features
        if batch == 0:
            return lambda q, k, v, sinks: (mx.zeros(q.shape, dtype=q.dtype),
                                           mx.zeros((0, hq), mx.float32) if lse_on else None)
        shape = (batch, hq, d)
        ints, kv = self.ints, cfg.kv
        pools = self._inputs(ints)
        common = dict(template=self._template(k_pool, q_dtype),
                      grid=cfg.grid(self.num_parts, batch), threadgroup=(cfg.threads, 1, 1))
        extra_out = ([(batch, hq)], [mx.float32]) if lse_on else ([], [])

        def finish(outs):
            return outs[0], (outs[1] if lse_on else None)

        if self.num_parts == 1:
            decode = _kernel(self.api, "decode", False, features, kv)
            return lambda q, k, v, sinks: finish(decode(
                inputs=[q, *pools(k, v)] + ([] if sinks is None else [sinks]),
                output_shapes=[shape] + extra_out[0], output_dtypes=[q_dtype] + extra_out[1],
                **common))
        # Split-K: the partitions get the cap and the bias; the reduce, which sees each query
        # once, the sinks and the LSE (so a sink is counted once, not once per partition).
        decode = _kernel(self.api, "decode", True, features & KERNEL_FEATURES[("decode", True)],
                         kv)
        reduce = _kernel(self.api, "reduce", False, features & KERNEL_FEATURES[("reduce", False)])
        part_shapes = [(batch, hq, self.num_parts, d), (batch, hq, self.num_parts, 2)]
        reduce_kw = dict(template=[("OutT", q_dtype), ("D", d), ("HQ", hq)],
                         grid=(REDUCE_THREADS, hq, batch), threadgroup=(REDUCE_THREADS, 1, 1),
                         output_shapes=[shape] + extra_out[0],
                         output_dtypes=[q_dtype] + extra_out[1])

        def split(q, k, v, sinks):
            o_part, ml_part = decode(inputs=[q, *pools(k, v)], output_shapes=part_shapes,
                                     output_dtypes=[mx.float32, mx.float32], **common)
            return finish(reduce(inputs=[o_part, ml_part, ints] + ([] if sinks is None else [sinks]),
                                 **reduce_kw))
        return split


def fused_decode(q: mx.array, k_pool: mx.array, v_pool: mx.array, args: StepArgs, *,
                 api: str, partitions: int | None = None) -> mx.array:
    """Paged decode attention. q [B, Hq, D]; pools [NB, BS, Hkv, D]; args validated on the host.
    Returns [B, Hq, D] in q's dtype. `partitions` forces the split-K count (1: no split)."""
    q = as_mx(q)
    if args.batch == 0:
        return mx.zeros(q.shape, dtype=q.dtype)
    return DecodePlan.from_args(api, args, k_pool, partitions)(q, k_pool, v_pool)
