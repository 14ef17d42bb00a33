"""The engine a server stands on: stop tokens, streaming, abort, preemption and bad input, on
every backend x path (`impl`), each checked against mlx-lm's own greedy loop or the engine's
isolated run; the churn state machine and soak are in test_engine_churn.py."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from paged_attention.errors import InvalidInput, PoolExhausted  # noqa: E402
from paged_attention.integrations import mlx_lm as pl  # noqa: E402

CONFIG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
              vocab_size=128, max_position_embeddings=4096, rope_theta=10000.0,
              tie_word_embeddings=True)
VOCAB = CONFIG["vocab_size"]


@pytest.fixture(autouse=True)
def on_cpu(request):
    """The model runs on the CPU (bit-exact against mlx-lm there) except under the MLX fused
    path, which needs a GPU (and is skipped by `impl` on machines without one)."""
    impl = getattr(getattr(request.node, "callspec", None), "params", {}).get("impl")
    before = mx.default_device()
    if impl != ("mlx", "fused"):
        mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture(scope="module")
def model():
    return pl.random_model(CONFIG, seed=3)


def prompts(lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lens]


_REFS: dict = {}


def reference(model, prompt, steps):
    key = (tuple(prompt), steps, str(mx.default_device()))
    if key not in _REFS:
        _REFS[key] = [int(t) for (t, _), _ in
                      zip(generate_step(mx.array(prompt), model, max_tokens=steps), range(steps))]
    return _REFS[key]


def assert_exact(got, want):
    # Float32 on the CPU on both sides: greedy tokens are bit-for-bit the same. On a GPU (the
    # MLX fused path) they may part at a near-tie; test_mlx_lm.py bounds that case.
    if mx.default_device() == mx.cpu:
        assert got == want
    else:
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert n >= 1, f"{got} vs {want}"


# -- stop tokens ----------------------------------------------------------------------------
def test_stop_token_ends_the_sample_and_frees_its_blocks_that_step(impl, model):
    be, path = impl
    p = prompts([13], seed=1)[0]
    want = reference(model, p, 24)
    stop = want[9]
    cut = want.index(stop)                   # its first occurrence ends the sample
    eng = pl.Engine(model, backend=be, path=path, block_size=4, num_blocks=32)
    rid = eng.add_request(p, 24, stop_tokens=[stop])
    other = eng.add_request(prompts([5], seed=2)[0], 24)
    steps_to_stop = None
    while eng.has_work:
        events = eng.step()
        assert all(tok != stop or r != rid for r, _, tok in events), "stop token emitted"
        if steps_to_stop is None and eng.done(rid):
            steps_to_stop = eng.stats.steps
            # Its blocks went back in the step that sampled the stop token: only `other` holds
            # blocks now, exactly its table's.
            (sid,) = eng.running()
            bm = eng.state.groups[0].bm
            assert eng.block_counts()[0] == len(bm.block_table(sid))
    assert steps_to_stop == cut + 1          # one prefill step, then one token per step
    assert_exact(eng.results(rid)[0], want[:cut])
    assert len(eng.results(other)[0]) == 24


def test_generate_stop_tokens_and_max_tokens(model):
    ps = prompts((4, 9), seed=5)
    want = [reference(model, p, 16) for p in ps]
    stop = {want[0][5], want[1][3]}
    got = pl.generate(model, ps, max_tokens=16, backend="numpy", stop_tokens=sorted(stop))
    for g, w in zip(got, want):
        cut = next((i for i, t in enumerate(w) if t in stop), len(w))
        assert g == w[:cut]


# -- streaming ------------------------------------------------------------------------------
def test_stream_generate_yields_tokens_as_sampled(impl, model):
    be, path = impl
    ps = prompts((3, 11, 6), seed=7)
    kw = dict(max_tokens=12, backend=be, path=path, n=2, max_batch_tokens=8,
              stop_tokens=[reference(model, ps[1], 12)[6]])
    want = pl.generate(model, ps, **kw)
    engine_out = []
    stream = pl.stream_generate(model, ps, engine_out=engine_out, **kw)
    got = [[] for _ in want]
    steps_seen = []
    for index, tok in stream:
        got[index].append(tok)
        steps_seen.append(engine_out[0].stats.steps)
    assert got == want
    # Tokens arrive step by step, not at the end: the first one long before the last step.
    assert steps_seen[0] < steps_seen[-1] - 5
    assert len(got[2]) < 12                  # prompt 1's samples stopped early


def test_step_returns_events_per_sample(model):
    eng = pl.Engine(model, backend="numpy", num_blocks=32)
    rid = eng.add_request(prompts([5])[0], 3, n=3)
    first = eng.step()
    assert sorted((r, s) for r, s, _ in first) == [(rid, 0), (rid, 1), (rid, 2)]
    assert len({t for _, _, t in first}) == 1            # greedy: one logits row, n samples
    eng.run()
    assert eng.done(rid) and eng.pop(rid) == [reference(model, prompts([5])[0], 3)] * 3
    with pytest.raises(InvalidInput, match="rid"):
        eng.results(rid)


# -- abort ----------------------------------------------------------------------------------
def test_abort_running_and_waiting_requests(impl, model):
    be, path = impl
    ps = prompts((9, 14, 5, 20), seed=11)
    eng = pl.Engine(model, backend=be, path=path, block_size=4, num_blocks=14,
                    max_batch_tokens=16)
    rids = [eng.add_request(p, 10, n=2 if i == 1 else 1) for i, p in enumerate(ps)]
    for _ in range(3):
        eng.step()
    assert rids[1] in {eng._live[s].rid for s in eng.running()}
    used = eng.block_counts()[0]
    eng.abort(rids[1])                       # running, both samples
    assert eng.block_counts()[0] < used
    eng.abort(rids[3])                       # still waiting (the pool is small)
    with pytest.raises(InvalidInput, match="rid"):
        eng.abort(rids[3])
    eng.run()
    for i in (0, 2):
        assert_exact(eng.results(rids[i])[0], reference(model, ps[i], 10))
    assert eng.block_counts() == [0]


# -- preemption -----------------------------------------------------------------------------
def test_small_pool_preempts_and_matches_a_big_pool(impl, model):
    be, path = impl
    ps = prompts((7, 30, 3, 18, 11, 25), seed=13)
    big = pl.generate(model, ps, max_tokens=20, backend=be, path=path, block_size=4)
    out = []
    small = pl.generate(model, ps, max_tokens=20, backend=be, path=path, block_size=4,
                        num_blocks=16, max_batch_tokens=12, engine_out=out)
    assert small == big
    assert out[0].stats.preemptions > 0
    assert out[0].stats.peak_blocks <= 16
    for p, g in zip(ps, small):
        assert_exact(g, reference(model, p, 20))


def test_forked_samples_survive_preemption(model):
    calls = []

    def spread(logprobs):
        calls.append(1)
        # Sample i takes the i-th best token on the prompt's step: distinct continuations.
        order = mx.argsort(-logprobs, axis=-1)
        if len(calls) == 1:
            return order[mx.arange(logprobs.shape[0]), mx.arange(logprobs.shape[0])]
        return order[:, 0]
    p = prompts([10], seed=17)[0]
    eng = pl.Engine(model, backend="numpy", block_size=4, num_blocks=12, sampler=spread)
    rid = eng.add_request(p, 16, n=3)
    eng.run()
    assert eng.stats.preemptions > 0
    for s in eng.results(rid):
        assert s[1:] == reference(model, p + s[:1], 15)


def test_pool_exhausted_only_when_one_request_never_fits(model):
    eng = pl.Engine(model, backend="numpy", block_size=4, num_blocks=5)
    eng.add_request(prompts([10])[0], 11)            # 20 positions: 5 blocks, fits alone
    with pytest.raises(PoolExhausted, match="num_blocks"):
        eng.add_request(prompts([10])[0], 12)        # 21 positions: 6 blocks
    assert len(eng._waiting) == 1
    with pytest.raises(PoolExhausted, match="num_blocks"):
        pl.generate(model, prompts([3, 30]), max_tokens=4, backend="numpy", block_size=4,
                    num_blocks=8)


# -- bad input ------------------------------------------------------------------------------
BAD_REQUESTS = [
    (dict(prompt=[1, VOCAB, 2]), rf"prompt\[1\]: token id {VOCAB} is outside \[0, {VOCAB}\)"),
    (dict(prompt=[3, -1]), r"prompt\[1\]: token id -1"),
    (dict(prompt=[1, 2.0]), r"prompt\[1\]: expected an integer token id, got 2.0"),
    (dict(prompt=np.array([1.0, 2.0])), r"prompt: .*integer token ids, got float64"),
    (dict(prompt="hello"), r"prompt: got text 'hello'.*tokenizer"),
    (dict(prompt=[]), r"prompt: expected at least one"),
    (dict(max_tokens=0), r"max_tokens: expected an integer >= 1, got 0"),
    (dict(max_tokens=2.5), r"max_tokens: expected an integer >= 1, got 2.5"),
    (dict(n=0), r"n: expected an integer >= 1"),
    (dict(stop_tokens=["eos"]), r"stop_tokens\[0\]: expected an integer token id, got 'eos'"),
    (dict(stop_tokens=[VOCAB + 5]), rf"stop_tokens\[0\]: token id {VOCAB + 5}"),
    (dict(stop_tokens="</s>"), r"stop_tokens: got text"),
]


@pytest.mark.parametrize("bad,match", BAD_REQUESTS, ids=[m[:24] for _, m in BAD_REQUESTS])
def test_bad_request_refused_state_unchanged(model, bad, match):
    eng = pl.Engine(model, backend="numpy", block_size=4, num_blocks=16)
    ok = eng.add_request([1, 2, 3], 4)
    eng.step()
    before = (list(eng._waiting), dict(eng._seqs), eng._next_id, eng.block_counts(),
              eng.results(ok))
    args = dict(prompt=[5, 6], max_tokens=4, n=1, stop_tokens=None) | bad
    with pytest.raises(InvalidInput, match=match):
        eng.add_request(args["prompt"], args["max_tokens"], args["n"],
                        stop_tokens=args["stop_tokens"])
    assert (list(eng._waiting), dict(eng._seqs), eng._next_id, eng.block_counts(),
            eng.results(ok)) == before


@pytest.mark.parametrize("arg", ["block_size", "num_blocks", "max_batch_tokens"])
@pytest.mark.parametrize("value", [0, -3, 1.5])
def test_bad_engine_sizes_refused(model, arg, value):
    with pytest.raises(InvalidInput, match=rf"{arg}: expected an integer >= 1, got {value}"):
        pl.Engine(model, backend="numpy", **{arg: value})


def test_generate_refuses_bad_prompts_before_running(model, monkeypatch):
    ran = []
    monkeypatch.setattr(pl.Engine, "step", lambda self: ran.append(1))
    cases = [
        (["some text"], r"prompts\[0\]: got text 'some text' but no tokenizer"),
        ([[1, 2], [3, VOCAB]], rf"prompts\[1\]\[1\]: token id {VOCAB}"),
        ([[1, 2], [0.5]], r"prompts\[1\]\[0\]: expected an integer token id, got 0.5"),
        ("one prompt", r"prompts: expected a list of prompts, got str \(wrap"),
        ([[1]], r"block_size: expected an integer >= 1, got 0"),
    ]
    for ps, match in cases:
        kw = dict(block_size=0) if "block_size" in match else {}
        with pytest.raises(InvalidInput, match=match):
            pl.generate(model, ps, max_tokens=4, backend="numpy", **kw)
    with pytest.raises(InvalidInput, match=r"stop_tokens\[0\]"):
        pl.stream_generate(model, [[1]], max_tokens=4, backend="numpy", stop_tokens=[-2])
    assert not ran
