"""The engine's books: which sequences wait, which run, and which blocks each holds in every
window group (policy and reasons: adr/0009-mlx-lm-integration.md, "Serving policy").

vLLM's split: the `Scheduler` here decides what a step computes (admission with prefix hits,
per-step block growth, preemption, window releases, block accounting, the block side of trim)
and owns every `BlockManager` call; the `Engine` (`mlx_lm.py`) owns the request API, the model
call and sampling. Nothing here touches the model or MLX: blocks, token counts and the pools'
copy-on-write copies only.

Invariant between steps: each running sequence's context length in every group equals its
`computed` tokens, and every block the prefix cache knows holds what its hash says (blocks are
allocated per step, for exactly the tokens the step writes).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from ..block_manager import BlockManager
from ..errors import PoolExhausted
from ..interface import PagedAttention


@dataclass
class WindowGroup:
    """Layers sharing one attention window share one block manager (one table per sequence)."""

    window: int | None
    layers: list
    bm: BlockManager
    pools: dict = field(default_factory=dict)    # layer -> KVPool


@dataclass(eq=False)
class Seq:
    """One sample of a request, waiting or running."""

    sid: int
    rid: int
    index: int            # this sample's position among its request's samples
    tokens: list          # prompt + generated
    prompt_len: int
    max_tokens: int
    stop: frozenset       # token ids that end this sample (not included in its tokens)
    computed: int = 0     # leading tokens whose K/V are in the cache; between steps also every
                          # group's context length for this sequence (blocks grow per step)
    n_children: int = 0   # forks still to make when the prompt finishes (n > 1)
    order: int = -1       # admission order (-1: waiting); preemption takes the largest first

    @property
    def generated(self):
        return self.tokens[self.prompt_len:]


@dataclass
class EngineStats:
    steps: int = 0
    tokens_computed: int = 0     # token rows run through the model (prefill + decode + recompute)
    tokens_generated: int = 0    # tokens added to results (stop tokens are not)
    prefix_hit_tokens: int = 0
    preemptions: int = 0         # sequences evicted to the waiting queue for recompute
    peak_blocks: int = 0         # most blocks referenced at once (all groups)
    peak_kv_bytes: int = 0
    blocks_used: int = 0
    blocks_shared: int = 0
    peak_running: int = 0        # most sequences admitted (holding blocks) at once


class Scheduler:
    """Admits waiting sequences first come, first served, picks each step's rows (every running
    sequence's next token first, then prefill chunks up to `max_batch_tokens`), allocates their
    blocks in every window group and preempts the most recently admitted sequences when blocks
    run out. Updates the block side of `stats` (prefix hits, preemptions, blocks, peak running).
    """

    def __init__(self, groups: list[WindowGroup], backend: PagedAttention, stats: EngineStats, *,
                 block_size: int, num_blocks: int, max_batch_tokens: int, trim_slack: int,
                 prefix_caching: bool):
        self.groups = groups
        self.backend = backend            # copies shared partial tails (copy_blocks)
        self.stats = stats
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_batch_tokens = max_batch_tokens
        self.trim_slack = trim_slack
        self.prefix_caching = prefix_caching
        self.waiting: collections.deque[Seq] = collections.deque()  # FIFO; preempted in front
        self.running: dict[int, Seq] = {}     # admitted (holding blocks), in admission order
        self._admissions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- queue --
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a sample no pool of `num_blocks` can ever hold (PoolExhausted), before it is
        queued. The last sampled token is never written, so a sample holds len + max_tokens - 1
        positions at most; full-attention groups keep them all."""
        need = self._blocks(prompt_len + max_tokens - 1)
        if need > self.num_blocks and any(g.window is None for g in self.groups):
            raise PoolExhausted(f"prompt, max_tokens: one sample of {prompt_len} + {max_tokens} "
                                f"tokens needs {need} blocks of {self.block_size}, the pool has "
                                f"{self.num_blocks}: raise num_blocks")

    def add(self, s: Seq) -> None:
        self.waiting.append(s)

    def drop(self, sids: set) -> None:
        """Remove these sequences, waiting or running; their blocks are released now."""
        self.waiting = collections.deque(s for s in self.waiting if s.sid not in sids)
        for sid in sids:
            if sid in self.running:
                del self.running[sid]
                self._free(sid)
        self.account()

    def finish(self, s: Seq) -> None:
        del self.running[s.sid]
        self._free(s.sid)

    def fork(self, parent: Seq, child: Seq) -> None:
        """`child` (a sample of parent's request) shares every block of parent, admitted now."""
        child.order = self._admissions
        self._admissions += 1
        for g in self.groups:
            g.bm.fork(parent.sid, child.sid)
        self.running[child.sid] = child

    def trim(self, s: Seq, keep: int) -> None:
        """The block side of rewinding a sequence to `keep` computed tokens (a waiting one holds
        no blocks: it is recomputed from its tokens when admitted)."""
        drop = s.computed - keep
        if drop > 0 and s.sid in self.running:
            for g in self.groups:
                g.bm.trim(s.sid, drop)
            s.computed = keep

    def _free(self, sid: int) -> None:
        for g in self.groups:
            g.bm.free(sid)

    # -- admission --
    def _group_need(self, g: WindowGroup, tokens: int) -> int:
        """Blocks a prompt of `tokens` tokens may hold at once in group g: all of them under full
        attention; under a window, the window, the trim slack and one step's chunk."""
        need = self._blocks(tokens)
        if g.window is not None:
            need = min(need, self._blocks(g.window + self.trim_slack + self.max_batch_tokens) + 2)
        return need

    def _reserved(self, g: WindowGroup) -> int:
        """Blocks admitted prompts still have to allocate for their remaining prefill."""
        return sum(max(0, self._group_need(g, len(s.tokens)) - self._blocks(s.computed))
                   for s in self.running.values() if s.computed < len(s.tokens) - 1)

    def _admit(self) -> None:
        # First come, first served: a request that does not fit yet holds back later ones, so
        # a long prompt (or a preempted sequence, queued in front) is not starved.
        while self.waiting and self._try_admit(self.waiting[0]):
            self.waiting.popleft()

    def _try_admit(self, s: Seq) -> bool:
        toks = s.tokens
        cached = 0
        hits = [[] for _ in self.groups]
        if self.prefix_caching:
            # At least the last token is recomputed: its query gives the next logits.
            cached = (len(toks) - 1) // self.block_size * self.block_size
            for gi, g in enumerate(self.groups):
                hits[gi] = g.bm.match_prefix(toks[:cached])
                cached = min(cached, len(hits[gi]) * self.block_size)
        for gi, g in enumerate(self.groups):
            shared = hits[gi][:cached // self.block_size]
            revived = sum(1 for b in shared if g.bm.ref_count(b) == 0)   # cached, unreferenced
            need = max(0, self._group_need(g, len(toks)) - len(shared)) + revived
            if need > g.bm.num_free - self._reserved(g):
                return False
        for g in self.groups:
            # Blocks are allocated as the prompt is computed (`_grow`), so every block the
            # prefix cache knows holds what its hash says by the end of each step.
            if self.prefix_caching:
                g.bm.add_sequence(s.sid, token_ids=toks[:cached])
            else:
                g.bm.add_sequence(s.sid, 0)
        self.stats.prefix_hit_tokens += cached
        s.computed = cached
        s.order = self._admissions
        self._admissions += 1
        self.running[s.sid] = s
        return True

    # -- one step's rows and blocks --
    def schedule(self) -> list[tuple[Seq, int]]:
        """Admit what fits, then the step's (sequence, new tokens) in row order: every running
        sequence's next token, then prefill chunks up to `max_batch_tokens` rows; their blocks
        are allocated in every group (preempting when they run out). Raises PoolExhausted when
        nothing can run while requests wait."""
        self._admit()
        decodes = [s for s in self.running.values() if s.computed == len(s.tokens) - 1]
        prefills = [s for s in self.running.values() if s.computed < len(s.tokens) - 1]
        budget = self.max_batch_tokens - len(decodes)
        batch: list[tuple[Seq, int]] = [(s, 1) for s in decodes]
        for s in prefills:
            if budget <= 0:
                break
            take = min(len(s.tokens) - s.computed, budget)
            batch.append((s, take))
            budget -= take
        if batch:
            batch = self._grow(batch)
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        if not batch and self.waiting:
            raise PoolExhausted("num_blocks: no request fits in the pool")
        return batch

    def tables_and_slots(self, batch: list[tuple[Seq, int]]) -> tuple[dict, dict]:
        """Per group index: the batch's block tables (int32 [B, max_blocks]) and the slots of its
        new tokens (int64 [N], sequence-major), once `schedule` has allocated them."""
        ids = [s.sid for s, _ in batch]
        tables, slots = {}, {}
        for gi, g in enumerate(self.groups):
            tables[gi] = g.bm.block_tables(ids)
            slots[gi] = np.concatenate([g.bm.slots(s.sid, s.computed, s.computed + n)
                                        for s, n in batch])
        return tables, slots

    def _blocks_needed(self, g: WindowGroup, entries) -> int:
        """Blocks group g must allocate for `entries` (seq, new tokens): new blocks plus a copy of
        each shared partial tail (an upper bound when siblings share one tail)."""
        need = 0
        for s, n in entries:
            need += self._blocks(s.computed + n) - self._blocks(s.computed)
            if s.computed % self.block_size and g.bm.ref_count(g.bm.block_table(s.sid)[-1]) > 1:
                need += 1
        return need

    def _fits(self, entries) -> bool:
        return all(self._blocks_needed(g, entries) <= g.bm.num_free for g in self.groups)

    def _append(self, entries) -> None:
        by_len: dict[int, list] = {}
        for s, n in entries:
            by_len.setdefault(n, []).append(s)
        for g in self.groups:
            for n, seqs in by_len.items():
                toks = [s.tokens[s.computed:s.computed + n] for s in seqs] \
                    if self.prefix_caching else None
                _, copies = g.bm.append_batch([s.sid for s in seqs], n, toks)
                if copies:
                    for pool in g.pools.values():
                        self.backend.copy_blocks(pool, copies)

    def _grow(self, batch: list) -> list:
        """Allocate the step's blocks; returns the batch less the sequences preempted for them."""
        if self._fits(batch):
            self._append(batch)
            return batch
        done: set = set()
        for s, n in sorted(batch, key=lambda e: e[0].order):
            if s.sid not in self.running:          # preempted for an earlier sequence
                continue
            while not self._fits([(s, n)]):
                victim = max((v for v in self.running.values() if v.sid not in done),
                             key=lambda v: v.order)
                if victim is s and len(self.running) == 1:
                    raise PoolExhausted(
                        f"num_blocks: sequence {s.sid} (request {s.rid}) alone needs more than "
                        f"the pool's {self.num_blocks} blocks for {s.computed + n} tokens")
                self._preempt(victim)
                if victim is s:
                    break
            else:
                self._append([(s, n)])
                done.add(s.sid)
        return [(s, n) for s, n in batch if s.sid in done]

    def _preempt(self, s: Seq) -> None:
        """Recompute policy (vLLM's): free every block, queue prompt + generated tokens in
        front. Its written blocks stay in the prefix cache, so readmission may reuse them."""
        self._free(s.sid)
        del self.running[s.sid]
        s.computed = 0
        s.order = -1
        self.waiting.appendleft(s)
        self.stats.preemptions += 1

    # -- after a step --
    def end_step(self) -> None:
        """Release the blocks that left every window, then count what is referenced."""
        for g in self.groups:
            if g.window is None:
                continue
            for s in self.running.values():
                # The next query (position len) sees positions > len - window; keep trim_slack
                # more so trim() can rewind that far.
                g.bm.release_before(s.sid, s.computed - g.window - self.trim_slack)
        self.account()

    def account(self) -> None:
        used = shared = 0
        kv_bytes = 0
        for g in self.groups:
            stt = g.bm.stats()
            used += stt.used
            shared += stt.shared
            kv_bytes += stt.used * group_block_bytes(g)
        self.stats.blocks_used, self.stats.blocks_shared = used, shared
        self.stats.peak_blocks = max(self.stats.peak_blocks, used)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, kv_bytes)

    def block_counts(self) -> list[int]:
        """Blocks referenced now, per window group (full attention first if present)."""
        return [g.bm.stats().used for g in self.groups]


def group_block_bytes(g: WindowGroup) -> int:
    """Bytes one block of the group holds over all its layers (K, V and any scales)."""
    pool = next(iter(g.pools.values()))
    return pool.nbytes // pool.num_blocks * len(g.layers)
