"""Fixtures shared by the backend tests."""
from __future__ import annotations

import pytest

import paged_attention as pa


@pytest.fixture(scope="module")
def mlx_backend():
    """The MLX backend, or a skip that says why it cannot be made here."""
    reason = pa.registry.unavailable_reason("mlx")
    if reason:
        pytest.skip(reason)
    return pa.get_backend("mlx")
