"""check_tables: the one O(B * max_blocks) check of a step (plan()). Entries past a row's used
blocks are ignored (kept when every entry is a block id, else zeroed), every used entry must be
a block id in the table's own dtype (before the int32 cast), and the plan's table never aliases
the caller's array."""
from __future__ import annotations

import numpy as np
import pytest

from paged_attention.errors import InvalidInput
from paged_attention.validation import PoolSpec, check_tables

SPEC = PoolSpec(num_blocks=10, block_size=4, num_kv_heads=1, head_dim=8, dtype="float16")


def check(tables, lens):
    return check_tables(SPEC, tables, lens, None, None, None, 1)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.uint32])
def test_full_table_is_checked_and_copied(dtype):
    tables = np.array([[1, 2], [3, 9]], dtype)
    args = check(tables, np.array([8, 7]))  # both rows use both blocks: nothing masked
    np.testing.assert_array_equal(args.block_tables, tables)
    assert args.block_tables.dtype == np.int32 and not np.shares_memory(args.block_tables, tables)
    assert tables.flags.writeable


@pytest.mark.parametrize("bad", [-1, 10, 2**32 + 5, -(2**40)])
@pytest.mark.parametrize("lens", [[8, 8], [8, 5]])
def test_used_entry_outside_the_pool_is_named(bad, lens):
    tables = np.array([[1, 2], [bad, 4]], np.int64)
    with pytest.raises(InvalidInput, match=rf"block_tables: entry \[1, 0\] = {bad} is outside \[0, 10\)"):
        check(tables, np.array(lens))


def test_entries_past_the_used_blocks_are_ignored_and_zeroed():
    tables = np.array([[1, -7, 2**31 - 1], [3, 4, 5]], np.int32)
    args = check(tables, np.array([3, 12]))
    np.testing.assert_array_equal(args.block_tables, [[1, 0, 0], [3, 4, 5]])
    assert tables[0, 1] == -7  # the caller's array is untouched


def test_unused_entries_that_are_block_ids_are_kept():
    tables = np.array([[1, 8, 9], [3, 4, 5]], np.int64)   # row 0 uses one block; all are ids
    args = check(tables, np.array([3, 12]))
    np.testing.assert_array_equal(args.block_tables, tables)
    assert args.block_tables.dtype == np.int32 and not np.shares_memory(args.block_tables, tables)
