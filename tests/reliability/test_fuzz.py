"""Hostile-input fuzzing of the public contract on every backend x path (hypothesis).

Each generated call either returns the float64 reference's answer or raises `InvalidInput`;
nothing else may escape (no TypeError/OverflowError/kernel crash), and neither a failed nor a
successful call may change a pool, a block table or a context-length array it was given.
Whether a call is valid is decided by an oracle written independently of
`paged_attention.validation`, so the fuzzer checks the validator too.

Shapes are drawn from a few geometries only: every new geometry compiles shaders on the Vulkan
backend (~1-2 s each on lavapipe), while batch, table width, lengths, ids, dtypes, memory
layouts and values vary freely. Examples per test: PAGED_ATTENTION_TEST_FUZZ_EXAMPLES (default 150 for decode,
100 for write_kv / copy_blocks); `pytest -s` prints the count per backend.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paged_attention as pa
from paged_attention import reference
from paged_attention.lab.workload import representable

try:
    import mlx.core as mx
except ImportError:  # pragma: no cover - mlx is optional
    mx = None

DECODE_EXAMPLES = int(os.environ.get("PAGED_ATTENTION_TEST_FUZZ_EXAMPLES", "150"))
WRITE_EXAMPLES = max(10, DECODE_EXAMPLES * 2 // 3)

# (head_dim, block_size, num_kv_heads, group): a padded head dim, block_size 1, GQA and MHA.
GEOMS = [(64, 16, 2, 4), (20, 4, 1, 2), (8, 1, 2, 1)]
FLOAT32_MAX = float(np.finfo(np.float32).max)
HALF = {"float16", "bfloat16"}

# Backends whose NaN/inf-in-q rows are known not to come out NaN (reported, not fixed here):
# those rows are skipped by the fuzzer; test_numerics.test_nonfinite_q_rows_are_nan xfails them.
NONFINITE_Q_GAPS: dict[str, str] = {}  # backend -> reason; empty: every backend complies


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def report(record_property, what, backend, path, count):
    record_property(f"fuzz_examples_{what}", count[0])
    print(f"\nFUZZ {what} {backend.name}/{path}: {count[0]} examples, {count[1]} valid calls "
          f"checked against the reference, {count[0] - count[1]} rejected with InvalidInput")


# -- array builders ---------------------------------------------------------------------------------
def dtype_name(x) -> str:
    if isinstance(x, (list, tuple)):
        return "list"
    return str(getattr(x, "dtype", "none")).rsplit(".", 1)[-1]


def make_float(values: np.ndarray, dtype: str, layout: str, rng):
    """`values` (float64) as an array of `dtype` in memory layout `layout`. Non-numpy kinds
    (mlx arrays, lists, object arrays) are returned as such."""
    if dtype == "list":
        return values.tolist()
    if dtype == "object":
        return values.astype(object)
    if dtype == "bfloat16" or layout == "mlx":
        mdt = {"float16": mx.float16, "float32": mx.float32, "bfloat16": mx.bfloat16,
               "int32": mx.int32, "bool": mx.bool_}.get(dtype)
        if mdt is None:  # float64: MLX has no such array type on every device
            return values.astype(np.float64)
        return mx.array(values.astype(np.float32)).astype(mdt)
    np_dt = np.dtype(dtype)
    if np_dt.kind not in "fc":
        with np.errstate(invalid="ignore"):
            values = np.nan_to_num(values).astype(np_dt)
    if layout == "fortran":
        return np.asfortranarray(values.astype(np_dt))
    if layout == "strided" and values.ndim:
        big = np.zeros((values.shape[0] * 2,) + values.shape[1:-1] + (values.shape[-1] * 3,),
                       dtype=np_dt) if values.size else values.astype(np_dt)
        if not values.size:
            return big
        big[::2, ..., 1::3] = values
        view = big[::2, ..., 1::3]
        assert not view.flags.c_contiguous or view.size <= 1
        return view
    if layout == "transposed" and values.ndim == 3:
        return np.ascontiguousarray(values.astype(np_dt).transpose(0, 2, 1)).transpose(0, 2, 1)
    return values.astype(np_dt)


def make_ints(values: np.ndarray, kind: str):
    """Integer-valued `values` as `kind`: numpy dtypes, 'list', 'object', 'fortran', 'strided'."""
    if kind == "list":
        return values.tolist()
    if kind == "object":
        return values.astype(object)
    if kind == "fortran":
        return np.asfortranarray(values.astype(np.int32))
    if kind == "strided":
        if values.ndim == 0 or not values.size:
            return values.astype(np.int64)
        big = np.full(tuple(2 * s for s in values.shape), 12345, dtype=np.int64)
        big[tuple(slice(None, None, 2) for _ in values.shape)] = values
        return big[tuple(slice(None, None, 2) for _ in values.shape)]
    if kind == "mlx":
        return mx.array(values.astype(np.int32))
    return values.astype(kind)


INT_KINDS = ["int32", "int64", "list", "fortran", "strided", "int16", "uint32", "float64",
             "bool", "object"] + (["mlx"] if mx is not None else [])


def as_host(x):
    """Host numpy copy of anything array-like, for the oracle and for snapshots."""
    if mx is not None and isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x)
    return np.array(x)


def is_int_array(a: np.ndarray) -> bool:
    return a.size == 0 or a.dtype.kind in "iu"


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return np.array_equal(a, b, equal_nan=True)
    return a.dtype == b.dtype and np.array_equal(a, b)


def tolerance(*dtypes) -> float:
    if "bfloat16" in dtypes:
        return 3e-2
    if "float16" in dtypes:
        return 5e-3
    return 2e-4


@st.composite
def kv_format(draw, formats):
    """(kv_dtype, kv_group_size) of the pool: plain two times in three, else one of `formats`
    (the quantized formats the backend or path lists) with a group size dividing GEOMS[0]."""
    kinds = sorted(formats)
    if not kinds or draw(st.integers(0, 2)):
        return None, 64
    return draw(st.sampled_from(kinds)), draw(st.sampled_from([32, 64]))


def backend_formats(backend) -> set:
    return set().union(*(backend.kv_formats.get(p, ()) for p in backend.paths))


def stored(pool, x, which):
    """What a pool holds for rows x (float32 [..., D] of the pool's dtype): x, or (quantized
    pool) the reference arithmetic's dequantized x."""
    fmt = pool.spec.kv_format
    if fmt is None:
        return x
    return fmt.dequantize(fmt.quantize(x, pool.dtype, which), pool.dtype, which)


def new_pool(backend, geom, dtype, nb, rng, kv=(None, 64)):
    d, bs, hkv, _ = geom
    pool = backend.create_pool(nb, bs, hkv, d, dtype, kv_dtype=kv[0], kv_group_size=kv[1],
                               k_scale=0.5 if kv[0] == "float8_e4m3" else 1.0)
    n = nb * bs
    k = representable(rng.standard_normal((n, hkv, d)), dtype)
    v = representable(rng.standard_normal((n, hkv, d)), dtype)
    backend.write_kv(pool, np.arange(n), k, v)
    if kv[0] is not None and not backend.kv_quantization_exact:
        # Ties broken the device's way (ADR 0011): the mirror starts from what it stored.
        k0, v0 = pool.to_numpy()
        assert near_stored(k0, stored(pool, k, "k").reshape(k0.shape), pool)
        return pool, k0, v0
    return pool, stored(pool, k, "k").reshape(nb, bs, hkv, d), \
        stored(pool, v, "v").reshape(nb, bs, hkv, d)


def near_stored(got, want, pool) -> bool:
    """A device's quantization against the reference's: equal but for rounding ties, where a
    group's scale or a code may be one step apart; at most a few percent of the elements."""
    fmt = pool.spec.kv_format
    differ = ~np.isclose(got, want, rtol=0, atol=0, equal_nan=True)
    if not differ.any():
        return True
    span = np.nanmax(np.abs(want)) if want.size else 0.0
    step = 2 * span / ((1 << fmt.bits) - 1) if fmt.affine else span / 8
    return bool(differ.mean() <= 0.05 and np.nanmax(np.abs(got - want)[differ]) <= 1.5 * step)


def check_pool(pool, k, v):
    kk, vv = pool.to_numpy()
    assert same(kk, k) and same(vv, v), "pool contents changed"


# -- decode ------------------------------------------------------------------------------------------
def decode_oracle(backend, spec, q, tables, lens, scale, window) -> str | None:
    """Why the call is invalid, or None. Independent of paged_attention.validation."""
    d, bs, hkv, nb = spec
    qdt = dtype_name(q)
    if qdt in ("list", "object"):
        return "q dtype"
    qshape = tuple(q.shape)
    if len(qshape) != 3 or qshape[2] != d or qshape[1] < 1 or qshape[1] % hkv:
        return "q shape"
    if qdt not in backend.q_dtypes:
        return "q dtype"
    t, ln = as_host(tables), as_host(lens)
    if t.ndim != 2 or ln.ndim != 1 or not is_int_array(t) or not is_int_array(ln):
        return "tables/lens rank or dtype"
    b = qshape[0]
    if t.shape[0] != b or ln.shape[0] != b:
        return "batch"
    t, ln = t.astype(np.int64), ln.astype(np.int64)
    cap = t.shape[1] * bs
    if b and (ln.min() < 0 or ln.max() > cap):
        return "context_lens range"
    for i in range(b):
        used = t[i, :-(-int(ln[i]) // bs)]
        if used.size and (used.min() < 0 or used.max() >= nb):
            return "block id"
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                               or window < 1):
        return "window"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or not 0 < scale <= FLOAT32_MAX):
        return "scale"
    return None


VALID_INT_KINDS = ["int32", "int64", "list", "fortran", "strided", "int16", "uint32"] + \
    (["mlx"] if mx is not None else [])
BAD_INT_KINDS = ["float64", "bool", "object"]


@st.composite
def corruptions(draw, fields):
    """About half the cases are valid; the others break one or two fields."""
    if draw(st.booleans()):
        return set()
    return draw(st.sets(st.sampled_from(fields), min_size=1, max_size=2))


@st.composite
def decode_case(draw, backend, path):
    bad = draw(corruptions(["lens", "ids", "window", "scale", "q_dtype", "q_shape", "table_kind",
                            "lens_kind"]))
    kv = draw(kv_format(backend.kv_formats.get(path, ())))
    geom_i = 0 if kv[0] else draw(st.integers(0, len(GEOMS) - 1))
    d, bs, hkv, group = GEOMS[geom_i]
    dtype = draw(st.sampled_from(backend.pool_dtypes))
    nb = draw(st.integers(1, 8))
    batch = draw(st.integers(0, 4))
    width = draw(st.integers(0, 4))
    cap = width * bs
    lens = [draw(st.integers(0, cap)) for _ in range(batch)]
    if "lens" in bad and batch:
        lens[draw(st.integers(0, batch - 1))] = draw(st.one_of(st.integers(cap + 1, cap + 4),
                                                               st.integers(-3, -1)))
    lo, hi = (-2, nb + 2) if "ids" in bad else (0, nb - 1)
    table = [[draw(st.integers(lo, hi)) for _ in range(width)] for _ in range(batch)]
    if "window" in bad:
        window = draw(st.sampled_from([0, -1, True, 1.5, "4"]))
    else:
        window = draw(st.one_of(st.none(), st.none(), st.integers(1, cap + 3),
                                st.sampled_from([1, 2 ** 31, 2 ** 40])))
    if "scale" in bad:
        scale = draw(st.sampled_from([0.0, -0.1, math.nan, math.inf, -math.inf, True, 1e39, "1"]))
    else:
        scale = draw(st.one_of(st.none(), st.none(), st.floats(0.02, 0.6), st.just(1e-30)))
    all_q = ["float16", "float32", "float64"] + (["bfloat16"] if mx is not None else [])
    good_q = [t for t in all_q if t in backend.q_dtypes]
    bad_q = [t for t in all_q if t not in backend.q_dtypes] + ["int32", "bool", "list", "object"]
    q_dtype = draw(st.sampled_from(bad_q if "q_dtype" in bad else good_q))
    q_layout = draw(st.sampled_from(["c", "c", "fortran", "strided", "transposed"]
                                    + (["mlx"] if mx is not None else [])))
    q_shape = draw(st.sampled_from(["bad_d", "bad_hq", "2d", "bad_b"])) if "q_shape" in bad \
        else "ok"
    nonfinite = draw(st.sampled_from([None] * 4 + ["nan", "inf"]))
    table_kind = draw(st.sampled_from(BAD_INT_KINDS if "table_kind" in bad else VALID_INT_KINDS))
    lens_kind = draw(st.sampled_from(BAD_INT_KINDS if "lens_kind" in bad else VALID_INT_KINDS))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return dict(geom=GEOMS[geom_i], dtype=dtype, nb=nb, batch=batch, group=group, lens=lens,
                table=table, width=width, window=window, scale=scale, q_dtype=q_dtype,
                q_layout=q_layout, q_shape=q_shape, nonfinite=nonfinite, table_kind=table_kind,
                lens_kind=lens_kind, seed=seed, corrupted=sorted(bad), kv=kv)


def test_decode_fuzz(impl, record_property):
    backend, path = impl
    count = [0, 0]  # examples, valid calls

    @fuzz_settings(DECODE_EXAMPLES)
    @given(st.data())
    def run(data):
        c = data.draw(decode_case(backend, path))
        count[0] += 1
        rng = np.random.default_rng(c["seed"])
        d, bs, hkv, group = c["geom"]
        pool, k, v = new_pool(backend, c["geom"], c["dtype"], c["nb"], rng, c["kv"])
        b, hq = c["batch"], hkv * group
        shape = {"ok": (b, hq, d), "bad_d": (b, hq, d + 1), "bad_hq": (b, hq + 1, d) if hkv > 1
                 else (b, 0, d), "2d": (b, hq * d), "bad_b": (b + 1, hq, d)}[c["q_shape"]]
        # q values exact in the coarsest dtype involved, so casts inside backends are lossless.
        qv = representable(rng.standard_normal(shape), "bfloat16" if "bfloat16" in
                           (c["dtype"], c["q_dtype"]) else "float16").astype(np.float64)
        bad_rows = np.zeros(shape[:2], bool) if len(shape) == 3 else None
        if c["nonfinite"] and len(shape) == 3 and qv.size:
            i, j = rng.integers(shape[0]), rng.integers(shape[1])
            qv[i, j, rng.integers(shape[2])] = np.nan if c["nonfinite"] == "nan" else \
                rng.choice([np.inf, -np.inf])
            bad_rows[i, j] = True
        q = make_float(qv, c["q_dtype"], c["q_layout"], rng)
        table_vals = np.array(c["table"], dtype=np.int64).reshape(b, c["width"])
        tables = make_ints(table_vals, c["table_kind"])
        lens = make_ints(np.array(c["lens"], dtype=np.int64), c["lens_kind"])
        tables_before, lens_before = as_host(tables).copy(), as_host(lens).copy()
        problem = decode_oracle(backend, (d, bs, hkv, c["nb"]), q if hasattr(q, "shape") else
                                np.asarray(q), tables, lens, c["scale"], c["window"])
        if problem is not None:
            with pytest.raises(pa.InvalidInput):
                backend.decode(q, pool, tables, lens, scale=c["scale"], window=c["window"], path=path)
        elif backend.shape_unsupported_reason(path, pool.spec):
            with pytest.raises(pa.UnsupportedPath, match="head_dim"):
                backend.decode(q, pool, tables, lens, scale=c["scale"], window=c["window"], path=path)
        else:
            out = backend.decode(q, pool, tables, lens, scale=c["scale"], window=c["window"],
                                 path=path)
            count[1] += 1
            assert dtype_name(out) == dtype_name(q), (dtype_name(out), dtype_name(q))
            got = as_host(out).astype(np.float64)
            assert got.shape == shape
            q_ref = np.where(bad_rows[..., None], 0.0, qv)
            ref = reference.decode(q_ref, k, v, table_vals, np.array(c["lens"]), scale=c["scale"],
                                   window=c["window"])
            attended = np.array(c["lens"]) if c["window"] is None else \
                np.minimum(np.array(c["lens"]), c["window"])
            good = ~bad_rows
            tol = tolerance(c["dtype"], c["q_dtype"])
            assert reference.rms(got[good], ref[good]) < tol, c
            assert np.isfinite(got[good]).all()
            empty = attended == 0
            assert np.all(got[empty] == 0), "an empty context must give zeros"
            # A NaN q row must come out NaN. An inf row has no single right answer (a lone key
            # gets weight 1 in the limit, the reference gives NaN): only the other rows count.
            for i, j in zip(*np.nonzero(bad_rows)):
                if attended[i] and c["nonfinite"] == "nan" and backend.name not in NONFINITE_Q_GAPS:
                    assert np.isnan(got[i, j]).all(), f"non-finite q row ({i}, {j}) is not NaN"
        assert same(as_host(tables), tables_before) and same(as_host(lens), lens_before)
        check_pool(pool, k, v)

    run()
    report(record_property, "decode", backend, path, count)


# -- write_kv ----------------------------------------------------------------------------------------
@st.composite
def write_case(draw, backend):
    bad = draw(corruptions(["slots", "slot_kind", "k_dtype", "v_dtype", "shape"]))
    kv = draw(kv_format(backend_formats(backend)))
    geom = GEOMS[0] if kv[0] else draw(st.sampled_from(GEOMS))
    dtype = draw(st.sampled_from(backend.pool_dtypes))
    nb = draw(st.integers(1, 5))
    slots_total = nb * geom[1]
    if "slots" in bad:  # out of range or repeated
        slots = draw(st.lists(st.integers(-2, slots_total + 1), min_size=1, max_size=6))
        if draw(st.booleans()):
            slots = slots + slots[:1]
    else:
        slots = draw(st.lists(st.integers(0, slots_total - 1), max_size=6, unique=True))
    all_kv = ["float16", "float32"] + (["bfloat16"] if mx is not None else [])
    good_kv = [t for t in all_kv if t in backend.kv_dtypes]
    bad_kv = [t for t in all_kv if t not in backend.kv_dtypes] + ["float64", "int32", "list"]
    return dict(geom=geom, dtype=dtype, nb=nb, slots=slots,
                slot_kind=draw(st.sampled_from(BAD_INT_KINDS if "slot_kind" in bad
                                               else VALID_INT_KINDS)),
                k_dtype=draw(st.sampled_from(bad_kv if "k_dtype" in bad else good_kv)),
                v_dtype=draw(st.sampled_from(bad_kv if "v_dtype" in bad else good_kv)),
                k_layout=draw(st.sampled_from(["c", "fortran", "strided", "transposed"]
                                              + (["mlx"] if mx is not None else []))),
                shape=draw(st.sampled_from(["n+1", "d+1", "hkv+1", "2d", "v_only"]))
                if "shape" in bad else "ok",
                nonfinite=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 32 - 1)),
                corrupted=sorted(bad), kv=kv)


def write_oracle(backend, spec, slots, k, v) -> str | None:
    d, bs, hkv, nb = spec
    s = as_host(slots)
    if s.ndim != 1 or not is_int_array(s):
        return "slots"
    for x in (k, v):
        if dtype_name(x) not in backend.kv_dtypes:
            return "k/v dtype"
        if tuple(np.shape(x) if not hasattr(x, "shape") else x.shape) != (s.shape[0], hkv, d):
            return "k/v shape"
    s = s.astype(np.int64)
    if s.size and (s.min() < 0 or s.max() >= nb * bs):
        return "slot range"
    if np.unique(s).size != s.size:
        return "duplicate slot"
    return None


def test_write_kv_fuzz(backend, record_property):
    count = [0, 0]  # examples, valid calls

    @fuzz_settings(WRITE_EXAMPLES)
    @given(st.data())
    def run(data):
        c = data.draw(write_case(backend))
        count[0] += 1
        rng = np.random.default_rng(c["seed"])
        d, bs, hkv, _ = c["geom"]
        pool, k0, v0 = new_pool(backend, c["geom"], c["dtype"], c["nb"], rng, c["kv"])
        n = len(c["slots"])
        shapes = {"ok": [(n, hkv, d)] * 2, "n+1": [(n + 1, hkv, d)] * 2,
                  "d+1": [(n, hkv, d + 1)] * 2, "hkv+1": [(n, hkv + 1, d)] * 2,
                  "2d": [(n, hkv * d)] * 2, "v_only": [(n, hkv, d), (n, hkv, d + 2)]}[c["shape"]]
        vals = [rng.standard_normal(s) for s in shapes]
        # NaN/inf in an affine group leave that group unspecified (ADR 0011): fp8 saturates.
        affine = c["kv"][0] in ("int8", "int4")
        if c["nonfinite"] and vals[0].size and not affine:
            vals[0].reshape(-1)[rng.integers(vals[0].size)] = rng.choice([np.nan, np.inf, -np.inf])
        k = make_float(vals[0], c["k_dtype"], c["k_layout"], rng)
        v = make_float(vals[1], c["v_dtype"], "c", rng)
        slots = make_ints(np.array(c["slots"], dtype=np.int64), c["slot_kind"])
        slots_before = as_host(slots).copy()
        problem = write_oracle(backend, (d, bs, hkv, c["nb"]), slots, k, v)
        if problem is not None:
            with pytest.raises(pa.InvalidInput):
                backend.write_kv(pool, slots, k, v)
            check_pool(pool, k0, v0)
        else:
            backend.write_kv(pool, slots, k, v)
            count[1] += 1
            s = np.array(c["slots"], dtype=np.int64)
            blk, off = np.divmod(s, bs)
            for mirror, x, which in ((k0, k, "k"), (v0, v, "v")):
                xs = as_host(x).astype(np.float32 if dtype_name(x) != "float16" else np.float16)
                # The pool stores x cast to its dtype (round to nearest even), then quantized.
                mirror[blk, off] = stored(pool, representable(xs.astype(np.float32), c["dtype"])
                                          if c["dtype"] == "bfloat16" else
                                          xs.astype(c["dtype"]), which)
            if c["kv"][0] is not None and not backend.kv_quantization_exact:
                kk, vv = pool.to_numpy()
                untouched = np.ones(k0.shape[:2], bool)
                untouched[blk, off] = False
                assert same(kk[untouched], k0[untouched]) and same(vv[untouched], v0[untouched])
                assert near_stored(kk, k0, pool) and near_stored(vv, v0, pool)
            else:
                check_pool(pool, k0, v0)
        assert same(as_host(slots), slots_before)

    run()
    report(record_property, "write_kv", backend, "-", count)


# -- copy_blocks -------------------------------------------------------------------------------------
def copy_oracle(nb, pairs) -> str | None:
    try:
        a = np.asarray(pairs)
    except ValueError:
        return "ragged"
    if a.size == 0:
        return None
    if a.ndim != 2 or a.shape[1] != 2:
        return "shape"
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.all(a == np.round(a)):
            return "not integral"
    elif a.dtype.kind not in "iu":
        return "dtype"
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= nb:
        return "range"
    if np.unique(a[:, 1]).size != a.shape[0]:
        return "dst twice"
    if np.intersect1d(a[:, 0], a[:, 1]).size:
        return "src and dst"
    return None


@st.composite
def copy_case(draw, backend):
    bad = draw(corruptions(["ids", "form"]))
    nb = draw(st.integers(1, 6))
    if "ids" in bad:  # out of range, a destination twice, or a block both source and destination
        pairs = draw(st.lists(st.tuples(st.integers(-1, nb), st.integers(-1, nb)), min_size=1,
                              max_size=4))
    else:
        ids = draw(st.permutations(range(nb)))
        p = draw(st.integers(0, nb // 2))
        srcs = [draw(st.sampled_from(ids[p:])) for _ in range(p)] if p else []
        pairs = list(zip(srcs, ids[:p]))
    form = draw(st.sampled_from(["fractional", "bool", "flat", "triples", "ragged", "scalar",
                                 "none"] if "form" in bad else
                                ["list", "list", "int32", "int64", "float", "uint8"]))
    kv = draw(kv_format(backend_formats(backend)))
    return dict(geom=GEOMS[0] if kv[0] else draw(st.sampled_from(GEOMS)),
                dtype=draw(st.sampled_from(backend.pool_dtypes)), kv=kv,
                nb=nb, pairs=pairs, form=form, seed=draw(st.integers(0, 2 ** 32 - 1)))


def test_copy_blocks_fuzz(backend, record_property):
    count = [0, 0]  # examples, valid calls

    @fuzz_settings(WRITE_EXAMPLES)
    @given(st.data())
    def run(data):
        c = data.draw(copy_case(backend))
        count[0] += 1
        rng = np.random.default_rng(c["seed"])
        pool, k0, v0 = new_pool(backend, c["geom"], c["dtype"], c["nb"], rng, c["kv"])
        arr = np.array(c["pairs"], dtype=np.int64).reshape(-1, 2)
        form = c["form"]
        pairs = {"list": c["pairs"], "int32": arr.astype(np.int32), "int64": arr,
                 "float": arr.astype(np.float64), "fractional": arr + 0.5, "bool": arr.astype(bool),
                 "flat": arr.reshape(-1), "triples": [(s, t, t) for s, t in c["pairs"]],
                 "ragged": [(s, t) for s, t in c["pairs"]] + [(1,)], "scalar": 3, "none": None,
                 "uint8": arr.astype(np.uint8) if arr.size and arr.min() >= 0 else arr}[form]
        problem = "not pairs" if form in ("scalar", "none") else copy_oracle(c["nb"], pairs)
        if problem is not None:
            with pytest.raises(pa.InvalidInput):
                backend.copy_blocks(pool, pairs)
        else:
            backend.copy_blocks(pool, pairs)
            count[1] += 1
            a = np.asarray(pairs).reshape(-1, 2).astype(np.int64) if np.size(pairs) else \
                np.zeros((0, 2), np.int64)
            k0[a[:, 1]], v0[a[:, 1]] = k0[a[:, 0]].copy(), v0[a[:, 0]].copy()
        check_pool(pool, k0, v0)

    run()
    report(record_property, "copy_blocks", backend, "-", count)


# -- deterministic hostile inputs --------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    (0, 4, 2, 8), (-1, 4, 2, 8), (4, 4, 2, 0), (4, True, 2, 8), (4.0, 4, 2, 8), ("4", 4, 2, 8),
    (None, 4, 2, 8), (4, 4, -2, 8)])
def test_create_pool_rejects_bad_geometry(backend, args):
    with pytest.raises(pa.InvalidInput):
        backend.create_pool(*args, "float32")


@pytest.mark.parametrize("dtype", ["float64", "int8", "bool", None, "bfloat17"])
def test_create_pool_rejects_bad_dtype(backend, dtype):
    if dtype in backend.pool_dtypes:
        pytest.skip("supported here")
    with pytest.raises(pa.InvalidInput):
        backend.create_pool(2, 4, 2, 8, dtype)


@pytest.mark.parametrize("kwargs, named", [
    (dict(kv_dtype="int2"), "kv_dtype"), (dict(kv_dtype="float8"), "kv_dtype"),
    (dict(kv_dtype=8), "kv_dtype"), (dict(kv_dtype="int8", kv_group_size=16), "kv_group_size"),
    (dict(kv_dtype="int4", kv_group_size=64.0), "kv_group_size"),
    (dict(kv_dtype="int8", kv_group_size=True), "kv_group_size"),
    (dict(kv_dtype="int8", kv_group_size=128), "kv_group_size"),     # does not divide D=64
    (dict(kv_dtype="float8_e4m3", k_scale=0.0), "k_scale"),
    (dict(kv_dtype="float8_e4m3", k_scale=math.nan), "k_scale"),
    (dict(kv_dtype="float8_e4m3", v_scale=-1.0), "v_scale"),
    (dict(kv_dtype="float8_e4m3", v_scale=math.inf), "v_scale"),
    (dict(kv_dtype="float8_e4m3", v_scale="1"), "v_scale"),
    (dict(kv_dtype="int8", k_scale=2.0), "k_scale")])
def test_create_pool_rejects_bad_kv_format(backend, kwargs, named):
    """Bad format arguments are named, on every backend, whether or not it reads the format."""
    with pytest.raises(pa.InvalidInput, match=named):
        backend.create_pool(2, 4, 2, 64, "float32", **kwargs)


def test_decode_step_is_all_or_nothing(impl):
    """A bad layer anywhere in a step rejects the whole step before any layer is written."""
    backend, path = impl
    rng = np.random.default_rng(7)
    geom = GEOMS[0]
    d, bs, hkv, group = geom
    pools = [new_pool(backend, geom, "float32", 4, rng) for _ in range(3)]
    tables, lens = np.array([[0, 1]], np.int32), np.array([5], np.int32)
    q = rng.standard_normal((1, hkv * group, d)).astype(np.float32)
    kn = rng.standard_normal((1, hkv, d)).astype(np.float32)
    good = [pa.LayerStep(q, p, kn, kn) for p, _, _ in pools]
    for bad in (pa.LayerStep(q[:, :, :-1], pools[2][0], kn, kn),     # q head_dim
                pa.LayerStep(q, pools[2][0], kn[:, :, :-1], kn),     # k shape
                pa.LayerStep(q.astype(np.int32), pools[2][0], kn, kn),
                "not a layer"):
        with pytest.raises(pa.InvalidInput):
            backend.decode_step(good[:2] + [bad], np.array([4]), tables, lens, path=path)
        for p, k, v in pools:
            check_pool(p, k, v)
    with pytest.raises(pa.InvalidInput):
        backend.decode_step([], np.array([4]), tables, lens, path=path)
    with pytest.raises(pa.InvalidInput):  # slot outside the pool
        backend.decode_step(good, np.array([4 * bs]), tables, lens, path=path)
    for p, k, v in pools:
        check_pool(p, k, v)


# -- prefill -----------------------------------------------------------------------------------------
@st.composite
def prefill_case(draw, backend):
    bad = draw(corruptions(["start_pos", "ids", "table_rank", "overflow", "q_dtype"]))
    geom = draw(st.sampled_from(GEOMS))
    d, bs, hkv, group = geom
    nb = draw(st.integers(1, 6))
    width = draw(st.integers(0, 4))
    cap = width * bs
    t = draw(st.integers(0, min(cap, 6)))
    start = draw(st.integers(0, cap - t))
    if "overflow" in bad:
        start = cap - t + draw(st.integers(1, 3))
    if "start_pos" in bad:
        start = draw(st.sampled_from([-1, True, 1.0, "0", 2 ** 63, None]))
    lo, hi = (-2, nb + 1) if "ids" in bad else (0, nb - 1)
    table = [draw(st.integers(lo, hi)) for _ in range(width)]
    all_q = ["float16", "float32"] + (["bfloat16"] if mx is not None else [])
    q_dtype = draw(st.sampled_from(["int32", "list"] if "q_dtype" in bad else
                                   [x for x in all_q if x in backend.q_dtypes]))
    return dict(geom=geom, dtype=draw(st.sampled_from(backend.pool_dtypes)), nb=nb, t=t,
                start=start, table=table, table_rank="table_rank" in bad, q_dtype=q_dtype,
                window=draw(st.one_of(st.none(), st.integers(1, cap + 2))),
                table_kind=draw(st.sampled_from(VALID_INT_KINDS)),
                seed=draw(st.integers(0, 2 ** 32 - 1)), corrupted=sorted(bad))


@pytest.mark.skipif(not hasattr(pa.PagedAttention, "prefill"), reason="no prefill in this API")
def test_prefill_fuzz(impl, record_property):
    backend, path = impl
    count = [0, 0]  # examples, valid calls

    @fuzz_settings(max(10, DECODE_EXAMPLES // 2))
    @given(st.data())
    def run(data):
        c = data.draw(prefill_case(backend))
        count[0] += 1
        rng = np.random.default_rng(c["seed"])
        d, bs, hkv, group = c["geom"]
        pool, k, v = new_pool(backend, c["geom"], c["dtype"], c["nb"], rng)
        qv = representable(rng.standard_normal((c["t"], hkv * group, d)), "bfloat16" if "bfloat16"
                           in (c["dtype"], c["q_dtype"]) else "float16").astype(np.float64)
        q = make_float(qv, c["q_dtype"], "c", rng)
        tv = np.array(c["table"], dtype=np.int64)
        table = make_ints(tv[None] if c["table_rank"] else tv, c["table_kind"])
        start, t = c["start"], c["t"]
        valid_start = isinstance(start, (int, np.integer)) and not isinstance(start, bool) \
            and 0 <= start
        problem = None
        if c["q_dtype"] not in backend.q_dtypes or c["table_rank"] or not valid_start:
            problem = "args"
        elif start + t > len(c["table"]) * bs:
            problem = "overflow"
        elif t and any(not 0 <= b < c["nb"] for b in tv[:-(-(start + t) // bs)]):
            problem = "ids"
        if problem:
            with pytest.raises(pa.InvalidInput):
                backend.prefill(q, pool, table, start, window=c["window"], path=path)
        elif backend.shape_unsupported_reason(path, pool.spec):
            with pytest.raises(pa.UnsupportedPath, match="head_dim"):
                backend.prefill(q, pool, table, start, window=c["window"], path=path)
        else:
            out = backend.prefill(q, pool, table, start, window=c["window"], path=path)
            count[1] += 1
            got = as_host(out).astype(np.float64)
            ref = reference.prefill(qv, k, v, tv, start, window=c["window"])
            assert got.shape == qv.shape
            assert reference.rms(got, ref) < tolerance(c["dtype"], c["q_dtype"]), c
        check_pool(pool, k, v)

    run()
    report(record_property, "prefill", backend, path, count)


def test_pool_of_another_instance_is_rejected(backend):
    """A pool is bound to the backend instance that created it: a Vulkan pool used through a
    second instance read freed device memory once its creator was closed."""
    other = pa.get_backend(backend.name)
    try:
        pool = other.create_pool(2, 4, 2, 8, "float32")
        q = np.zeros((1, 2, 8), np.float32)
        for call in (lambda: backend.decode(q, pool, [[0]], [3]),
                     lambda: backend.write_kv(pool, [0], q[:, :2], q[:, :2]),
                     lambda: backend.copy_blocks(pool, [(0, 1)]),
                     lambda: backend.decode_step([pa.LayerStep(q, pool, q[:, :2], q[:, :2])], [0],
                                                 [[0]], [3])):
            with pytest.raises(pa.InvalidInput, match="another"):
                call()
        np.asarray(other.decode(q, pool, [[0]], [3]))   # its creator still uses it
    finally:
        other.close()


# -- attention variants (ADR 0010) -------------------------------------------------------------------
VARIANT_GEOM = (64, 16, 2, 2)   # one geometry: the variant forms compile per geometry on Vulkan


def _variant_value(draw, kind: str, hq: int):
    """A soft_cap, alibi_slopes or sinks argument, valid or hostile; (value, why it is bad)."""
    bad = draw(st.sampled_from([None, None, None, "shape", "dtype", "nonfinite", "type"]))
    if kind == "soft_cap":
        if bad is None:
            return draw(st.floats(0.5, 60.0)), None
        return draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "30", True])), "soft_cap"
    values = np.linspace(-0.5, 0.5, hq).astype(np.float32)
    if bad is None:
        return values, None
    return {"shape": values[:-1], "dtype": np.arange(hq), "type": "x",
            "nonfinite": np.where(np.arange(hq) == 0, np.nan, values)}[bad], kind


def variant_case(draw, backend, path):
    d, bs, hkv, group = VARIANT_GEOM
    hq = hkv * group
    b = draw(st.integers(1, 3))
    ql = draw(st.lists(st.integers(0, 6), min_size=b, max_size=b))
    lens = [q + draw(st.integers(0, 40)) for q in ql]
    picks = draw(st.lists(st.sampled_from(["soft_cap", "alibi_slopes", "sinks", "return_lse"]),
                          min_size=1, max_size=4, unique=True))
    args, bad = {}, None
    for k in ("soft_cap", "alibi_slopes", "sinks"):
        if k in picks:
            args[k], why = _variant_value(draw, k, hq)
            bad = bad or why
    args["return_lse"] = "return_lse" in picks
    return dict(b=b, ql=ql, lens=lens, args=args, bad=bad, seed=draw(st.integers(0, 2**31)),
                window=draw(st.sampled_from([None, None, 5])),
                dtype=draw(st.sampled_from(["float32", "float16"])))


@pytest.mark.parametrize("examples", [max(10, DECODE_EXAMPLES // 5)])
def test_variant_fuzz(impl, examples, record_property):
    """Ragged plan/run with soft-cap, ALiBi, sinks and the LSE, valid or hostile: the reference's
    answer (out, lse), or InvalidInput naming the argument with the pool untouched (the plan's
    k/v writes included), or UnsupportedPath naming the feature on a path that lacks it."""
    backend, path = impl
    d, bs, hkv, group = VARIANT_GEOM
    hq = hkv * group
    count = [0, 0]

    @fuzz_settings(examples)
    @given(st.data())
    def run(data):
        c = data.draw(st.composite(lambda draw: variant_case(draw, backend, path))())
        count[0] += 1
        rng = np.random.default_rng(c["seed"])
        nb = 3 * 4
        pool, _, _ = new_pool(backend, (d, bs, hkv, 0), c["dtype"], nb, rng)
        tables = rng.permutation(nb)[:3 * 4].reshape(3, 4)[:c["b"]].astype(np.int32)
        ql = np.array(c["ql"])
        n = int(ql.sum())
        ends = np.array(c["lens"])
        # The new rows: each sequence's last ql[b] positions.
        slots = np.concatenate([tables[i, p // bs] * bs + p % bs for i in range(c["b"])
                                for p in [np.arange(ends[i] - ql[i], ends[i])]]).astype(np.int64)
        q = representable(rng.standard_normal((n, hq, d)), "float16")
        kv = representable(rng.standard_normal((n, hkv, d)), "float16")
        plan_kw = {k: v for k, v in c["args"].items() if k != "sinks"}
        sinks = c["args"].get("sinks")
        before = pool.to_numpy()
        need = [f for f, on in (("soft_cap", "soft_cap" in c["args"]),
                                ("alibi_slopes", "alibi_slopes" in c["args"]),
                                ("return_lse", c["args"]["return_lse"])) if on]
        try:
            plan = backend.plan(pool, tables, ends, num_q_heads=hq, query_lens=ql,
                                slot_mapping=slots, window=c["window"], path=path, **plan_kw)
            got = backend.run(plan, q, pool, kv, kv, sinks=sinks)
        except pa.InvalidInput as e:
            assert c["bad"] is not None and c["bad"] in str(e), (c["bad"], str(e))
            after = pool.to_numpy()
            assert all(same(a, b) for a, b in zip(before, after)), "a refused call wrote"
            return
        except pa.UnsupportedPath as e:
            lacking = [f for f in need + (["sinks"] if sinks is not None else [])
                       if f not in backend.variants.get(path, ())]
            assert lacking and lacking[0] in str(e), str(e)
            return
        assert c["bad"] is None, f"{c['bad']} accepted"
        count[1] += 1
        out, lse = got if c["args"]["return_lse"] else (got, None)
        k, v = pool.to_numpy()
        want, want_lse = reference.step(q, k, v, plan.args, sinks)
        tol = tolerance(c["dtype"])
        assert reference.rms(as_host(out).astype(np.float64), want) < tol
        if lse is not None:
            np.testing.assert_allclose(as_host(lse), want_lse, atol=50 * tol, rtol=0)

    run()
    report(record_property, "variants", backend, path, count)
