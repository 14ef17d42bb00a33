"""plan/run, the API a model's decode loop calls: what plan() rejects, what run() rejects, that a
rejected call leaves the pool as it was, and that a plan is immutable and reusable across layers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import paged_attention as pa
from paged_attention import reference

HKV, D, BS, NB = 2, 32, 4, 12


def make_pool(backend, rng, dtype="float32"):
    pool = backend.create_pool(NB, BS, HKV, D, dtype)
    k = rng.standard_normal((NB * BS, HKV, D)).astype(np.float32)
    v = rng.standard_normal((NB * BS, HKV, D)).astype(np.float32)
    backend.write_kv(pool, np.arange(NB * BS), k, v)
    return pool


def unchanged(backend, pool, before):
    k, v = pool.to_numpy()
    return np.array_equal(k, before[0]) and np.array_equal(v, before[1])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


TABLES = np.array([[3, 0, 7], [5, 1, 2]], np.int32)
LENS = np.array([9, 6], np.int32)


def test_ragged_plan_is_reused_across_layers(impl, rng):
    """One plan, several pools (layers): each run writes its own pool, then attends over it."""
    backend, path = impl
    pools = [make_pool(backend, rng) for _ in range(3)]
    qlens = np.array([4, 1])
    # The newest tokens: sequence 0's positions 5..8 (blocks 0, 0, 0, 7), sequence 1's position 5.
    slots = np.array([0 * BS + 1, 0 * BS + 2, 0 * BS + 3, 7 * BS + 0, 1 * BS + 1])
    plan = backend.plan(pools[0], TABLES, LENS, num_q_heads=2 * HKV, query_lens=qlens,
                        slot_mapping=slots, path=path)
    assert plan.num_rows == 5 and plan.path == path and plan.batch == 2
    for pool in pools:
        q = rng.standard_normal((5, 2 * HKV, D)).astype(np.float32)
        k = rng.standard_normal((5, HKV, D)).astype(np.float32)
        v = rng.standard_normal((5, HKV, D)).astype(np.float32)
        out = backend.run(plan, q, pool, k, v)
        assert isinstance(out, backend.array_type)
        kk, vv = pool.to_numpy()
        b, off = np.divmod(slots, BS)
        assert np.allclose(kk[b, off], k) and np.allclose(vv[b, off], v)
        ref = reference.ragged(q, kk, vv, TABLES, LENS, qlens)
        # 1e-3, not 1e-4: on CUDA, MLX's SDPA for a chunk of several queries (the gather path's
        # prefill segment) is TF32-accurate in float32 (RMS 1.2e-4 measured on the H100).
        assert reference.rms(backend.to_numpy(out), ref) < 1e-3


def test_plan_is_immutable(backend, rng):
    pool = make_pool(backend, rng)
    plan = backend.plan(pool, TABLES, LENS, num_q_heads=HKV, query_lens=[2, 3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.path = "other"
    with pytest.raises(ValueError):
        plan.block_tables[0, 0] = 1   # host arrays are read-only
    with pytest.raises(ValueError):
        plan.qo_indptr[1] = 0
    with pytest.raises(ValueError):
        plan.query_lens[0] = 1


BAD_PLAN = [
    (dict(num_q_heads=3), "num_q_heads"),
    (dict(num_q_heads=0), "num_q_heads"),
    (dict(query_lens=[1, 7]), "query_lens"),         # more queries than tokens
    (dict(query_lens=[1, -1]), "query_lens"),
    (dict(query_lens=[1]), "query_lens"),
    (dict(slot_mapping=[0, NB * BS]), "slot_mapping"),
    (dict(slot_mapping=[4, 4]), "distinct"),
    (dict(tables=np.array([[3, 0, 12], [5, 1, 2]], np.int32)), "block_tables"),
    (dict(lens=np.array([9, 13], np.int32)), "context_lens"),
    (dict(window=0), "window"),
]


@pytest.mark.parametrize("bad,match", BAD_PLAN, ids=[m + str(i) for i, (_, m) in enumerate(BAD_PLAN)])
def test_bad_plan_raises_naming_the_argument(backend, rng, bad, match):
    pool = make_pool(backend, rng)
    before = pool.to_numpy()
    args = dict(tables=TABLES, lens=LENS, num_q_heads=2 * HKV, query_lens=None, slot_mapping=None,
                window=None)
    args.update(bad)
    with pytest.raises(pa.InvalidInput, match=match):
        backend.plan(pool, args["tables"], args["lens"], num_q_heads=args["num_q_heads"],
                     query_lens=args["query_lens"], slot_mapping=args["slot_mapping"],
                     window=args["window"])
    assert unchanged(backend, pool, before)


def _bad_runs(backend, rng, pool):
    other = backend.create_pool(NB, BS, HKV, 2 * D, "float32")
    q = np.zeros((2, 2 * HKV, D), np.float32)
    kv = np.ones((2, HKV, D), np.float32)
    return [
        (dict(plan="not a plan"), "plan"),
        (dict(pool=other), "geometry"),
        (dict(q=np.zeros((3, 2 * HKV, D), np.float32)), "rows"),
        (dict(q=np.zeros((2, HKV, D), np.float32)), "Hq"),
        (dict(q=q.astype(np.int32)), "dtype"),
        (dict(k=kv), "both"),
        (dict(k=np.ones((3, HKV, D), np.float32), v=np.ones((3, HKV, D), np.float32)), "k: expected shape"),
        (dict(k=kv.astype(np.int32), v=kv.astype(np.int32)), "k: expected a float dtype"),
    ]


def test_bad_run_raises_before_anything_is_written(backend, rng):
    pool = make_pool(backend, rng)
    before = pool.to_numpy()
    plan = backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV, slot_mapping=[1, 2])
    good = dict(plan=plan, q=np.zeros((2, 2 * HKV, D), np.float32), pool=pool,
                k=np.ones((2, HKV, D), np.float32), v=np.ones((2, HKV, D), np.float32))
    for bad, match in _bad_runs(backend, rng, pool):
        args = dict(good, **bad)
        if "k" in bad and "v" not in bad:
            args["v"] = None
        with pytest.raises(pa.InvalidInput, match=match):
            backend.run(args["plan"], args["q"], args["pool"], args["k"], args["v"])
        assert unchanged(backend, pool, before), bad
    # k/v given to a plan made without slots: refused, not silently dropped.
    plain = backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV)
    with pytest.raises(pa.InvalidInput, match="slot_mapping"):
        backend.run(plain, good["q"], pool, good["k"], good["v"])
    assert unchanged(backend, pool, before)


def test_plan_of_another_backend_instance_is_refused(backend, rng):
    pool = make_pool(backend, rng)
    plan = backend.plan(pool, TABLES, LENS, num_q_heads=HKV)
    other = pa.get_backend(backend.name)
    try:
        with pytest.raises(pa.InvalidInput, match="plan"):
            other.run(plan, np.zeros((2, HKV, D), np.float32), pool)
    finally:
        other.close()


def test_native_arrays_pass_through(backend, rng):
    """Tables, lengths and q in the backend's own array type give the same answer as numpy, in the
    backend's own array type."""
    pool = make_pool(backend, rng)
    q = rng.standard_normal((2, 2 * HKV, D)).astype(np.float32)
    want = backend.to_numpy(backend.decode(q, pool, TABLES, LENS))
    native = backend.array_type
    if native is np.ndarray:
        pytest.skip(f"backend {backend.name!r} works on numpy arrays")
    plan = backend.plan(pool, native(TABLES), native(LENS), num_q_heads=2 * HKV)
    out = backend.run(plan, native(q), pool)
    assert isinstance(out, native)
    assert np.allclose(backend.to_numpy(out), want, atol=1e-6)


def test_path_resolution_is_memoised_but_follows_settings(backend, rng):
    """plan() resolves a path named outright once per geometry (it runs every step): a bad name
    still raises every time, and $PAGED_ATTENTION_PATH (settings) still steers path='auto'."""
    from paged_attention import settings
    pool = make_pool(backend, rng)
    for path in backend.paths:
        for _ in range(2):
            assert backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV, path=path).path == path
        with settings.override(path=path):
            assert backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV).path == path
    for _ in range(2):
        with pytest.raises(pa.UnsupportedPath, match="no_such_path"):
            backend.plan(pool, TABLES, LENS, num_q_heads=2 * HKV, path="no_such_path")


def test_unused_table_entries_never_change_the_output(backend, rng):
    """Entries past a row's used blocks may hold anything: block ids (taken as they are) or
    garbage (zeroed); either way the plan attends the same blocks."""
    pool = make_pool(backend, rng)
    q = rng.standard_normal((2, 2 * HKV, D)).astype(np.float32)
    lens = np.array([5, 2], np.int32)           # rows use 2 and 1 of their 3 entries
    valid = TABLES.copy()                       # unused entries are block ids
    garbage = TABLES.copy()
    garbage[0, 2], garbage[1, 1:] = -5, 10**6
    outs = []
    for tables in (valid, garbage):
        plan = backend.plan(pool, tables, lens, num_q_heads=2 * HKV)
        assert (plan.block_tables >= 0).all() and (plan.block_tables < NB).all()
        outs.append(backend.to_numpy(backend.run(plan, q, pool)))
    np.testing.assert_array_equal(outs[0], outs[1])
    k, v = pool.to_numpy()
    want = reference.decode(q, k.reshape(NB, BS, HKV, D), v.reshape(NB, BS, HKV, D), valid, lens)
    np.testing.assert_allclose(outs[0], want, rtol=2e-3, atol=2e-3)


def test_decode_loop_of_growing_sequences_matches_reference(impl, rng):
    """A model's decode loop: each step every sequence gains one token (written by run() at the
    plan's slots, then attended), a sequence crossing into a new block gets one appended to its
    table row (so some steps reuse the last step's table and some change it)."""
    backend, path = impl
    nb = 24
    pool = backend.create_pool(nb, BS, HKV, D, "float32")
    free = list(rng.permutation(nb))
    lens = np.array([3, 7, 1], np.int32)
    tables = np.zeros((3, 6), np.int32)
    for b, n in enumerate(lens):
        tables[b, :-(-n // BS)] = [free.pop() for _ in range(-(-n // BS))]
    k_all = np.zeros((nb * BS, HKV, D), np.float32)
    v_all = np.zeros_like(k_all)
    pos = np.concatenate([tables[b, np.arange(n) // BS] * BS + np.arange(n) % BS
                          for b, n in enumerate(lens)])
    k_all[pos] = rng.standard_normal((pos.size, HKV, D))
    v_all[pos] = rng.standard_normal((pos.size, HKV, D))
    backend.write_kv(pool, pos, k_all[pos], v_all[pos])
    for step in range(14):
        for b, n in enumerate(lens):
            if n % BS == 0:                        # the new token opens a block
                tables[b, n // BS] = free.pop()
        slots = tables[np.arange(3), lens // BS].astype(np.int64) * BS + lens % BS
        lens = lens + 1
        plan = backend.plan(pool, tables, lens, num_q_heads=2 * HKV, slot_mapping=slots, path=path)
        q = rng.standard_normal((3, 2 * HKV, D)).astype(np.float32)
        k = rng.standard_normal((3, HKV, D)).astype(np.float32)
        v = rng.standard_normal((3, HKV, D)).astype(np.float32)
        k_all[slots], v_all[slots] = k, v
        out = backend.to_numpy(backend.run(plan, q, pool, k, v))
        want = reference.decode(q, k_all.reshape(nb, BS, HKV, D), v_all.reshape(nb, BS, HKV, D),
                                tables, lens)
        assert reference.rms(out, want) < 1e-3, f"step {step}"


def _arrays_in(obj, seen=None):
    """Every array-like (anything with a shape) reachable from obj through attributes, slots,
    containers and closures: what a plan holds, the backend's metadata included."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
        return
    seen.add(id(obj))
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        yield obj
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    else:
        items = list(getattr(obj, "__dict__", {}).values())
        items += [getattr(obj, s, None) for c in type(obj).__mro__
                  for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
        items += [c.cell_contents for c in (getattr(obj, "__closure__", None) or ())]
    for item in items:
        if item is not None and not isinstance(item, (pa.PagedAttention, pa.KVPool)):
            yield from _arrays_in(item, seen)


def test_ragged_plan_is_per_sequence(impl, rng):
    """The plan exposes the step per sequence (tables [B, max_blocks], lengths [B], qo_indptr
    [B+1]); neither it nor the backend's metadata holds a table per query row."""
    backend, path = impl
    pool = make_pool(backend, rng)
    tables = np.array([[3, 0, 7, 4, 2], [5, 1, 0, 0, 0], [8, 9, 10, 11, 6]], np.int32)
    lens = np.array([9, 2, 17], np.int32)
    qlens = np.array([5, 0, 4])
    plan = backend.plan(pool, tables, lens, num_q_heads=2 * HKV, query_lens=qlens, path=path)
    assert plan.block_tables.shape == (3, 5) and plan.block_tables.dtype == np.int32
    assert plan.context_lens.dtype == np.int32 and list(plan.context_lens) == [9, 2, 17]
    assert plan.qo_indptr.dtype == np.int32 and list(plan.qo_indptr) == [0, 5, 5, 9]
    assert list(plan.query_lens) == [5, 0, 4] and plan.num_rows == 9 and plan.batch == 3
    for a in _arrays_in(plan):
        shape = tuple(a.shape)
        assert not (len(shape) == 2 and shape[0] == 9), f"per-row table of shape {shape}"
        assert int(np.prod(shape)) != 9 * 5, f"per-row table flattened: {shape}"
    q = rng.standard_normal((9, 2 * HKV, D)).astype(np.float32)
    k, v = pool.to_numpy()
    ref = reference.ragged(q, k, v, tables, lens, qlens)
    assert reference.rms(backend.to_numpy(backend.run(plan, q, pool)), ref) < 1e-3


def test_decode_plan_indptr_is_one_query_per_sequence(impl, rng):
    backend, path = impl
    pool = make_pool(backend, rng)
    plan = backend.plan(pool, TABLES, LENS, num_q_heads=HKV, path=path)
    assert list(plan.qo_indptr) == [0, 1, 2] and list(plan.query_lens) == [1, 1]
    assert plan.num_rows == 2 and plan.block_tables.shape == TABLES.shape
