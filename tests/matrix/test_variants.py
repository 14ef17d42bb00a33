"""Attention variants (ADR 0010): soft-cap, ALiBi, sinks, the log-sum-exp and merge_states,
against the float64 reference, on every backend x path that lists them in `variants`; the
others refuse them by name, before anything is written."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from paged_attention import reference
from paged_attention.errors import InvalidInput, UnsupportedPath

HKV, D, BS, NB = 2, 32, 4, 16
FEATURES = ("soft_cap", "alibi_slopes", "return_lse", "sinks")


def setup(backend, rng, dtype="float32"):
    pool = backend.create_pool(NB, BS, HKV, D, dtype)
    k = rng.standard_normal((NB * BS, HKV, D)).astype(np.float32)
    v = rng.standard_normal((NB * BS, HKV, D)).astype(np.float32)
    backend.write_kv(pool, np.arange(NB * BS), k, v)
    return pool


def supports(backend, path, feats) -> bool:
    return set(feats) <= set(backend.variants.get(path, ()))


TABLES = np.array([[3, 0, 7, 4, 2], [5, 1, 0, 0, 0], [8, 9, 10, 11, 6]], np.int32)
LENS = np.array([19, 2, 17], np.int32)

CASES = [  # (soft_cap, alibi, sinks, return_lse, window, query_lens, group)
    (30.0, False, False, True, None, None, 1),
    (2.0, False, False, False, None, [5, 0, 4], 4),
    (None, True, False, True, None, [5, 2, 4], 2),
    (None, False, True, True, 6, None, 4),
    (1.5, True, True, True, 5, [3, 1, 4], 2),
    (None, True, True, False, None, [1, 1, 1], 1),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_variants_match_the_reference(impl, dtype, case):
    backend, path = impl
    cap, alibi, use_sinks, lse_on, window, qlens, group = CASES[case]
    feats = [f for f, on in zip(FEATURES, (cap is not None, alibi, lse_on, use_sinks)) if on]
    if dtype not in backend.pool_dtypes:
        pytest.skip(f"{backend.name} has no {dtype} pools")
    rng = np.random.default_rng(case)
    pool = setup(backend, rng, dtype)
    hq = HKV * group
    slopes = (rng.uniform(0.05, 0.5, hq) * -1).astype(np.float32) if alibi else None
    sinks = rng.standard_normal(hq).astype(np.float32) if use_sinks else None
    kw = dict(num_q_heads=hq, query_lens=qlens, window=window, soft_cap=cap,
              alibi_slopes=slopes, return_lse=lse_on, path=path)
    plan_feats = [f for f in feats if f != "sinks"]
    if not supports(backend, path, plan_feats):
        with pytest.raises(UnsupportedPath, match=plan_feats[0]):
            backend.plan(pool, TABLES, LENS, **kw)
        return
    plan = backend.plan(pool, TABLES, LENS, **kw)
    n = plan.num_rows
    q = rng.standard_normal((n, hq, D)).astype(np.float32)
    qx = backend.from_numpy(q, dtype if dtype in backend.q_dtypes else "float32")
    if use_sinks and not supports(backend, path, ["sinks"]):
        with pytest.raises(UnsupportedPath, match="sinks"):
            backend.run(plan, qx, pool, sinks=sinks)
        return
    got = backend.run(plan, qx, pool, sinks=sinks)
    out, lse = got if lse_on else (got, None)
    k, v = pool.to_numpy()
    want, want_lse = reference.step(backend.to_numpy(qx), k, v, plan.args, sinks)
    # float32: 1e-3, not 1e-4, as tests/matrix/test_plan_run.py: on CUDA MLX's float32 matmuls
    # of a prompt chunk's variant attention give 1.1e-4 (H200, 2026-12-05).
    tol = 5e-3 if dtype != "float32" else 1e-3
    assert reference.rms(backend.to_numpy(out), want) < tol
    if lse_on:
        lse = backend.to_numpy(lse)
        assert lse.shape == (n, hq) and lse.dtype == np.float32
        np.testing.assert_allclose(lse, want_lse, atol=50 * tol, rtol=0)


def test_a_query_that_sees_nothing_gives_zero_and_minus_inf(impl):
    backend, path = impl
    if not supports(backend, path, ["return_lse", "sinks"]):
        pytest.skip(f"{backend.name}/{path} does not implement return_lse and sinks yet")
    rng = np.random.default_rng(3)
    pool = setup(backend, rng)
    plan = backend.plan(pool, TABLES[:2], np.array([0, 5]), num_q_heads=HKV, return_lse=True,
                        path=path)
    q = rng.standard_normal((2, HKV, D)).astype(np.float32)
    out, lse = (backend.to_numpy(a) for a in backend.run(plan, q, pool))
    assert not out[0].any() and np.all(np.isneginf(lse[0])) and np.isfinite(lse[1]).all()
    sinks = np.array([0.5, -1.0], np.float32)
    out, lse = (backend.to_numpy(a) for a in backend.run(plan, q, pool, sinks=sinks))
    assert not out[0].any() and np.allclose(lse[0], sinks)   # the sink alone is the denominator


@pytest.mark.parametrize("cap", [None, 20.0])
def test_merge_states_of_disjoint_key_sets_is_the_whole(impl, cap):
    """Cascade attention: a shared prefix of whole blocks and each sequence's own suffix
    attended separately (return_lse), then merged, equal attention over the whole context."""
    backend, path = impl
    if not supports(backend, path, ["return_lse"] + (["soft_cap"] if cap else [])):
        pytest.skip(f"{backend.name}/{path} does not implement return_lse yet")
    rng = np.random.default_rng(4)
    pool = setup(backend, rng)
    prefix = np.array([[3, 0], [3, 0]], np.int32)                 # 8 shared tokens
    suffix = np.array([[7, 4, 2], [5, 1, 9]], np.int32)
    lens_suffix = np.array([9, 6])
    q = rng.standard_normal((2, 2 * HKV, D)).astype(np.float32)
    run = lambda t, l: backend.run(backend.plan(pool, t, l, num_q_heads=2 * HKV, soft_cap=cap,
                                                return_lse=True, path=path), q, pool)
    oa, la = run(prefix, np.array([8, 8]))
    ob, lb = run(suffix, lens_suffix)
    out, lse = backend.merge_states(oa, la, ob, lb)
    whole = np.concatenate([prefix, suffix], axis=1)
    plan = backend.plan(pool, whole, 8 + lens_suffix, num_q_heads=2 * HKV, soft_cap=cap,
                        return_lse=True, path=path)
    want, want_lse = backend.run(plan, q, pool)
    assert reference.rms(backend.to_numpy(out), backend.to_numpy(want)) < 1e-5
    np.testing.assert_allclose(backend.to_numpy(lse), backend.to_numpy(want_lse), atol=1e-4)


BAD_PLAN = [
    (dict(soft_cap=0.0), "soft_cap"), (dict(soft_cap=-1), "soft_cap"),
    (dict(soft_cap=float("inf")), "soft_cap"), (dict(soft_cap=float("nan")), "soft_cap"),
    (dict(soft_cap="30"), "soft_cap"), (dict(soft_cap=True), "soft_cap"),
    (dict(alibi_slopes=np.ones(3, np.float32)), "alibi_slopes"),
    (dict(alibi_slopes=np.ones((2, 2), np.float32)), "alibi_slopes"),
    (dict(alibi_slopes=np.ones(4, np.int32)), "alibi_slopes"),
    (dict(alibi_slopes=np.array([1, np.nan, 1, 1], np.float32)), "alibi_slopes"),
    (dict(alibi_slopes="slopes"), "alibi_slopes"),
    (dict(return_lse="yes"), "return_lse"),
]


@pytest.mark.parametrize("kw,name", BAD_PLAN, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_PLAN)])
def test_bad_variant_arguments_are_refused_by_name(backend, kw, name):
    pool = setup(backend, np.random.default_rng(0))
    with pytest.raises(InvalidInput, match=name):
        backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV, **kw)


@pytest.mark.parametrize("sinks", [np.ones(3, np.float32), np.ones(4, np.int64),
                                   np.array([0, 1, np.inf, 0], np.float32), "sinks"])
def test_bad_sinks_are_refused_before_anything_is_written(backend, sinks):
    rng = np.random.default_rng(1)
    pool = setup(backend, rng)
    before = pool.to_numpy()
    path = next((p for p in backend.paths if "sinks" in backend.variants.get(p, ())), None)
    if path is None:
        pytest.skip(f"no path of {backend.name} implements sinks yet")
    plan = backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV, slot_mapping=[60, 61, 62],
                        path=path)
    q = rng.standard_normal((3, 2 * HKV, D)).astype(np.float32)
    kv = rng.standard_normal((3, HKV, D)).astype(np.float32)
    with pytest.raises(InvalidInput, match="sinks"):
        backend.run(plan, q, pool, kv, kv, sinks=sinks)
    after = pool.to_numpy()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_merge_states_refuses_mismatched_shapes(backend):
    o = np.zeros((2, 4, D), np.float32)
    lse = np.zeros((2, 4), np.float32)
    for args, name in [((o, lse, o[:1], lse), "out_b"), ((o, lse[:, :2], o, lse), "lse_a"),
                       ((o, lse, o, lse.astype(np.int32)), "lse_b"), ((o[0], lse, o, lse), "out_a")]:
        with pytest.raises(InvalidInput, match=name):
            backend.merge_states(*args)


def test_plain_plans_keep_the_plain_kernels(impl, monkeypatch):
    """A plan without variants goes to the backend's plain `_run` (the kernels as before)."""
    backend, path = impl
    pool = setup(backend, np.random.default_rng(2))
    plan = backend.plan(pool, TABLES, LENS, num_q_heads=HKV, path=path)
    assert plan.args.variant.plain and plan.args.variant.features() == ()
    calls = []
    plain = type(backend)._run
    monkeypatch.setattr(type(backend), "_run", lambda *a: calls.append(1) or plain(*a))
    out = backend.run(plan, np.zeros((3, HKV, D), np.float32), pool)
    assert calls == [1] and backend.to_numpy(out).shape == (3, HKV, D)
