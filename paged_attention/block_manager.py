"""Backend-neutral allocation of KV-cache blocks: free list, reference counts, block tables,
fork (prefix sharing), copy-on-write and automatic prefix caching.

The manager only does bookkeeping; it never touches a pool. Operations that need data moved
return what to move: `append_slots` returns the slots to write (`write_kv`) and the block
copies to perform first (`copy_blocks`). Every operation is all-or-nothing: on `PoolExhausted`
or bad input the state is exactly as before the call.

Prefix caching works as vLLM's: every full block of a sequence whose token ids are known gets a
hash chained over all tokens up to its end, so equal hashes mean equal K/V contents. A new
sequence whose prompt starts with cached blocks references them instead of allocating. A
cached block nobody references is kept, still reusable, until the pool needs room; then the
least recently released one is evicted. Those books are the `PrefixCache`; the `BlockManager`
keeps reference counts, the free list and the sequences' tables.
"""
from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import numpy as np

from .errors import InvalidInput, PoolExhausted


@dataclass
class CacheStats:
    """A snapshot of the pool's occupancy."""

    num_blocks: int
    free: int                 # blocks available for allocation (cached ones included)
    used: int                 # blocks referenced by at least one sequence
    shared: int               # blocks referenced by two or more sequences
    cached: int = 0           # unreferenced blocks that still hold a reusable prefix
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache, since creation
    blocks_per_seq: dict = field(default_factory=dict)  # seq_id -> blocks in its table
    tokens_per_seq: dict = field(default_factory=dict)  # seq_id -> context length


@dataclass
class _Sequence:
    blocks: list[int]
    num_tokens: int
    token_ids: list | None = None   # known token ids (enables prefix caching of its full blocks)
    hashed: int = 0                 # leading full blocks already registered in the cache
    hit_tokens: int = 0             # prompt tokens that were served from the cache
    released: int = 0               # leading blocks dropped by release_before (out of every window)
    hashes: list = field(default_factory=list)  # chained hash of each registered leading block

    def live(self) -> list[int]:
        return self.blocks[self.released:]


class PrefixCache:
    """Automatic prefix caching's books (vLLM's): the chained hash of every registered full block
    -> the block holding it, and the cached blocks nobody references, least recently released
    first. The `BlockManager` owns reference counts and the free list; a block it releases is
    `park`ed here when it holds a prefix (kept, reusable, until the pool needs room: `evict`)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._block_of: dict[int, int] = {}         # prefix hash -> block holding it
        self._hash_of: dict[int, int] = {}          # block -> its prefix hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def hash_of(self, block: int) -> int:
        return self._hash_of[block]

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def revive(self, block: int) -> None:
        """A cached block is referenced again: it may no longer be evicted."""
        self._evictable.pop(block, None)

    def park(self, block: int) -> bool:
        """A block nobody references any more: kept as evictable if it holds a prefix (True),
        else the caller frees it (False)."""
        if block not in self._hash_of:
            return False
        self._evictable[block] = None                # keep the prefix until room is needed
        return True

    def evict(self) -> int:
        """Forget the least recently released cached block and return it for reuse."""
        victim, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(victim)]
        return victim

    def withdraw(self, block: int) -> None:
        """Forget a referenced block's prefix (it is about to be rewritten), if it has one."""
        if block in self._hash_of:
            del self._block_of[self._hash_of.pop(block)]

    def block_hashes(self, token_ids: list, count: int, start: int = 0, prev: int = 0) -> list[int]:
        """Chained hashes of full blocks start..count-1; each covers every token up to its end."""
        out = []
        for i in range(start, count):
            prev = hash((prev, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])))
            out.append(prev)
        return out

    def lookup(self, token_ids: list) -> list[int]:
        """The cached blocks holding the leading full blocks of `token_ids`, in order."""
        hits = []
        for h in self.block_hashes(token_ids, len(token_ids) // self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def register(self, seq: _Sequence) -> None:
        """Register the sequence's full blocks past those it already registered."""
        full = seq.num_tokens // self.block_size
        if seq.token_ids is None or full <= seq.hashed:
            return
        # The chain continues from the sequence's own record: a released block may be reused.
        prev = seq.hashes[seq.hashed - 1] if seq.hashed else 0
        for i, h in enumerate(self.block_hashes(seq.token_ids, full, seq.hashed, prev), seq.hashed):
            if i < seq.released:
                break
            block = seq.blocks[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
            elif self._block_of.get(h) != block:
                # Another block already holds this prefix: stop here, since later hashes chain
                # through blocks this sequence does not share.
                break
            seq.hashed = i + 1
            seq.hashes.append(h)


class BlockManager:
    """Allocates fixed-size blocks of a pool of `num_blocks` blocks to sequences.

    fragmented=True hands out free blocks in random order (seeded), so block tables look like
    those of a long-running server; otherwise the lowest free id is taken first.
    """

    def __init__(self, num_blocks: int, block_size: int, *, fragmented: bool = False,
                 seed: int | None = 0):
        if num_blocks < 1 or block_size < 1:
            raise InvalidInput(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.fragmented = fragmented
        self._rng = random.Random(seed)
        self._free: list[int] = list(range(self.num_blocks))  # a heap when not fragmented
        self._ref = np.zeros(self.num_blocks, dtype=np.int64)
        self._seqs: dict[Hashable, _Sequence] = {}
        self._prefix = PrefixCache(self.block_size)
        self._prefix_hit_tokens = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks available for allocation, cached-but-unreferenced ones included."""
        return len(self._free) + self._prefix.num_evictable

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def sequences(self) -> list:
        return list(self._seqs)

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def context_len(self, seq_id) -> int:
        return self._seq(seq_id).num_tokens

    def ref_count(self, block: int) -> int:
        return int(self._ref[block])

    def block_tables(self, seq_ids: Sequence, max_blocks: int | None = None, pad: int = 0) -> np.ndarray:
        """int32 [B, max_blocks] of the sequences' tables, padded with `pad`."""
        seqs = [self._seq(s) for s in seq_ids]
        width = max((len(q.blocks) for q in seqs), default=0)
        if max_blocks is None:
            max_blocks = max(width, 1)
        elif max_blocks < width:
            raise InvalidInput(f"max_blocks: {max_blocks} is smaller than the longest table ({width})")
        out = np.full((len(seqs), max_blocks), pad, dtype=np.int32)
        for i, q in enumerate(seqs):
            # Released entries (release_before) keep `pad`: a windowed kernel never reads them.
            out[i, q.released:len(q.blocks)] = q.live()
        return out

    def context_lens(self, seq_ids: Sequence) -> np.ndarray:
        return np.array([self._seq(s).num_tokens for s in seq_ids], dtype=np.int32)

    def slots(self, seq_id, start: int, stop: int) -> np.ndarray:
        """Slots (block_id * block_size + offset) of token positions [start, stop) of a sequence."""
        seq = self._seq(seq_id)
        if not 0 <= start <= stop <= seq.num_tokens:
            raise InvalidInput(f"positions [{start}, {stop}) outside sequence of {seq.num_tokens} tokens")
        pos = np.arange(start, stop)
        blocks = np.asarray(seq.blocks, dtype=np.int64)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size if pos.size \
            else np.zeros(0, dtype=np.int64)

    def stats(self) -> CacheStats:
        return CacheStats(
            num_blocks=self.num_blocks,
            free=self.num_free,
            used=int((self._ref > 0).sum()),
            shared=int((self._ref > 1).sum()),
            cached=self._prefix.num_evictable,
            prefix_hit_tokens=self._prefix_hit_tokens,
            blocks_per_seq={s: len(q.blocks) - q.released for s, q in self._seqs.items()},
            tokens_per_seq={s: q.num_tokens for s, q in self._seqs.items()},
        )

    # -- mutations -----------------------------------------------------------------------------
    def add_sequence(self, seq_id, num_tokens: int = 0, token_ids: Sequence[int] | None = None,
                     *, max_cached_tokens: int | None = None) -> np.ndarray:
        """Register a sequence holding `num_tokens` tokens (or the prompt `token_ids`).

        With token_ids, leading full blocks found in the prefix cache are shared instead of
        allocated, at most `max_cached_tokens` tokens' worth (an engine keeps the last prompt
        token uncached so it has a query to sample from). Returns the slots of the tokens the caller must write: positions
        [cached_tokens(seq_id), num_tokens), i.e. every position when nothing was cached.
        """
        if seq_id in self._seqs:
            raise InvalidInput(f"seq_id {seq_id!r} already exists")
        if token_ids is not None:
            token_ids = list(token_ids)
            if num_tokens not in (0, len(token_ids)):
                raise InvalidInput(f"num_tokens={num_tokens} disagrees with len(token_ids)={len(token_ids)}")
            num_tokens = len(token_ids)
        if num_tokens < 0:
            raise InvalidInput(f"num_tokens: expected >= 0, got {num_tokens}")
        hits = self._prefix.lookup(token_ids) if token_ids is not None else []
        if max_cached_tokens is not None:
            hits = hits[:max(0, int(max_cached_tokens)) // self.block_size]
        need = self._blocks_for(num_tokens) - len(hits)
        # Cached blocks about to be reused cannot also be evicted to make room.
        reusable = sum(1 for b in hits if self._prefix.is_evictable(b))
        if need > self.num_free - reusable:
            raise PoolExhausted(f"need {need} free blocks, {self.num_free - reusable} available")
        for b in hits:
            self._prefix.revive(b)
            self._ref[b] += 1
        blocks = hits + self._allocate(need)
        seq = _Sequence(blocks, int(num_tokens), token_ids, hashed=len(hits),
                        hit_tokens=len(hits) * self.block_size,
                        hashes=[self._prefix.hash_of(b) for b in hits])
        self._seqs[seq_id] = seq
        self._prefix_hit_tokens += len(hits) * self.block_size
        self._prefix.register(seq)
        return self.slots(seq_id, len(hits) * self.block_size, num_tokens)

    def cached_tokens(self, seq_id) -> int:
        """Prompt tokens of the sequence that were found in the prefix cache when it was added."""
        return self._seq(seq_id).hit_tokens

    def fork(self, parent, child) -> None:
        """`child` shares every block of `parent` (reference counts +1); nothing is copied now."""
        src = self._seq(parent)
        if child in self._seqs:
            raise InvalidInput(f"seq_id {child!r} already exists")
        self._ref[src.live()] += 1
        self._seqs[child] = _Sequence(list(src.blocks), src.num_tokens,
                                      None if src.token_ids is None else list(src.token_ids),
                                      src.hashed, released=src.released, hashes=list(src.hashes))

    def append_slots(self, seq_id, num_tokens: int = 1, token_ids: Sequence[int] | None = None
                     ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Reserve room for `num_tokens` more tokens of one sequence.

        Returns (slots int64 [num_tokens], copies [(src, dst)]). A shared, partially filled tail
        block is copied on write: perform `copies` with `copy_blocks` before writing the slots.
        token_ids (length num_tokens) keep the sequence's blocks eligible for prefix caching.
        """
        return self.append_batch([seq_id], num_tokens,
                                 None if token_ids is None else [token_ids])

    def append_batch(self, seq_ids: Sequence, num_tokens: int = 1,
                     token_ids: Sequence[Sequence[int]] | None = None
                     ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """append_slots for several distinct sequences at once, all-or-nothing.

        Returns the concatenated slots (sequence-major) and every copy pair. token_ids, if
        given, holds num_tokens ids per sequence.
        """
        if num_tokens < 0:
            raise InvalidInput(f"num_tokens: expected >= 0, got {num_tokens}")
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidInput("seq_ids: each sequence may appear once per append")
        if token_ids is not None and (len(token_ids) != len(seq_ids)
                                      or any(len(t) != num_tokens for t in token_ids)):
            raise InvalidInput(f"token_ids: expected {len(seq_ids)} lists of {num_tokens} ids")
        seqs = [self._seq(s) for s in seq_ids]
        need = sum(self._blocks_for(q.num_tokens + num_tokens) - len(q.blocks) for q in seqs)
        if num_tokens:
            # A shared partial tail is copied by each appender but the last holder, who keeps it.
            tails: dict[int, int] = {}
            for q in seqs:
                if self._tail_is_shared_partial(q):
                    tails[q.blocks[-1]] = tails.get(q.blocks[-1], 0) + 1
            need += sum(min(n, int(self._ref[b]) - 1) for b, n in tails.items())
        if need > self.num_free:
            raise PoolExhausted(f"need {need} free blocks, {self.num_free} available")
        copies, out = [], []
        for i, (s, seq) in enumerate(zip(seq_ids, seqs)):
            if num_tokens and self._tail_is_shared_partial(seq):
                old = seq.blocks[-1]
                (new,) = self._allocate(1)
                self._release(old)
                seq.blocks[-1] = new
                copies.append((old, new))
            seq.blocks.extend(self._allocate(self._blocks_for(seq.num_tokens + num_tokens)
                                             - len(seq.blocks)))
            start = seq.num_tokens
            seq.num_tokens += num_tokens
            if seq.token_ids is not None:
                if token_ids is None:   # ids unknown from here on: stop caching this sequence
                    seq.token_ids = None
                else:
                    seq.token_ids.extend(token_ids[i])
                    self._prefix.register(seq)
            out.append(self.slots(s, start, seq.num_tokens))
        return (np.concatenate(out) if out else np.zeros(0, dtype=np.int64)), copies

    def free(self, seq_id) -> None:
        """Drop a sequence; blocks no other sequence references return to the free list."""
        seq = self._seqs.pop(self._key(seq_id))
        for b in seq.live():
            self._release(b)

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks a sequence with this prompt would share (read-only: nothing is
        referenced). An engine uses it to hold back a request whose prefix is still being written."""
        return self._prefix.lookup(list(token_ids))

    def trim(self, seq_id, num_tokens: int) -> int:
        """Forget the last `num_tokens` tokens of a sequence (rejected speculative tokens).

        Blocks past the new end are released; a registered block the sequence will write into
        again is withdrawn from the prefix cache when this sequence alone holds it (a shared one is
        copied on the next append instead). Refuses to expose released (out-of-window) blocks.
        Returns the number of tokens removed (at most the sequence's length).
        """
        seq = self._seq(seq_id)
        if num_tokens < 0:
            raise InvalidInput(f"num_tokens: expected >= 0, got {num_tokens}")
        n = min(int(num_tokens), seq.num_tokens)
        new_len = seq.num_tokens - n
        keep = self._blocks_for(new_len)
        if keep < seq.released or (new_len % self.block_size and keep - 1 < seq.released):
            raise InvalidInput(f"num_tokens: trimming {n} tokens would reach blocks already released "
                               f"out of the window ({seq.released} leading blocks)")
        for b in seq.blocks[keep:]:
            self._release(b)
        del seq.blocks[keep:]
        seq.num_tokens = new_len
        full = new_len // self.block_size
        if seq.hashed > full:
            seq.hashed = full
            del seq.hashes[full:]
        if new_len % self.block_size and self._ref[seq.blocks[-1]] == 1:
            self._prefix.withdraw(seq.blocks[-1])
        if seq.token_ids is not None:
            del seq.token_ids[new_len:]
        return n

    def release_before(self, seq_id, position: int) -> int:
        """Release the sequence's blocks that lie wholly before token `position` (they fell out of
        every attention window). Their table entries read as padding from then on. Returns how
        many blocks were released by this call."""
        seq = self._seq(seq_id)
        upto = min(max(0, int(position)) // self.block_size, len(seq.blocks))
        # The tail block always stays: appends and copy-on-write work on it.
        upto = min(upto, max(len(seq.blocks) - 1, 0))
        count = upto - seq.released
        if count <= 0:
            return 0
        for b in seq.blocks[seq.released:upto]:
            self._release(b)
        seq.released = upto
        return count

    # -- internals -----------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.block_size)

    def _tail_is_shared_partial(self, seq: _Sequence) -> bool:
        return bool(seq.blocks) and seq.num_tokens % self.block_size != 0 \
            and self._ref[seq.blocks[-1]] > 1

    def _allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise PoolExhausted(f"need {n} free blocks, {self.num_free} available")
        out = []
        for _ in range(n):
            if not self._free:                       # evict the least recently released prefix
                out.append(self._prefix.evict())
            elif self.fragmented:
                i = self._rng.randrange(len(self._free))
                self._free[i], self._free[-1] = self._free[-1], self._free[i]
                out.append(self._free.pop())
            else:
                out.append(heapq.heappop(self._free))
        self._ref[out] += 1
        return out

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] > 0:
            return
        if self._prefix.park(block):
            return
        if self.fragmented:
            self._free.append(block)
        else:
            heapq.heappush(self._free, block)

    def _key(self, seq_id):
        if seq_id not in self._seqs:
            raise InvalidInput(f"unknown seq_id {seq_id!r}")
        return seq_id

    def _seq(self, seq_id) -> _Sequence:
        return self._seqs[self._key(seq_id)]

    def release_all(self, seq_ids: Iterable | None = None) -> None:
        for s in list(self._seqs if seq_ids is None else seq_ids):
            self.free(s)
