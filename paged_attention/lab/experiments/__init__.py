"""Experiments: YAML-defined sweeps over backends, paths and decode shapes, with timing,
bandwidth, memory and parity measurements, run artefacts (records, summary, plots) and the
calibration of the path selector. See `config` for the file format and `paged-attn run`.

Needs matplotlib and tqdm (the `experiments` extra) on top of the runtime core; they are
imported only when a run writes plots or shows progress.
"""
from .config import ConfigError, Experiment, load, parse

__all__ = ["ConfigError", "Experiment", "load", "parse", "run"]


def run(*args, **kwargs):
    from .runner import run as _run
    return _run(*args, **kwargs)
