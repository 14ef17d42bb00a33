"""A real mlx-lm model directory (tests/model_dir.py: config.json, safetensors, a word-level
tokenizer saved by transformers) through `paged-attn generate --model DIR` and
`generate(model, ["text"], tokenizer=tok)`: stops at the tokenizer's EOS, runs on with
--ignore-eos, streams text as it is produced. The models a user brings beyond llama: a 4-bit
directory written by mlx-lm's own converter, gpt-oss (attention sinks) and gemma2 (soft-capped
logits), through `generate()` and the CLI, as mlx-lm's own generate gives them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
pytest.importorskip("transformers", reason="transformers (installed with mlx-lm) is missing")
import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_dir import EOS_ID, quantize_model_dir, word_id, write_model_dir  # noqa: E402

from paged_attention.errors import InvalidInput  # noqa: E402
from paged_attention.integrations import mlx_lm as pl  # noqa: E402
from paged_attention.lab import cli  # noqa: E402


pytestmark = pytest.mark.usefixtures("on_cpu")   # tests/integrations/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models") / "tiny-model")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from mlx_lm import load
    return load(str(model_dir))


def test_directory_loads_with_an_eos(loaded):
    model, tok = loaded
    assert tok.eos_token_ids == {EOS_ID}
    assert tok.encode("ninety-five") == [word_id("ninety-five")]
    # mlx-lm's own loop on this model counts and then emits EOS.
    from mlx_lm import generate as mlx_generate
    assert mlx_generate(model, tok, "ninety-five", max_tokens=8) == \
        "ninety-six ninety-seven ninety-eight ninety-nine"


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_generate_with_tokenizer_stops_at_eos(loaded, backend):
    model, tok = loaded
    got = pl.generate(model, ["ninety-five", "eighty eighty-nine"], max_tokens=20,
                      backend=backend, tokenizer=tok)
    assert [tok.decode(g) for g in got] == [
        "ninety-six ninety-seven ninety-eight ninety-nine", "ninety ninety-one ninety-two "
        "ninety-three ninety-four ninety-five ninety-six ninety-seven ninety-eight ninety-nine"]
    on = pl.generate(model, ["ninety-five"], max_tokens=6, backend=backend, tokenizer=tok,
                     stop_tokens=())
    assert on[0][:5] == got[0] + [EOS_ID] and len(on[0]) == 6
    with pytest.raises(InvalidInput, match=r"prompts\[0\]: got text 'ninety-five' but no "
                                           "tokenizer"):
        pl.generate(model, ["ninety-five"], max_tokens=4, backend=backend)


def run_cli(capsys, *args):
    rc = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_stops_at_eos_by_default(model_dir, capsys):
    rc, out, _ = run_cli(capsys, "--model", str(model_dir), "--prompt", "ninety-five",
                         "--backend", "numpy")
    assert rc == 0
    first = out.splitlines()[0]
    assert first == "[0] 'ninety-five' -> ninety-six ninety-seven ninety-eight ninety-nine"
    assert out.splitlines()[1].startswith("4 tokens in ")


def test_cli_ignore_eos_runs_to_max_tokens(model_dir, capsys):
    rc, out, _ = run_cli(capsys, "--model", str(model_dir), "--prompt", "ninety-five",
                         "--ignore-eos", "--max-tokens", "7")
    assert rc == 0
    assert out.splitlines()[0].startswith(
        "[0] 'ninety-five' -> ninety-six ninety-seven ninety-eight ninety-nine </s>")
    assert out.splitlines()[1].startswith("7 tokens in ")


def test_cli_several_prompts_print_each_sample(model_dir, capsys):
    rc, out, _ = run_cli(capsys, "--model", str(model_dir), "--prompt", "ninety-seven",
                         "--prompt", "ninety", "--n", "2", "--no-progress", "--max-tokens", "12",
                         "--num-blocks", "3",
                         "--block-size", "4")
    assert rc == 0
    lines = out.splitlines()
    # Samples print as they finish (the shorter ones first); 3 blocks of 4 hold one sample
    # at a time, so the others were preempted and recomputed.
    assert "preemptions" in lines[4] and " 0 preemptions" not in lines[4]
    assert lines[:4] == ["[0.0] 'ninety-seven' -> ninety-eight ninety-nine",
                         "[0.1] 'ninety-seven' -> ninety-eight ninety-nine",
                         "[2.0] 'ninety' -> " + " ".join(f"ninety-{w}" for w in
                                                         ("one", "two", "three", "four", "five",
                                                          "six", "seven", "eight", "nine")),
                         "[2.1] 'ninety' -> " + " ".join(f"ninety-{w}" for w in
                                                         ("one", "two", "three", "four", "five",
                                                          "six", "seven", "eight", "nine"))]


def test_cli_streams_text_while_generating(model_dir, capsys, monkeypatch):
    """Text reaches stdout between engine steps, not after the last one."""
    log = []
    step = pl.Engine.step

    def logged(self):
        events = step(self)
        log.append(("step", len(events)))
        return events
    monkeypatch.setattr(pl.Engine, "step", logged)
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: (log.append(("write", s)), real_write(s))[1])
    rc = cli.main(["generate", "--model", str(model_dir), "--prompt", "ninety-three",
                   "--backend", "numpy"])
    assert rc == 0
    steps = [i for i, (kind, _) in enumerate(log) if kind == "step"]
    words = [i for i, (kind, s) in enumerate(log) if kind == "write" and "ninety-" in s
             and "'" not in s]
    assert len(words) == 6 and len(steps) == 7      # 6 words, then the EOS step
    # Each word is written right after the step that sampled it.
    assert all(steps[k] < words[k] < steps[k + 1] for k in range(6))


def test_cli_refuses_missing_directory_and_bad_ids(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 2 and "is not a directory" in err
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, '
                   '"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, '
                   '"head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": 64, '
                   '"tie_word_embeddings": true}')
    rc, _, err = run_cli(capsys, "--random-config", str(cfg), "--prompt", "1 2 99",
                         "--backend", "numpy")
    assert rc == 2 and "prompt[2]: token id 99 is outside [0, 64)" in err
    rc, _, err = run_cli(capsys, "--random-config", str(cfg), "--prompt", "1 2",
                         "--block-size", "0", "--backend", "numpy")
    assert rc == 2 and "block_size: expected an integer >= 1, got 0" in err


# -- the models a user brings: mlx-lm's 4-bit conversion, gpt-oss, gemma2 ---------------------
USER_MODELS = {
    # mlx_lm.convert -q: packed uint32 weights, quantized embedding, float32 scales
    "llama-4bit": lambda d: quantize_model_dir(write_model_dir(d / "src"), d / "q4", bits=4,
                                               group_size=64),
    "gpt-oss": lambda d: write_model_dir(d / "m", model_type="gpt_oss", sliding_window=8,
                                         num_local_experts=4, num_experts_per_tok=2),
    # ties its head to the embedding, so it does not count: random greedy text, compared with
    # mlx-lm's; a cap of 1.0 so that the soft-cap changes these small random logits
    "gemma2": lambda d: write_model_dir(d / "m", model_type="gemma2",
                                        attn_logit_softcapping=1.0),
}


@pytest.fixture(scope="module", params=list(USER_MODELS))
def user_model(request, tmp_path_factory):
    path = USER_MODELS[request.param](tmp_path_factory.mktemp(request.param))
    from mlx_lm import load
    return request.param, path, *load(str(path))


def mlx_lm_text(model, tok, prompt, max_tokens):
    from mlx_lm import generate as mlx_generate
    return mlx_generate(model, tok, prompt, max_tokens=max_tokens)


PROMPT = "eighty eighty-one"


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_user_models_generate_as_mlx_lm(user_model, backend):
    """generate() with text prompts gives mlx-lm's greedy text (the counting ones count and
    stop at EOS), and 64 tokens run past EOS equal mlx-lm's generate_step token for token."""
    from mlx_lm.generate import generate_step
    name, _, model, tok = user_model
    if name == "llama-4bit":
        assert model.layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    want = mlx_lm_text(model, tok, PROMPT, 24)
    if name != "gemma2":
        assert want == " ".join(f"{w}" for w in
                                ["eighty-two", "eighty-three", "eighty-four", "eighty-five",
                                 "eighty-six", "eighty-seven", "eighty-eight", "eighty-nine"]
                                + ["ninety"] + [f"ninety-{o}" for o in
                                                ("one", "two", "three", "four", "five", "six",
                                                 "seven", "eight", "nine")])
    got = pl.generate(model, [PROMPT], max_tokens=24, backend=backend, tokenizer=tok)
    assert tok.decode(got[0]) == want
    ids = tok.encode(PROMPT)
    ref = [int(t) for (t, _), _ in zip(generate_step(mx.array(ids), model, max_tokens=64),
                                       range(64))]
    assert pl.generate(model, [ids], max_tokens=64, backend=backend, stop_tokens=())[0] == ref


def test_user_models_through_the_cli(user_model, capsys):
    name, path, model, tok = user_model
    rc, out, _ = run_cli(capsys, "--model", str(path), "--prompt", PROMPT, "--backend", "numpy",
                         "--max-tokens", "24")
    assert rc == 0
    assert out.splitlines()[0] == f"[0] {PROMPT!r} -> {mlx_lm_text(model, tok, PROMPT, 24)}"


def test_cli_gives_a_repo_id_to_mlx_lms_loader(model_dir, loaded, capsys, monkeypatch):
    """--model takes what mlx_lm.generate --model takes: a string shaped like a Hugging Face
    repo id goes to mlx_lm.load, which resolves (downloads) it; here a stand-in loader returns
    the local model, so nothing is fetched."""
    import mlx_lm
    asked = []
    monkeypatch.setattr(mlx_lm, "load", lambda repo, **kw: (asked.append(repo), loaded)[1])
    rc, out, _ = run_cli(capsys, "--model", "mlx-community/tiny-model-4bit", "--prompt",
                         "ninety-five", "--backend", "numpy")
    assert rc == 0 and asked == ["mlx-community/tiny-model-4bit"]
    assert out.splitlines()[0] == \
        "[0] 'ninety-five' -> ninety-six ninety-seven ninety-eight ninety-nine"

    def offline(repo, **kw):
        raise OSError(f"cannot reach the hub for {repo}")
    monkeypatch.setattr(mlx_lm, "load", offline)
    rc, _, err = run_cli(capsys, "--model", "owner/missing", "--prompt", "x")
    assert rc == 2 and "--model: mlx-lm could not load 'owner/missing': OSError: cannot " \
        "reach the hub for owner/missing" in err
