"""Real (random-weight) mlx-lm models on the paged cache: token-exact against mlx-lm's own
KVCache and generate_step, on every backend x path (`impl`)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from paged_attention.integrations import mlx_lm as pl  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, vocab_size=256,
            max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)
CONFIGS = {
    "qwen3": dict(BASE, model_type="qwen3"),
    "llama": dict(BASE, model_type="llama"),
    # mistral loads as llama; layer 0 slides over 24 positions, layer 1 sees everything
    "mistral-swa": dict(BASE, model_type="mistral", sliding_window=24,
                        layer_types=["sliding_attention", "full_attention"]),
    "gemma3": dict(BASE, model_type="gemma3_text", sliding_window=24, sliding_window_pattern=2,
                   query_pre_attn_scalar=32),
}
STEPS = 64
PROMPT_LENS = (1, 7, 16, 41)


@pytest.fixture(autouse=True)
def model_device(request):
    """Where the model runs. On the CPU, mlx-lm's float32 model is bit-for-bit the same on both
    sides, so tokens must match exactly. The MLX fused path needs the GPU, where MLX's float32
    matmuls and SDPA (the reference's attention) round differently from the fused kernel:
    there greedy tokens may part only at a near-tie (`assert_tokens`). Every other backend/path
    runs its model on the CPU, so a GPU machine checks it as exactly as CI does."""
    impl = getattr(getattr(request.node, "callspec", None), "params", {}).get("impl")
    on_gpu = impl == ("mlx", "fused")
    before = mx.default_device()
    if not on_gpu:
        mx.set_default_device(mx.cpu)
    yield mx.default_device()
    mx.set_default_device(before)


def assert_tokens(model, prompt, got, want):
    """got == want on the CPU. On a GPU, they may part at a step where the float32 top-2 logit
    gap is < 0.05 (a near-tie that rounding decides); everything before it must match."""
    if got == want:
        return
    assert mx.default_device() != mx.cpu, f"tokens diverged on the CPU: {got} != {want}"
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert first is not None, f"lengths differ: {len(got)} != {len(want)}"
    gap = _logits_gap(model, prompt, want[:first + 1])[first]
    assert gap < 0.05, f"diverged at step {first} with a float32 top-2 gap of {gap:.3f}"


@pytest.fixture(scope="module")
def models():
    return {name: pl.random_model(cfg, seed=1) for name, cfg in CONFIGS.items()}


def prompts(lens, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lens]


def reference(model, prompt, steps=STEPS):
    """mlx-lm's own loop and cache (RotatingKVCache on sliding layers)."""
    out = []
    for (tok, _), _ in zip(generate_step(mx.array(prompt), model, max_tokens=steps), range(steps)):
        out.append(int(tok))
    return out


@pytest.fixture(scope="module")
def refs(models):
    cache = {}

    def get(name, prompt, steps=STEPS):
        key = (name, tuple(prompt), steps, str(mx.default_device()))
        if key not in cache:
            cache[key] = reference(models[name], prompt, steps)
        return cache[key]
    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_mlx_lm(impl, name, models, refs):
    be, path = impl
    ps = prompts(PROMPT_LENS)
    got = pl.generate(models[name], ps, max_tokens=STEPS, backend=be, path=path)
    for p, g in zip(ps, got):
        assert_tokens(models[name], p, g, refs(name, p))


def test_mlx_lm_generate_step_drives_paged_cache(impl, models, refs):
    """mlx-lm's unmodified generate_step with the paged cache list (prefill in one call)."""
    be, path = impl
    model = models["qwen3"]
    p = prompts([23], seed=3)[0]
    cache = pl.make_paged_cache(model, backend=be, path=path, num_blocks=16)
    with pl.paged_attention_hook(model):
        got = [int(t) for (t, _), _ in zip(
            generate_step(mx.array(p), model, max_tokens=STEPS, prompt_cache=cache), range(STEPS))]
    assert_tokens(model, p, got, refs("qwen3", p))


def test_cache_refuses_use_outside_hook(models):
    model = models["qwen3"]
    cache = pl.make_paged_cache(model, backend="numpy", num_blocks=8)
    with pytest.raises(pl.PagedAttentionError, match="paged_attention_hook"):
        model(mx.array([[1, 2, 3]]), cache=cache)


def test_unsupported_architecture_is_refused():
    from mlx_lm.models import gemma2
    args = gemma2.ModelArgs(model_type="gemma2", hidden_size=64, num_hidden_layers=2,
                            intermediate_size=128, num_attention_heads=4, head_dim=16,
                            rms_norm_eps=1e-6, vocab_size=256, num_key_value_heads=2)
    with pytest.raises(pl.Unsupported, match="gemma2"):
        pl.Engine(gemma2.Model(args), backend="numpy")


def test_bfloat16_refused_where_backend_has_no_bf16_pools(models):
    """Every shipped backend has bf16 pools now; one without them is refused up front."""
    from paged_attention.backends.numpy_backend import NumpyBackend

    class NoBf16(NumpyBackend):
        pool_dtypes = ("float16", "float32")
    model = pl.random_model(CONFIGS["qwen3"], dtype="bfloat16", seed=1)
    with pytest.raises(pl.Unsupported, match="bfloat16"):
        pl.Engine(model, backend=NoBf16())


def _logits_gap(model, prompt, tokens):
    """Per step, the reference top-1 minus top-2 logit (float32 model) along `tokens`."""
    seq = list(prompt) + list(tokens)
    logits = model(mx.array(seq)[None])[0, len(prompt) - 1:len(seq) - 1].astype(mx.float32)
    top = mx.sort(logits, axis=-1)[:, -2:]
    return np.array(top[:, 1] - top[:, 0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_matches_until_a_near_tie(impl, dtype, refs):
    """Half-precision caches round differently from mlx-lm's own half SDPA, so greedy tokens can
    differ only where the float32 model's top two logits are nearly tied. Bound: every token
    up to the first divergence matches, and at that step the float32 gap is < 0.05."""
    be, path = impl
    if dtype not in be.pool_dtypes:
        pytest.skip(f"backend {be.name!r} has no {dtype} pools")
    model = pl.random_model(CONFIGS["qwen3"], dtype=dtype, seed=1)
    model32 = pl.random_model(CONFIGS["qwen3"], seed=1)
    ps = prompts((9, 30), seed=5)
    got = pl.generate(model, ps, max_tokens=32, backend=be, path=path)
    for p, g in zip(ps, got):
        want = reference(model, p, 32)
        if g == want:
            continue
        first = next(i for i, (a, b) in enumerate(zip(g, want)) if a != b)
        gap = _logits_gap(model32, p, want[:first + 1])[first]
        assert gap < 0.05, f"diverged at step {first} with a float32 top-2 gap of {gap:.3f}"


def test_shared_prefix_allocates_only_suffix(impl, models, refs):
    be, path = impl
    model = models["llama"]
    block = 8
    shared = prompts([32], seed=7)[0]              # 4 full blocks
    a, b = shared + [1, 2, 3], shared + [9, 8, 7, 6, 5]
    eng = pl.Engine(model, backend=be, path=path, block_size=block, num_blocks=64)
    ra = eng.add_request(a, 8)
    eng.step()                                      # a's prompt is fully written
    used_before = eng.block_counts()[0]
    rb = eng.add_request(b, 8)
    eng.step()
    # b shares a's 4 prefix blocks: it allocated only its suffix block, and a grew by none
    # (a's 36th token still fits its tail block).
    assert eng.stats.prefix_hit_tokens == 32
    assert eng.block_counts()[0] == used_before + 1
    assert eng.state.groups[0].bm.stats().shared == 4
    eng.run()
    assert_tokens(model, a, eng.results(ra)[0], refs("llama", a, 8))
    assert_tokens(model, b, eng.results(rb)[0], refs("llama", b, 8))


def test_fork_n2_matches_independent_runs(impl, models):
    """n = 2 samples fork one prefilled prompt (copy-on-write of its partial tail); with a
    sampler that differs per row they must match two independent runs with the same first
    tokens, i.e. forcing each sample's first token."""
    be, path = impl
    model = models["qwen3"]
    p = prompts([21], seed=11)[0]                  # tail block 5/16 full: shared, then copied
    calls = []

    def second_best_first(logprobs):
        calls.append(logprobs.shape[0])
        greedy = mx.argmax(logprobs, axis=-1)
        if len(calls) == 1:                        # the prompt's step: sample 2 takes top-2
            second = mx.argsort(logprobs, axis=-1)[:, -2]
            return mx.where(mx.arange(logprobs.shape[0]) == 1, second, greedy)
        return greedy
    eng = pl.Engine(model, backend=be, path=path, num_blocks=32, sampler=second_best_first)
    rid = eng.add_request(p, 24, n=2)
    eng.run()
    s1, s2 = eng.results(rid)
    assert calls[0] == 2 and s1[0] != s2[0]
    for sample in (s1, s2):
        want = pl.generate(model, [p + [sample[0]]], max_tokens=23, backend=be, path=path)[0]
        assert_tokens(model, p + [sample[0]], sample[1:], want)


def test_sliding_window_blocks_stay_bounded(impl, models, refs):
    be, path = impl
    model = models["mistral-swa"]
    p = prompts([10], seed=2)[0]
    eng = pl.Engine(model, backend=be, path=path, block_size=8, num_blocks=64, trim_slack=0)
    rid = eng.add_request(p, 150)
    counts = []
    while eng.has_work:
        eng.step()
        if eng.has_work:
            counts.append(eng.block_counts())
    windows = [g.window for g in eng.state.groups]
    swa = windows.index(24)
    full = windows.index(None)
    # window 24 + one partial block + the block being filled: at most ceil(24/8) + 2 blocks
    assert max(c[swa] for c in counts) <= 5
    assert counts[-1][full] == -(-(10 + 149) // 8)
    assert_tokens(model, p, eng.results(rid)[0], refs("mistral-swa", p, 150))


def test_trim_and_regenerate_matches(impl, models, refs):
    be, path = impl
    model = models["mistral-swa"]
    p = prompts([19], seed=4)[0]
    want = refs("mistral-swa", p, 40)
    eng = pl.Engine(model, backend=be, path=path, block_size=8, num_blocks=64)
    rid = eng.add_request(p, 40)
    for _ in range(30):
        eng.step()
    (sid,) = eng.sequences(rid)
    assert_tokens(model, p, eng.results(rid)[0], want[:30])
    # Reject 13 "speculated" tokens: crosses a block boundary and the window's slack.
    assert eng.trim(sid, 13) == 13
    assert_tokens(model, p, eng.results(rid)[0], want[:17])
    eng.run()
    assert_tokens(model, p, eng.results(rid)[0], want)


def test_continuous_batching_joins_and_finishes(models, refs):
    """Requests join mid-run, with different lengths, and each still matches its own reference."""
    model = models["gemma3"]
    ps = prompts((3, 50, 12, 33), seed=9)
    lens = (20, 5, 40, 12)
    eng = pl.Engine(model, backend="mlx", num_blocks=64, max_batch_tokens=24)
    rids = [eng.add_request(ps[0], lens[0]), eng.add_request(ps[1], lens[1])]
    for _ in range(4):
        eng.step()
    rids += [eng.add_request(ps[2], lens[2]), eng.add_request(ps[3], lens[3])]
    eng.run()
    for rid, p, n in zip(rids, ps, lens):
        assert eng.results(rid) == [refs("gemma3", p, n)]
    assert eng.block_counts() == [0, 0]
