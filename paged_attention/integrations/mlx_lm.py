"""mlx-lm models on the paged KV cache (design and figures: adr/0009-mlx-lm-integration.md).

Three layers, each usable alone:

- `PagedLayerCache`: what mlx-lm's attention layers use of a cache (`offset`,
  `update_and_fetch`, `make_mask`, `trim`, `is_trimmable`). `update_and_fetch` only stashes the
  new k/v; the attention itself happens in the hook.
- `paged_attention_hook(model)`: a context manager that swaps the model module's
  `scaled_dot_product_attention` (or, for an attention that computes its logits inline, i.e.
  gemma2, its attention class's `__call__`: a per-architecture adapter) for one that, given a
  `PagedLayerCache`, runs `backend.run(plan, q, pool, k, v, sinks=...)` (writes the new rows,
  attends over the blocks). One `backend.plan(...)` per step, window and soft-cap is shared by
  all layers. mlx-lm itself is unchanged.
- `Engine` / `generate`: continuous batching. Every step is ONE model call over the ragged batch
  laid out token-major: input ids [N, 1] (one "batch row" per token) with per-token rope offsets,
  so mlx-lm's [B, H, L, D] tensors are [N, H, 1, D], i.e. plan/run's [N, H, D] without a copy.
  Prefill chunks and decode tokens share the step's plan through `query_lens`. Which rows a
  step computes and every block decision are the engine's `Scheduler`'s (scheduler.py).

`make_paged_cache(model, ...)` gives a cache list that mlx-lm's own `generate_step` can drive
(one sequence per batch row, L tokens per call) inside `paged_attention_hook(model)`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

try:
    import mlx.core as mx
    import mlx_lm.models.base as _mlx_base
    from mlx_lm.models import rope_utils as _rope_utils
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("paged_attention.integrations.mlx_lm needs mlx-lm: "
                      "pip install 'paged-attention[mlx-lm]'") from e

from ..block_manager import BlockManager
from ..errors import InvalidInput, PagedAttentionError
from ..interface import PagedAttention
from ..kv_formats import KV_DTYPES
from ..registry import get_backend
from . import distributed
from .scheduler import EngineStats, Scheduler, Seq, WindowGroup, group_block_bytes


class Unsupported(PagedAttentionError, NotImplementedError):
    """The model (or one of its features) cannot be served by the paged cache."""


# -- architectures --------------------------------------------------------------------------
def _llama_windows(model):
    win = model.args.sliding_window
    return [win if getattr(layer, "use_sliding", False) else None for layer in model.layers]


def _full_windows(model):
    return [None] * len(model.layers)


def _gemma3_windows(model):
    win = model.args.sliding_window
    return [win if layer.self_attn.is_sliding else None for layer in model.layers]


def _gpt_oss_windows(model):
    win = model.args.sliding_window
    return [win if t == "sliding_attention" else None for t in model.model.layer_types]


def _heads(attn):
    return attn.n_heads, attn.n_kv_heads, attn.scale


def _gpt_oss_heads(attn):
    return attn.num_attention_heads, attn.num_key_value_heads, attn.sm_scale


def _no_soft_cap(attn):
    return None


@dataclass(frozen=True)
class _Arch:
    """How one mlx-lm model module's attention reaches the paged cache.

    windows: model -> per-layer window (None = full attention).
    heads: attention layer -> (Hq, Hkv, scale).
    soft_cap: attention layer -> its logit soft-cap (None: none).
    sinks: its attention passes learned `sinks=` to scaled_dot_product_attention.
    adapter: None when the attention calls the module's `scaled_dot_product_attention` (the
        hook swaps that name); else (class, name of the patched method, its paged replacement)
        for an attention that computes its logits inline.
    """

    windows: Callable
    heads: Callable = _heads
    soft_cap: Callable = _no_soft_cap
    sinks: bool = False
    adapter: tuple | None = None

    def features(self, attn) -> frozenset:
        """The backend `variants` features this model's attention needs."""
        return frozenset({"soft_cap"} if self.soft_cap(attn) is not None else ()) | \
            frozenset({"sinks"} if self.sinks else ())


def _gemma2_attention(self, x, mask=None, cache=None):
    """gemma2's Attention.__call__ on the paged cache: the same projections and rope, then the
    soft-capped attention as `backend.run` on a plan with `soft_cap=` (its own code computes
    the capped logits inline, so there is no function to swap). Other caches: its own code."""
    if not isinstance(cache, PagedLayerCache):
        return _ORIGINALS["mlx_lm.models.gemma2"](self, x, mask, cache)
    if mask is not None:
        raise Unsupported("the model passed its own attention mask; the paged cache only "
                          "applies causal (and per-layer window) masking")
    b, length, _ = x.shape
    q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
    k = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q = self.rope(q, offset=cache.offset)
    k = self.rope(k, offset=cache.offset)
    k, v = cache.update_and_fetch(k, v)
    # gemma2 scales q by 1/sqrt(query_pre_attn_scalar) before q.k and caps after: the plan's
    # s = scale * q.k, then soft_cap * tanh(s / soft_cap).
    out = cache._attend(q, k, v, self.scale, soft_cap=float(self.attn_logit_softcapping))
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


def _gemma2_arch() -> _Arch:
    from mlx_lm.models import gemma2
    # mlx-lm's gemma2 attends to every position on every layer (its ModelArgs has no
    # sliding_window: the checkpoint's 4096-token local layers are served as global), so the
    # paged cache does the same to give mlx-lm's tokens.
    return _Arch(_full_windows, soft_cap=lambda attn: float(attn.attn_logit_softcapping),
                 adapter=(gemma2.Attention, "__call__", _gemma2_attention))


# model module -> how its attention is served. Every entry applies rope(offset=cache.offset)
# and cache.update_and_fetch; all but gemma2 then call base.scaled_dot_product_attention.
# mistral configs load as llama (mlx-lm's MODEL_REMAPPING). Quantized weights (nn.quantize,
# mlx_lm.convert -q) are served like the float model they came from.
_ARCHITECTURES: dict[str, Callable[[], _Arch]] = {
    "mlx_lm.models.llama": lambda: _Arch(_llama_windows),
    "mlx_lm.models.qwen2": lambda: _Arch(_full_windows),
    "mlx_lm.models.qwen3": lambda: _Arch(_full_windows),
    "mlx_lm.models.gemma3_text": lambda: _Arch(_gemma3_windows),
    "mlx_lm.models.gpt_oss": lambda: _Arch(_gpt_oss_windows, heads=_gpt_oss_heads, sinks=True),
    "mlx_lm.models.gemma2": _gemma2_arch,
}


@dataclass(frozen=True)
class ModelInfo:
    module: object
    arch: _Arch
    windows: tuple            # per layer: window or None
    scales: tuple             # per layer: attention scale
    features: frozenset       # backend `variants` features the attention needs
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str                # pool dtype: the model's activation dtype
    vocab_size: int           # token ids the model takes: [0, vocab_size)


_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def _activation_dtype(layer, attn) -> str | None:
    """The dtype q, k, v have when they reach attention: a float q_proj weight's, or, for a
    quantized q_proj (uint32 packed weights), its scales' (quantized matmuls return the scales'
    dtype); failing both (e.g. mxfp4's uint8 scales), the layer's float parameters' (norms)."""
    from mlx.utils import tree_flatten
    proj = attn.q_proj
    for a in (proj.weight, getattr(proj, "scales", None), getattr(proj, "biases", None)):
        if a is not None and a.dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[a.dtype]
    found = {_DTYPE_NAMES[a.dtype] for _, a in tree_flatten(layer.parameters())
             if a.dtype in _DTYPE_NAMES}
    return found.pop() if len(found) == 1 else None


def inspect_model(model) -> ModelInfo:
    """What the paged cache needs to know about an mlx-lm model; `Unsupported` says why not."""
    import sys
    name = type(model).__module__
    if name not in _ARCHITECTURES:
        raise Unsupported(
            f"model: {name} is not served by the paged cache: only architectures whose "
            "attention was checked token for token against mlx-lm's own cache are (supported: "
            f"{', '.join(m.rsplit('.', 1)[1] for m in _ARCHITECTURES)}, and mistral as llama). "
            "Serving one takes its per-layer windows and head geometry, and an attention "
            "adapter unless it calls base.scaled_dot_product_attention with a plain KV cache; "
            "linear attention, MLA and recurrent state have no paged form here")
    arch = _ARCHITECTURES[name]()
    layers = list(model.layers)
    attns = [layer.self_attn for layer in layers]
    for i, a in enumerate(attns):
        if isinstance(a.rope, _rope_utils.DynamicNTKScalingRoPE):
            raise Unsupported(f"model: layer {i} uses dynamic NTK rope, whose python-side offset "
                              "arithmetic cannot take per-token positions")
        if getattr(a, "attn_logit_softcapping", None) and arch.soft_cap(a) is None:
            raise Unsupported(f"model: layer {i} uses attention logit softcapping, which "
                              f"{name} does not route to the paged cache")
    heads = [arch.heads(a) for a in attns]
    hq = {h[0] for h in heads}
    hkv = {h[1] for h in heads}
    dims = {a.k_proj.weight.shape[0] // h[1] for a, h in zip(attns, heads)}
    if len(hq) != 1 or len(hkv) != 1 or len(dims) != 1:
        raise Unsupported("model: layers differ in head counts or head_dim; one pool geometry "
                          "is shared by every layer")
    dtype = _activation_dtype(layers[0], attns[0])
    if dtype is None:
        raise Unsupported("model: no float32/float16/bfloat16 parameter in layer 0 gives the "
                          "activation dtype (the KV pools' dtype)")
    return ModelInfo(module=sys.modules[name], arch=arch,
                     windows=tuple(arch.windows(model)),
                     scales=tuple(float(h[2]) for h in heads),
                     features=frozenset().union(*(arch.features(a) for a in attns)),
                     num_q_heads=hq.pop(), num_kv_heads=hkv.pop(), head_dim=dims.pop(),
                     dtype=dtype, vocab_size=int(model.args.vocab_size))


def random_model(config: dict, *, dtype: str = "float32", seed: int = 0):
    """An mlx-lm model built from a config dict with random weights (nothing is downloaded)."""
    from mlx_lm.utils import _get_classes
    import mlx.nn as nn
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    model.eval()
    assert isinstance(model, nn.Module)
    return model


# -- the step state every layer cache shares ------------------------------------------------
@dataclass
class _Step:
    seq_ids: list
    query_lens: np.ndarray       # int32 [B]
    context_lens: np.ndarray     # int32 [B], after this step's tokens
    positions: object            # mx int32 [N] rope offsets (engine) or None (per-layer int)
    tables: dict                 # group index -> int32 [B, max_blocks]
    slots: dict                  # group index -> int64 [N]
    plans: dict = field(default_factory=dict)


def kv_format_args(kv_bits, kv_group_size, kv_dtype=None) -> dict:
    """mlx-lm's quantized-cache names -> create_pool's: kv_bits None (plain pools), 8 or 4
    (MLX's affine format, ADR 0011) with kv_group_size elements per scale and bias. kv_dtype
    names any create_pool format instead ("int8", "int4", or "float8_e4m3": vLLM's fp8 with
    k_scale = v_scale = 1, which mlx-lm has no name for); give at most one of the two."""
    if kv_dtype is not None:
        if kv_bits is not None:
            raise InvalidInput(f"kv_bits, kv_dtype: give one of them (kv_bits 8/4 is mlx-lm's "
                               f"name for kv_dtype 'int8'/'int4'), got {kv_bits!r} and "
                               f"{kv_dtype!r}")
        if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
            raise InvalidInput(f"kv_dtype: expected None or one of {KV_DTYPES}, got {kv_dtype!r}")
        return dict(kv_dtype=kv_dtype, kv_group_size=kv_group_size)
    if kv_bits is None:
        return {}
    if isinstance(kv_bits, bool) or kv_bits not in (8, 4):
        raise InvalidInput(f"kv_bits: expected None, 8 or 4, got {kv_bits!r}")
    return dict(kv_dtype=f"int{kv_bits}", kv_group_size=kv_group_size)


class _PagedState:
    def __init__(self, model, backend: PagedAttention, *, num_blocks: int, block_size: int,
                 path: str, kv_bits=None, kv_group_size: int = 64, kv_dtype=None):
        self.info = inspect_model(model)
        kv = kv_format_args(kv_bits, kv_group_size, kv_dtype)
        self.backend = backend
        self.path = path
        info = self.info
        if info.dtype not in backend.pool_dtypes or info.dtype not in backend.q_dtypes:
            raise Unsupported(f"backend: {backend.name!r} has no {info.dtype} pools or queries "
                              f"(pools {backend.pool_dtypes}); use the mlx backend or float32")
        # The path for plans whose run needs `sinks`: plan(path="auto") only steps around paths
        # lacking the plan's own features, and sinks are given to run, not plan.
        self.sinks_path = _variant_path(backend, path, info.features)
        self._sinks: dict = {}            # layer -> (the model's sinks array, float32 numpy)
        self.groups: list[WindowGroup] = []
        self.group_of: list[int] = []
        by_window: dict = {}
        for i, w in enumerate(info.windows):
            if w not in by_window:
                by_window[w] = len(self.groups)
                self.groups.append(WindowGroup(w, [], BlockManager(num_blocks, block_size)))
            g = self.groups[by_window[w]]
            g.layers.append(i)
            g.pools[i] = backend.create_pool(num_blocks, block_size, info.num_kv_heads,
                                             info.head_dim, info.dtype, **kv)
            self.group_of.append(by_window[w])
        self.block_size = block_size
        self.step: _Step | None = None

    def plan_for(self, layer: int, num_q_heads: int, scale: float, soft_cap=None,
                 sinks: bool = False):
        gi = self.group_of[layer]
        key = (gi, num_q_heads, scale, soft_cap, sinks)
        plan = self.step.plans.get(key)
        if plan is None:
            g = self.groups[gi]

            def make(path):
                return self.backend.plan(
                    g.pools[layer], self.step.tables[gi], self.step.context_lens,
                    num_q_heads=num_q_heads, query_lens=self.step.query_lens,
                    slot_mapping=self.step.slots[gi], scale=scale, window=g.window,
                    soft_cap=soft_cap, path=path)
            plan = make(self.path)
            if sinks and "sinks" not in self.backend.variants.get(plan.path, ()):
                plan = make(self.sinks_path)
            self.step.plans[key] = plan
        return plan

    def sinks_of(self, layer: int, sinks):
        """A layer's sinks as float32 numpy, converted once (run reads Hq values on the host;
        a numpy array spares the MLX backend a device sync per layer and step)."""
        hit = self._sinks.get(layer)
        if hit is None or hit[0] is not sinks:
            hit = self._sinks[layer] = (sinks, np.array(sinks.astype(mx.float32)))
        return hit[1]

    def kv_bytes(self) -> int:
        """Bytes of the blocks referenced right now, over every layer (the cache's live KV)."""
        return sum(g.bm.stats().used * group_block_bytes(g) for g in self.groups)


def _to_mx(x, dtype):
    if isinstance(x, mx.array):
        return x
    return mx.array(np.asarray(x)).astype(dtype)


class PagedLayerCache:
    """One layer's view of the paged cache, as mlx-lm's attention layers use a KVCache.

    `offset` is the rope position: an int (this layer's token count, `make_paged_cache` mode) or,
    under the Engine, an int32 array with one position per token row.
    """

    def __init__(self, state: _PagedState, layer: int, auto: bool):
        self._state = state
        self.layer = layer
        self._auto = auto
        self._count = 0          # tokens this layer holds (auto mode)
        self._new = None

    # -- what the attention layers call --
    @property
    def offset(self):
        st = self._state
        if not self._auto:
            return st.step.positions
        return self._count

    def update_and_fetch(self, keys, values):
        if not _HOOK_DEPTH.get(self._state.info.module.__name__):
            raise PagedAttentionError(
                "PagedLayerCache used outside paged_attention_hook(model): the model's own "
                "attention would see only the new tokens")
        self._new = (keys, values)
        # The hook takes them back from here; mlx-lm passes them straight to it.
        return keys, values

    def make_mask(self, N, return_array=False, window_size=None, **_):
        # Causality and windows are the plan's (query_lens, window); no dense mask exists.
        return None

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        """Forget this layer's last n tokens (mlx-lm's trim_prompt_cache calls every layer)."""
        if not self._auto:
            raise PagedAttentionError("under the Engine, trim with Engine.trim(seq_id, n)")
        n = min(int(n), self._count)
        self._count -= n
        st = self._state
        if self.layer == 0 and n:
            for g in st.groups:
                for s in g.bm.sequences():
                    g.bm.trim(s, n)
        return n

    def size(self):
        return self._count if self._auto else 0

    def empty(self):
        return self._auto and self._count == 0

    @property
    def state(self):
        return []

    @property
    def nbytes(self):
        return self._state.kv_bytes() if self.layer == 0 else 0

    # -- the attention itself (called by the hook) --
    def _attend(self, queries, keys, values, scale: float, *, soft_cap=None, sinks=None):
        st = self._state
        if self._new is None or self._new[0] is not keys:
            raise PagedAttentionError("attention hook: keys are not the ones this cache just "
                                      "received from update_and_fetch")
        self._new = None
        b, hq, length, d = queries.shape
        hkv = keys.shape[1]
        if self._auto:
            if self.layer == 0:
                _auto_begin_step(st, b, length)
            self._count += length
        # [B, H, L, D] -> token-major [B*L, H, D]; under the Engine L == 1 and this is a reshape.
        q = queries.transpose(0, 2, 1, 3).reshape(b * length, hq, d)
        k = keys.transpose(0, 2, 1, 3).reshape(b * length, hkv, d)
        v = values.transpose(0, 2, 1, 3).reshape(b * length, hkv, d)
        be = st.backend
        plan = st.plan_for(self.layer, hq, scale, soft_cap, sinks is not None)
        if be.array_type is not mx.array:
            # numpy has no bfloat16: widen (exactly) to float32; the pool rounds k, v back.
            q, k, v = (np.asarray(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
                       for x in (q, k, v))
        out = be.run(plan, q, st.groups[st.group_of[self.layer]].pools[self.layer], k, v,
                     sinks=None if sinks is None else st.sinks_of(self.layer, sinks))
        out = _to_mx(out, queries.dtype)
        return out.reshape(b, length, hq, d).transpose(0, 2, 1, 3)


def _auto_begin_step(st: _PagedState, batch: int, length: int) -> None:
    """make_paged_cache mode: every batch row is a sequence and gains `length` tokens."""
    ids = list(range(batch))
    tables, slots = {}, {}
    for gi, g in enumerate(st.groups):
        for s in ids:
            if s not in g.bm:
                g.bm.add_sequence(s, 0)
        sl, copies = g.bm.append_batch(ids, length)
        if copies:
            for pool in g.pools.values():
                st.backend.copy_blocks(pool, copies)
        tables[gi] = g.bm.block_tables(ids)
        slots[gi] = sl
    ctx = st.groups[0].bm.context_lens(ids)
    st.step = _Step(ids, np.full(batch, length, np.int32), ctx, None, tables, slots)


def _variant_path(backend: PagedAttention, path: str, features: frozenset) -> str | None:
    """Check up front that `path` (or, for "auto", some path) of `backend` implements the
    attention `features` the model needs; returns the path to plan sinks steps on ("auto" where
    no sinks are needed). `Unsupported` names the missing features."""
    if not features:
        return path
    have = [p for p in backend.paths if features <= backend.variants.get(p, frozenset())]
    if path != "auto" and path in backend.paths:
        missing = sorted(features - backend.variants.get(path, frozenset()))
        if missing:
            raise Unsupported(f"path: {path!r} of backend {backend.name!r} does not implement "
                              f"{', '.join(missing)}, which this model's attention needs; paths "
                              f"that do: {have}")
        return path
    if path == "auto" and not have:
        raise Unsupported(f"backend: no path of {backend.name!r} implements "
                          f"{', '.join(sorted(features))}, which this model's attention needs "
                          f"(its paths implement {dict(backend.variants)})")
    return have[0] if path == "auto" and "sinks" in features else path


def _hooked_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    if not isinstance(cache, PagedLayerCache):
        return _mlx_base.scaled_dot_product_attention(queries, keys, values, cache=cache,
                                                      scale=scale, mask=mask, sinks=sinks)
    if mask is not None and not (isinstance(mask, str) and mask == "causal"):
        raise Unsupported("the model passed its own attention mask; the paged cache only "
                          "applies causal (and per-layer window) masking")
    return cache._attend(queries, keys, values, scale, sinks=sinks)


@contextlib.contextmanager
def paged_attention_hook(model):
    """Route the model's attention to the paged cache while inside; other caches pass through.
    Patches one name while inside: the model module's `scaled_dot_product_attention` or, for an
    architecture with an attention adapter (gemma2), its attention class's `__call__`. mlx-lm's
    files are unchanged; both replacements hand every other cache to mlx-lm's own code."""
    info = inspect_model(model)
    owner, attr, replacement = info.arch.adapter or (
        info.module, "scaled_dot_product_attention", _hooked_sdpa)
    key = info.module.__name__
    if not _HOOK_DEPTH.get(key):          # nested hooks (several engines) patch once
        _ORIGINALS[key] = getattr(owner, attr)
        setattr(owner, attr, replacement)
        _HOOK_DEPTH[key] = 0
    _HOOK_DEPTH[key] += 1
    try:
        yield
    finally:
        _HOOK_DEPTH[key] -= 1
        if _HOOK_DEPTH[key] == 0:
            setattr(owner, attr, _ORIGINALS.pop(key))


_HOOK_DEPTH: dict = {}     # model module name -> hooks entered and not yet left
_ORIGINALS: dict = {}      # model module name -> what its hook replaced


def _resolve_backend(backend) -> PagedAttention:
    return backend if isinstance(backend, PagedAttention) else get_backend(backend)


def make_paged_cache(model, *, backend="mlx", num_blocks: int = 256, block_size: int = 16,
                     path: str = "auto", kv_bits=None, kv_group_size: int = 64,
                     kv_dtype=None) -> list:
    """A per-layer cache list for mlx-lm's own loops (`generate_step(..., prompt_cache=...)`);
    use it inside `paged_attention_hook(model)`. Each batch row is one sequence. kv_bits 8/4:
    quantized pools (mlx-lm's names and format); kv_dtype: any create_pool format instead."""
    st = _PagedState(model, _resolve_backend(backend), num_blocks=num_blocks,
                     block_size=block_size, path=path, kv_bits=kv_bits,
                     kv_group_size=kv_group_size, kv_dtype=kv_dtype)
    return [PagedLayerCache(st, i, auto=True) for i in range(len(model.layers))]


# -- input checks ---------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInput(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _first_bad_id(name: str, ids: list, vocab: int) -> InvalidInput | None:
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            return InvalidInput(f"{name}[{i}]: expected an integer token id, got {t!r} "
                                f"({type(t).__name__})")
        if not 0 <= t < vocab:
            return InvalidInput(f"{name}[{i}]: token id {int(t)} is outside [0, {vocab}), the "
                                "model's vocabulary")
    return None


def token_ids(name: str, ids, vocab: int) -> list[int]:
    """`ids` as a list of ints, each an integer in [0, vocab); `InvalidInput` names the argument,
    the first offending index and its value. Text is refused: encode it with a tokenizer."""
    if isinstance(ids, (str, bytes)):
        raise InvalidInput(f"{name}: got text {ids[:40]!r}; pass token ids, or pass tokenizer= to "
                           "generate() to encode text")
    if isinstance(ids, mx.array):
        ids = np.array(ids)
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InvalidInput(f"{name}: expected a 1-D array of integer token ids, got "
                               f"{ids.dtype} of shape {ids.shape}")
        arr = ids
        ids = ids.tolist()
    else:
        try:
            ids = list(ids)
        except TypeError:
            raise InvalidInput(f"{name}: expected a sequence of token ids, got "
                               f"{type(ids).__name__}") from None
        # One vectorised check for the common case; the slow scan only finds what to report.
        arr = np.asarray(ids) if ids and all(type(t) is int for t in ids) else None
    if arr is None or ((arr < 0) | (arr >= vocab)).any():
        err = _first_bad_id(name, ids, vocab)
        if err is not None:
            raise err
    return [int(t) for t in ids]


def _stop_ids(stop_tokens, vocab: int) -> frozenset:
    if stop_tokens is None:
        return frozenset()
    if isinstance(stop_tokens, (int, np.integer)) and not isinstance(stop_tokens, bool):
        stop_tokens = [stop_tokens]
    return frozenset(token_ids("stop_tokens", stop_tokens, vocab))


# -- the engine -----------------------------------------------------------------------------
def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


class Engine:
    """Continuous batching over a paged cache: requests join, finish and leave at any step.

    Each `step()` makes one model call: every running sequence's next token plus prefill chunks
    of admitted prompts (up to `max_batch_tokens` rows), one plan per window. Blocks are
    allocated per step for the tokens the step writes; when they run out the most recently
    admitted sequences are preempted (blocks freed, prompt + generated tokens recomputed later).
    Prompts share cached prefix blocks (`prefix_caching`), `n > 1` samples fork one prefilled
    prompt (copy-on-write), a sample ends at one of its stop tokens or at `max_tokens`,
    `abort(rid)` drops a request, blocks that left every window are released, and
    `trim(seq_id, k)` rewinds a sequence. Policy and reasons: adr/0009-mlx-lm-integration.md.

    The engine owns the requests, the model call and sampling; which rows a step computes and
    every block decision (admission, growth, preemption, windows, trim) are its `scheduler`'s
    (`integrations/scheduler.py`), as vLLM splits its scheduler from its model runner.

    A model sharded with mlx-lm's `model.shard(group)` (or `group=` given) runs tensor-parallel:
    every rank runs this same engine on its own KV heads (pools, `num_blocks` and the bytes in
    `stats` are per rank), checks on the first `check_steps` steps that every rank planned the
    same step, and takes rank 0's sampled tokens (adr/0012-tensor-parallel.md).
    """

    def __init__(self, model, *, backend="mlx", path: str = "auto", block_size: int = 16,
                 num_blocks: int = 1024, sampler=None, prefix_caching: bool = True,
                 max_batch_tokens: int = 512, trim_slack: int = 16, group=None,
                 check_steps: int = 8, kv_bits=None, kv_group_size: int = 64,
                 kv_dtype=None):
        block_size = _positive_int("block_size", block_size)
        num_blocks = _positive_int("num_blocks", num_blocks)
        self.max_batch_tokens = _positive_int("max_batch_tokens", max_batch_tokens)
        if isinstance(trim_slack, bool) or not isinstance(trim_slack, (int, np.integer)) \
                or trim_slack < 0:
            raise InvalidInput(f"trim_slack: expected an integer >= 0, got {trim_slack!r}")
        if isinstance(check_steps, bool) or not isinstance(check_steps, (int, np.integer)) \
                or check_steps < 0:
            raise InvalidInput(f"check_steps: expected an integer >= 0, got {check_steps!r}")
        self.model = model
        group = group if group is not None else distributed.model_group(model)
        self.tp = distributed.TensorParallel(group, check_steps=int(check_steps)) \
            if group is not None and group.size() > 1 else None
        self.state = _PagedState(model, _resolve_backend(backend), num_blocks=num_blocks,
                                 block_size=block_size, path=path, kv_bits=kv_bits,
                                 kv_group_size=kv_group_size, kv_dtype=kv_dtype)
        self.caches = [PagedLayerCache(self.state, i, auto=False)
                       for i in range(len(model.layers))]
        self.sampler = sampler or greedy
        self.prefix_caching = prefix_caching
        self.trim_slack = int(trim_slack)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = self.state.info.vocab_size
        self.stats = EngineStats()
        self.scheduler = Scheduler(self.state.groups, self.state.backend, self.stats,
                                   block_size=block_size, num_blocks=num_blocks,
                                   max_batch_tokens=self.max_batch_tokens,
                                   trim_slack=self.trim_slack, prefix_caching=prefix_caching)
        self._next_id = 0
        self._live: dict[int, Seq] = {}           # every unfinished sequence, waiting or running
        self._requests: dict[int, list] = {}      # rid -> seq ids in sample order
        self.finished: dict[int, list] = {}       # seq id -> generated tokens

    # The scheduler's queue and running sequences (admission order), under the engine's names.
    _waiting = property(lambda self: self.scheduler.waiting)
    _seqs = property(lambda self: self.scheduler.running)

    # -- requests --
    def add_request(self, prompt: Sequence[int], max_tokens: int, n: int = 1, *,
                    stop_tokens=None) -> int:
        """Queue a prompt (token ids) for `max_tokens` new tokens in each of `n` samples; a
        sample also ends at one of `stop_tokens` (not included in its result). Returns the
        request id. Everything is checked before anything is queued."""
        prompt = token_ids("prompt", prompt, self.vocab_size)
        if not prompt:
            raise InvalidInput("prompt: expected at least one token id")
        max_tokens = _positive_int("max_tokens", max_tokens)
        n = _positive_int("n", n)
        stop = _stop_ids(stop_tokens, self.vocab_size)
        self.scheduler.check_fits(len(prompt), max_tokens)
        rid = self._new_id()
        s = Seq(self._new_id(), rid, 0, prompt, len(prompt), max_tokens, stop, n_children=n - 1)
        self.scheduler.add(s)
        self._live[s.sid] = s
        self._requests[rid] = [s.sid]
        return rid

    def results(self, rid: int) -> list[list[int]]:
        """Generated tokens of each sample of a request (finished or not)."""
        return [self.finished[s] if s in self.finished else self._live[s].generated
                for s in self._sids(rid)]

    def done(self, rid: int) -> bool:
        """True when every sample of the request has finished (samples 2..n are forked before
        the first one can finish)."""
        return all(s not in self._live for s in self._sids(rid))

    def pop(self, rid: int) -> list[list[int]]:
        """A finished request's results, forgotten by the engine (a server's loop calls this so
        the engine holds nothing for requests it has answered)."""
        if not self.done(rid):
            raise InvalidInput(f"rid: request {rid} has not finished (abort it to drop it)")
        out = self.results(rid)
        for s in self._requests.pop(rid):
            del self.finished[s]
        return out

    def abort(self, rid: int) -> None:
        """Drop a request, waiting, running or finished: all its samples, their blocks released
        now. Other requests' tokens are the ones they would have produced without it."""
        sids = set(self._sids(rid))
        self.scheduler.drop(sids)
        for sid in sids:
            self._live.pop(sid, None)
            self.finished.pop(sid, None)
        del self._requests[rid]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def sequences(self, rid: int) -> list[int]:
        return list(self._sids(rid))

    def running(self) -> list[int]:
        """Sequence ids holding blocks now, in admission order."""
        return list(self.scheduler.running)

    def _sids(self, rid) -> list:
        sids = self._requests.get(rid)
        if sids is None:
            raise InvalidInput(f"rid: {rid!r} is not a request of this engine (never added, "
                               "aborted or popped)")
        return sids

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # -- one step --
    def step(self) -> list[tuple[int, int, int]]:
        """One model call. Returns the step's tokens as (request id, sample, token) events, in
        the order sampled; a stop token ends its sample without an event."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self._forward(batch)
        # Sample where a sequence's known tokens are all in the cache after this step.
        last = np.cumsum([n for _, n in batch]) - 1
        rows, ready = [], []
        for (s, n), row in zip(batch, last):
            s.computed += n
            if s.computed == len(s.tokens):
                rows.append(int(row))
                ready.append(s)
        events: list[tuple[int, int, int]] = []
        if ready:
            self._sample(logits[mx.array(rows), 0, :], ready, events)
        self.scheduler.end_step()
        return events

    def _forward(self, batch: list[tuple[Seq, int]]):
        """The model over the step's rows, token-major (input ids [N, 1], per-token rope
        offsets); returns its logits [N, 1, vocab]."""
        st = self.state
        ids = [s.sid for s, _ in batch]
        qlens = np.array([n for _, n in batch], np.int32)
        ctx = np.array([s.computed + n for s, n in batch], np.int32)
        positions = np.concatenate([np.arange(s.computed, s.computed + n) for s, n in batch])
        tokens = np.concatenate([s.tokens[s.computed:s.computed + n] for s, n in batch])
        tables, slots = self.scheduler.tables_and_slots(batch)
        st.step = _Step(ids, qlens, ctx, mx.array(positions.astype(np.int32)), tables, slots)
        if self.tp is not None:
            # Tables and slots carry admission, prefix hits, forks, window releases and trims;
            # query lengths the chunking; tokens what was sampled before.
            self.tp.check_plan(self.stats.steps, [np.asarray(ids), qlens, ctx, tokens, positions,
                                                  len(self.scheduler.waiting),
                                                  self.stats.preemptions,
                                                  *tables.values(), *slots.values()])
        with paged_attention_hook(self.model):
            logits = self.model(mx.array(tokens.astype(np.int32))[:, None], cache=self.caches)
        st.step = None
        self.stats.steps += 1
        self.stats.tokens_computed += int(qlens.sum())
        return logits

    def _sample(self, rows, ready: list[Seq], events: list) -> None:
        """Sample the next token of each ready sequence from its logits row ([len(ready), V]);
        a prompt with n > 1 samples forks its samples 2..n here."""
        reps = [1 + s.n_children for s in ready]
        if any(r > 1 for r in reps):   # n samples of one prompt share its logits row
            rows = mx.concatenate([mx.broadcast_to(rows[i:i + 1], (r, rows.shape[-1]))
                                   for i, r in enumerate(reps)])
        logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
        picked = self.sampler(logprobs).tolist()
        if self.tp is not None:
            picked = self.tp.agree(picked)
        k = 0
        for s, r in zip(ready, reps):
            mine = picked[k:k + r]
            k += r
            children = self._fork_children(s, mine[1:])
            for seq, tok in [(s, mine[0])] + children:
                self._accept(seq, int(tok), events)

    def _accept(self, s: Seq, tok: int, events: list) -> None:
        """A sampled token: the end of its sample if it is a stop token, else one more token."""
        if tok not in s.stop:
            s.tokens.append(tok)
            self.stats.tokens_generated += 1
            events.append((s.rid, s.index, tok))
        if tok in s.stop or len(s.generated) >= s.max_tokens:
            self.scheduler.finish(s)
            del self._live[s.sid]
            self.finished[s.sid] = s.generated

    def _fork_children(self, parent: Seq, first_tokens: list) -> list:
        """Samples 2..n of a prompt that just finished: each shares the parent's blocks."""
        forked = []
        for tok in first_tokens:
            sids = self._requests[parent.rid]
            child = Seq(self._new_id(), parent.rid, len(sids), list(parent.tokens),
                        parent.prompt_len, parent.max_tokens, parent.stop,
                        computed=parent.computed)
            self.scheduler.fork(parent, child)
            self._live[child.sid] = child
            sids.append(child.sid)
            forked.append((child, int(tok)))
        parent.n_children = 0
        return forked

    def trim(self, sid: int, k: int) -> int:
        """Drop the last k generated tokens of an unfinished sequence (rejected speculation);
        its next step recomputes from there. Returns the number of tokens dropped."""
        s = self._live.get(sid)
        if s is None:
            raise InvalidInput(f"seq_id: {sid!r} is not an unfinished sequence")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise InvalidInput(f"k: expected an integer >= 0, got {k!r}")
        k = min(int(k), len(s.tokens) - s.prompt_len)
        if k <= 0:
            return 0
        del s.tokens[len(s.tokens) - k:]
        # The newest kept token is fed again as the next query.
        self.scheduler.trim(s, len(s.tokens) - 1)
        return k

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        while self.has_work:
            before = self.stats.tokens_generated
            self.step()
            if progress:
                progress(self.stats.tokens_generated - before)

    def block_counts(self) -> list[int]:
        """Blocks referenced now, per window group (full attention first if present)."""
        return self.scheduler.block_counts()


def blocks_needed(prompts, max_tokens: int, block_size: int, n: int = 1) -> int:
    """A pool that holds every request at its longest at once (never preempts)."""
    return sum(n * (-(-(len(p) + max_tokens) // block_size) + 1) for p in prompts) + 1


def _start(model, prompts, *, max_tokens, backend, path, block_size, sampler, prefix_caching,
           n, num_blocks, max_batch_tokens, tokenizer, stop_tokens, group=None, kv_bits=None,
           kv_group_size=64, kv_dtype=None):
    """An engine with every prompt queued; all input checked before anything is admitted."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InvalidInput(f"prompts: expected a list of prompts, got {type(prompts).__name__}"
                           + (" (wrap one text prompt in a list)" if isinstance(prompts, str)
                              else ""))
    vocab = inspect_model(model).vocab_size
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise InvalidInput(f"prompts[{i}]: got text {p[:40]!r} but no tokenizer; pass "
                                   "tokenizer= (mlx_lm.load gives one) or token ids")
            p = tokenizer.encode(p)
        ids.append(token_ids(f"prompts[{i}]", p, vocab))
        if not ids[-1]:
            raise InvalidInput(f"prompts[{i}]: expected at least one token id")
    max_tokens = _positive_int("max_tokens", max_tokens)
    n = _positive_int("n", n)
    kv_format_args(kv_bits, kv_group_size, kv_dtype)     # checked before anything is built
    if stop_tokens is None and tokenizer is not None:
        stop_tokens = sorted(tokenizer.eos_token_ids)      # mlx-lm's default: stop at EOS
    stop = _stop_ids(stop_tokens, vocab)
    if num_blocks is None:
        num_blocks = blocks_needed(ids, max_tokens, _positive_int("block_size", block_size), n)
    eng = Engine(model, backend=backend, path=path, block_size=block_size, num_blocks=num_blocks,
                 sampler=sampler, prefix_caching=prefix_caching,
                 max_batch_tokens=max_batch_tokens, group=group, kv_bits=kv_bits,
                 kv_group_size=kv_group_size, kv_dtype=kv_dtype)
    # add_request refuses a request no pool of num_blocks can hold before any is queued.
    rids = [eng.add_request(p, max_tokens, n, stop_tokens=stop) for p in ids]
    return eng, rids, n


def generate(model, prompts: Sequence, *, max_tokens: int, backend="mlx", path: str = "auto",
             block_size: int = 16, sampler=None, prefix_caching: bool = True, n: int = 1,
             num_blocks: int | None = None, max_batch_tokens: int = 512, tokenizer=None,
             stop_tokens=None, engine_out: list | None = None, group=None, kv_bits=None,
             kv_group_size: int = 64, kv_dtype=None) -> list[list[int]]:
    """Generate up to `max_tokens` tokens for each prompt, all requests batched continuously on
    the paged cache; returns token ids, n lists per prompt, in order.

    Prompts are token ids, or text when `tokenizer` (mlx-lm's) is given. A sample ends at one of
    `stop_tokens` (not included), by default the tokenizer's EOS ids when one is given (pass
    `stop_tokens=()` to run on). Greedy unless `sampler` (mlx-lm's signature: logprobs [B, V] ->
    tokens [B]). `num_blocks` defaults to a pool that holds everything at once; a smaller one
    works too, through preemption and recompute (same greedy tokens, more compute). A model
    sharded with `model.shard(group)` runs tensor-parallel: call this on every rank with the
    same arguments (`Engine`, adr/0012-tensor-parallel.md). `kv_bits` 8 or 4 quantizes the
    cache as mlx-lm's `--kv-bits` does (its affine format with `kv_group_size`; ADR 0011), here
    with paging, prefix sharing, forks and windows; `kv_dtype` names any of create_pool's
    formats instead (e.g. "float8_e4m3")."""
    eng, rids, _ = _start(model, prompts, max_tokens=max_tokens, backend=backend, path=path,
                          block_size=block_size, sampler=sampler, prefix_caching=prefix_caching,
                          n=n, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                          tokenizer=tokenizer, stop_tokens=stop_tokens, group=group,
                          kv_bits=kv_bits, kv_group_size=kv_group_size, kv_dtype=kv_dtype)
    eng.run()
    if engine_out is not None:
        engine_out.append(eng)
    return [toks for r in rids for toks in eng.results(r)]


def stream_generate(model, prompts: Sequence, **kwargs):
    """`generate`'s arguments; returns an iterator of `(index, token)` pairs, one as each token
    is sampled, `index` being the position of the token's sample in `generate`'s result list.
    Input is checked here, before the first step; leaving the loop early stops generating."""
    engine_out = kwargs.pop("engine_out", None)
    eng, rids, n = _start(model, prompts, **{**_GENERATE_DEFAULTS, **kwargs})
    if engine_out is not None:
        engine_out.append(eng)
    return _stream(eng, {rid: i * n for i, rid in enumerate(rids)})


def _stream(eng: Engine, first: dict):
    while eng.has_work:
        for rid, sample, tok in eng.step():
            yield first[rid] + sample, tok


_GENERATE_DEFAULTS = dict(backend="mlx", path="auto", block_size=16, sampler=None,
                          prefix_caching=True, n=1, num_blocks=None, max_batch_tokens=512,
                          tokenizer=None, stop_tokens=None, group=None, kv_bits=None,
                          kv_group_size=64, kv_dtype=None)
