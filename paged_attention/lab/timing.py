"""The one timing harness of the lab: every benchmark and experiment times through here.

Rules it enforces:
- Several paths are timed interleaved (one step of each in turn: A B A B ...), so drift in
  clocks or host load on a shared machine hits every path alike and the ratios between them
  stay fair.
- A step runs L layers and synchronises once (`sync`, usually `backend.synchronize`), so launch
  and synchronisation costs are amortised as in a real decode step; times are per layer.
- Where a backend has a device timer (`backend.has_device_timer`, `backend.device_time(fn)`),
  the device's kernel time is taken as well; callers report it as the primary time and keep the
  host time alongside.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np

Step = Callable[[], float]   # runs one step, returns the seconds it took


def wall(fn: Callable[[], Any]) -> Step:
    """A step timed as a whole on the host clock."""
    def step() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return step


def layered(layer_fn: Callable[[int], Any], layers: int, sync: Callable[[list], Any],
            build_untimed: bool = False) -> Step:
    """A step of `layers` calls of layer_fn(i) and one sync(outputs). build_untimed: only the
    sync is timed (lazy backends such as MLX build the graph first, then evaluate it)."""
    def step() -> float:
        if build_untimed:
            outs = [layer_fn(i) for i in range(layers)]
            t0 = time.perf_counter()
            sync(outs)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        sync([layer_fn(i) for i in range(layers)])
        return time.perf_counter() - t0
    return step


def serial(layer: Callable[[int, Any], Any], first: Callable[[int], Any]) -> Callable[[int], Any]:
    """A layer_fn for `layered`/`time_steps` whose layer i > 0 takes layer i-1's output as its
    input, as a model's layers do, so each waits for the one before; layer 0 takes first(0).
    Nothing is added to the chain. Without it the layers of a step are independent, and MLX on
    CUDA runs independent kernels of one CUDA graph concurrently, hiding each kernel's ramp and
    tail behind its neighbours': an overlapped throughput no model sees (ADR 0004, "Serial
    timing")."""
    prev: list = [None]

    def layer_fn(i: int):
        prev[0] = layer(i, first(i) if i == 0 or prev[0] is None else prev[0])
        return prev[0]
    return layer_fn


def round_robin(steps: dict[str, Step], repeats: int, warmup: int = 0,
                max_seconds: float | None = None, min_repeats: int = 2) -> dict[str, list[float]]:
    """Seconds per step for each named step, the steps taking turns. Stops early once the timed
    steps together exceed max_seconds per step name (after min_repeats rounds)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    spent = 0.0
    for rep in range(warmup + repeats):
        for name, step in steps.items():
            t = step()
            if rep >= warmup:
                times[name].append(t)
                spent += t
        if (max_seconds is not None and rep - warmup + 1 >= min_repeats
                and spent > max_seconds * max(1, len(steps))):
            break
    return times


def time_steps(paths: dict[str, Callable[[int], Any]], layers: int, repeats: int, warmup: int,
               sync: Callable[[list], Any]) -> dict[str, float]:
    """Median seconds per layer of each path (name -> layer_fn(i) building layer i lazily),
    the graph built untimed and evaluated with one sync per step, paths in turns."""
    steps = {name: layered(fn, layers, sync, build_untimed=True) for name, fn in paths.items()}
    return {name: statistics.median(ts) / layers
            for name, ts in round_robin(steps, repeats, warmup).items()}


def device_step_times(backend, layer_fns: dict[str, Callable[[int], Any]], layers: int,
                      rounds: int) -> dict[str, list[float]]:
    """Per-layer device seconds of each path over `rounds` steps, paths in turns, from the
    backend's device timer; {} when the backend has none or a call reports no time."""
    if not getattr(backend, "has_device_timer", False):
        return {}
    out: dict[str, list[float]] = {name: [] for name in layer_fns}
    for _ in range(rounds):
        for name, one in layer_fns.items():
            total = 0.0
            for layer in range(layers):
                _, t = backend.device_time(lambda: one(layer))
                if t is None:
                    return {}
                total += t
            out[name].append(total / layers)
    return out


def percentiles_us(xs: Iterable[float]) -> dict:
    """Median, p10 and p90 of seconds, in microseconds."""
    a = np.asarray(list(xs)) * 1e6
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90))}


def warm_up(fn: Callable[[], Any], seconds: float) -> None:
    """Keep the device busy for `seconds` so it leaves its idle clocks before anything is timed
    (an idle H100 measured up to 5x slower for the first tens of ms, ADR 0003)."""
    t0 = time.perf_counter()
    while True:
        fn()
        if time.perf_counter() - t0 >= seconds:
            return
