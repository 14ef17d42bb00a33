"""Quantized paged KV in the engine (ADR 0011): greedy tokens equal mlx-lm's own quantized cache
(`generate_step(..., kv_bits=b, kv_group_size=64, quantized_kv_start=0)`) for 64 steps in
float32, parting only at a near tie of mlx-lm's own top-2 logprobs (< 0.05): mlx-lm attends
through quantized matmuls, the paged paths over the dequantized blocks, and mlx-lm's prompt
pass sees its K/V before they are quantized. A path that does not list the format refuses it
by name. Prefix sharing, forks and sliding windows run on quantized pools too."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import QuantizedKVCache  # noqa: E402

import paged_attention as pa  # noqa: E402
from paged_attention.integrations import mlx_lm as pl  # noqa: E402

# head_dim 64: mlx-lm's quantized cache needs kv_group_size (64) to divide it.
BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, vocab_size=256,
            max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)
STEPS = 64
NEAR_TIE = 0.05


pytestmark = pytest.mark.usefixtures("on_cpu")   # tests/integrations/conftest.py


@pytest.fixture(scope="module")
def models():
    return {"qwen3": pl.random_model(dict(BASE, model_type="qwen3"), seed=1),
            "llama": pl.random_model(dict(BASE, model_type="llama"), seed=2),
            "mistral-swa": pl.random_model(dict(BASE, model_type="mistral", sliding_window=24,
                                                layer_types=["sliding_attention",
                                                             "full_attention"]), seed=3)}


def prompts(lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lens]


def mlx_lm_reference(model, prompt, bits, steps=STEPS, cache=None):
    """mlx-lm's tokens and each step's top-2 logprob gap. `cache`: an explicit prompt_cache
    (windowed models: mlx-lm cannot quantize its rotating cache, so a QuantizedKVCache per
    layer, masked by the model's windows, stands in)."""
    kw = dict(prompt_cache=cache) if cache is not None else \
        dict(kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
    toks, gaps = [], []
    for (tok, logprobs), _ in zip(generate_step(mx.array(prompt), model, max_tokens=steps, **kw),
                                  range(steps)):
        toks.append(int(tok))
        top = np.sort(np.array(logprobs.astype(mx.float32)))[-2:]
        gaps.append(float(top[1] - top[0]))
    return toks, gaps


def assert_tokens(got, want, gaps):
    """Equal, or parting first where mlx-lm's own top-2 logprobs are nearly tied."""
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert first is not None, f"lengths differ: {len(got)} != {len(want)}"
    assert gaps[first] < NEAR_TIE, (f"diverged at step {first} where mlx-lm's top-2 logprob gap "
                                    f"is {gaps[first]:.3f} >= {NEAR_TIE}")


def reads(be, path, bits) -> bool:
    """Whether `path` reads int<bits> pools; if not, check that the engine refuses by name."""
    fmt = f"int{bits}"
    if fmt in be.kv_formats.get(path, ()):
        return True
    err = pa.InvalidInput if not be.paths_reading(fmt) else pa.UnsupportedPath
    with pytest.raises(err, match=fmt if err is pa.UnsupportedPath else "kv_dtype"):
        pl.generate(pl.random_model(dict(BASE, model_type="qwen3")), [[1, 2, 3]], max_tokens=2,
                    backend=be, path=path, kv_bits=bits)
    return False


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_greedy_matches_mlx_lm_quantized_cache(impl, name, bits, models):
    be, path = impl
    if not reads(be, path, bits):
        return
    ps = prompts((1, 7, 41), seed=bits)
    got = pl.generate(models[name], ps, max_tokens=STEPS, backend=be, path=path, kv_bits=bits)
    for p, g in zip(ps, got):
        assert_tokens(g, *mlx_lm_reference(models[name], p, bits))


def test_sliding_window_on_quantized_pools(impl, models):
    """Windows on quantized pools (beyond mlx-lm, which cannot quantize its rotating cache):
    the window's blocks are released and tokens match a full quantized cache with the model's
    window masks."""
    be, path = impl
    if not reads(be, path, 8):
        return
    model = models["mistral-swa"]
    p = prompts([10], seed=4)[0]
    eng = pl.Engine(model, backend=be, path=path, block_size=8, num_blocks=64, trim_slack=0,
                    kv_bits=8)
    rid = eng.add_request(p, STEPS)
    swa = [g.window for g in eng.state.groups].index(24)
    most = 0
    while eng.has_work:
        eng.step()
        most = max(most, eng.block_counts()[swa])
    assert most <= 5          # window 24 over blocks of 8, a partial block and the next one
    cache = [QuantizedKVCache(group_size=64, bits=8) for _ in model.layers]
    assert_tokens(eng.results(rid)[0], *mlx_lm_reference(model, p, 8, cache=cache))


def test_prefix_sharing_and_forks_on_quantized_pools(impl, models):
    """Shared prefix blocks hold their scales once; a fork's copy-on-write copies them; both
    give the tokens of independent runs."""
    be, path = impl
    if not reads(be, path, 4):
        return
    model = models["llama"]
    shared = prompts([32], seed=7)[0]
    a, b = shared + [1, 2, 3], shared + [9, 8, 7]
    eng = pl.Engine(model, backend=be, path=path, block_size=8, num_blocks=64, kv_bits=4)
    ra = eng.add_request(a, 16)
    eng.step()
    rb = eng.add_request(b, 16, n=2)
    eng.run()
    assert eng.stats.prefix_hit_tokens >= 32
    alone = pl.generate(model, [a, b], max_tokens=16, backend=be, path=path, kv_bits=4,
                        prefix_caching=False)
    assert eng.results(ra)[0] == alone[0]
    assert eng.results(rb) == [alone[1], alone[1]]     # greedy: both forks as one run


def test_kv_bits_is_checked(models):
    for bad in (2, 16, True, "8"):
        with pytest.raises(pa.InvalidInput, match="kv_bits"):
            pl.generate(models["qwen3"], [[1]], max_tokens=1, backend="numpy", kv_bits=bad)
    with pytest.raises(pa.InvalidInput, match="kv_group_size"):
        pl.generate(models["qwen3"], [[1]], max_tokens=1, backend="numpy", kv_bits=8,
                    kv_group_size=128)          # does not divide head_dim 64


def test_quantized_pools_hold_fewer_bytes(models):
    """The engine's pools count K, V and scales: float32 here (the model's dtype), D = 64, one
    group: per token and head, int8 64 + 2 x 4 bytes and int4 32 + 2 x 4 against 256."""
    def pool_bytes(e):
        return sum(p.nbytes for g in e.state.groups for p in g.pools.values())
    plain = pool_bytes(pl.Engine(models["qwen3"], backend="numpy", num_blocks=8))
    for bits, per_head in ((8, 72), (4, 40)):
        q = pool_bytes(pl.Engine(models["qwen3"], backend="numpy", num_blocks=8, kv_bits=bits))
        assert q / plain == per_head / 256


def test_kv_dtype_names_any_format(models):
    """kv_dtype (create_pool's names) beside mlx-lm's kv_bits: 'int8' is kv_bits=8 token for
    token; 'float8_e4m3', which mlx-lm has no name for, fills fp8 pools; both at once, or an
    unknown name, is refused by name before anything is built."""
    be, model = pa.get_backend("numpy"), models["qwen3"]
    ps = prompts((5, 9), seed=7)
    assert pl.generate(model, ps, max_tokens=8, backend=be, kv_dtype="int8") == \
        pl.generate(model, ps, max_tokens=8, backend=be, kv_bits=8)
    engines = []
    got = pl.generate(model, ps, max_tokens=8, backend=be, kv_dtype="float8_e4m3",
                      engine_out=engines)
    assert [len(g) for g in got] == [8, 8]
    pools = [p for g in engines[0].state.groups for p in g.pools.values()]
    assert {p.kv_format.name for p in pools} == {"float8_e4m3"}
    with pytest.raises(pa.InvalidInput, match="kv_bits, kv_dtype"):
        pl.generate(model, ps, max_tokens=2, backend=be, kv_bits=8, kv_dtype="int8")
    with pytest.raises(pa.InvalidInput, match="kv_dtype"):
        pl.Engine(model, backend=be, kv_dtype="int3")
