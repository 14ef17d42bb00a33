"""Real (random-weight) mlx-lm models on the paged cache: token-exact against mlx-lm's own
KVCache and generate_step, on every backend x path (`impl`) whose `variants` has the attention
features the model needs (gpt-oss: sinks; gemma2: soft_cap); on any other path the engine must
refuse the model, naming the missing feature."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
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
    # attention sinks on every layer; layer 0 slides over 24 positions, layer 1 sees all; MoE
    "gpt-oss": dict(BASE, model_type="gpt_oss", sliding_window=24, num_local_experts=4,
                    num_experts_per_tok=2),
    # soft-capped logits computed inline (the adapter). The cap is 1.0, not gemma2's 50: these
    # random weights give logits of O(1), which a cap of 50 would leave almost untouched, so
    # an engine that dropped the cap would still match. query_pre_attn_scalar 16 != head_dim:
    # the scale must come from the model, not 1/sqrt(D).
    "gemma2": dict(BASE, model_type="gemma2", attn_logit_softcapping=1.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16),
}
# Weights quantized as mlx_lm.convert -q does (nn.quantize), every bits x group size; attention
# runs in float32 (the scales' dtype). Hidden 128 so that group 128 divides every input dim.
QUANTIZED = {f"llama-q{bits}g{group}": dict(BASE, model_type="llama", hidden_size=128,
                                            intermediate_size=256, quantize=(group, bits))
             for bits in (4, 8) for group in (32, 64, 128)}
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


def build(cfg: dict, dtype: str = "float32"):
    """A random-weight model from one of the configs above (nothing is downloaded)."""
    cfg = dict(cfg)
    quantize = cfg.pop("quantize", None)
    model = pl.random_model(cfg, dtype=dtype, seed=1)
    if cfg["model_type"] == "gpt_oss":
        # mlx-lm initialises sinks to 0 (exp(0) = 1 still joins every denominator); random
        # ones, a few units wide as trained models' are, make each head's sink count.
        for i, layer in enumerate(model.layers):
            layer.self_attn.sinks = 2 * mx.random.normal((cfg["num_attention_heads"],),
                                                         key=mx.random.key(100 + i))
    if quantize:
        group, bits = quantize
        nn.quantize(model, group_size=group, bits=bits)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def models():
    return {name: build(cfg) for name, cfg in {**CONFIGS, **QUANTIZED}.items()}


def missing_features(be, path, model) -> list:
    """Features the model's attention needs that path `path` of `be` does not implement."""
    return sorted(pl.inspect_model(model).features - be.variants.get(path, frozenset()))


def serves(be, path, model) -> bool:
    """True when `path` implements what the model needs; otherwise checks that the engine (and
    make_paged_cache) refuse the model up front, naming each missing feature, and returns
    False, so the caller's test passes on what it could check instead of skipping silently."""
    missing = missing_features(be, path, model)
    if not missing:
        return True
    for make in (lambda: pl.Engine(model, backend=be, path=path, num_blocks=8),
                 lambda: pl.make_paged_cache(model, backend=be, path=path, num_blocks=8)):
        with pytest.raises(pl.Unsupported) as err:
            make()
        for f in missing:
            assert f in str(err.value) and repr(path) in str(err.value), str(err.value)
    return False


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


@pytest.mark.parametrize("name", list(CONFIGS) + list(QUANTIZED))
def test_greedy_matches_mlx_lm(impl, name, models, refs):
    be, path = impl
    if not serves(be, path, models[name]):
        return
    ps = prompts(PROMPT_LENS)
    got = pl.generate(models[name], ps, max_tokens=STEPS, backend=be, path=path)
    for p, g in zip(ps, got):
        assert_tokens(models[name], p, g, refs(name, p))


@pytest.mark.parametrize("name", ["qwen3", "gpt-oss", "gemma2", "llama-q4g64"])
def test_mlx_lm_generate_step_drives_paged_cache(impl, name, models, refs):
    """mlx-lm's unmodified generate_step with the paged cache list (prefill in one call)."""
    be, path = impl
    model = models[name]
    if not serves(be, path, model):
        return
    p = prompts([23], seed=3)[0]
    cache = pl.make_paged_cache(model, backend=be, path=path, num_blocks=16)
    with pl.paged_attention_hook(model):
        got = [int(t) for (t, _), _ in zip(
            generate_step(mx.array(p), model, max_tokens=STEPS, prompt_cache=cache), range(STEPS))]
    assert_tokens(model, p, got, refs(name, p))


def test_cache_refuses_use_outside_hook(models):
    model = models["qwen3"]
    cache = pl.make_paged_cache(model, backend="numpy", num_blocks=8)
    with pytest.raises(pl.PagedAttentionError, match="paged_attention_hook"):
        model(mx.array([[1, 2, 3]]), cache=cache)


def test_unsupported_architecture_is_refused():
    model = pl.random_model(dict(BASE, model_type="starcoder2", norm_epsilon=1e-5))
    with pytest.raises(pl.Unsupported, match=r"starcoder2 is not served .* \(supported: llama, "
                                             "qwen2, qwen3, gemma3_text, gpt_oss, gemma2"):
        pl.Engine(model, backend="numpy")


def test_hook_restores_what_it_patched(models):
    """The hook patches one name per model module (gemma2: its attention class's __call__,
    the others: the module's scaled_dot_product_attention), nests, and puts back mlx-lm's own
    on the way out, so a model outside the hook runs mlx-lm's code with any cache."""
    from mlx_lm.models import gemma2, gpt_oss
    before = (gemma2.Attention.__call__, gpt_oss.scaled_dot_product_attention)
    with pl.paged_attention_hook(models["gemma2"]), pl.paged_attention_hook(models["gpt-oss"]):
        with pl.paged_attention_hook(models["gemma2"]):
            assert gemma2.Attention.__call__ is not before[0]
            assert gpt_oss.scaled_dot_product_attention is not before[1]
        assert gemma2.Attention.__call__ is not before[0]
        # mlx-lm's own cache still gets mlx-lm's attention inside the hook
        p = prompts([9], seed=12)[0]
        inside = reference(models["gemma2"], p, 8)
    assert (gemma2.Attention.__call__, gpt_oss.scaled_dot_product_attention) == before
    assert inside == reference(models["gemma2"], p, 8)


@pytest.mark.parametrize("name", ["llama-q4g64", "llama-q8g128"])
def test_quantized_weights_pool_dtype_is_the_activation_dtype(name, models):
    """Packed uint32 weights say nothing about attention: the pools take the dtype q, k, v
    arrive in (float32 here, the quantization scales'; float16 for a float16 model)."""
    info = pl.inspect_model(models[name])
    assert models[name].layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    assert info.dtype == "float32" and info.head_dim == 32 and info.num_q_heads == 4
    half = build(QUANTIZED["llama-q4g64"], dtype="float16")
    assert pl.inspect_model(half).dtype == "float16"
    eng = pl.Engine(half, backend="numpy", num_blocks=4)
    assert eng.state.groups[0].pools[0].spec.dtype == "float16"


def test_needed_features_are_checked_before_anything_runs():
    """A path without sinks/soft-cap is refused when the engine is made, naming the feature
    and the paths that have it (gpt-oss and gemma2 on a backend listing no variants)."""
    from paged_attention.backends.numpy_backend import Backend as NumpyBackend

    class Plain(NumpyBackend):
        variants = {"reference": frozenset({"return_lse"})}
    gpt_oss = build(CONFIGS["gpt-oss"])
    with pytest.raises(pl.Unsupported, match=r"'reference' of backend 'numpy' does not "
                                             r"implement sinks.*paths that do: \[\]"):
        pl.Engine(gpt_oss, backend=Plain(), path="reference")
    with pytest.raises(pl.Unsupported, match="no path of 'numpy' implements sinks"):
        pl.Engine(gpt_oss, backend=Plain())
    with pytest.raises(pl.Unsupported, match="no path of 'numpy' implements soft_cap"):
        pl.Engine(build(CONFIGS["gemma2"]), backend=Plain())


def test_bfloat16_refused_where_backend_has_no_bf16_pools(models):
    """Every shipped backend has bf16 pools now; one without them is refused up front."""
    from paged_attention.backends.numpy_backend import NumpyBackend

    class NoBf16(NumpyBackend):
        pool_dtypes = ("float16", "float32")
    model = build(CONFIGS["qwen3"], dtype="bfloat16")
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


@pytest.mark.parametrize("name", ["llama", "gpt-oss", "gemma2", "llama-q4g64"])
def test_shared_prefix_allocates_only_suffix(impl, name, models, refs):
    be, path = impl
    model = models[name]
    if not serves(be, path, model):
        return
    block = 8
    shared = prompts([32], seed=7)[0]              # 4 full blocks
    a, b = shared + [1, 2, 3], shared + [9, 8, 7, 6, 5]
    eng = pl.Engine(model, backend=be, path=path, block_size=block, num_blocks=64)
    full = [g.window for g in eng.state.groups].index(None)
    ra = eng.add_request(a, 8)
    eng.step()                                      # a's prompt is fully written
    used_before = eng.block_counts()[full]
    rb = eng.add_request(b, 8)
    eng.step()
    # b shares a's 4 prefix blocks: it allocated only its suffix block, and a grew by none
    # (a's 36th token still fits its tail block).
    assert eng.stats.prefix_hit_tokens == 32
    assert eng.block_counts()[full] == used_before + 1
    assert eng.state.groups[full].bm.stats().shared == 4
    eng.run()
    assert_tokens(model, a, eng.results(ra)[0], refs(name, a, 8))
    assert_tokens(model, b, eng.results(rb)[0], refs(name, b, 8))


@pytest.mark.parametrize("name", ["qwen3", "gpt-oss", "gemma2", "llama-q4g64"])
def test_fork_n2_matches_independent_runs(impl, name, models, refs):
    """n = 2 samples fork one prefilled prompt (copy-on-write of its partial tail); with a
    sampler that differs per row they must match two independent runs with the same first
    tokens, i.e. forcing each sample's first token (and mlx-lm's own run for them)."""
    be, path = impl
    model = models[name]
    if not serves(be, path, model):
        return
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
        assert_tokens(model, p + [sample[0]], sample[1:], refs(name, p + [sample[0]], 23))


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


def test_sinks_steps_leave_an_auto_path_without_sinks():
    """plan(path="auto") cannot know run will get sinks: where auto picks a path without them
    (here a numpy backend whose auto choice, "plain", lists no variants), the sinks model's
    steps are planned on the first path that has them, and tokens stay mlx-lm's."""
    from paged_attention.backends.numpy_backend import Backend as NumpyBackend

    class AutoWithoutSinks(NumpyBackend):
        paths = ("plain", "reference")
        variants = {"plain": frozenset(), "reference": NumpyBackend.variants["reference"]}

        def _auto_path(self, args, spec):
            return "plain"

        def _run_variant(self, plan, q, pool, k, v, sinks):
            self.chosen.append(plan.path)
            return super()._run_variant(plan, q, pool, k, v, sinks)

    be = AutoWithoutSinks()
    be.chosen = []             # the path of every layer's run (numpy's _run goes through here)
    model = build(CONFIGS["gpt-oss"])
    p = prompts([30], seed=13)[0]
    assert pl.generate(model, [p], max_tokens=16, backend=be)[0] == reference(model, p, 16)
    assert set(be.chosen) == {"reference"} and len(be.chosen) == 2 * 16  # 2 layers x 16 steps
    # a model without sinks on that backend keeps auto's choice
    be.chosen = []
    pl.generate(build(CONFIGS["llama"]), [p[:5]], max_tokens=2, backend=be)
    assert set(be.chosen) == {"plain"}


@pytest.mark.parametrize("name, dropped", [("gpt-oss", "sinks"), ("gemma2", "soft_cap")])
def test_configs_depend_on_the_feature(name, dropped, models, refs, monkeypatch):
    """The token-exact tests above could not fail if these tiny models ignored their sinks or
    cap: an engine that drops the feature must give different tokens on them."""
    attend = pl.PagedLayerCache._attend

    def without(self, q, k, v, scale, **kw):
        kw.pop(dropped)
        return attend(self, q, k, v, scale, **kw)
    monkeypatch.setattr(pl.PagedLayerCache, "_attend", without)
    ps = prompts(PROMPT_LENS)
    got = pl.generate(models[name], ps, max_tokens=STEPS, backend="numpy")
    assert sum(g != refs(name, p) for g, p in zip(got, ps)) >= 3
