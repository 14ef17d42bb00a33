"""`paged-attn generate` and `paged-attn bench generate`: mlx-lm models on the paged cache
(figures: adr/0009-mlx-lm-integration.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

GENERATE_HELP = """Generate with an mlx-lm model on the paged KV cache (continuous batching).
--model takes what `mlx_lm.generate --model` takes: a local mlx-lm model directory
(config.json, *.safetensors, tokenizer files; float or quantized weights) or a Hugging Face repo
id, which mlx-lm's own loader (mlx_lm.load) fetches into its cache. Prompts are then text; each
sample stops at the tokenizer's end-of-sequence ids (--ignore-eos runs on to --max-tokens). One sample streams its
text to the terminal as it is generated; with several, each is printed when it finishes.
--random-config CONFIG.json builds random weights from an mlx-lm config dict; it has no
tokenizer, so each prompt is whitespace-separated TOKEN IDS (e.g. --prompt "1 5 9").
Under `mlx.launch -n N` the model is sharded over the N ranks (tensor parallel: each rank holds
1/N of the heads and of the KV cache; --model loads through mlx-lm's sharded_load); rank 0
prints, and a rank that fails ends the others, naming it."""


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate with an mlx-lm model on the paged cache",
                       description=GENERATE_HELP)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="mlx-lm model directory or Hugging Face repo id")
    src.add_argument("--random-config", help="mlx-lm config JSON; random weights, token-id prompts")
    pr = g.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    pr.add_argument("--prompts", help="a file with one prompt per line")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the tokenizer's end-of-sequence ids")
    g.add_argument("--stop-token", type=int, action="append", default=None,
                   help="a token id that ends a sample (repeatable; with --model, added to EOS)")
    g.add_argument("--backend", default="mlx")
    g.add_argument("--path", default="auto")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: room for every request at once; "
                        "smaller pools preempt and recompute)")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (forks, copy-on-write)")
    g.add_argument("--dtype", default="float32", help="weights of --random-config models")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                   help="quantize the paged KV cache (mlx-lm's affine format; ADR 0011)")
    g.add_argument("--kv-group-size", type=int, default=64,
                   help="elements of head_dim per scale and bias with --kv-bits")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--tp-timeout", type=float, default=300.0,
                   help="under mlx.launch: seconds without a finished collective before a rank "
                        "gives up on its peers (0: wait forever)")
    g.set_defaults(func=cmd_generate)


def _error(msg: str) -> int:
    print(f"paged-attn: error: {msg}", file=sys.stderr)
    return 2


class _Printer:
    """Text to the terminal as it is produced: one sample streams its text inline; with several,
    each sample's line is printed when it finishes (interleaved pieces would be unreadable)."""

    def __init__(self, eng, rids, lines, n, tokenizer, bar):
        self.eng, self.tokenizer, self.bar = eng, tokenizer, bar
        self.samples = [(rid, i, text) for rid, text in zip(rids, lines) for i in range(n)]
        self.inline = len(self.samples) == 1
        self.detok = {}
        self.printed: set = set()
        if self.inline:
            rid, _, text = self.samples[0]
            print(f"[{rid}] {text!r} -> ", end="", flush=True)

    def _text(self, rid, sample):
        toks = self.eng.results(rid)[sample]
        return self.tokenizer.decode(toks) if self.tokenizer else " ".join(map(str, toks))

    def events(self, events) -> None:
        if self.inline:
            for rid, sample, tok in events:
                if self.tokenizer is None:
                    print(f"{tok} ", end="", flush=True)
                    continue
                d = self.detok.get(sample)
                if d is None:
                    d = self.detok[sample] = self.tokenizer.detokenizer
                d.add_token(tok)
                print(d.last_segment, end="", flush=True)   # reading it consumes it
            return
        for rid, sample, text in self.samples:
            if (rid, sample) not in self.printed and self._sample_done(rid, sample):
                self.printed.add((rid, sample))
                self.bar.write(f"[{rid}.{sample}] {text!r} -> {self._text(rid, sample)}",
                               file=sys.stdout)
                sys.stdout.flush()

    def _sample_done(self, rid, sample) -> bool:
        sids = self.eng.sequences(rid)
        return sample < len(sids) and sids[sample] in self.eng.finished

    def close(self) -> None:
        if self.inline:
            if self.tokenizer is not None:
                for d in self.detok.values():
                    d.finalize()
                    print(d.last_segment, end="")
            print(flush=True)


def _model_source_ok(model: str) -> bool:
    """A local directory, or a string shaped like a Hugging Face repo id ("name" or
    "owner/name"; letters, digits, '-', '_', '.'; not a path such as ./x or /tmp/x)."""
    import re
    if os.path.isdir(model):
        return True
    return not os.path.exists(model) and re.fullmatch(
        r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)?", model) is not None


def cmd_generate(args) -> int:
    try:
        from ..integrations import distributed
        from ..integrations import mlx_lm as pl
    except ImportError as e:
        return _error(str(e))
    from ..errors import PagedAttentionError
    group = distributed.launched_group()
    if group is not None and group.rank() != 0:
        # Every rank computes every token; one prints them.
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    try:
        with distributed.fail_fast(group, timeout_s=args.tp_timeout):
            return _generate(args, pl, group)
    except (PagedAttentionError, ValueError) as e:
        return _error(str(e))


def _generate(args, pl, group) -> int:
    from ..integrations import distributed
    lines = args.prompt or [ln.rstrip("\n") for ln in open(args.prompts) if ln.strip()]
    tokenizer = None
    stop = list(args.stop_token or [])
    if args.model:
        if not _model_source_ok(args.model):
            # mlx_lm.load takes any missing path for a repo id and tries to download it.
            return _error(f"--model: {args.model!r} is not a directory (an mlx-lm model "
                          "directory: config.json, *.safetensors, tokenizer files) nor a "
                          "Hugging Face repo id (owner/name)")
        try:
            if group is not None:
                model, tokenizer = distributed.load(args.model, group)
            else:
                from mlx_lm import load
                model, tokenizer = load(args.model)
        except Exception as e:  # noqa: BLE001 - a missing repo, network, bad files: say which
            if isinstance(e, distributed.Unshardable):
                raise
            return _error(f"--model: mlx-lm could not load {args.model!r}: "
                          f"{type(e).__name__}: {e}")
        prompts = [tokenizer.encode(t) for t in lines]
        if not args.ignore_eos:
            stop += sorted(tokenizer.eos_token_ids)
    else:
        with open(args.random_config) as f:
            model = pl.random_model(json.load(f), dtype=args.dtype)
        if group is not None:
            distributed.shard(model, group)
        try:
            prompts = [[int(t) for t in ln.split()] for ln in lines]
        except ValueError:
            return _error("--prompt/--prompts: with --random-config prompts are token ids "
                          "separated by spaces (there is no tokenizer)")
    num_blocks = args.num_blocks
    if num_blocks is None:
        num_blocks = pl.blocks_needed(prompts, max(args.max_tokens, 1),
                                      max(args.block_size, 1), max(args.n, 1))
    eng = pl.Engine(model, backend=args.backend, path=args.path, block_size=args.block_size,
                    num_blocks=num_blocks, prefix_caching=not args.no_prefix_caching,
                    kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    rids = [eng.add_request(p, args.max_tokens, args.n, stop_tokens=stop) for p in prompts]
    from tqdm import tqdm
    total = len(prompts) * args.n * args.max_tokens
    t0 = time.perf_counter()
    # An inline stream and a progress bar would share the terminal line: one or the other.
    inline = len(prompts) * args.n == 1
    with tqdm(total=total, unit="tok", disable=args.no_progress or inline,
              file=sys.stderr) as bar:
        out = _Printer(eng, rids, lines, args.n, tokenizer, bar)
        while eng.has_work:
            events = eng.step()
            bar.update(len(events))
            out.events(events)
        out.close()
    dt = time.perf_counter() - t0
    s = eng.stats
    print(f"{s.tokens_generated} tokens in {dt:.2f} s: {s.tokens_generated / dt:.1f} tokens/s "
          f"({s.steps} steps, {s.tokens_computed} token rows, {s.preemptions} preemptions)")
    ranks = "" if group is None else f" per rank ({group.size()} ranks, tensor parallel)"
    print(f"cache: peak blocks used {s.peak_blocks}, peak KV {s.peak_kv_bytes / 2**20:.2f} MiB"
          f"{ranks}, shared now {s.blocks_shared}, prefix hits {s.prefix_hit_tokens} tokens")
    return 0


# -- bench ----------------------------------------------------------------------------------
CPU_CONFIG = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                  vocab_size=1024, max_position_embeddings=8192, rope_theta=500000.0,
                  tie_word_embeddings=True)
# Llama-3-8B's shapes (random weights, bf16: ~16 GB).
H100_CONFIG = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                   intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, rms_norm_eps=1e-5, vocab_size=128256,
                   max_position_embeddings=131072, rope_theta=500000.0,
                   tie_word_embeddings=False)


def build_model(config: dict, dtype: str, seed: int = 0):
    """Random weights, created layer by layer in `dtype` so a bf16 8B model never exists in
    float32 (which would need 32 GB)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.random.seed(seed)
    dt = getattr(mx, dtype)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            params = {}
            for k, v in tree_flatten(mod.parameters()):
                if isinstance(mod, nn.RMSNorm):
                    params[k] = mx.ones(v.shape, dt)
                else:
                    params[k] = (mx.random.normal(v.shape, dtype=dt)
                                 * (v.shape[-1] ** -0.5)).astype(dt)
            mod.update(tree_unflatten(list(params.items())))
            mx.eval(mod.parameters())
    model.eval()
    return model


def _prompts(batch: int, ragged: bool, shared: bool, lo: int, hi: int, vocab: int, seed: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, batch) if ragged else np.full(batch, (lo + hi) // 2)
    prefix = rng.integers(0, vocab, int(lens.min()) // 2).tolist() if shared else []
    return [prefix + rng.integers(0, vocab, int(n) - len(prefix)).tolist() for n in lens]


def run_mlx_lm(model, prompts, max_tokens):
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    gen = BatchGenerator(model, stop_tokens=None, completion_batch_size=len(prompts),
                         prefill_batch_size=min(8, len(prompts)))
    t0 = time.perf_counter()
    gen.insert(prompts, [max_tokens] * len(prompts))
    peak, n = 0, 0
    while responses := gen.next_generated():
        n += len(responses)
        peak = max(peak, gen.prompt_cache_nbytes)
    mx.synchronize()
    dt = time.perf_counter() - t0
    gen.close()
    return n, dt, peak


def run_paged(model, prompts, max_tokens, backend, path, block_size, batch_tokens=2048,
              kv_bits=None, kv_group_size=64):
    import mlx.core as mx
    from ..integrations import mlx_lm as pl
    eng = pl.Engine(model, backend=backend, path=path, block_size=block_size,
                    num_blocks=pl.blocks_needed(prompts, max_tokens, block_size),
                    max_batch_tokens=batch_tokens, kv_bits=kv_bits, kv_group_size=kv_group_size)
    for p in prompts:
        eng.add_request(p, max_tokens)
    t0 = time.perf_counter()
    eng.run()
    mx.synchronize()
    dt = time.perf_counter() - t0
    return eng.stats.tokens_generated, dt, eng.stats.peak_kv_bytes


def sequences_fitting(prompts, max_tokens: int, block_size: int, kv_bytes: int, config: dict,
                      dtype: str, seed: int = 0, kv_bits=None, kv_group_size: int = 64) -> int:
    """How many requests like `prompts` (their common prefix shared, each with its own random
    suffix of the same length, room for max_tokens) the paged cache admits in kv_bytes of KV
    (pools of `dtype`, quantized to kv_bits): the block manager's own admission, prefix cache
    included, not a formula."""
    import os

    import numpy as np

    from ..block_manager import BlockManager
    from ..errors import PoolExhausted
    from ..validation import check_pool_spec
    spec = check_pool_spec(1, block_size, config["num_key_value_heads"], config["head_dim"],
                           dtype, (dtype,), None if kv_bits is None else f"int{kv_bits}",
                           kv_group_size)
    per_block = block_size * spec.bytes_per_token * config["num_hidden_layers"]
    bm = BlockManager(kv_bytes // per_block, block_size)
    prefix = list(os.path.commonprefix([list(p) for p in prompts]))
    rng = np.random.default_rng(seed)
    for i in range(10**6):
        n = len(prompts[i % len(prompts)])
        ids = prefix + rng.integers(0, config["vocab_size"], n - len(prefix)).tolist()
        try:
            bm.add_sequence(i, token_ids=ids, max_cached_tokens=n - 1)
            bm.append_slots(i, max_tokens)
        except PoolExhausted:
            return i
    return i


BENCH_HELP = ("tokens/s (prefill + decode, end to end) and peak live KV bytes: the paged engine "
              "on each backend/path vs mlx-lm's own BatchGenerator (batch_generate's engine) and "
              "KV cache, with random-weight models.")


def bench_main(argv) -> int:
    from .experiments.runner import bench_cli
    return bench_cli("generate", argv)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.description = BENCH_HELP
    ap.add_argument("--preset", choices=["cpu", "h100"], default="cpu")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32)")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--impls", default=None,
                    help="comma list of backend:path (default: every available one + mlx-lm)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--lengths", default=None,
                    help="prompt lengths LO-HI in tokens (default: 1024-4096 on h100, 32-256 on cpu)")
    ap.add_argument("--batch-tokens", type=int, default=2048,
                    help="the paged engine's max tokens per step (prefill chunks + decode rows)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed first run per impl")
    ap.add_argument("--kv-bits", type=kv_bits_list, default=None,
                    help="quantized paged KV (ADR 0011): 8, 4, or a comma list where 16 means the "
                         "pool's own dtype (e.g. 16,8: each paged impl at both, in one run, "
                         "for tokens/s side by side); reports sequences admitted per MiB")
    ap.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=None,
                    help="with --kv-bits: elements per scale and bias (default 64, or the head "
                         "dim when smaller)")
    tp = ap.add_argument_group("tensor parallel (under mlx.launch -n N)")
    tp.add_argument("--tp", type=int, default=1,
                    help="N > 1: rows for 1 and N ranks (run under `mlx.launch -n N`): tokens/s, "
                         "per-rank KV bytes, sequences admitted in --kv-mib per rank")
    tp.add_argument("--kv-mib", type=float, default=None,
                    help="with --tp: each rank's KV pool in MiB (default: what one rank needs to "
                         "hold half the batch)")


def kv_bits_list(text: str) -> list:
    """'8' -> [8]; '16,8' -> [None, 8]: None is the unquantized pool (the weights' dtype)."""
    out = []
    for part in str(text).split(","):
        if part.strip() not in ("16", "8", "4"):
            raise argparse.ArgumentTypeError(f"--kv-bits: expected 8, 4 or 16 (unquantized), "
                                             f"comma-separated; got {part.strip()!r}")
        out.append(None if part.strip() == "16" else int(part))
    return list(dict.fromkeys(out))


def _bits(a) -> tuple:
    """The run's KV formats: (None,) for plain pools; --kv-bits as parsed (an int from a config
    snapshot or an older caller is one format)."""
    kb = a.kv_bits
    if kb is None:
        return (None,)
    return (kb,) if isinstance(kb, int) else tuple(kb)


def split_impl(impl: str) -> tuple[str, str, int | None]:
    """'mlx:fused@int8' -> ('mlx', 'fused', 8); 'mlx:fused' -> ('mlx', 'fused', None);
    'mlx-lm' -> ('mlx-lm', '', None): an impl of `measure`, its KV format in its name."""
    backend, _, path = impl.partition(":")
    path, _, bits = path.partition("@int")
    return backend, path, int(bits) if bits else None


def follower() -> bool:
    """A rank other than 0 of an `mlx.launch` run: it measures alongside rank 0, which alone
    writes the run (the runner's hook)."""
    try:
        from ..integrations.distributed import launched_group
    except ImportError:
        return False
    group = launched_group()
    return group is not None and group.rank() != 0


def measure(a) -> list[dict]:
    """Records "generate": one per impl x batch x (uniform | ragged) x (own | shared prefix);
    with --tp N, "generate.tp": one per impl x batch x rank count (1, N)."""
    from .. import registry
    if a.tp != 1:
        return measure_tp(a)
    if a.preset == "h100":
        cfg, dtype, lo, hi, steps = H100_CONFIG, "bfloat16", 1024, 4096, a.max_tokens or 32
        default_impls = ["mlx:fused", "mlx-lm"]
    else:
        cfg, dtype, lo, hi, steps = CPU_CONFIG, "float32", 32, 256, a.max_tokens or 32
        default_impls = ["mlx-lm"]
        for name in registry.available_backends():
            be = registry.get_backend(name)
            default_impls += [f"{name}:{p}" for p in be.paths]
    if a.lengths:
        lo, hi = (int(x) for x in a.lengths.split("-"))
    impls = a.impls.split(",") if a.impls else default_impls
    group = getattr(a, "kv_group_size", None) or min(64, cfg["head_dim"])
    # Each paged impl once per KV format; "impl" then carries the format ("mlx:fused@int8").
    impls = [i if i == "mlx-lm" else (i if b is None else f"{i}@int{b}")
             for i in impls for b in (_bits(a) if i != "mlx-lm" else (None,))]
    batches = [int(b) for b in (a.batches or "1,8,32").split(",")]
    t0 = time.perf_counter()
    model = build_model(cfg, dtype)
    print(f"model {cfg['model_type']} hidden {cfg['hidden_size']} x {cfg['num_hidden_layers']} "
          f"layers, {dtype}, built in {time.perf_counter() - t0:.1f} s; prompts {lo}-{hi} tokens, "
          f"{steps} new tokens each", flush=True)
    print(f"{'impl':16s} {'B':>3s} {'lengths':8s} {'prefix':6s} {'tok/s':>9s} {'s':>7s} "
          f"{'peak KV MiB':>11s}", flush=True)
    def run_impl(impl, prompts):
        """(tokens generated, seconds, peak KV bytes) of one impl: 'mlx-lm' or backend:path."""
        if impl == "mlx-lm":
            return run_mlx_lm(model, prompts, steps)
        backend, path, bits = split_impl(impl)
        return run_paged(model, prompts, steps, backend, path, a.block_size, a.batch_tokens,
                         bits, group)

    rows = []
    if a.warmup:
        # One untimed run per impl on the first configuration: the process's first run pays
        # one-time compilation (kernels, graphs) that would otherwise land in the first row.
        warm = _prompts(batches[0], False, False, lo, hi, cfg["vocab_size"], seed=batches[0])
        for impl in impls:
            t1 = time.perf_counter()
            run_impl(impl, warm)
            print(f"# warm-up {impl}: {time.perf_counter() - t1:.1f} s (untimed)", flush=True)
    for b in batches:
        for ragged in (False, True):
            for shared in (False, True):
                prompts = _prompts(b, ragged, shared, lo, hi, cfg["vocab_size"], seed=b)
                for impl in impls:
                    n, dt, peak = run_impl(impl, prompts)
                    row = dict(impl=impl, batch=b, lengths=f"{lo}-{hi}", ragged=ragged,
                               shared_prefix=shared, tokens=n, seconds=dt, tokens_per_s=n / dt,
                               peak_kv_bytes=peak)
                    rows.append(row)
                    print(f"{impl:16s} {b:3d} {'ragged' if ragged else 'uniform':8s} "
                          f"{'50%' if shared else '-':6s} {n / dt:9.1f} {dt:7.2f} "
                          f"{peak / 2**20:11.2f}", flush=True)
                base = [r for r in rows[-len(impls):] if r["impl"] == "mlx-lm"]
                if shared and base:
                    # Concurrency in the same memory: what mlx-lm's cache peaked at for b
                    # sequences, filled by the paged cache's own admission.
                    budget = base[0]["peak_kv_bytes"]
                    fit = sequences_fitting(prompts, steps, a.block_size, budget, cfg, dtype)
                    base[0]["paged_sequences_in_same_kv"] = fit
                    print(f"{'':16s} {b:3d} paged cache admits {fit} such sequences in mlx-lm's "
                          f"{budget / 2**20:.0f} MiB ({fit / b:.2f}x)", flush=True)
                    base[0]["sequences_per_mib"] = fit / (budget / 2**20)
                    for bits in _bits(a):   # the same budget, quantized pools: sequences per byte
                        if bits is None:
                            continue
                        qfit = sequences_fitting(prompts, steps, a.block_size, budget, cfg, dtype,
                                                 kv_bits=bits, kv_group_size=group)
                        for r in rows[-len(impls):]:
                            if split_impl(r["impl"])[2] == bits:
                                r["sequences_per_mib"] = qfit / (budget / 2**20)
                        print(f"{'':16s} {b:3d} int{bits} paged cache admits {qfit} "
                              f"({qfit / (budget / 2**20):.2f}/MiB against "
                              f"{fit / (budget / 2**20):.2f}/MiB unquantized, "
                              f"{qfit / max(fit, 1):.2f}x)", flush=True)
    for r in rows:  # the lab's record fields: backend and path ("mlx-lm": its own cache)
        backend, path, bits = split_impl(r["impl"])
        r.update(measurement="generate", backend=backend, path=path or "-", kv_bits=bits)
    return rows


def measure_tp(a) -> list[dict]:
    """Ragged prompts with a shared prefix, the model sharded over 1 and N ranks, each rank's
    pool of the same bytes: tokens/s, each rank's peak KV bytes, the sequences the engine held
    at once, and how many such sequences the pool admits (the block manager's admission)."""
    import mlx.core as mx

    from ..integrations import distributed
    from ..integrations import mlx_lm as pl
    from .benches import BenchUnavailable
    group = distributed.launched_group()
    size = 1 if group is None else group.size()
    if a.tp < 1 or size != a.tp:
        raise BenchUnavailable(f"--tp {a.tp}: this process is one of {size} rank(s); run it as "
                               f"`mlx.launch -n {a.tp} -- paged-attn bench generate --tp {a.tp}`")
    rank = group.rank()
    say = print if rank == 0 else (lambda *_, **__: None)
    cfg, dtype, lo, hi, steps = (H100_CONFIG, "bfloat16", 1024, 4096, a.max_tokens or 32) \
        if a.preset == "h100" else (CPU_CONFIG, "float32", 32, 256, a.max_tokens or 32)
    if a.lengths:
        lo, hi = (int(x) for x in a.lengths.split("-"))
    impls = a.impls.split(",") if a.impls else ["mlx:fused" if a.preset == "h100" else "mlx:gather"]
    batches = [int(b) for b in (a.batches or "1,8,32").split(",")]
    itemsize = 4 if dtype == "float32" else 2
    rows = []
    with distributed.fail_fast(group, timeout_s=0):
        for tp in (1, a.tp):
            # tp=1: rank 0 alone holds the whole model; the others wait for it.
            model = build_model(cfg, dtype) if tp == 1 and rank == 0 or tp > 1 else None
            if model is not None and tp > 1:
                distributed.shard(model, group)
            cfg_rank = dict(cfg, num_key_value_heads=cfg["num_key_value_heads"] // tp)
            block_bytes = (2 * a.block_size * cfg_rank["num_key_value_heads"] * cfg["head_dim"]
                           * itemsize * cfg["num_hidden_layers"])
            for b in batches:
                prompts = _prompts(b, True, True, lo, hi, cfg["vocab_size"], seed=b)
                half = pl.blocks_needed(prompts[:max(1, b // 2)], steps, a.block_size)
                one_rank = (2 * a.block_size * cfg["num_key_value_heads"] * cfg["head_dim"]
                            * itemsize * cfg["num_hidden_layers"])
                budget = int(a.kv_mib * 2**20) if a.kv_mib else half * one_rank
                for impl in impls:
                    if model is None:
                        continue
                    backend, path = impl.split(":")
                    eng = pl.Engine(model, backend=backend, path=path, block_size=a.block_size,
                                    num_blocks=max(1, budget // block_bytes),
                                    max_batch_tokens=a.batch_tokens,
                                    group=group if tp > 1 else None)
                    for p in prompts:
                        eng.add_request(p, steps)
                    if a.warmup:   # untimed: the first steps compile
                        warm = pl.Engine(model, backend=backend, path=path,
                                         block_size=a.block_size, num_blocks=64,
                                         group=group if tp > 1 else None)
                        warm.add_request(prompts[0][:16], 2)
                        warm.run()
                    t0 = time.perf_counter()
                    eng.run()
                    mx.synchronize()
                    dt = time.perf_counter() - t0
                    s = eng.stats
                    fit = sequences_fitting(prompts, steps, a.block_size, budget, cfg_rank,
                                            itemsize)
                    row = dict(impl=impl, backend=backend, path=path, tp=tp, batch=b,
                               lengths=f"{lo}-{hi}", tokens=s.tokens_generated, seconds=dt,
                               tokens_per_s=s.tokens_generated / dt,
                               kv_bytes_per_rank=s.peak_kv_bytes, kv_budget_per_rank=budget,
                               sequences_admitted=s.peak_running, sequences_in_budget=fit,
                               preemptions=s.preemptions, measurement="generate.tp")
                    rows.append(row)
                    say(f"{impl:12s} tp={tp} B={b:3d} {row['tokens_per_s']:9.1f} tok/s "
                          f"{dt:7.2f} s, KV/rank {s.peak_kv_bytes / 2**20:8.2f} MiB of "
                          f"{budget / 2**20:.2f}, {s.peak_running} running at once, "
                          f"{fit} fit, {s.preemptions} preemptions", flush=True)
            del model
            mx.eval(mx.distributed.all_sum(mx.array([1]), group=group, stream=mx.cpu))
    return rows


def main(argv=None) -> int:
    return bench_main(sys.argv[1:] if argv is None else argv)
