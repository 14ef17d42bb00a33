"""Quantized KV formats: the one place that knows how a pool stores K and V (ADR 0011).

A `KVFormat` says what a pool holds per token and head (the storage of K/V and of their
scales), how many bytes that is, and how values go in and come back out. Validation, pools,
backends and the reference ask it; a new format is a `KVFormat` here plus the kernels that read
it. The numpy `quantize` / `dequantize` below are the reference arithmetic every backend must
match: the affine formats store MLX's `mx.quantize(x, group_size, bits)`, bit for bit, and read
back as `codes * scale + bias` in float32 (the stored scale and bias, no rounding to the pool's
dtype in between: what MLX's quantized matmuls and every kernel here compute, and
`mx.dequantize` with float32 scales, bit for bit; ADR 0011, "One definition of the values");
"float8_e4m3" is vLLM's kv_cache_dtype="fp8" (stored = e4m3fn(x / scale), round to
nearest even, saturating at +-448, as MLX's `mx.to_fp8`; read back as stored * scale).

Storage per pool, each array indexed [block, offset, kv_head, ...] like an unquantized pool's,
so a block id, a slot and a copy-on-write step address the scales exactly as they address K/V:
  data    affine: uint32 [..., D * bits / 32] (MLX's packing: element j of a word in bits
          [j * bits, (j + 1) * bits)); fp8: uint8 [..., D] (e4m3fn bit patterns)
  scales  affine only: [..., D / group_size] in the pool's dtype (per token, head and group)
  biases  affine only: the same
fp8 has one scale per pool for K (k_scale) and one for V (v_scale): nothing per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput

KV_DTYPES = ("int8", "int4", "float8_e4m3")
GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0
_AFFINE_BITS = {"int8": 8, "int4": 4}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of K or V in a format's storage: data, and per-group scales and biases (affine)."""

    data: np.ndarray
    scales: np.ndarray | None = None
    biases: np.ndarray | None = None


@dataclass(frozen=True)
class KVFormat:
    """How a quantized pool stores K and V. `name` is create_pool's kv_dtype."""

    name: str
    group_size: int = 64      # affine formats: elements of head_dim sharing a scale and bias
    k_scale: float = 1.0      # fp8: stored K = e4m3fn(k / k_scale)
    v_scale: float = 1.0

    @property
    def affine(self) -> bool:
        return _AFFINE_BITS.get(self.name, 0) > 0

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4, "float8_e4m3": 8}[self.name]

    # -- storage -------------------------------------------------------------------------------
    def data_width(self, head_dim: int) -> int:
        """Elements of `data` per (token, head): uint32 words (affine) or bytes (fp8)."""
        return head_dim * self.bits // 32 if self.affine else head_dim

    @property
    def data_dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.affine else np.uint8)

    def groups(self, head_dim: int) -> int:
        """Scales (and biases) per (token, head); 0 for fp8."""
        return head_dim // self.group_size if self.affine else 0

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, dtype: str) -> int:
        """Bytes one token takes in one layer's pool: K and V with their scales."""
        per_head = self.data_width(head_dim) * self.data_dtype.itemsize \
            + 2 * self.groups(head_dim) * _ITEMSIZE[dtype]
        return 2 * num_kv_heads * per_head

    def kernel_params(self, head_dim: int) -> dict:
        """What a kernel needs to read the format (its specialisation constants)."""
        return {"kv_dtype": self.name, "bits": self.bits, "group_size": self.group_size if
                self.affine else 0, "data_width": self.data_width(head_dim),
                "k_scale": self.k_scale, "v_scale": self.v_scale}

    def scale_of(self, which: str) -> float:
        return self.k_scale if which == "k" else self.v_scale

    def describe(self) -> str:
        if self.affine:
            return f"{self.name} (affine, group {self.group_size})"
        return f"{self.name} (k_scale {self.k_scale:g}, v_scale {self.v_scale:g})"

    # -- the reference arithmetic ----------------------------------------------------------------
    def quantize(self, x: np.ndarray, dtype: str, which: str = "k") -> QuantizedRows:
        """x [..., D] (any float; taken in the pool's `dtype` first, as an unquantized pool
        would store it) -> the format's storage."""
        x = round_to(np.asarray(x, np.float32), dtype)
        if self.affine:
            return _affine_quantize(x, self.group_size, self.bits, dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            return QuantizedRows(to_e4m3(x / np.float32(self.scale_of(which))))

    def dequantize(self, rows: QuantizedRows, dtype: str, which: str = "k") -> np.ndarray:
        """Storage -> float32 [..., D] values: affine as float32 codes * scale + bias (the
        stored scale and bias; `dtype` only names the pool), fp8 as float32(stored) * scale."""
        if self.affine:
            return _affine_dequantize(rows, self.group_size, self.bits)
        return from_e4m3(rows.data) * np.float32(self.scale_of(which))


def check_kv_format(kv_dtype, kv_group_size, k_scale, v_scale, head_dim: int) -> KVFormat | None:
    """create_pool's format arguments -> a KVFormat (None: unquantized), or InvalidInput naming
    the argument."""
    if kv_dtype is None:
        return None
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
        raise InvalidInput(f"kv_dtype: expected None or one of {KV_DTYPES}, got {kv_dtype!r}")
    if isinstance(kv_group_size, bool) or not isinstance(kv_group_size, (int, np.integer)) \
            or kv_group_size not in GROUP_SIZES:
        raise InvalidInput(f"kv_group_size: expected one of {GROUP_SIZES}, got {kv_group_size!r}")
    fmt = KVFormat(kv_dtype, int(kv_group_size))
    if fmt.affine and head_dim % kv_group_size:
        raise InvalidInput(f"kv_group_size: {kv_group_size} must divide head_dim={head_dim}")
    scales = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) \
                or not math.isfinite(s) or s <= 0 or s > float(np.finfo(np.float32).max):
            raise InvalidInput(f"{name}: expected a finite float > 0, got {s!r}")
        scales.append(float(s))
    if fmt.affine and scales != [1.0, 1.0]:
        raise InvalidInput(f"k_scale, v_scale: only kv_dtype='float8_e4m3' takes per-pool "
                           f"scales ({kv_dtype!r} keeps one per group), got {scales}")
    return KVFormat(kv_dtype, int(kv_group_size), *scales)


# -- dtype rounding (numpy has no bfloat16) ------------------------------------------------------
def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 x rounded to `dtype` (round to nearest even), returned as float32."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        u = np.ascontiguousarray(x).view(np.uint32)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return np.where(np.isnan(x), x, r.astype(np.uint32).view(np.float32))
    return x


# -- affine: MLX's quantize, element by element (mlx/backend/cpu/quantized.cpp) -------------------
def _affine_quantize(x: np.ndarray, group: int, bits: int, dtype: str) -> QuantizedRows:
    lead, d = x.shape[:-1], x.shape[-1]
    w = x.reshape(*lead, d // group, group)
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = w.max(axis=-1), w.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # The scale spans the group's range; its sign and the bias are chosen so the edge of
        # larger magnitude (min or max) is represented exactly, as MLX does.
        mask = np.abs(w_min) > np.abs(w_max)
        scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
        scale = np.where(mask, scale, -scale)
        edge = np.where(mask, w_min, w_max)
        q0 = np.rint(edge / scale)
        nonzero = q0 != 0
        scale = np.where(nonzero, edge / np.where(nonzero, q0, 1), scale).astype(np.float32)
        bias = np.where(nonzero, edge, np.float32(0)).astype(np.float32)
        q = np.clip(np.rint((w - bias[..., None]) / scale[..., None]), 0, n_bins)
    # A group holding NaN or inf has no meaningful scale; MLX's cast of its NaN codes is
    # undefined behaviour, so such groups' contents are unspecified (ADR 0011); here code 0.
    q = np.nan_to_num(q, nan=0.0).astype(np.uint32).reshape(*lead, d * bits // 32, 32 // bits)
    words = np.bitwise_or.reduce(q << (np.arange(32 // bits, dtype=np.uint32) * bits), axis=-1)
    return QuantizedRows(words.astype(np.uint32), round_to(scale, dtype), round_to(bias, dtype))


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [..., W] -> the quantized integers [..., W * 32 / bits] (uint32)."""
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    q = (np.asarray(words, np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*words.shape[:-1], words.shape[-1] * (32 // bits))


def _affine_dequantize(rows: QuantizedRows, group: int, bits: int) -> np.ndarray:
    q = unpack(rows.data, bits).astype(np.float32)
    lead, d = q.shape[:-1], q.shape[-1]
    q = q.reshape(*lead, d // group, group)
    s = np.asarray(rows.scales, np.float32)[..., None]
    b = np.asarray(rows.biases, np.float32)[..., None]
    return (s * q + b).reshape(*lead, d)


# -- fp8 e4m3fn (no infinities; 0x7f/0xff are NaN; max finite 448) -------------------------------
def to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn bit patterns (uint8): round to nearest even, saturating at +-448.
    As mx.to_fp8, infinities saturate and NaN becomes +-448 by its sign bit."""
    x = np.asarray(x, np.float32)
    sign = np.signbit(x)
    a = np.abs(np.nan_to_num(x, nan=FP8_MAX, posinf=FP8_MAX, neginf=FP8_MAX)).astype(np.float32)
    # The grid step at a: 2**(e - 3) for a normal a in [2**e, 2**(e+1)), 2**-9 below 2**-6.
    _, e = np.frexp(a)                                   # a = m * 2**e, m in [0.5, 1)
    e = np.maximum(e - 1, -6)
    step = np.ldexp(np.float32(1), e - 3).astype(np.float32)
    v = np.minimum(np.rint(a / step) * step, np.float32(FP8_MAX))   # exact: powers of two
    _, ev = np.frexp(v)
    ev = ev - 1
    normal = v >= np.float32(2.0 ** -6)
    mant = np.where(normal, np.ldexp(v, -ev) * 8 - 8, v * 512)       # 3 bits, or subnormal /2**-9
    code = np.where(normal, ((ev + 7) << 3) + mant.astype(np.int64), mant.astype(np.int64))
    return (code.astype(np.uint8) | (sign.astype(np.uint8) << 7)).astype(np.uint8)


_E4M3_TABLE = None


def from_e4m3(bits: np.ndarray) -> np.ndarray:
    """e4m3fn bit patterns (uint8) -> float32, exactly."""
    global _E4M3_TABLE
    if _E4M3_TABLE is None:
        c = np.arange(256)
        exp, mant = (c >> 3) & 15, (c & 7).astype(np.float64)
        mag = np.where(exp == 0, mant * 2.0 ** -9, (1 + mant / 8) * 2.0 ** (exp - 7))
        mag = np.where((c & 127) == 127, np.nan, mag)
        _E4M3_TABLE = np.where(c >= 128, -mag, mag).astype(np.float32)
    return _E4M3_TABLE[np.asarray(bits, np.uint8)]
