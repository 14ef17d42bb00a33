"""The engine's scheduler (integrations/scheduler.py) on its own: no model and no MLX, a numpy
pool for its copy-on-write copies. The engine's tests (tests/integrations) check the tokens; these
check the policy of ADR 0009 directly: first come, first served admission, preemption of the most
recently admitted sequence, requeued in front for recompute."""
from __future__ import annotations

import pytest

from paged_attention import BlockManager, PoolExhausted, get_backend
from paged_attention.integrations.scheduler import EngineStats, Scheduler, Seq, WindowGroup


def scheduler(num_blocks: int, block_size: int = 4) -> Scheduler:
    be = get_backend("numpy")
    group = WindowGroup(None, [0], BlockManager(num_blocks, block_size),
                        {0: be.create_pool(num_blocks, block_size, 1, 8, "float32")})
    return Scheduler([group], be, EngineStats(), block_size=block_size, num_blocks=num_blocks,
                     max_batch_tokens=64, trim_slack=0, prefix_caching=False)


def seq(sid: int, prompt_len: int) -> Seq:
    return Seq(sid, sid, 0, list(range(prompt_len)), prompt_len, 8, frozenset())


def computed_and_sampled(batch) -> None:
    """What the engine does after the model call: the rows are computed, one token sampled."""
    for s, n in batch:
        s.computed += n
        if s.computed == len(s.tokens):
            s.tokens.append(0)


def test_a_full_pool_preempts_the_latest_admitted_and_requeues_it_in_front():
    sch = scheduler(num_blocks=4)
    a, b, c = seq(0, 8), seq(1, 8), seq(2, 1)
    for s in (a, b, c):
        sch.add(s)
    batch = sch.schedule()          # a and b fill the pool; c waits behind them
    assert [(s.sid, n) for s, n in batch] == [(0, 8), (1, 8)] and list(sch.waiting) == [c]
    computed_and_sampled(batch)
    sch.end_step()
    assert sch.stats.blocks_used == 4
    # Each decode needs a third block: b, admitted last, makes room for a.
    batch = sch.schedule()
    assert [(s.sid, n) for s, n in batch] == [(0, 1)]
    assert list(sch.running) == [0] and list(sch.waiting) == [b, c]
    assert (b.computed, b.order, sch.stats.preemptions) == (0, -1, 1)
    assert sch.groups[0].bm.context_len(0) == 9 and 1 not in sch.groups[0].bm
    computed_and_sampled(batch)
    sch.end_step()
    assert (sch.stats.blocks_used, sch.stats.peak_blocks) == (3, 4)


def test_a_sequence_that_cannot_fit_alone_raises():
    sch = scheduler(num_blocks=2)
    s = seq(0, 8)
    sch.add(s)
    computed_and_sampled(sch.schedule())
    with pytest.raises(PoolExhausted, match="num_blocks: sequence 0 .* alone needs more"):
        sch.schedule()


def test_check_fits_refuses_a_sample_no_pool_can_hold():
    sch = scheduler(num_blocks=2)
    sch.check_fits(8, 1)            # 8 positions: two blocks of 4
    with pytest.raises(PoolExhausted, match="needs 3 blocks of 4, the pool has 2"):
        sch.check_fits(8, 2)
