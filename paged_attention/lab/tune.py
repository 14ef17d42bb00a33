"""`paged-attn tune --backend mlx|vulkan`: measure candidate configurations of the fused decode
kernels on this device and, with --write, store the winners as the device's row of the tuning
table (paged_attention/tuning.py; ADR 0004, "Per-device tuning").

    paged-attn tune --backend mlx --write          # MLX fused kernel (Metal or CUDA)
    paged-attn tune --backend vulkan --write       # Vulkan decode.comp / split-K

For each batch class it builds every (batch, context) point of the grid (Hq 32, Hkv 8, D 128,
float16, block 16 by default; fragmented tables, every sequence at the full context), runs each
candidate once and checks it against the built-in configuration ("default", always measured),
then times all candidates at that point in the same process, in turns (lab/timing.py). A
candidate that fails to build, to run or to agree with the default is reported and skipped.
Per batch the winner is the candidate with the lowest geometric mean, over the contexts, of
(time / best time at that context); adjacent batches with the same winner become one rule.

A candidate runs through the same path as a table row: each is a row of a scratch table that
the backend reads with PAGED_ATTENTION_TUNING_TABLE/_DEVICE pointing at it, so what is timed
is what the written table will run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import devices, settings, tuning
from ..errors import InvalidInput
from .benches import parse_sizes
from .tune_measure import DEFAULT_NAME, TuneUnavailable, measurer

# Settings that win over the table, so over every candidate: tune refuses to run under them.
OVERRIDES = {"mlx": ("mlx_variant", "mlx_splitk"),
             "vulkan": ("vk_wg", "vk_unroll", "vk_tpt", "vk_chunk", "vk_split_occupancy")}


@dataclass(frozen=True)
class Candidate:
    label: str   # its parameters as text, e.g. 'iters=4,stream=2' (a row key of the scratch table)
    params: dict = field(default_factory=dict, hash=False, compare=False)


def candidate(**params) -> Candidate:
    """A candidate named by its parameters, e.g. 'iters=4,stream=2'; no parameter: 'default'."""
    return Candidate(",".join(f"{k}={v}" for k, v in params.items()) or DEFAULT_NAME, params)


DEFAULT = candidate()


def mlx_candidates(which: str) -> list[Candidate]:
    """quick: single knobs and the pairs the H100 sweeps (ADR 0004) and the first H200
    exploration found close, the per-warp softmax (ws) alone and with each, and finer splits;
    full: every combination of the kernel's variant knobs (ws, prefetch, iters, stream, warps,
    l2), then every split-K constant pair (ctas_per_unit, min_part_tokens) with and without ws."""
    if which == "quick":
        return [DEFAULT] + [candidate(**p) for p in (
            {"prefetch": True}, {"iters": 4}, {"stream": 1}, {"stream": 2},
            {"warps": 8, "iters": 4}, {"prefetch": True, "iters": 8},
            {"ctas_per_unit": 2}, {"ctas_per_unit": 4}, {"ctas_per_unit": 6, "min_part_tokens": 128},
            {"ws": True}, {"ws": True, "prefetch": True}, {"ws": True, "prefetch": True, "iters": 8},
            {"ws": True, "stream": 1}, {"ws": True, "iters": 4}, {"ws": True, "warps": 8},
            {"ws": True, "ctas_per_unit": 2}, {"ws": True, "ctas_per_unit": 4},
            # Finer splits (the wave model then fills 8-24 threadgroups per SM: more, shorter
            # partitions, up to 12 at 32 x 32k): what a lone kernel's ragged end should favour
            # in serial timing (ADR 0004, "Serial timing").
            {"ctas_per_unit": 8}, {"ws": True, "ctas_per_unit": 8},
            {"ws": True, "stream": 1, "ctas_per_unit": 8},
            {"ws": True, "ctas_per_unit": 12, "min_part_tokens": 128},
            {"ws": True, "stream": 1, "ctas_per_unit": 24, "min_part_tokens": 128})]
    variants = [candidate(ws=bool(ws), prefetch=bool(pf), iters=it, stream=nc, warps=w, l2=l2)
                for ws, pf, it, nc, w, l2 in itertools.product((0, 1), (0, 1), (2, 4, 8),
                                                               (0, 1, 2, 3), (4, 8), (0, 1))]
    split = [candidate(ws=bool(ws), ctas_per_unit=c, min_part_tokens=m)
             for ws, c, m in itertools.product((0, 1), (2, 3, 4, 6, 8, 12, 24), (128, 256, 512))]
    return [DEFAULT] + variants + split


def vulkan_candidates(which: str) -> list[Candidate]:
    """full: wg x unroll x split occupancy (workgroups per CU at low fill) x min chunk x
    workgroups per CU past it; quick: each knob alone, the pairs ADR 0008's sweeps touched, and
    finer splits at B=8-32."""
    if which == "quick":
        return [DEFAULT] + [candidate(**p) for p in (
            {"wg": 256}, {"wg": 1024}, {"unroll": 2}, {"unroll": 4}, {"unroll": 8},
            {"split_occupancy": 1.0}, {"split_occupancy": 3.0}, {"split_occupancy": 4.0},
            {"min_chunk": 256}, {"min_chunk": 1024}, {"wg": 256, "unroll": 4},
            {"split_occupancy": 4.0, "min_chunk": 256}, {"wg": 256, "split_occupancy": 3.0},
            {"wg": 256, "split_occupancy": 4.0, "min_chunk": 256}, {"wg": 256, "unroll": 8},
            # Split-K past a quarter fill (B=8-32 at Hkv 8): more, shorter workgroups than the
            # built-in 1.5 per CU, for a lone layer's ragged end (ADR 0004, "Serial timing").
            {"per_cu": 3.0}, {"per_cu": 6.0}, {"wg": 256, "per_cu": 3.0})]
    return [DEFAULT] + [candidate(wg=wg, unroll=u, split_occupancy=occ, min_chunk=mc, per_cu=pc)
                        for wg, u, occ, mc, pc in itertools.product(
                            (256, 512, 1024), (2, 4, 8), (1.0, 1.5, 2.0, 3.0, 4.0),
                            (256, 512, 1024), (1.5, 3.0))]


CANDIDATES = {"mlx": mlx_candidates, "vulkan": vulkan_candidates}


# -- selection ------------------------------------------------------------------------------------

def scores(times: dict[str, dict[int, float]], contexts: list[int]) -> dict[str, float]:
    """Per candidate: the geometric mean over `contexts` of its time / the best time there;
    inf for a candidate missing a context (it failed there)."""
    best = {c: min((t[c] for t in times.values() if c in t), default=math.inf) for c in contexts}
    out = {}
    for name, t in times.items():
        if any(c not in t for c in contexts):
            out[name] = math.inf
        else:
            out[name] = math.exp(sum(math.log(t[c] / best[c]) for c in contexts) / len(contexts))
    return out


def select(times: dict[str, dict[int, float]], contexts: list[int]) -> str | None:
    """The lowest score; a tie goes to the earlier candidate (the default comes first). None
    when no candidate ran at every context."""
    s = scores(times, contexts)
    finite = [n for n in times if math.isfinite(s[n])]
    return min(finite, key=lambda n: s[n]) if finite else None


def merge(winners: list[tuple[int, str]]) -> list[tuple[int | None, str]]:
    """(batch, winner) per batch class -> rules (max_batch, winner): adjacent batches with the
    same winner merged, the last rule open-ended (max_batch None: any larger batch)."""
    rules: list[list] = []
    for batch, name in sorted(winners):
        if rules and rules[-1][1] == name:
            rules[-1][0] = batch
        else:
            rules.append([batch, name])
    if rules:
        rules[-1][0] = None
    return [(mb, name) for mb, name in rules]


# -- candidates as table rows ------------------------------------------------------------------------

@contextlib.contextmanager
def candidate_table(backend: str, cands: list[Candidate]):
    """A scratch tuning table with one row per candidate (keyed by its name); yields use(name),
    a context manager under which the backend reads that candidate's row."""
    with tempfile.TemporaryDirectory(prefix="paged-attn-tune-") as tmp:
        path = Path(tmp) / "candidates.json"
        rows = {c.label: {backend: {"rules": [{"max_batch": None, "params": c.params}]}}
                for c in cands}
        path.write_text(json.dumps({"rows": rows}))
        tuning.load(str(path))   # a malformed candidate fails here, before anything runs

        def use(name):
            return settings.override(tuning_table=str(path), tuning_device=name)
        yield use


# -- the command ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--backend", required=True, choices=sorted(CANDIDATES))
    p.add_argument("--batches", default="1,4,8,32", help="batch classes (default 1,4,8,32)")
    p.add_argument("--contexts", default="4k,16k,32k", help="contexts per batch (default 4k,16k,32k)")
    p.add_argument("--candidates", choices=("quick", "full"), default="quick",
                   help="quick: a chosen set (mlx_candidates / vulkan_candidates); full: the "
                        "whole grid")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--layers", type=int, default=8, help="layers per timed step")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per candidate and point")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pool-budget-gb", type=float, default=8.0,
                   help="memory for the distinct K/V pools rotated across layers (so small points "
                        "are not served from L2)")
    p.add_argument("--write", action="store_true",
                   help="replace this device's row of the tuning table with the winners")
    p.add_argument("--device-key", default=None,
                   help="the devices.py key to write (default: the device's own)")
    p.add_argument("--table", default=None,
                   help="the table to write (default: $PAGED_ATTENTION_TUNING_TABLE, else the "
                        "shipped paged_attention/tuning.json)")
    p.add_argument("--out", default=None, help="a directory for report.json and summary.txt")
    p.add_argument("--json", default=None, help="also write the report here (one JSON document)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(a: argparse.Namespace) -> int:
    """The CLI entry: exit 0 done, 1 no candidate ran somewhere, 2 cannot run here / bad input."""
    try:
        batches, contexts = (sorted(set(parse_sizes(x))) for x in (a.batches, a.contexts))
        m = measurer(a)   # imports the backend, which declares its settings
        set_ = [n for n in OVERRIDES[a.backend] if getattr(settings.get(), n) not in (None, "")]
        if set_:
            raise InvalidInput(
                "these settings win over the tuning table, so every candidate would run the same: "
                + ", ".join("$" + settings.PREFIX + next(k.env for k in settings.declared()
                                                         if k.field == n) for n in set_)
                + "; unset them to tune")
        key = a.device_key or devices.lookup(m.device).key
        if a.write and key not in {k for k, *_ in devices.DEVICES}:
            raise InvalidInput(
                f"--write: device {m.device!r} is not in paged_attention/devices.py "
                f"(key {key!r}); pass --device-key with one of "
                f"{[k for k, *_ in devices.DEVICES]}, or add the device there first")
    except (TuneUnavailable, InvalidInput) as e:
        print(f"paged-attn tune: {e}", file=sys.stderr)
        return 2
    report = tune(m, CANDIDATES[a.backend](a.candidates), batches, contexts, a)
    report.update(device_key=key, command=" ".join(["paged-attn", *getattr(a, "argv", ["tune"])]))
    print(summary(report))
    save(report, a)
    if report["rules"] is None:
        print("paged-attn tune: no candidate ran at every point of some batch; nothing written",
              file=sys.stderr)
        return 1
    if a.write:
        path = a.table or tuning.table_path()
        tuning.write_row(path, key, a.backend, report["rules"], provenance(report))
        print(f"wrote the {a.backend} row of {key!r} to {path}")
    return 0


def tune(m, cands: list[Candidate], batches: list[int], contexts: list[int], a) -> dict:
    """Measure every candidate at every point with measurer `m` (m.point(batch, context, cands,
    use) -> ({name: seconds per layer}, {name: error}, {name: extra facts})); pick and merge."""
    points, winners = [], []
    with candidate_table(m.backend, cands) as use:
        for batch in batches:
            per: dict[str, dict[int, float]] = {c.label: {} for c in cands}
            for ctx in contexts:
                secs, errors, facts = m.point(batch, ctx, cands, use)
                for name, s in secs.items():
                    per[name][ctx] = s
                points.append({"batch": batch, "context": ctx, "kv_bytes": m.kv_bytes(batch, ctx),
                               "seconds": secs, "errors": errors, "facts": facts})
                print(point_table(points[-1], cands, m.peak), flush=True)
            winner = select(per, contexts)
            if winner is None:
                return {"backend": m.backend, "device": m.device, "points": points,
                        "rules": None, "winners": winners, "grid": grid(a, batches, contexts)}
            winners.append((batch, winner, scores(per, contexts)[winner], per[winner],
                            per.get(DEFAULT.label, {})))
    by_name = {c.label: c.params for c in cands}
    rules = [{"max_batch": mb, "params": by_name[name]}
             for mb, name in merge([(b, n) for b, n, *_ in winners])]
    return {"backend": m.backend, "device": m.device, "peak_bytes_per_s": m.peak,
            "versions": m.versions, "points": points, "grid": grid(a, batches, contexts),
            "winners": [{"batch": b, "candidate": n, "score": s,
                         "us": {str(c): t * 1e6 for c, t in ts.items()},
                         "default_us": {str(c): t * 1e6 for c, t in ds.items()}}
                        for b, n, s, ts, ds in winners],
            "rules": rules}


def grid(a, batches, contexts) -> dict:
    return {"batches": batches, "contexts": contexts, "candidates": a.candidates, "hq": a.hq,
            "hkv": a.hkv, "head_dim": a.head_dim, "block_size": a.block_size, "dtype": a.dtype,
            "layers": a.layers, "repeats": a.repeats}


def provenance(report: dict) -> dict:
    return {"command": report["command"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": report["device"], "versions": report["versions"], "grid": report["grid"],
            "chosen": report["winners"]}


def point_table(p: dict, cands: list[Candidate], peak: float | None) -> str:
    """One point's table: candidate, us per layer, effective TB/s, % of the device's peak."""
    lines = [f"B={p['batch']} ctx={p['context']}: candidate | us/layer | TB/s | %peak"]
    best = min(p["seconds"].values(), default=None)
    for c in cands:
        if c.label in p["errors"]:
            lines.append(f"  {c.label:42s} | skipped: {p['errors'][c.label]}")
            continue
        s = p["seconds"].get(c.label)
        if s is None:
            continue
        tbs = p["kv_bytes"] / s / 1e12
        pct = f"{tbs * 1e12 / peak * 100:5.1f}" if peak else "    -"
        mark = " *" if s == best else ""
        lines.append(f"  {c.label:42s} | {s * 1e6:9.1f} | {tbs:6.3f} | {pct}{mark}")
    return "\n".join(lines)


def summary(report: dict) -> str:
    lines = [f"tune {report['backend']} on {report['device']}:"]
    for w in report["winners"]:
        us = ", ".join(f"{c}: {t:.1f}" for c, t in w["us"].items())
        du = ", ".join(f"{c}: {t:.1f}" for c, t in w["default_us"].items())
        lines.append(f"  B={w['batch']}: {w['candidate']} (score {w['score']:.3f}) us/layer "
                     f"{us}; default {du}")
    if report["rules"] is not None:
        lines.append("rules: " + json.dumps(report["rules"]))
    return "\n".join(lines)


def save(report: dict, a) -> None:
    text = json.dumps(report, indent=1, default=str)
    if a.json:
        Path(a.json).write_text(text + "\n")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(text + "\n")
        (out / "summary.txt").write_text(summary(report) + "\n")
