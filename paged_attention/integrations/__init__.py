"""Integrations of the paged KV cache with model libraries (optional extras).

`mlx_lm` (extra `paged-attention[mlx-lm]`): a paged per-layer cache for mlx-lm models, the
attention hook they call, a continuous-batching `Engine` and `generate`. Imported lazily so
that `import paged_attention.integrations` works without mlx-lm installed.
"""
from __future__ import annotations

__all__ = ["Engine", "PagedLayerCache", "generate", "make_paged_cache", "paged_attention_hook",
           "random_model", "Unsupported"]


def __getattr__(name):
    if name in __all__:
        from . import mlx_lm
        return getattr(mlx_lm, name)
    raise AttributeError(name)
