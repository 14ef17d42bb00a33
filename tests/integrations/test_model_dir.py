"""A real mlx-lm model directory (tests/model_dir.py: config.json, safetensors, a word-level
tokenizer saved by transformers) through `paged-attn generate --model DIR` and
`generate(model, ["text"], tokenizer=tok)`: stops at the tokenizer's EOS, runs on with
--ignore-eos, streams text as it is produced."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (extra paged-attention[mlx-lm])")
pytest.importorskip("transformers", reason="transformers (installed with mlx-lm) is missing")
import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_dir import EOS_ID, word_id, write_model_dir  # noqa: E402

from paged_attention.errors import InvalidInput  # noqa: E402
from paged_attention.integrations import mlx_lm as pl  # noqa: E402
from paged_attention.lab import cli  # noqa: E402


@pytest.fixture(autouse=True)
def on_cpu():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


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
