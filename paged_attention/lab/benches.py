"""The lab's benches, each a measurement the experiment runner runs like any other.

A bench is a module with
    add_arguments(parser)   its options, as `paged-attn bench NAME` flags
    resolve(a)              optional: fill what depends on other options (presets)
    measure(a)              the measurement: records (dicts), or (records, notes)
    follower()              optional: True on a rank other than 0 of a multi-process run
                            (mlx.launch), which measures with rank 0 and writes nothing
and an entry in BENCHES below naming the backend it needs and the measurements its records
belong to (each record's "measurement" field; what identifies a point, what is measured).

One configuration, two front ends: `paged-attn bench NAME --flag ...` parses the flags, and an
experiment file `kind: bench`, `bench: NAME`, `options: {flag: value}` turns its options into the
same flags; both give the same resolved options (the run's config snapshot) to the one runner
(`lab.experiments.runner`), which writes the run directory every experiment writes
(config.yaml, env.json, results.jsonl/csv, summary.md, plots), so `paged-attn compare` reads
any two runs. This module imports no bench: a bench's module (and its backend library) is
imported only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field

from ..errors import InvalidInput, PagedAttentionError


class BenchUnavailable(PagedAttentionError):
    """The bench cannot measure on this machine (no device for it); the message says why."""


@dataclass(frozen=True)
class Measurement:
    """The record format of one measurement: `params` identify a point (compare matches runs on
    them), `metrics` are (key, label) of what is measured, the headline first; `compare` the
    metric keys `paged-attn compare` shows (default: the headline); `x` the param on the plots'
    x axis (no plot without it)."""
    params: tuple[str, ...]
    metrics: tuple[tuple[str, str], ...]
    compare: tuple[str, ...] = ()
    x: str | None = None

    def compared(self) -> tuple[tuple[str, str], ...]:
        keys = self.compare or (self.metrics[0][0],)
        labels = dict(self.metrics)
        return tuple((k, labels[k]) for k in keys)


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    backend: str | None        # the backend it needs; None: it takes the available ones
    help: str
    measurements: dict[str, Measurement] = field(default_factory=dict)


_POINT = ("backend", "path", "batch", "context")
# A decode bench's point is also its attention variant and pool format (None: plain, and the
# bench's own pools), so a run comparing them keeps one record per variant and format.
_DECODE_POINT = _POINT + ("attention", "kv_dtype")

BENCHES = {b.name: b for b in (
    Bench("mlx", "paged_attention.lab.bench.mlx_decode", "mlx",
          "MLX decode kernels (fused, gather, sdpa) on a GPU",
          {"mlx": Measurement(_DECODE_POINT, (("us_per_layer", "us/layer"), ("tbs", "TB/s"),
                                              ("ratio_vs_plain", "x plain"),
                                              ("rms_vs_gather", "RMS vs gather")),
                              compare=("us_per_layer", "tbs"), x="context")}),
    Bench("mlx-ceiling", "paged_attention.lab.bench.mlx_ceiling", "mlx",
          "MLX streaming-read ceiling and launch cost",
          {"mlx-ceiling.read": Measurement(("backend", "groups_per_unit"),
                                           (("read_tbs", "read TB/s"),)),
           "mlx-ceiling.launch": Measurement(("backend", "kernel"), (("us", "us per launch"),))}),
    Bench("vulkan", "paged_attention.lab.bench.vulkan_decode", "vulkan",
          "Vulkan decode kernels, step, model-like loop, round trips, prefill",
          {"vulkan.point": Measurement(_DECODE_POINT, (("kernel_us", "kernel us"), ("gbs", "GB/s"),
                                                       ("ratio_vs_plain", "x plain"),
                                                       ("wall_us", "call wall us"), ("rms", "RMS")),
                                       compare=("kernel_us", "wall_us"), x="context"),
           "vulkan.step": Measurement(_POINT + ("layers",), (("gpu_ms", "GPU ms"),
                                                            ("wall_ms", "wall ms")),
                                      compare=("gpu_ms", "wall_ms")),
           "vulkan.model_loop": Measurement(("backend", "wait", "batch", "context", "layers"),
                                            (("wall_ms", "wall ms"), ("ratio", "x kernels"))),
           "vulkan.tiny": Measurement(("backend", "wait"), (("run_us", "run us"),
                                                            ("decode_us", "decode us")),
                                      compare=("run_us", "decode_us")),
           "vulkan.submit": Measurement(("backend", "wait"), (("us", "round trip us"),)),
           "vulkan.readback": Measurement(("backend", "buffer", "mib"), (("gbs", "GB/s"),)),
           "vulkan.prefill": Measurement(("backend", "tokens"), (("wall_ms", "wall ms"),
                                                                 ("kernel_ms", "kernel ms"),
                                                                 ("per_query_ms", "per-query ms")),
                                         compare=("wall_ms", "kernel_ms"))}),
    Bench("e2e", "paged_attention.lab.e2e", None,
          "the model-like loop through plan/run (every available backend)",
          {"e2e": Measurement(_POINT + ("layers",), (
              ("api_ms", "api ms"), ("kernel_ms", "kernel ms"), ("overlap_ms", "overlap ms"),
              ("fresh_ms", "fresh ms"), ("run_ms", "run ms"), ("inputs_ms", "inputs ms"),
              ("pipe_ms", "pipe ms"), ("pipe_kernel_ms", "pipe kernel ms"),
              ("sdpa_ms", "sdpa ms"), ("api_over_kernel", "api/kernel"),
              ("api_tbs", "api TB/s"), ("host_us_per_run", "host us/run"),
              ("host_us_per_plan", "host us/plan")),
              compare=("api_ms", "kernel_ms", "pipe_ms"), x="context"),
           "e2e.host": Measurement(("backend", "path", "batch", "blocks"), (
               ("plan_us", "plan us"), ("run_us", "run us"), ("check_us", "checks us"),
               ("kernel_call_us", "kernel call us"), ("decode_us", "decode us")),
               compare=("plan_us", "run_us", "decode_us"))}),
    Bench("generate", "paged_attention.lab.generate", None,
          "tokens/s of mlx-lm models on the paged cache vs mlx-lm's own",
          {"generate": Measurement(("backend", "path", "kv_bits", "batch", "lengths", "ragged",
                                    "shared_prefix"),
                                   (("tokens_per_s", "tokens/s"), ("seconds", "s"),
                                    ("peak_kv_bytes", "peak KV bytes")),
                                   compare=("tokens_per_s", "peak_kv_bytes"), x="batch"),
           "generate.tp": Measurement(("backend", "path", "tp", "batch", "lengths"),
                                      (("tokens_per_s", "tokens/s"), ("seconds", "s"),
                                       ("kv_bytes_per_rank", "peak KV bytes per rank"),
                                       ("kv_budget_per_rank", "KV pool bytes per rank"),
                                       ("sequences_admitted", "sequences running at once"),
                                       ("sequences_in_budget", "sequences the pool admits"),
                                       ("preemptions", "preemptions")),
                                      compare=("tokens_per_s", "kv_bytes_per_rank",
                                               "sequences_in_budget"), x="batch")}),
    Bench("coldstart", "paged_attention.lab.bench.coldstart", "mlx",
          "first generate of fresh processes vs their warm run: compilation and its caches",
          {"coldstart": Measurement(("backend", "path", "process"),
                                    (("overhead_s", "first - warm s"), ("first_s", "first s"),
                                     ("warm_s", "warm s"), ("startup_s", "start-up s"),
                                     ("glslc_runs", "glslc runs"),
                                     ("spirv_loaded", "SPIR-V files loaded"),
                                     ("ptx_written", "PTX files written"),
                                     ("driver_cache_files", "driver cache files")),
                                    compare=("overhead_s", "first_s"))}),
    Bench("prefill", "paged_attention.lab.bench.prefill", None,
          "wall time of one prompt's prefill() through the public API",
          {"prefill": Measurement(("backend", "tokens"), (("median_ms", "median ms"),
                                                         ("min_ms", "min ms"), ("rms", "RMS")),
                                  compare=("median_ms",), x="tokens")}),
)}

# Options of the front end, not of the measurement: never in a config snapshot.
FRONT_END = ("out", "json", "no_progress")


def parse_sizes(text: str) -> list[int]:
    """A comma list of positive sizes, a `k` suffix meaning 1024 ("1,8" or "4k,32k"), in the
    order given: the batch and context options of the benches and of `paged-attn tune`."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise InvalidInput(f"expected a comma list of sizes such as 1,4 or 4k,16k, got {text!r}") \
                from None
        if out[-1] <= 0:
            raise InvalidInput(f"sizes must be positive, got {text!r}")
    return out


def get(name: str) -> Bench:
    return BENCHES[name]


def module(name: str):
    return importlib.import_module(BENCHES[name].module)


def measurement(name: str) -> Measurement | None:
    """The record format of a measurement name, from whichever bench declares it."""
    for b in BENCHES.values():
        if name in b.measurements:
            return b.measurements[name]
    return None


def parser(name: str, front_end: bool = True) -> argparse.ArgumentParser:
    mod = module(name)
    p = argparse.ArgumentParser(prog=f"paged-attn bench {name}", description=mod.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    if front_end:
        g = p.add_argument_group("run")
        g.add_argument("--out", default=None,
                       help="run directory (default runs/<timestamp>-bench-<name>/)")
        g.add_argument("--json", default=None, help="also write the records here (one JSON "
                                                    "document: bench, options, rows)")
    return p


def resolved(name: str, a: argparse.Namespace) -> dict:
    """The bench's options after its own resolution (presets), without front-end options: the
    run's config snapshot."""
    hook = getattr(module(name), "resolve", None)
    if hook is not None:
        hook(a)
    return {k: v for k, v in vars(a).items() if k not in FRONT_END}


def argv_from_options(name: str, options: dict, fail) -> list[str]:
    """The command-line flags that say what `options` (YAML keys: the flags' names, dashes or
    underscores) say. fail(key, message) reports a bad key or value."""
    actions = {a.dest: a for a in parser(name, front_end=False)._actions if a.option_strings}
    actions.pop("help", None)
    argv: list[str] = []
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        act = actions.get(dest)
        if act is None:
            fail(key, f"unknown option; expected one of {sorted(actions)}")
        flag = max(act.option_strings, key=len)
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                fail(key, f"expected true or false, got {value!r}")
            if value == bool(act.const):
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, list):
            if not value:
                fail(key, "expected a value or a non-empty list")
            items = [str(v) for v in value]
            argv += [flag] + items if act.nargs in ("+", "*") else [flag, ",".join(items)]
        elif isinstance(value, dict):
            fail(key, f"expected a value or a list, got a mapping {value!r}")
        else:
            argv += [flag, str(value)]
    return argv


def options_from_yaml(name: str, options: dict, fail) -> dict:
    """Validate an experiment file's `options` with the bench's own flag parser; the resolved
    options (what the same flags on the command line give)."""
    argv = argv_from_options(name, options, fail)
    p = parser(name, front_end=False)

    def error(message):
        fail(None, message)
    p.error = error   # argparse reports through self.error; exits are the CLI's business
    return resolved(name, p.parse_args(argv))


def namespace(options: dict) -> argparse.Namespace:
    """The options of a config snapshot as the namespace the bench's measure() takes."""
    return argparse.Namespace(**options)
