"""Experiment files: loading, schema validation and expansion of the sweep grid.

An experiment is a YAML mapping (read with `yaml.safe_load` only)::

    name: smoke                      # optional, defaults to the file's stem
    description: free text
    kind: decode                     # decode | prefix_sharing
    backends: [numpy, mlx, vulkan]   # or "all"; unavailable ones are skipped with the reason
    paths: all                       # or a list: gather, fused, splitk, reference, dense, auto
    grid:                            # every axis a scalar or a list; the sweep is their product
      batch: [1, 4]
      context: [256, 1024]           # tokens per sequence (every sequence the same length)
      num_q_heads: 8
      num_kv_heads: 2
      head_dim: 64
      block_size: 16
      dtype: float16                 # float16 | bfloat16 | float32 (of q, the output, the scales)
      kv_dtype: null                 # null (K/V stored in dtype) | int8 | int4 | float8_e4m3 (ADR 0011)
      kv_group_size: 64              # int8/int4: elements per scale and bias (32, 64, 128)
      window: null                   # null (full context) or a sliding window in tokens
      fragmentation: fragmented      # fragmented (random block order) | contiguous
      layers: 4                      # layers per decode step (per-layer time is step time / layers)
      shared_prefix: 0.0             # prefix_sharing only: fraction of each prompt that is shared
    measure:
      warmup: 1                      # untimed steps per point and path
      iterations: 5                  # timed steps per point and path
      pools: 2                       # distinct pools rotated over the layers (at most `layers`)
      max_pool_memory_mb: 2048       # fewer pools (never < 1) when pools * pool bytes exceed this
      max_seconds: 20                # stop timing a path early (after >= 2 steps) past this budget
    check:
      rms_tolerance: 0.01            # RMS vs the float64 numpy reference must stay below this
      sequences: 2                   # ... computed on the first n sequences of layer 0 (a subsample)
      max_reference_tokens: 65536    # skip the check when n * context exceeds this
    plot:
      x: context                     # grid axis on the x axis of the plots
      facet: batch                   # one panel per value of this axis
    calibrate: false                 # true: write the path selector's calibration table
    greedy:                          # optional: greedy agreement of each quantized kv_dtype of
      model: {model_type: llama, ...}  # the grid with plain KV, on this random mlx-lm model
      steps: 64                      # tokens generated per prompt
      prompts: [1, 7, 41]            # prompt lengths (random token ids)
      seed: 0                        # weights and prompts
    quick:                           # what --quick replaces (grid axes, measure, check, greedy keys)
      grid: {context: [256]}
      measure: {iterations: 2}

Points whose kv_dtype is not affine (null, float8_e4m3) have no group size (kv_group_size
null in their records), and affine points whose group does not divide head_dim are left out.

Any key outside this schema is an error; so is a wrong type or value. Errors are
`ConfigError`s whose message names the file, the key and what was expected.

A bench (`paged-attn bench NAME`, lab/bench) is an experiment too; its options are its flags'
names, checked by the bench's own flag parser::

    name: e2e_cpu
    kind: bench
    bench: e2e                       # one of lab.bench.BENCHES
    options:                         # what `paged-attn bench e2e --preset cpu --batches 1,4` says
      preset: cpu
      batches: [1, 4]                # a list: repeated values, or comma-joined for a text flag
      host: true                     # a switch: true or false
    quick:
      options: {contexts: [256]}     # what --quick replaces
"""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from ... import registry
from ...errors import PagedAttentionError
from ...kv_formats import GROUP_SIZES, KV_DTYPES, KVFormat

KINDS = ("decode", "prefix_sharing", "bench")
BENCH_KEYS = ("name", "description", "kind", "bench", "options", "quick")
# Paths the lab adds to the backends' own (registry.known_paths): the contiguous baseline and
# the backend's automatic choice.
LAB_PATHS = ("dense", "auto")


def backend_names() -> tuple[str, ...]:
    return tuple(registry.BACKENDS)


def path_names() -> tuple[str, ...]:
    known = {p for name in registry.BACKENDS for p in registry.known_paths(name)}
    return tuple(sorted(known)) + LAB_PATHS
DTYPES = ("float16", "bfloat16", "float32")
FRAGMENTATION = ("fragmented", "contiguous")
KV_CHOICES = (None,) + KV_DTYPES

# axis -> (kind check, description of what is expected, default)
GRID_AXES = {
    "batch": ("posint", "a positive int", 1),
    "context": ("posint", "a positive int (tokens)", 256),
    "num_q_heads": ("posint", "a positive int", 8),
    "num_kv_heads": ("posint", "a positive int", 2),
    "head_dim": ("posint", "a positive int", 64),
    "block_size": ("posint", "a positive int", 16),
    "dtype": ("choice", f"one of {list(DTYPES)}", "float16"),
    "kv_dtype": ("choice", f"null or one of {list(KV_DTYPES)}", None),
    "kv_group_size": ("choice", f"one of {list(GROUP_SIZES)}", 64),
    "window": ("window", "null or a positive int (tokens)", None),
    "fragmentation": ("choice", f"one of {list(FRAGMENTATION)}", "fragmented"),
    "layers": ("posint", "a positive int", 4),
    "shared_prefix": ("fraction", "a number in [0, 1)", 0.0),
}
CHOICES = {"dtype": DTYPES, "fragmentation": FRAGMENTATION, "kv_dtype": KV_CHOICES,
           "kv_group_size": GROUP_SIZES}

MEASURE_KEYS = {
    "warmup": ("nonneg", "an int >= 0", 1),
    "iterations": ("posint", "a positive int", 5),
    "pools": ("posint", "a positive int", 2),
    "max_pool_memory_mb": ("posnum", "a positive number (MB)", 2048),
    "max_seconds": ("posnum", "a positive number (seconds)", 20),
}
CHECK_KEYS = {
    "rms_tolerance": ("posnum", "a positive number", 1e-2),
    "sequences": ("posint", "a positive int", 2),
    "max_reference_tokens": ("posint", "a positive int", 65536),
}
GREEDY_KEYS = {
    "steps": ("posint", "a positive int (tokens per prompt)", 64),
    "seed": ("nonneg", "an int >= 0", 0),
}
TOP_KEYS = ("name", "description", "kind", "backends", "paths", "grid", "measure", "check",
            "plot", "calibrate", "greedy", "quick")


class ConfigError(PagedAttentionError, ValueError):
    """A malformed experiment file; the message names the file, the key and what was expected."""


@dataclass
class Experiment:
    name: str
    source: str                      # the file it was read from
    kind: str
    backends: list[str]              # names, or ["all"]
    paths: list[str]                 # names, or ["all"]
    grid: dict[str, list]
    measure: dict
    check: dict
    plot: dict
    calibrate: bool
    description: str = ""
    quick: dict = field(default_factory=dict)
    is_quick: bool = False
    greedy: dict | None = None       # the greedy section (lab.experiments.greedy), or None

    def points(self) -> list[dict]:
        """Every grid point (a dict axis -> value), in a stable order; impossible head
        configurations (num_q_heads not a multiple of num_kv_heads, an affine group not
        dividing head_dim) are left out, and formats without groups get kv_group_size None."""
        axes = list(GRID_AXES)
        out, seen = [], set()
        for values in itertools.product(*(self.grid[a] for a in axes)):
            p = dict(zip(axes, values))
            if p["num_q_heads"] % p["num_kv_heads"]:
                continue
            if p["kv_dtype"] is None or not KVFormat(p["kv_dtype"]).affine:
                p["kv_group_size"] = None
            elif p["head_dim"] % p["kv_group_size"]:
                continue
            key = tuple(p.values())
            if key not in seen:
                seen.add(key)
                out.append(p)
        return out

    def to_dict(self) -> dict:
        """The resolved experiment (after --quick), as written to the run's config snapshot."""
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "backends": self.backends, "paths": self.paths, "grid": self.grid,
                "measure": self.measure, "check": self.check, "plot": self.plot,
                "calibrate": self.calibrate, "greedy": self.greedy,
                "quick_applied": self.is_quick, "source": self.source}


@dataclass
class BenchExperiment:
    """A bench as an experiment: its name and resolved options (its flags' values)."""
    name: str
    source: str
    bench: str
    options: dict
    description: str = ""
    is_quick: bool = False
    kind: str = "bench"

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "bench": self.bench, "options": self.options, "quick_applied": self.is_quick,
                "source": self.source}


def _type_ok(kind: str, v) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_num = (isinstance(v, (int, float)) and not isinstance(v, bool))
    if kind == "posint":
        return is_int and v > 0
    if kind == "nonneg":
        return is_int and v >= 0
    if kind == "posnum":
        return is_num and v > 0
    if kind == "fraction":
        return is_num and 0 <= v < 1
    if kind == "window":
        return v is None or (is_int and v > 0)
    raise AssertionError(kind)


def _describe(v) -> str:
    return f"{v!r} ({type(v).__name__})"


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, expected: str, got=None, *, missing=False):
        what = "missing" if missing else f"got {_describe(got)}"
        raise ConfigError(f"{self.source}: {key}: expected {expected}, {what}")

    def mapping(self, key: str, v, allowed) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.fail(key, "a mapping", v)
        for k in v:
            if k not in allowed:
                self.unknown(f"{key}.{k}" if key else str(k), allowed)
        return v

    def unknown(self, key: str, allowed):
        raise ConfigError(f"{self.source}: {key}: unknown key; expected one of {sorted(allowed)}")

    def axis(self, name: str, v) -> list:
        kind, expected, _ = GRID_AXES[name]
        values = v if isinstance(v, list) else [v]
        if not values:
            self.fail(f"grid.{name}", f"{expected} or a non-empty list of them", v)
        for i, x in enumerate(values):
            key = f"grid.{name}" + (f"[{i}]" if isinstance(v, list) else "")
            if kind == "choice":
                if x not in CHOICES[name]:
                    self.fail(key, expected, x)
            elif not _type_ok(kind, x):
                self.fail(key, expected, x)
        return list(values)

    def scalars(self, key: str, section: dict, spec: dict, base: dict | None = None) -> dict:
        out = dict(base) if base is not None else {k: d for k, (_, _, d) in spec.items()}
        for k, v in section.items():
            kind, expected, _ = spec[k]
            if not _type_ok(kind, v):
                self.fail(f"{key}.{k}", expected, v)
            out[k] = v
        return out

    def names(self, key: str, v, allowed) -> list[str]:
        if v is None or v == "all":
            return ["all"]
        values = v if isinstance(v, list) else [v]
        if not values:
            self.fail(key, f'"all" or a non-empty list of {list(allowed)}', v)
        for i, x in enumerate(values):
            if x not in allowed:
                self.fail(f"{key}[{i}]" if isinstance(v, list) else key,
                          f'"all" or one of {list(allowed)}', x)
        return list(values)


def parse(data, source: str, *, quick: bool = False) -> Experiment:
    """Validate a loaded YAML document and build the Experiment (with --quick applied)."""
    c = _Checker(source)
    if not isinstance(data, dict):
        c.fail("(top level)", "a mapping of experiment keys", data)
    c.mapping("", data, BENCH_KEYS if data.get("kind") == "bench" else TOP_KEYS)
    name = data.get("name", os.path.splitext(os.path.basename(source))[0])
    if not isinstance(name, str) or not name or any(ch in name for ch in "/\\ \t\n"):
        c.fail("name", "a non-empty string without spaces or slashes", name)
    description = data.get("description", "")
    if not isinstance(description, str):
        c.fail("description", "a string", description)
    kind = data.get("kind", "decode")
    if kind not in KINDS:
        c.fail("kind", f"one of {list(KINDS)}", kind)
    if kind == "bench":
        return _parse_bench(c, data, source, name, description, quick)
    backends = c.names("backends", data.get("backends"), backend_names())
    paths = c.names("paths", data.get("paths"), path_names())

    grid_in = c.mapping("grid", data.get("grid"), GRID_AXES)
    grid = {a: [d] for a, (_, _, d) in GRID_AXES.items()}
    for a, v in grid_in.items():
        grid[a] = c.axis(a, v)
    measure = c.scalars("measure", c.mapping("measure", data.get("measure"), MEASURE_KEYS),
                        MEASURE_KEYS)
    check = c.scalars("check", c.mapping("check", data.get("check"), CHECK_KEYS), CHECK_KEYS)
    plot = dict(c.mapping("plot", data.get("plot"), ("x", "facet")))
    for k, default in (("x", "context"), ("facet", "batch")):
        v = plot.setdefault(k, default)
        if v not in GRID_AXES:
            c.fail(f"plot.{k}", f"a grid axis (one of {list(GRID_AXES)})", v)
    calibrate = data.get("calibrate", False)
    if not isinstance(calibrate, bool):
        c.fail("calibrate", "true or false", calibrate)

    greedy = _greedy(c, "greedy", data.get("greedy")) if data.get("greedy") is not None \
        else None

    quick_in = c.mapping("quick", data.get("quick"), ("grid", "measure", "check", "greedy"))
    quick_grid = c.mapping("quick.grid", quick_in.get("grid"), GRID_AXES)
    quick_measure = c.mapping("quick.measure", quick_in.get("measure"), MEASURE_KEYS)
    quick_check = c.mapping("quick.check", quick_in.get("check"), CHECK_KEYS)
    qgrid = {a: c.axis(a, v) for a, v in quick_grid.items()}
    qmeasure = c.scalars("quick.measure", quick_measure, MEASURE_KEYS, measure)
    qcheck = c.scalars("quick.check", quick_check, CHECK_KEYS, check)
    if quick_in.get("greedy") is not None and greedy is None:
        c.fail("quick.greedy", "a top-level greedy section for it to change", quick_in["greedy"])
    qgreedy = _greedy(c, "quick.greedy", quick_in.get("greedy"), greedy) if greedy else None

    exp = Experiment(name=name, source=source, kind=kind, backends=backends, paths=paths,
                     grid=grid, measure=measure, check=check, plot=plot, calibrate=calibrate,
                     description=description, quick=copy.deepcopy(quick_in), greedy=greedy)
    if quick:
        exp.grid = {**grid, **qgrid}
        exp.measure, exp.check, exp.greedy, exp.is_quick = qmeasure, qcheck, qgreedy, True
    if not exp.points():
        c.fail("grid", "at least one point with num_q_heads a multiple of num_kv_heads",
               {"num_q_heads": exp.grid["num_q_heads"], "num_kv_heads": exp.grid["num_kv_heads"]})
    return exp


def _greedy(c: _Checker, key: str, v, base: dict | None = None) -> dict:
    """The greedy section: an mlx-lm config for the random model (checked by mlx-lm when the
    model is built), steps, prompt lengths and a seed; `base`: the section --quick changes."""
    allowed = ("model", "prompts") + tuple(GREEDY_KEYS)
    section = c.mapping(key, v, allowed)
    out = copy.deepcopy(base) if base is not None else {k: d for k, (_, _, d) in GREEDY_KEYS.items()}
    out.update(c.scalars(key, {k: x for k, x in section.items() if k in GREEDY_KEYS},
                         GREEDY_KEYS, out))
    if "model" in section:
        m = section["model"]
        if not isinstance(m, dict) or not isinstance(m.get("model_type"), str):
            c.fail(f"{key}.model", "an mlx-lm config mapping with a model_type", m)
        out["model"] = dict(m)
    elif base is None:
        c.fail(f"{key}.model", "an mlx-lm config mapping with a model_type", missing=True)
    if "prompts" in section:
        ps = section["prompts"]
        if not isinstance(ps, list) or not ps or not all(_type_ok("posint", n) for n in ps):
            c.fail(f"{key}.prompts", "a non-empty list of prompt lengths (positive ints)", ps)
        out["prompts"] = list(ps)
    out.setdefault("prompts", [1, 7, 41])
    return out


def _parse_bench(c: _Checker, data: dict, source: str, name: str, description: str,
                 quick: bool) -> BenchExperiment:
    from .. import benches
    c.mapping("", data, BENCH_KEYS)
    which = data.get("bench")
    if which not in benches.BENCHES:
        c.fail("bench", f"one of {sorted(benches.BENCHES)}", which, missing="bench" not in data)
    options = dict(c.mapping("options", data.get("options"), _Anything()))
    quick_in = c.mapping("quick", data.get("quick"), ("options",))
    if quick:
        options.update(c.mapping("quick.options", quick_in.get("options"), _Anything()))

    def fail(key, message):
        where = "options" if key is None else f"options.{key}"
        raise ConfigError(f"{source}: {where}: {message}")
    resolved = benches.options_from_yaml(which, options, fail)
    return BenchExperiment(name=name, source=source, bench=which, options=resolved,
                           description=description, is_quick=quick)


class _Anything:
    """Every key allowed: a bench's options are checked by its own flag parser."""
    def __contains__(self, key) -> bool:
        return True


def shipped() -> list[str]:
    """Names of the experiments shipped with the package (`paged-attn run <name>`)."""
    files = resources.files("paged_attention.experiment_files")
    return sorted(f.name[:-5] for f in files.iterdir() if f.name.endswith(".yaml"))


def resolve(path: str) -> str:
    """A file path as given, or the shipped experiment of that name ('smoke', 'smoke.yaml')."""
    if os.path.exists(path) or os.sep in path or "/" in path:
        return path
    name = path[:-5] if path.endswith(".yaml") else path
    if name in shipped():
        return str(resources.files("paged_attention.experiment_files") / f"{name}.yaml")
    return path


def load(path: str, *, quick: bool = False) -> Experiment:
    """Read and validate an experiment file, or a shipped experiment by name. Raises ConfigError
    (one line) on any problem."""
    path = resolve(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file (shipped experiments: "
                          f"{', '.join(shipped())})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return parse(data, path, quick=quick)
