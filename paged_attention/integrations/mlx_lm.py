"""mlx-lm models on the paged KV cache (design and figures: adr/0009-mlx-lm-integration.md).

Three layers, each usable alone:

- `PagedLayerCache`: what mlx-lm's attention layers use of a cache (`offset`,
  `update_and_fetch`, `make_mask`, `trim`, `is_trimmable`). `update_and_fetch` only stashes the
  new k/v; the attention itself happens in the hook.
- `paged_attention_hook(model)`: a context manager that swaps the model module's
  `scaled_dot_product_attention` for one that, given a `PagedLayerCache`, runs
  `backend.run(plan, q, pool, k, v)` (writes the new rows, attends over the blocks). One
  `backend.plan(...)` per step and window is shared by all layers. mlx-lm itself is unchanged.
- `Engine` / `generate`: continuous batching. Every step is ONE model call over the ragged batch
  laid out token-major: input ids [N, 1] (one "batch row" per token) with per-token rope offsets,
  so mlx-lm's [B, H, L, D] tensors are [N, H, 1, D], i.e. plan/run's [N, H, D] without a copy.
  Prefill chunks and decode tokens share the step's plan through `query_lens`.

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
from ..errors import InvalidInput, PagedAttentionError, PoolExhausted
from ..interface import PagedAttention
from ..registry import get_backend


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


# model module -> per-layer attention window (None = full). Every entry routes attention through
# base.scaled_dot_product_attention with rope(offset=cache.offset) and cache.update_and_fetch.
# mistral configs load as llama (mlx-lm's MODEL_REMAPPING).
_ARCHITECTURES: dict[str, Callable] = {
    "mlx_lm.models.llama": _llama_windows,
    "mlx_lm.models.qwen2": _full_windows,
    "mlx_lm.models.qwen3": _full_windows,
    "mlx_lm.models.gemma3_text": _gemma3_windows,
}


@dataclass(frozen=True)
class ModelInfo:
    module: object
    windows: tuple            # per layer: window or None
    scales: tuple             # per layer: attention scale
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str                # pool dtype (the attention projections' dtype)


_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def inspect_model(model) -> ModelInfo:
    """What the paged cache needs to know about an mlx-lm model; `Unsupported` says why not."""
    import sys
    name = type(model).__module__
    if name not in _ARCHITECTURES:
        raise Unsupported(
            f"model: {name} is not served by the paged cache (supported: "
            f"{', '.join(m.rsplit('.', 1)[1] for m in _ARCHITECTURES)}, and mistral as llama); "
            "its attention does not go through base.scaled_dot_product_attention with a plain "
            "KV cache, or uses features (logit softcapping, sinks, linear attention) not implemented")
    layers = list(model.layers)
    attns = [layer.self_attn for layer in layers]
    for i, a in enumerate(attns):
        if isinstance(a.rope, _rope_utils.DynamicNTKScalingRoPE):
            raise Unsupported(f"model: layer {i} uses dynamic NTK rope, whose python-side offset "
                              "arithmetic cannot take per-token positions")
        if getattr(a, "attn_logit_softcapping", None):
            raise Unsupported(f"model: layer {i} uses attention logit softcapping")
    hq = {a.n_heads for a in attns}
    hkv = {a.n_kv_heads for a in attns}
    dims = {a.k_proj.weight.shape[0] // a.n_kv_heads for a in attns}
    if len(hq) != 1 or len(hkv) != 1 or len(dims) != 1:
        raise Unsupported("model: layers differ in head counts or head_dim; one pool geometry "
                          "is shared by every layer")
    dtype = _DTYPE_NAMES.get(attns[0].q_proj.weight.dtype)
    if dtype is None:
        raise Unsupported(f"model: weights of dtype {attns[0].q_proj.weight.dtype} (quantized?) "
                          "are not supported")
    return ModelInfo(module=sys.modules[name], windows=tuple(_ARCHITECTURES[name](model)),
                     scales=tuple(float(a.scale) for a in attns), num_q_heads=hq.pop(),
                     num_kv_heads=hkv.pop(), head_dim=dims.pop(), dtype=dtype)


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
class _Group:
    """Layers sharing one attention window share one block manager (one table per sequence)."""

    window: int | None
    layers: list
    bm: BlockManager
    pools: dict = field(default_factory=dict)    # layer -> KVPool


@dataclass
class _Step:
    seq_ids: list
    query_lens: np.ndarray       # int32 [B]
    context_lens: np.ndarray     # int32 [B], after this step's tokens
    positions: object            # mx int32 [N] rope offsets (engine) or None (per-layer int)
    tables: dict                 # group index -> int32 [B, max_blocks]
    slots: dict                  # group index -> int64 [N]
    plans: dict = field(default_factory=dict)


class _PagedState:
    def __init__(self, model, backend: PagedAttention, *, num_blocks: int, block_size: int,
                 path: str):
        self.info = inspect_model(model)
        self.backend = backend
        self.path = path
        info = self.info
        if info.dtype not in backend.pool_dtypes or info.dtype not in backend.q_dtypes:
            raise Unsupported(f"backend: {backend.name!r} has no {info.dtype} pools or queries "
                              f"(pools {backend.pool_dtypes}); use the mlx backend or float32")
        self.groups: list[_Group] = []
        self.group_of: list[int] = []
        by_window: dict = {}
        for i, w in enumerate(info.windows):
            if w not in by_window:
                by_window[w] = len(self.groups)
                self.groups.append(_Group(w, [], BlockManager(num_blocks, block_size)))
            g = self.groups[by_window[w]]
            g.layers.append(i)
            g.pools[i] = backend.create_pool(num_blocks, block_size, info.num_kv_heads,
                                             info.head_dim, info.dtype)
            self.group_of.append(by_window[w])
        self.block_size = block_size
        self.step: _Step | None = None

    def plan_for(self, layer: int, num_q_heads: int, scale: float):
        gi = self.group_of[layer]
        key = (gi, num_q_heads, scale)
        plan = self.step.plans.get(key)
        if plan is None:
            g = self.groups[gi]
            plan = self.backend.plan(
                g.pools[layer], self.step.tables[gi], self.step.context_lens,
                num_q_heads=num_q_heads, query_lens=self.step.query_lens,
                slot_mapping=self.step.slots[gi], scale=scale, window=g.window, path=self.path)
            self.step.plans[key] = plan
        return plan

    def kv_bytes(self) -> int:
        """Bytes of the blocks referenced right now, over every layer (the cache's live KV)."""
        per_block = 0
        total = 0
        for g in self.groups:
            pool = next(iter(g.pools.values()))
            per_block = pool.nbytes // pool.num_blocks
            total += g.bm.stats().used * per_block * len(g.layers)
        return total


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
    def _attend(self, queries, keys, values, scale: float):
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
        plan = st.plan_for(self.layer, hq, scale)
        if be.array_type is not mx.array:
            # numpy has no bfloat16: widen (exactly) to float32; the pool rounds k, v back.
            q, k, v = (np.asarray(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
                       for x in (q, k, v))
        out = be.run(plan, q, st.groups[st.group_of[self.layer]].pools[self.layer], k, v)
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


@contextlib.contextmanager
def paged_attention_hook(model):
    """Route the model's attention to the paged cache while inside; other caches pass through.
    Patches the model module's `scaled_dot_product_attention` name only (mlx-lm is unchanged)."""
    info = inspect_model(model)
    module = info.module
    original = module.scaled_dot_product_attention

    def hooked(queries, keys, values, cache, scale, mask, sinks=None):
        if not isinstance(cache, PagedLayerCache):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                            sinks=sinks)
        if sinks is not None:
            raise Unsupported("attention sinks are not supported by the paged cache")
        if mask is not None and not (isinstance(mask, str) and mask == "causal"):
            raise Unsupported("the model passed its own attention mask; the paged cache only "
                              "applies causal (and per-layer window) masking")
        return cache._attend(queries, keys, values, scale)

    module.scaled_dot_product_attention = hooked
    _HOOK_DEPTH[module.__name__] = _HOOK_DEPTH.get(module.__name__, 0) + 1
    try:
        yield
    finally:
        _HOOK_DEPTH[module.__name__] -= 1
        if _HOOK_DEPTH[module.__name__] == 0:
            module.scaled_dot_product_attention = _mlx_base.scaled_dot_product_attention
        else:
            module.scaled_dot_product_attention = original


_HOOK_DEPTH: dict = {}


def _resolve_backend(backend) -> PagedAttention:
    return backend if isinstance(backend, PagedAttention) else get_backend(backend)


def make_paged_cache(model, *, backend="mlx", num_blocks: int = 256, block_size: int = 16,
                     path: str = "auto") -> list:
    """A per-layer cache list for mlx-lm's own loops (`generate_step(..., prompt_cache=...)`);
    use it inside `paged_attention_hook(model)`. Each batch row is one sequence."""
    st = _PagedState(model, _resolve_backend(backend), num_blocks=num_blocks,
                     block_size=block_size, path=path)
    return [PagedLayerCache(st, i, auto=True) for i in range(len(model.layers))]


# -- the engine -----------------------------------------------------------------------------
def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


@dataclass
class _Seq:
    sid: int
    rid: int
    tokens: list          # prompt + generated
    prompt_len: int
    computed: int = 0     # leading tokens whose K/V are in the cache
    n_children: int = 0   # forks still to make when the prompt finishes (n > 1)

    @property
    def generated(self):
        return self.tokens[self.prompt_len:]


@dataclass
class EngineStats:
    steps: int = 0
    tokens_computed: int = 0     # token rows run through the model (prefill + decode)
    tokens_generated: int = 0
    prefix_hit_tokens: int = 0
    peak_blocks: int = 0         # most blocks referenced at once (all groups)
    peak_kv_bytes: int = 0
    blocks_used: int = 0
    blocks_shared: int = 0


class Engine:
    """Continuous batching over a paged cache: requests join and finish at any step.

    Each `step()` makes one model call: every running sequence's next token plus prefill chunks
    of waiting prompts (up to `max_batch_tokens` rows), one plan per window. Prompts share cached
    prefix blocks (`prefix_caching`), `n > 1` samples fork one prefilled prompt (copy-on-write),
    blocks that left every window are released, and `trim(seq_id, k)` rewinds a sequence.
    """

    def __init__(self, model, *, backend="mlx", path: str = "auto", block_size: int = 16,
                 num_blocks: int = 1024, sampler=None, prefix_caching: bool = True,
                 max_batch_tokens: int = 512, trim_slack: int = 16):
        self.model = model
        self.state = _PagedState(model, _resolve_backend(backend), num_blocks=num_blocks,
                                 block_size=block_size, path=path)
        self.caches = [PagedLayerCache(self.state, i, auto=False)
                       for i in range(len(model.layers))]
        self.sampler = sampler or greedy
        self.prefix_caching = prefix_caching
        self.max_batch_tokens = int(max_batch_tokens)
        self.trim_slack = int(trim_slack)
        self.block_size = block_size
        self._next_id = 0
        self._waiting: list[tuple[int, list, int, int]] = []   # (rid, prompt, max_tokens, n)
        self._seqs: dict[int, _Seq] = {}
        self._max_tokens: dict[int, int] = {}
        self._outputs: dict[int, list] = {}                    # rid -> seq ids in sample order
        self.finished: dict[int, list] = {}                    # seq id -> generated tokens
        self.stats = EngineStats()

    # -- requests --
    def add_request(self, prompt: Sequence[int], max_tokens: int, n: int = 1) -> int:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InvalidInput("prompt: expected at least one token id")
        if max_tokens < 1 or n < 1:
            raise InvalidInput(f"max_tokens, n: expected >= 1, got {max_tokens}, {n}")
        rid = self._next_id
        self._next_id += 1
        self._waiting.append((rid, prompt, int(max_tokens), int(n)))
        self._outputs[rid] = []
        return rid

    def results(self, rid: int) -> list[list[int]]:
        """Generated tokens of each sample of a request (finished or not)."""
        return [self.finished[s] if s in self.finished else self._seqs[s].generated
                for s in self._outputs[rid]]

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._seqs)

    def sequences(self, rid: int) -> list[int]:
        return list(self._outputs[rid])

    # -- admission --
    def _unwritten_blocks(self, g: _Group) -> set:
        out = set()
        for s in self._seqs.values():
            if s.computed < s.prompt_len:
                out.update(g.bm.block_table(s.sid)[s.computed // self.block_size:])
        return out

    def _admit(self) -> None:
        still = []
        for req in self._waiting:
            rid, prompt, max_tokens, n = req
            if not self._try_admit(rid, prompt, max_tokens, n):
                still.append(req)
        self._waiting = still

    def _try_admit(self, rid, prompt, max_tokens, n) -> bool:
        st = self.state
        cached = 0
        if self.prefix_caching:
            # At least the last prompt token is recomputed: its query gives the first logits.
            cached = (len(prompt) - 1) // self.block_size * self.block_size
            for g in st.groups:
                hits = g.bm.match_prefix(prompt)
                # A prefix another prompt is still prefilling is not written yet: wait a step.
                if set(hits) & self._unwritten_blocks(g):
                    return False
                cached = min(cached, len(hits) * self.block_size)
        need = -(-len(prompt) // self.block_size)
        if any(g.bm.num_free < need for g in st.groups):
            return False
        sid = self._new_sid()
        done = []
        try:
            for g in st.groups:
                if self.prefix_caching:
                    g.bm.add_sequence(sid, token_ids=prompt, max_cached_tokens=cached)
                else:
                    g.bm.add_sequence(sid, len(prompt))
                done.append(g)
        except PoolExhausted:
            for g in done:
                g.bm.free(sid)
            return False
        self.stats.prefix_hit_tokens += cached
        self._seqs[sid] = _Seq(sid, rid, list(prompt), len(prompt), computed=cached,
                               n_children=n - 1)
        self._max_tokens[sid] = max_tokens
        self._outputs[rid].append(sid)
        return True

    def _new_sid(self) -> int:
        sid = self._next_id
        self._next_id += 1
        return sid

    # -- one step --
    def step(self) -> list[int]:
        """One model call. Returns the sequence ids that finished in it."""
        st = self.state
        self._admit()
        decodes = [s for s in self._seqs.values() if s.computed == len(s.tokens) - 1]
        prefills = [s for s in self._seqs.values() if s.computed < len(s.tokens) - 1]
        budget = self.max_batch_tokens
        batch: list[tuple[_Seq, int]] = []
        for s in decodes:
            batch.append((s, 1))
        budget -= len(decodes)
        for s in prefills:
            if budget <= 0:
                break
            take = min(len(s.tokens) - s.computed, budget)
            batch.append((s, take))
            budget -= take
        if not batch:
            if self._waiting:
                raise PoolExhausted("no request fits in the pool: raise num_blocks")
            return []
        # Tokens past what the block manager holds (decodes; a prompt rewound by trim) need
        # room, and copy-on-write of a shared tail, before they are written.
        for g in st.groups:
            grow: dict[int, list] = {}
            for s, n in batch:
                extra = s.computed + n - g.bm.context_len(s.sid)
                if extra > 0:
                    grow.setdefault(extra, []).append((s, n))
            for extra, group in grow.items():
                toks = [s.tokens[s.computed + n - extra:s.computed + n]
                        for s, n in group] if self.prefix_caching else None
                try:
                    _, copies = g.bm.append_batch([s.sid for s, _ in group], extra, toks)
                except PoolExhausted as e:
                    raise PoolExhausted(f"{e}; raise num_blocks (the engine does not preempt)")
                if copies:
                    for pool in g.pools.values():
                        st.backend.copy_blocks(pool, copies)
        ids = [s.sid for s, _ in batch]
        qlens = np.array([n for _, n in batch], np.int32)
        ctx = np.array([s.computed + n for s, n in batch], np.int32)
        positions = np.concatenate([np.arange(s.computed, s.computed + n) for s, n in batch])
        tokens = np.concatenate([s.tokens[s.computed:s.computed + n] for s, n in batch])
        tables, slots = {}, {}
        for gi, g in enumerate(st.groups):
            tables[gi] = g.bm.block_tables(ids)
            slots[gi] = np.concatenate([g.bm.slots(s.sid, s.computed, s.computed + n)
                                        for s, n in batch])
        st.step = _Step(ids, qlens, ctx, mx.array(positions.astype(np.int32)), tables, slots)
        with paged_attention_hook(self.model):
            logits = self.model(mx.array(tokens.astype(np.int32))[:, None], cache=self.caches)
        st.step = None
        self.stats.steps += 1
        self.stats.tokens_computed += int(qlens.sum())
        # Sample where a sequence's known tokens are all in the cache after this step.
        last = np.cumsum(qlens) - 1
        sample_rows, sample_seqs = [], []
        for (s, n), row in zip(batch, last):
            s.computed += n
            if s.computed == len(s.tokens):
                sample_rows.append(int(row))
                sample_seqs.append(s)
        finished = []
        if sample_seqs:
            rows = logits[mx.array(sample_rows), 0, :]
            reps = [1 + s.n_children for s in sample_seqs]
            if any(r > 1 for r in reps):   # n samples of one prompt share its logits row
                rows = mx.concatenate([mx.broadcast_to(rows[i:i + 1], (r, rows.shape[-1]))
                                       for i, r in enumerate(reps)])
            logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
            picked = self.sampler(logprobs).tolist()
            k, got = 0, []
            for s, r in zip(sample_seqs, reps):
                mine = picked[k:k + r]
                k += r
                got += self._fork_children(s, mine[1:])
                s.tokens.append(int(mine[0]))
                got.append(s)
            for s in got:
                self.stats.tokens_generated += 1
                if len(s.generated) >= self._max_tokens[s.sid]:
                    finished.append(s.sid)
        for sid in finished:
            self._finish(sid)
        self._release_windows()
        self._account()
        return finished

    def _fork_children(self, parent: _Seq, first_tokens: list) -> list:
        st = self.state
        forked = []
        for tok in first_tokens:
            cid = self._new_sid()
            for g in st.groups:
                g.bm.fork(parent.sid, cid)
            child = _Seq(cid, parent.rid, list(parent.tokens) + [int(tok)], parent.prompt_len,
                         computed=parent.computed)
            self._seqs[cid] = child
            self._max_tokens[cid] = self._max_tokens[parent.sid]
            self._outputs[parent.rid].append(cid)
            forked.append(child)
        parent.n_children = 0
        return forked

    def _finish(self, sid: int) -> None:
        s = self._seqs.pop(sid)
        self.finished[sid] = s.generated
        for g in self.state.groups:
            g.bm.free(sid)

    def _release_windows(self) -> None:
        for g in self.state.groups:
            if g.window is None:
                continue
            for s in self._seqs.values():
                # The next query (position len) sees positions > len - window; keep trim_slack
                # more so trim() can rewind that far.
                g.bm.release_before(s.sid, s.computed - g.window - self.trim_slack)

    def _account(self) -> None:
        used = shared = 0
        for g in self.state.groups:
            stt = g.bm.stats()
            used += stt.used
            shared += stt.shared
        self.stats.blocks_used, self.stats.blocks_shared = used, shared
        self.stats.peak_blocks = max(self.stats.peak_blocks, used)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.state.kv_bytes())

    def trim(self, sid: int, k: int) -> int:
        """Drop the last k generated tokens of a running sequence (rejected speculation); its
        next step recomputes from there. Returns the number of tokens dropped."""
        s = self._seqs.get(sid)
        if s is None:
            raise InvalidInput(f"seq_id: {sid!r} is not running")
        k = min(int(k), len(s.tokens) - s.prompt_len)
        if k <= 0:
            return 0
        del s.tokens[len(s.tokens) - k:]
        keep = len(s.tokens) - 1          # the newest token is fed again as the next query
        drop = s.computed - keep
        if drop > 0:
            for g in self.state.groups:
                g.bm.trim(sid, drop)
            s.computed = keep
        return k

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        while self.has_work:
            before = self.stats.tokens_generated
            self.step()
            if progress:
                progress(self.stats.tokens_generated - before)

    def block_counts(self) -> list[int]:
        """Blocks referenced now, per window group (full attention first if present)."""
        return [g.bm.stats().used for g in self.state.groups]


def blocks_needed(prompts, max_tokens: int, block_size: int, n: int = 1) -> int:
    return sum(n * (-(-(len(p) + max_tokens) // block_size) + 1) for p in prompts) + 1


def generate(model, prompts: Sequence[Sequence[int]], *, max_tokens: int, backend="mlx",
             path: str = "auto", block_size: int = 16, sampler=None, prefix_caching: bool = True,
             n: int = 1, num_blocks: int | None = None, max_batch_tokens: int = 512,
             engine_out: list | None = None) -> list[list[int]]:
    """Generate `max_tokens` tokens for each prompt (lists of token ids), all requests batched
    continuously on the paged cache. Greedy unless `sampler` (mlx-lm's sampler signature:
    logprobs [B, V] -> tokens [B]). With n > 1 the result has n lists per prompt, in order."""
    if num_blocks is None:
        num_blocks = blocks_needed(prompts, max_tokens, block_size, n)
    eng = Engine(model, backend=backend, path=path, block_size=block_size, num_blocks=num_blocks,
                 sampler=sampler, prefix_caching=prefix_caching, max_batch_tokens=max_batch_tokens)
    rids = [eng.add_request(p, max_tokens, n) for p in prompts]
    eng.run()
    if engine_out is not None:
        engine_out.append(eng)
    return [toks for r in rids for toks in eng.results(r)]
