"""What the decode benches (`paged-attn bench mlx`, `paged-attn bench vulkan`) time against the
plain kernel at each point, and the targets those ratios are held to.

- `--attention sinks,softcap,alibi,lse` (or `all`): each attention variant of ADR 0010 on the
  same pools and tables as plain attention, timed in turns with it; ratio = variant / plain.
- `--kv-dtype fp16,int8,int4,float8_e4m3`: each quantized format of ADR 0011 on its own pools
  (same tables, same shape), timed in turns with the unquantized pool; ratio = format / plain.
  A single quantized format (`--kv-dtype int8`) keeps its older meaning in `bench mlx`: every
  path reads that format and nothing is compared.
- The targets (the H200 run issue): a variant within 1.10x of plain where B*ctx >= 64k; a decode
  step on int8 or fp8 at most 0.60x, on int4 at most 0.40x, of fp16's where B*ctx >= 128k.
  Below those sizes a ratio is reported and held to nothing (launch costs, not bytes, rule there).

No backend is imported here: the MLX and the Vulkan bench share it.
"""
from __future__ import annotations

import argparse

import numpy as np

from paged_attention.errors import InvalidInput
from paged_attention.kv_formats import KV_DTYPES

ATTENTION = ("sinks", "softcap", "alibi", "lse")
SOFT_CAP = 30.0   # FlashInfer's logits_soft_cap test value (gemma2 caps attention at 50)
PLAIN_NAMES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}

VARIANT_LIMIT, VARIANT_FROM = 1.10, 64 * 1024
FORMAT_LIMITS = {"int8": 0.60, "float8_e4m3": 0.60, "int4": 0.40}
FORMAT_FROM = 128 * 1024


def attention_option(text: str) -> str:
    """argparse type of --attention: a comma list of ATTENTION names, `plain` (the baseline,
    always timed) or `all`; returns the canonical list of variants ("" for none)."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ATTENTION + ("plain", "all")]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown attention variant(s) {bad}; expected a comma list of "
            f"{', '.join(('plain',) + ATTENTION)}, or all")
    chosen = set(ATTENTION) if "all" in names else set(names)
    return ",".join(n for n in ATTENTION if n in chosen)


def kv_dtype_option(text: str) -> str:
    """argparse type of --kv-dtype: one format, or a comma list of formats and the unquantized
    pool (fp16 / float16, bf16, fp32); returns the canonical comma list."""
    out = []
    for token in (t.strip().lower() for t in text.split(",")):
        name = PLAIN_NAMES.get(token, token)
        if name not in KV_DTYPES + tuple(PLAIN_NAMES.values()):
            raise argparse.ArgumentTypeError(
                f"unknown kv dtype {token!r}; expected a comma list of {', '.join(KV_DTYPES)} "
                f"and fp16 (the unquantized pool: {', '.join(PLAIN_NAMES)})")
        if name not in out:
            out.append(name)
    return ",".join(out)


def split_kv_dtypes(option: str | None, dtype: str) -> tuple[str | None, list[str]]:
    """(--kv-dtype's base format, the formats compared with the plain pool). One quantized
    format: every path reads it, nothing compared (base = it). A list: plain pools are the base
    and each quantized format of the list is compared with them. An unquantized name must be
    the pool dtype (--dtype): InvalidInput otherwise."""
    names = option.split(",") if option else []
    for name in names:
        if name not in KV_DTYPES and name != dtype:
            raise InvalidInput(f"--kv-dtype: expected quantized formats and the pool dtype "
                               f"(--dtype {dtype}), got {name}: a ratio against another dtype "
                               f"is no format's")
    quantized = [n for n in names if n in KV_DTYPES]
    if len(names) == 1 and quantized:
        return quantized[0], []
    return None, quantized


def alibi_slopes(num_q_heads: int) -> np.ndarray:
    """ALiBi's geometric slopes 2^(-8 h / Hq), h = 1..Hq (the paper's, for any Hq)."""
    return (2.0 ** (-8.0 * np.arange(1, num_q_heads + 1) / num_q_heads)).astype(np.float32)


def attention_case(name: str, num_q_heads: int, rng) -> tuple[dict, np.ndarray | None]:
    """(plan() keyword arguments, run()'s sinks or None) of one attention variant."""
    if name == "softcap":
        return {"soft_cap": SOFT_CAP}, None
    if name == "alibi":
        return {"alibi_slopes": alibi_slopes(num_q_heads)}, None
    if name == "lse":
        return {"return_lse": True}, None
    if name == "sinks":
        return {}, rng.standard_normal(num_q_heads).astype(np.float32)
    raise ValueError(f"unknown attention variant {name!r}; expected one of {ATTENTION}")


def limit(name: str, batch: int, context: int) -> float | None:
    """The issue's bound on `name`'s ratio to plain at this point; None where none holds."""
    tokens = batch * context
    if name in ATTENTION:
        return VARIANT_LIMIT if tokens >= VARIANT_FROM else None
    if name in FORMAT_LIMITS:
        return FORMAT_LIMITS[name] if tokens >= FORMAT_FROM else None
    return None


def verdict(name: str, batch: int, context: int, ratio: float) -> tuple[float | None, bool | None]:
    """(bound, whether the ratio meets it); (None, None) where no bound holds."""
    bound = limit(name, batch, context)
    return bound, (None if bound is None else bool(ratio <= bound))


def summary_line(batch: int, context: int, ratios: dict[str, float], where: str = "") -> str:
    """One line per point (and path): each ratio, its bound and PASS/FAIL, or why none holds."""
    parts = []
    for name, ratio in ratios.items():
        bound, ok = verdict(name, batch, context, ratio)
        frm = VARIANT_FROM if name in ATTENTION else FORMAT_FROM
        parts.append(f"{name} {ratio:.2f}x " + (
            f"<= {bound:.2f} {'PASS' if ok else 'FAIL'}" if bound is not None
            else f"(no target below B*ctx {frm // 1024}k)"))
    head = f"targets B={batch} ctx={context}{f' {where}' if where else ''}: "
    return head + ("; ".join(parts) if parts else "nothing compared with plain")


def overall(entries: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's targets over every point: (target, held everywhere it applies, the worst
    case). entries: dicts with name, batch, context, ratio and optionally where (a path)."""
    out = []
    groups = [(f"attention variants <= {VARIANT_LIMIT:.2f}x plain at B*ctx >= "
               f"{VARIANT_FROM // 1024}k", ATTENTION)]
    groups += [(f"{n} <= {b:.2f}x fp16 at B*ctx >= {FORMAT_FROM // 1024}k", (n,))
               for n, b in FORMAT_LIMITS.items()]
    for title, names in groups:
        held = [(e, limit(e["name"], e["batch"], e["context"])) for e in entries
                if e["name"] in names]
        held = [(e, b) for e, b in held if b is not None]
        if not held:
            continue
        worst, bound = max(held, key=lambda eb: eb[0]["ratio"] / eb[1])
        where = f" {worst['where']}" if worst.get("where") else ""
        out.append((title, all(e["ratio"] <= b for e, b in held),
                    f"worst {worst['name']} {worst['ratio']:.2f}x at "
                    f"({worst['batch']}, {worst['context']}){where}, over {len(held)} case(s)"))
    return out
