"""A tiny mlx-lm model directory, written offline: what `mlx_lm.convert` leaves on disk
(config.json, model.safetensors, tokenizer files), small enough for CI.

The tokenizer is a word-level `tokenizers` vocabulary wrapped by transformers'
`PreTrainedTokenizerFast` and saved with `save_pretrained`, so `mlx_lm.load(dir)` reads it as it
reads a real checkpoint's. Nothing is downloaded.

The transformer blocks have random weights. The embedding and the (untied) output head are set
so that greedy decoding counts: after the word for k the model's top token is the word for k + 1,
and after the last word ("ninety-nine") it is the end-of-sequence token. A random model would
rarely, if ever, produce a chosen EOS id; this one reaches it from any prompt, so stopping at
EOS (and running on past it) is observable and the output is predictable:
"ninety-five" -> " ninety-six ninety-seven ninety-eight ninety-nine", then EOS.

Any model type mlx-lm builds from a config works (llama by default, gpt_oss, ...). One whose
output head is its embedding (gemma2 always ties them) cannot be set up to count: it keeps
random weights, and tests compare its output with mlx-lm's own generate instead.
`quantize_model_dir` turns a directory into a quantized one with mlx-lm's own converter.
"""
from __future__ import annotations

import pathlib

SPECIALS = ["<unk>", "<s>", "</s>"]
EOS_ID = SPECIALS.index("</s>")
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORDS = [_ONES[k] if k < 20 else _TENS[k // 10] + ("-" + _ONES[k % 10] if k % 10 else "")
         for k in range(100)]
VOCAB = SPECIALS + WORDS          # id = position; "zero" is id 3, "ninety-nine" id 102

CONFIG = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=len(VOCAB),
              max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)

# How much the current token's embedding outweighs what the random blocks add to the residual
# stream (their outputs are O(sqrt(hidden))): large enough that the head reads the input token.
_EMBED_SCALE = 1000.0


def word_id(word: str) -> int:
    return VOCAB.index(word)


def _tokenizer(eos_token_id):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(unk_token="<unk>", bos_token="<s>")
    if eos_token_id is not None:
        special["eos_token"] = VOCAB[eos_token_id]
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def write_model_dir(path, *, model_type: str = "llama", eos_token_id: int | None = EOS_ID,
                    seed: int = 0, **config_overrides) -> pathlib.Path:
    """Write a tiny mlx-lm model directory at `path` and return it: a counting one when the
    model has an untied output head, random weights otherwise (see the module docstring).

    eos_token_id: the tokenizer's and config's end-of-sequence id (None: the tokenizer has none,
    so generation runs to max_tokens); a counting model emits it after "ninety-nine".
    config_overrides change the mlx-lm config (the vocabulary stays `VOCAB`).
    """
    from mlx_lm.utils import save_config, save_model

    from paged_attention.integrations.mlx_lm import random_model

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, model_type=model_type, **config_overrides)
    if eos_token_id is not None:
        if not 0 <= eos_token_id < len(VOCAB):
            raise ValueError(f"eos_token_id: expected an id in [0, {len(VOCAB)}), got {eos_token_id}")
        config["eos_token_id"] = eos_token_id
    model = random_model(config, seed=seed)
    if hasattr(model, "lm_head"):
        _make_it_count(model, config, eos_token_id, seed)
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    _tokenizer(eos_token_id).save_pretrained(str(path))
    return path


def quantize_model_dir(src, dst, *, bits: int = 4, group_size: int = 64) -> pathlib.Path:
    """What `mlx_lm.convert --quantize` leaves on disk (packed weights, quantization config,
    tokenizer), written from the model directory `src` into `dst` (which must not exist)."""
    from mlx_lm.convert import convert
    convert(str(src), str(dst), quantize=True, q_bits=bits, q_group_size=group_size)
    return pathlib.Path(dst)


def _make_it_count(model, config: dict, eos_token_id, seed: int) -> None:
    import mlx.core as mx
    hidden = config["hidden_size"]
    # One random unit direction per token: the embedding of token i is a scaled u_i, and the
    # head row of i's successor is u_i, so the successor's logit is the largest by far.
    u = mx.random.normal((len(VOCAB), hidden), key=mx.random.key(seed))
    u = u / mx.linalg.norm(u, axis=-1, keepdims=True)
    first = word_id(WORDS[0])
    successor = list(range(len(VOCAB)))
    for i in range(first, len(VOCAB) - 1):
        successor[i] = i + 1
    successor[len(VOCAB) - 1] = EOS_ID if eos_token_id is None else eos_token_id
    head = mx.random.normal((len(VOCAB), hidden), key=mx.random.key(seed + 1)) * 0.01
    rows = mx.array(successor[first:])
    head[rows] = u[first:]
    model.model.embed_tokens.weight = u * _EMBED_SCALE
    model.lm_head.weight = head
    mx.eval(model.parameters())


if __name__ == "__main__":  # python tests/model_dir.py DIR: write one by hand
    import sys
    print(write_model_dir(sys.argv[1]))
