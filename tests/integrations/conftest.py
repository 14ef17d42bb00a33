"""Shared fixtures of the mlx-lm integration tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def on_cpu():
    """MLX's default device is the CPU for the test: the engine tests compare token for token
    with mlx-lm's own generation, run on the same device (a GPU host's numerics differ)."""
    mx = pytest.importorskip("mlx.core")
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)
