"""MLX backend: pools as mx.array; a gather path everywhere and a fused kernel on Metal/CUDA."""
from __future__ import annotations

from . import settings as _knobs  # noqa: F401 - declares the PAGED_ATTENTION_MLX_* settings

KNOWN_PATHS = ("gather", "fused")


def probe() -> str | None:
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        return (f"mlx is not importable ({exc}); install it with pip install -e '.[mlx]' "
                "(Linux CPU: 'mlx[cpu]', NVIDIA: 'mlx[cuda13]', macOS: 'mlx')")
    return None


def __getattr__(name):
    # Import lazily so that probing does not pay for building the backend module.
    if name == "Backend":
        from .backend import MLXBackend
        return MLXBackend
    raise AttributeError(name)
