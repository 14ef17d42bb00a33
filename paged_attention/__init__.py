"""paged-attention: paged KV-cache decode attention across backends (numpy, MLX, Vulkan)."""
from .block_manager import BlockManager, CacheStats
from .errors import (BackendUnavailable, InvalidInput, PagedAttentionError, PoolExhausted,
                     UnsupportedPath)
from .interface import KVPool, LayerStep, PagedAttention
from .registry import available_backends, get_backend, register_backend

__all__ = [
    "BackendUnavailable", "BlockManager", "CacheStats", "InvalidInput", "KVPool", "LayerStep",
    "PagedAttention", "PagedAttentionError", "PoolExhausted", "UnsupportedPath",
    "available_backends", "get_backend", "register_backend",
]
__version__ = "0.1.0"
