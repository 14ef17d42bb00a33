"""One fixture, `impl`, yields (backend, path) for every registered backend and every path it
knows. Unavailable combinations are collected as skips that say exactly why, so a new backend
gets the whole matrix by registering itself."""
from __future__ import annotations

import functools
import os
import tempfile

import pytest

import paged_attention as pa
from paged_attention import settings
from paged_attention.registry import BACKENDS, unavailable_reason


# A calibration table left in the user's cache by an experiment run must not steer path="auto"
# in tests: every test session starts uncalibrated.
os.environ["PAGED_ATTENTION_SELECTOR_DIR"] = tempfile.mkdtemp(prefix="pa-selector-")


@functools.cache
def backend_instance(name: str) -> pa.PagedAttention:
    return pa.get_backend(name)


def impl_params() -> list:
    params = []
    for name in BACKENDS:
        reason = unavailable_reason(name)
        if reason is not None:
            params.append(pytest.param((name, None), id=name, marks=pytest.mark.skip(reason=reason)))
            continue
        backend = backend_instance(name)
        for path in backend.known_paths:
            why = backend.path_unavailable_reason(path)
            marks = [pytest.mark.skip(reason=why)] if why else []
            params.append(pytest.param((name, path), id=f"{name}-{path}", marks=marks))
    return params


@pytest.fixture(params=impl_params())
def impl(request):
    """(backend instance, path) for one available backend x path."""
    name, path = request.param
    return backend_instance(name), path


@pytest.fixture(params=[n for n in BACKENDS], ids=lambda n: n)
def backend(request):
    """Each registered backend (skipped with the reason when unavailable)."""
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return backend_instance(request.param)


def pytest_terminal_summary(terminalreporter):
    """Worst per-step RMS of the 200-step matrix for each backend/path and dtype (works under
    xdist: the figure travels in each report's user_properties)."""
    worst: dict[tuple[str, str], tuple[float, int]] = {}
    for rep in terminalreporter.stats.get("passed", []):
        props = dict(getattr(rep, "user_properties", []))
        if rep.when == "call" and "matrix" in props:
            impl_id, dtype, rms = props["matrix"]
            prev, n = worst.get((impl_id, dtype), (0.0, 0))
            worst[(impl_id, dtype)] = (max(prev, rms), n + 1)
    if worst:
        terminalreporter.write_sep("-", "decode matrix: worst per-step RMS vs float64 reference")
        for (impl_id, dtype), (rms, n) in sorted(worst.items()):
            terminalreporter.write_line(f"{impl_id:16s} {dtype:8s} {n:4d} configs  max RMS {rms:.2e}")


@pytest.fixture
def setenv(monkeypatch):
    """setenv(name, value): set a PAGED_ATTENTION_* variable and re-read the settings (the
    package reads the environment once per process); both are restored after the test."""
    def set_(name, value):
        monkeypatch.setenv(name, value)
        settings.reload()
    yield set_
    monkeypatch.undo()
    settings.reload()
