"""Shader geometry and path heuristics of the Vulkan backend: pure functions of the pool
geometry, the step and the device's facts (compute units, subgroup size) and the VK_* settings.
Nothing here touches Kompute.

Kernels
  decode.comp   one workgroup per (query row, KV head[, split]): decode rows and the split-K pass.
  prefill.comp  ragged plans (any query_lens > 1) on the fused path: one workgroup per (query
                tile, KV head), flash-attention style. A tile is up to QT queries of one sequence;
                QT*G rows share each K/V load (`query_tile`: PREFILL_ROWS rows, within 48 KiB of
                shared memory). QT 1 (PAGED_ATTENTION_VK_QT=1, or a head too wide) keeps
                decode.comp.
  prefill_coop.comp  the same tiles on tensor cores (VK_NV_cooperative_matrix): 64 query rows per
                workgroup, one 16-row slice per subgroup. `prefill_kernel` picks it where the
                device and the step allow it (`coop_unsupported` says why not), prefill.comp
                otherwise; PAGED_ATTENTION_VK_PREFILL forces either.
"""
from __future__ import annotations

import math
import os

import numpy as np

from paged_attention import devices, settings, tuning
from paged_attention.errors import InvalidInput, PagedAttentionError
from paged_attention.validation import PoolSpec, StepArgs

MIN_CHUNK = 512             # split-K: fewest tokens per split
PER_CU = 1.5                # split-K workgroups per compute unit (split_geometry)
SPLIT_OCCUPANCY = 2.0       # ... when the (sequence, KV head) workgroups fill under a quarter
DECODE_WG = 512             # decode.comp's workgroup size (64 on subgroups under 32 lanes)
# The values a device without a row in the tuning table runs (paged_attention/tuning.py; ADR
# 0004, "Per-device tuning"), measured on the H100 (ADR 0008): its rows hold exactly these
# (tests/units/test_tuning.py); unroll and tpt are left to the register heuristic.
BUILT_IN = {"wg": DECODE_WG, "per_cu": PER_CU, "split_occupancy": SPLIT_OCCUPANCY,
            "min_chunk": MIN_CHUNK}
PREFILL_WG = 128            # prefill.comp workgroup size
PREFILL_ROWS = 32           # prefill.comp query rows (queries x heads) per workgroup, the default
PREFILL_SHARED = 48 * 1024  # shared-memory budget: the most NVIDIA gives a workgroup without opt-in
COOP_WG = 128               # prefill_coop.comp: 4 subgroups of 32 lanes, 16 query rows each
COOP_ROWS = 64              # its query rows (queries x heads) per workgroup
COOP_HEAD_DIMS = (64, 128)
PREFILL_KERNELS = ("auto", "coop", "flash")


def pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def padded_dim(spec: PoolSpec) -> int:
    """Head dim padded to whole vectors (VulkanPool.dp): 8 16-bit elements or 4 float32 per
    16-byte load; a quantized pool's loads hold 8 elements (8 or 4 bytes)."""
    vec = 8 if spec.dtype in ("float16", "bfloat16") or spec.kv_format is not None else 4
    return -(-spec.head_dim // vec) * vec


def compute_units(device_name: str) -> int:
    """Compute units the split-K geometry assumes: PAGED_ATTENTION_VK_CUS, else the CPU count
    for lavapipe, else the device table, else a fallback by vendor."""
    if settings.get().vk_compute_units:
        return settings.get().vk_compute_units
    name = device_name.lower()
    if "llvmpipe" in name or "lavapipe" in name:
        return os.cpu_count() or 2
    known = devices.lookup(device_name).compute_units
    if known:
        return known
    if "nvidia" in name or "amd" in name or "radeon" in name:
        return devices.FALLBACK_COMPUTE_UNITS["vulkan-discrete"]
    return devices.FALLBACK_COMPUTE_UNITS["vulkan"]


def heuristic_path(args: StepArgs, spec: PoolSpec, units: int,
                   rule: tuning.Rule = tuning.EMPTY) -> str:
    """split-K when the (sequence, KV head) workgroups cannot fill the device and the context is
    long enough for the extra reduce to pay; fused otherwise."""
    if args.num_rows == 0:
        return "fused"
    longest = int(args.attended_tokens().max())
    wgs = args.num_rows * spec.num_kv_heads   # decode.comp: one workgroup per (row, KV head)
    if longest >= 1024 and wgs < 2 * units and split_geometry(args, spec, units, rule)[0] > 1:
        return "splitk"
    return "fused"


def split_geometry(args: StepArgs, spec: PoolSpec, units: int,
                   rule: tuning.Rule = tuning.EMPTY) -> tuple[int, int]:
    """(nsplit, chunk): chunk tokens per split, from the table's capacity so that a decode loop
    with a fixed table width keeps one recorded command buffer while contexts grow. `rule`: the
    device's tuning (per_cu, split_occupancy, min_chunk); the VK_* settings win over it."""
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
        if 4 * wgs > units:
            per_cu = rule.get("per_cu", PER_CU)
        else:
            per_cu = settings.get().vk_split_occupancy or rule.get("split_occupancy",
                                                                   SPLIT_OCCUPANCY)
        want = max(1, math.ceil(per_cu * units / wgs))
        chunk = max(rule.get("min_chunk", MIN_CHUNK), -(-(-(-span // want)) // 256) * 256)
    return max(1, -(-span // chunk)), chunk


def decode_defines(pool, group: int, splitk: bool, subgroup_size: int,
                   rule: tuning.Rule = tuning.EMPTY) -> dict:
    """decode.comp's compile-time constants for a pool (VulkanPool) at G query heads per KV head;
    `rule`: the device's tuning (wg, unroll, tpt), under the VK_* settings."""
    s = pool.spec
    vec = 8 if pool.f16 or pool.kvq else 4
    nv = pool.dp // vec
    tpt = min(pow2_floor(nv), pow2_floor(subgroup_size))
    s_ = settings.get()
    tpt = s_.vk_tpt or rule.get("tpt") or tpt
    wg = s_.vk_wg or rule.get("wg") or (DECODE_WG if subgroup_size >= 32 else 64)
    ng = max(1, min(wg // tpt, 4096 // pool.dp))  # shared memory: ng * dp floats <= 16 KiB
    nl = -(-nv // tpt)
    regs = group * nl * vec  # per-lane q and accumulator floats per token
    unroll = s_.vk_unroll or rule.get("unroll") or (8 if regs <= 32 else 4 if regs <= 64 else 2)
    return {"DP": pool.dp, "G": group, "HKV": s.num_kv_heads, "BS": s.block_size, "WG": ng * tpt,
            "TPT": tpt, "F16": int(pool.f16), "BF16": int(pool.bf16), "U": unroll,
            "SPLITK": int(splitk), **kv_defines(pool)}


def kv_defines(pool) -> dict:
    """A quantized pool's reading constants (ADR 0011); none for a plain pool, whose kernels
    keep their exact defines. F16/BF16 then say what the (scale, bias) pairs are stored in."""
    if not pool.kvq:
        return {}
    fmt = pool.fmt
    return {"KVQ": pool.kvq, "GS": fmt.group_size,
            "KSC": int(np.float32(fmt.k_scale).view(np.uint32)),
            "VSC": int(np.float32(fmt.v_scale).view(np.uint32))}


def prefill_layout(group: int, dp: int, qt: int) -> dict | None:
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
    ndg = min(pow2_floor(ndv), 16)
    nrg = math.gcd(PREFILL_WG // ndg, rwp)
    return {"QT": qt, "KT": kt, "WG": PREFILL_WG, "NDG": ndg, "NRG": nrg}


def query_tile(group: int, spec: PoolSpec) -> int:
    """Queries per prefill.comp workgroup: PREFILL_ROWS query rows (QT*G) share each K/V
    load; PAGED_ATTENTION_VK_QT overrides (1: decode.comp, one query per workgroup). Lowered
    until the tile fits the shared-memory budget; 1 when not even two queries fit."""
    qt = settings.get().vk_query_tile or max(2, PREFILL_ROWS // max(1, group))
    dp = padded_dim(spec)
    while qt > 1 and prefill_layout(group, dp, qt) is None:
        qt -= 1
    return max(1, qt)


def prefill_defines(pool, group: int, qt: int) -> dict:
    s = pool.spec
    return {"DP": pool.dp, "G": group, "HKV": s.num_kv_heads, "BS": s.block_size,
            "F16": int(pool.f16), "BF16": int(pool.bf16), **prefill_layout(group, pool.dp, qt),
            **kv_defines(pool)}


def coop_layout(dp: int) -> dict | None:
    """prefill_coop.comp's key tile BC for head dim DP: the largest of 64/32 whose shared arrays
    (the shader's header: fp16 K and V tiles, fp16 P, fp32 S) fit PREFILL_SHARED."""
    rows, ksv = COOP_ROWS, dp // 8 + 1
    for bc in (64, 32):
        shared = 16 * ksv * max(rows, 2 * bc) + 16 * rows * (bc // 8 + 1) + 4 * rows * (bc + 4)
        if shared <= PREFILL_SHARED:
            return {"BC": bc, "WG": COOP_WG}
    return None


def coop_unsupported(spec: PoolSpec, group: int, plain: bool, device_missing: str | None) -> str | None:
    """Why prefill_coop.comp cannot serve a prefill step on this pool, or None when it can.
    device_missing: the device's reason (VulkanDevice.coop_missing), None on a device with
    VK_NV_cooperative_matrix. plain: the step has no attention variant (ADR 0010)."""
    if device_missing:
        return device_missing
    if spec.kv_format is not None:
        return f"the pool is quantized ({spec.kv_format}); the coop kernel reads fp16 pools only"
    if spec.dtype != "float16":
        # Tensor-core inputs are fp16: a bfloat16 or float32 pool's values may not fit its range.
        return f"the pool is {spec.dtype}; the coop kernel reads fp16 pools only"
    if spec.head_dim not in COOP_HEAD_DIMS or coop_layout(spec.head_dim) is None:
        return f"head_dim {spec.head_dim}; the coop kernel has head dims {COOP_HEAD_DIMS}"
    if not 1 <= group <= COOP_ROWS // 2:
        return f"{group} query heads per KV head; the coop kernel tiles at most {COOP_ROWS // 2}"
    if not plain:
        return "the step has an attention variant (soft cap, ALiBi, sinks or LSE); the coop " \
               "kernel computes plain attention only"
    return None


def prefill_kernel(spec: PoolSpec, group: int, plain: bool, device_missing: str | None) -> str:
    """"coop" (prefill_coop.comp) or "flash" (prefill.comp) for a ragged step on the fused path,
    from PAGED_ATTENTION_VK_PREFILL: auto takes coop wherever `coop_unsupported` has no reason
    against it; coop raises that reason instead of falling back (a bench must not time the
    fallback unawares). A run whose q is not fp16 still runs prefill.comp (`run_kernel`)."""
    mode = settings.get().vk_prefill or "auto"
    if mode not in PREFILL_KERNELS:
        raise InvalidInput(f"$PAGED_ATTENTION_VK_PREFILL: expected one of {PREFILL_KERNELS}, got {mode!r}")
    if mode == "flash":
        return "flash"
    why = coop_unsupported(spec, group, plain, device_missing)
    if why is None:
        return "coop"
    if mode == "coop":
        raise PagedAttentionError(f"PAGED_ATTENTION_VK_PREFILL=coop, but {why}")
    return "flash"


def coop_query_tile(group: int) -> int:
    """Queries per prefill_coop.comp workgroup: as many as fill its COOP_ROWS rows."""
    return COOP_ROWS // group


def run_kernel(kernel: str, f16_io: bool) -> str:
    """The shader a recording uses for a plan's prefill kernel: the coop kernel takes fp16 q only
    (a float32 or bfloat16 q may not fit fp16's range), so such a run keeps prefill.comp on
    the same query tiles."""
    return "prefill_coop.comp" if kernel == "coop" and f16_io else "prefill.comp"


def coop_defines(pool, group: int, qt: int) -> dict:
    s = pool.spec
    return {"DP": pool.dp, "G": group, "HKV": s.num_kv_heads, "BS": s.block_size, "QT": qt,
            **coop_layout(pool.dp)}
