"""BlockManager: unit tests and a hypothesis state machine over add/fork/append/free."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from paged_attention import BlockManager, InvalidInput, PoolExhausted


def test_append_allocates_blocks_on_demand():
    bm = BlockManager(8, 4)
    assert bm.add_sequence("a", 5).tolist() == [0, 1, 2, 3, 4]
    slots, copies = bm.append_slots("a", 4)
    assert slots.tolist() == [5, 6, 7, 8] and copies == []
    assert bm.block_table("a") == [0, 1, 2] and bm.context_len("a") == 9
    assert bm.stats().used == 3 and bm.num_free == 5


def test_fork_shares_and_copy_on_write_of_partial_tail():
    bm = BlockManager(8, 4)
    bm.add_sequence("a", 6)                       # blocks [0, 1], tail half full
    bm.fork("a", "b")
    assert bm.stats().shared == 2
    slots, copies = bm.append_slots("b", 1)
    new = bm.block_table("b")[-1]
    assert copies == [(1, new)] and new not in (0, 1)
    assert slots.tolist() == [new * 4 + 2]
    assert bm.block_table("a") == [0, 1] and bm.ref_count(1) == 1 and bm.ref_count(0) == 2
    # The original owner now holds the tail alone: no copy.
    assert bm.append_slots("a", 1)[1] == []


def test_full_shared_tail_needs_no_copy():
    bm = BlockManager(8, 4)
    bm.add_sequence("a", 8)
    bm.fork("a", "b")
    slots, copies = bm.append_slots("b", 1)
    assert copies == [] and bm.block_table("b")[:2] == [0, 1]


def test_batch_append_of_all_holders_copies_all_but_one():
    bm = BlockManager(8, 4)
    bm.add_sequence("a", 2)
    bm.fork("a", "b")
    bm.fork("a", "c")
    _, copies = bm.append_batch(["a", "b", "c"], 1)
    assert len(copies) == 2
    assert len({bm.block_table(s)[-1] for s in "abc"}) == 3
    for s in "abc":
        bm.free(s)
    assert bm.num_free == 8


def test_exhaustion_is_all_or_nothing():
    bm = BlockManager(4, 4)
    bm.add_sequence("a", 4)
    bm.add_sequence("b", 4)
    before = (bm.stats(), bm.block_table("a"), bm.block_table("b"))
    with pytest.raises(PoolExhausted):
        bm.append_batch(["a", "b"], 9)            # needs 3 + 3 blocks, 2 are free
    assert (bm.stats(), bm.block_table("a"), bm.block_table("b")) == before
    with pytest.raises(PoolExhausted):
        bm.add_sequence("c", 100)
    assert "c" not in bm


def test_block_tables_pad_and_errors():
    bm = BlockManager(8, 4, fragmented=True, seed=3)
    bm.add_sequence(0, 9)
    bm.add_sequence(1, 1)
    t = bm.block_tables([0, 1], max_blocks=5, pad=-1)
    assert t.dtype == np.int32 and t.shape == (2, 5)
    assert t[1, 1:].tolist() == [-1] * 4
    assert bm.context_lens([0, 1]).tolist() == [9, 1]
    with pytest.raises(InvalidInput, match="max_blocks"):
        bm.block_tables([0], max_blocks=1)
    with pytest.raises(InvalidInput, match="unknown seq_id"):
        bm.free(7)
    with pytest.raises(InvalidInput, match="already exists"):
        bm.fork(0, 1)


def test_prefix_cache_shares_full_blocks_and_survives_free():
    bm = BlockManager(8, 4)
    prompt = list(range(10))                      # 2 full blocks + 2 tokens
    assert len(bm.add_sequence("a", token_ids=prompt)) == 10
    slots = bm.add_sequence("b", token_ids=prompt[:8] + [99, 98, 97])
    assert bm.cached_tokens("b") == 8 and len(slots) == 3      # only the suffix is written
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.stats().prefix_hit_tokens == 8 and bm.stats().shared == 2
    bm.free("a")
    bm.free("b")
    assert bm.stats().cached == 2 and bm.num_free == 8         # kept, yet allocatable
    bm.add_sequence("c", token_ids=prompt[:4] + [5, 5, 5, 5])
    assert bm.cached_tokens("c") == 4 and bm.stats().prefix_hit_tokens == 12


def test_prefix_cache_evicts_least_recently_released():
    bm = BlockManager(3, 2)
    bm.add_sequence("x", token_ids=[1, 2])
    bm.add_sequence("y", token_ids=[3, 4])
    bm.free("x")
    bm.free("y")                                  # both cached; x released first
    bm.add_sequence("z", 4)                       # takes the free block, then evicts x's
    assert bm.stats().cached == 1
    assert len(bm.add_sequence("y2", token_ids=[3, 4])) == 0   # y's prefix survived
    bm.free("z")
    assert len(bm.add_sequence("x2", token_ids=[1, 2])) == 2   # x's prefix was evicted


def test_appended_tokens_become_cacheable():
    bm = BlockManager(8, 4)
    bm.add_sequence("a", token_ids=[1, 2, 3])
    bm.append_slots("a", 1, token_ids=[4])
    bm.append_slots("a", 2, token_ids=[5, 6])
    bm.add_sequence("b", token_ids=[1, 2, 3, 4, 7])
    assert bm.cached_tokens("b") == 4


def test_fragmented_mode_scatters_blocks():
    bm = BlockManager(64, 4, fragmented=True, seed=1)
    bm.add_sequence("a", 64)
    table = bm.block_table("a")
    assert sorted(table) != table and len(set(table)) == 16


PROMPTS = st.lists(st.sampled_from([7, 8]), min_size=0, max_size=14)  # tiny vocab: many hits


class BlockManagerMachine(RuleBasedStateMachine):
    """Random add/fork/append/free, with and without prefix caching, against a shadow model.

    A slot's content is tagged with what a model would have written there: the whole token prefix
    up to that position (or a unique tag for sequences without token ids). Reading a wrong tag
    means a block was written while another live sequence still read it, or shared wrongly.
    """

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(24, 4, fragmented=True, seed=0)
        self.next_id = 0
        self.next_token = 100
        self.content: dict[int, object] = {}     # slot -> tag last written there
        self.expected: dict[int, list] = {}      # seq -> tags of its tokens, in order
        self.tokens: dict[int, list | None] = {}  # seq -> its token ids, None if anonymous

    def _tag(self, seq, pos):
        toks = self.tokens[seq]
        return ("anon", seq, pos) if toks is None else tuple(toks[:pos + 1])

    def _write(self, seq, slots, start):
        for i, slot in enumerate(slots):
            self.content[int(slot)] = self._tag(seq, start + i)

    @rule(n=st.integers(0, 9), prompt=PROMPTS, cached=st.booleans())
    def add(self, n, prompt, cached):
        sid, self.next_id = self.next_id, self.next_id + 1
        before = self.bm.stats()
        try:
            slots = self.bm.add_sequence(sid, token_ids=prompt) if cached else self.bm.add_sequence(sid, n)
        except PoolExhausted:
            assert sid not in self.bm and self.bm.stats() == before
            return
        self.tokens[sid] = list(prompt) if cached else None
        length = len(prompt) if cached else n
        self.expected[sid] = [self._tag(sid, p) for p in range(length)]
        hit = self.bm.cached_tokens(sid) if cached else 0
        assert len(slots) == length - min(hit, length) or hit == 0 and len(slots) == length
        self._write(sid, slots, length - len(slots))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.expected)))
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        self.expected[child] = list(self.expected[parent])
        self.tokens[child] = None if self.tokens[parent] is None else list(self.tokens[parent])

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), n=st.integers(1, 6))
    def append(self, data, n):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.expected)), min_size=1, unique=True))
        ids = [[self.next_token + i * n + j for j in range(n)] for i in range(len(seqs))]
        before = self.bm.stats()
        try:
            slots, copies = self.bm.append_batch(seqs, n, token_ids=ids)
        except PoolExhausted:
            assert self.bm.stats() == before
            return
        self.next_token += len(seqs) * n
        for src, dst in copies:                    # copy_blocks, on the shadow
            for off in range(4):
                if src * 4 + off in self.content:
                    self.content[dst * 4 + off] = self.content[src * 4 + off]
        for i, s in enumerate(seqs):
            start = len(self.expected[s])
            if self.tokens[s] is not None:
                self.tokens[s].extend(ids[i])
            self.expected[s] += [self._tag(s, start + j) for j in range(n)]
            self._write(s, slots[i * n:(i + 1) * n], start)

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.expected)))
        self.bm.free(sid)
        del self.expected[sid]
        del self.tokens[sid]

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for sid, tags in self.expected.items():
            slots = self.bm.slots(sid, 0, len(tags))
            assert [self.content.get(int(s)) for s in slots] == tags

    @invariant()
    def no_block_leaks_and_stats_agree(self):
        refs = np.zeros(self.bm.num_blocks, dtype=int)
        for sid in self.expected:
            table = self.bm.block_table(sid)
            assert len(set(table)) == len(table)
            refs[table] += 1
        st_ = self.bm.stats()
        assert st_.used == int((refs > 0).sum()) and st_.shared == int((refs > 1).sum())
        assert st_.free + st_.used == self.bm.num_blocks
        assert all(self.bm.ref_count(b) == refs[b] for b in range(self.bm.num_blocks))
        assert st_.blocks_per_seq == {s: len(self.bm.block_table(s)) for s in self.expected}

    def teardown(self):
        for sid in list(self.expected):
            self.bm.free(sid)
        assert self.bm.num_free == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
