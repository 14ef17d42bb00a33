"""Greedy agreement of quantized KV with plain KV: what a format does to a model's tokens.

An experiment's `greedy` section names a random mlx-lm model (a config dict; weights from the
seed, nothing downloaded), prompt lengths and a number of steps. Per backend and path, the
engine (`integrations.mlx_lm.generate`, greedy, no stop tokens) generates `steps` tokens for
every prompt on plain pools (the model's dtype), then once per quantized kv_dtype of the grid;
a record says which fraction of the tokens equal the plain run's, position by position, and
the first step where a prompt's tokens part (None: no prompt's did). Random weights make
near-ties of the top two logits common, so an early divergence is not by itself a defect: the
error figures of the decode points say how far attention moved. A path that does not read a
format (`backend.kv_formats`) gets a skipped record with the reason.
"""
from __future__ import annotations

import time

import numpy as np

from ...errors import PagedAttentionError
from ...kv_formats import KVFormat
from . import measure as M

MEASUREMENT = "greedy"


def formats(points: list[dict]) -> list[tuple[str, int | None]]:
    """The quantized (kv_dtype, kv_group_size) pairs of the grid's points, in order."""
    return list(dict.fromkeys((p["kv_dtype"], p["kv_group_size"]) for p in points
                              if p["kv_dtype"] is not None))


def agreement(got: list[list[int]], base: list[list[int]]) -> dict:
    """Position-by-position agreement of each prompt's tokens with the baseline's."""
    equal = total = 0
    firsts = []
    for g, b in zip(got, base):
        same = [x == y for x, y in zip(g, b)] + [False] * abs(len(g) - len(b))
        equal += sum(same)
        total += len(same)
        firsts.append(next((i for i, s in enumerate(same) if not s), None))
    parted = [f for f in firsts if f is not None]
    return {"tokens_equal": equal / total if total else None,
            "first_divergence": min(parted) if parted else None,
            "first_divergences": firsts}


def measure(exp_name: str, live: dict, choose, greedy: dict, fmts: list
            ) -> list[dict]:
    """Records for every backend in `live` (name -> backend), path (`choose(backend)`: the
    experiment's [(path, skip reason)]) and quantized format in `fmts`."""
    if not fmts:
        return []

    def row(be, path, kv, group, **more):
        return {"experiment": exp_name, "measurement": MEASUREMENT, "backend": be.name,
                "device": be.device, "path": path, "kv_dtype": kv, "kv_group_size": group,
                "steps": greedy["steps"], "prompts": len(greedy["prompts"]),
                "model": greedy["model"]["model_type"], **more}

    try:
        from ...integrations import mlx_lm as pl
        model = pl.random_model(greedy["model"], seed=greedy["seed"])
        vocab = pl.inspect_model(model).vocab_size
    except ImportError as exc:
        why = f"greedy agreement needs mlx-lm (the mlx-lm extra): {exc}"
        return [row(be, "-", kv, g, status="skipped", note=why)
                for be in live.values() for kv, g in fmts]
    except Exception as exc:  # noqa: BLE001 - a config mlx-lm refuses: recorded, the run goes on
        why = f"greedy.model: mlx-lm cannot build it: {type(exc).__name__}: {exc}"
        return [row(be, "-", kv, g, status="error", note=why)
                for be in live.values() for kv, g in fmts]
    rng = np.random.default_rng(greedy["seed"])
    prompts = [rng.integers(0, vocab, n).tolist() for n in greedy["prompts"]]

    rows = []
    for be in live.values():
        for path, why in choose(be):
            if path == "dense":
                continue
            base, base_s = None, None
            for kv, group in fmts:
                reason = why or M.format_unread(be, path, kv)
                if reason:
                    rows.append(row(be, path, kv, group, status="skipped", note=reason))
                    continue
                try:
                    if base is None:
                        t0 = time.perf_counter()
                        base = _generate(pl, model, prompts, greedy["steps"], be, path, {})
                        base_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    got = _generate(pl, model, prompts, greedy["steps"], be, path,
                                    {"kv_dtype": kv, "kv_group_size": group or 64})
                    rows.append(row(be, path, kv, group, status="ok", note="",
                                    **agreement(got, base), greedy_s=time.perf_counter() - t0,
                                    plain_greedy_s=base_s))
                except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                    status = "skipped" if isinstance(exc, PagedAttentionError) else "error"
                    rows.append(row(be, path, kv, group, status=status,
                                    note=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"))
    return rows


def _generate(pl, model, prompts, steps, be, path, kv) -> list[list[int]]:
    return pl.generate(model, prompts, max_tokens=steps, backend=be, path=path, stop_tokens=(),
                       **kv)


def label(kv: str | None, group: int | None) -> str:
    """A format's short name in tables and plots: 'plain', 'int8 g64', 'float8_e4m3'."""
    if kv is None:
        return "plain"
    return f"{kv} g{group}" if KVFormat(kv).affine else kv
