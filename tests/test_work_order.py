"""work_order.py: the tables of the listed order of work that the Hopper forward and dq pass read (flash_hopper._work).

The kernels run only on an H100 (benchmarks/hopper_check.py checks their numbers in the listed order there); these
tests pin down the tables themselves: every work item exactly once, and the choice between the listed and the paired
order that the cost model makes.
"""

from __future__ import annotations

import math

import pytest

from pope_lm.kernels import work_order

H100_SMS = 132
L2_BUDGET = 0.75 * 50 * 2**20  # flash_hopper.KEYS_IN_L2 of an H100's L2


def head_bytes(n_k: int, head_dim: int = 64) -> int:
    return 2 * n_k * head_dim * 2  # keys and values, bf16


def costs(n_blocks: int, rows: int, n_k: int, q_offset: int, block_n: int) -> list[float]:
    return [work_order.ITEM_OVERHEAD_TILES + work_order.key_tiles(m, rows, n_k, q_offset, True, block_n)
            for m in range(n_blocks)]


def listed_loads(table: list[list[int]], item_costs: list[float]) -> list[float]:
    n = len(item_costs)
    return [sum(item_costs[item % n] for item in column if item >= 0) for column in zip(*table, strict=True)]


@pytest.mark.parametrize("heads, n_q, n_k, q_offset, rows, block_n, programs", [
    (16, 16384, 16384, 0, 128, 128, H100_SMS),  # issue 3's long shape, the forward
    (16, 16384, 16384, 0, 128, 64, H100_SMS),  # its dq pass
    (192, 1024, 1024, 0, 128, 64, H100_SMS),  # the 124M pretraining step's (16, 12, 1024)
    (16, 8192, 8192, 0, 64, 64, H100_SMS),  # the D = 128 dq pass: 64-row blocks
    (3, 1100, 1100, 0, 128, 64, 27),  # an odd count of blocks, fewer programs
    (2, 300, 1200, 900, 128, 64, 6),  # fewer queries than keys, at an offset
])
def test_listed_table_names_every_work_item_exactly_once(heads, n_q, n_k, q_offset, rows, block_n, programs):
    n_blocks = math.ceil(n_q / rows)
    order, table = work_order.choose(heads, n_blocks, rows, n_k, q_offset, True, block_n, programs,
                                     head_bytes(n_k), L2_BUDGET, min_gain=-math.inf)
    assert order == work_order.LISTED
    assert all(len(round_) == programs for round_ in table)
    assert sorted(item for round_ in table for item in round_ if item >= 0) == list(range(heads * n_blocks))
    for column in zip(*table, strict=True):  # a program's items come first, then only the -1 padding
        assert -1 not in column or set(column[column.index(-1):]) == {-1}


def test_listed_order_ends_the_long_causal_forward_sooner_than_paired():
    # (1, 16, 16384): 1,024 pairs on 132 SMs take 8 rounds where 7.76 would do
    item_costs = costs(128, 128, 16384, 0, 128)
    order, table = work_order.choose(16, 128, 128, 16384, 0, True, 128, H100_SMS, head_bytes(16384), L2_BUDGET,
                                     min_gain=0.01)
    mean = 16 * sum(item_costs) / H100_SMS
    assert order == work_order.LISTED
    assert max(work_order.paired_loads(item_costs, 16, H100_SMS)) / mean == pytest.approx(8 / 7.76, abs=2e-3)
    assert max(listed_loads(table, item_costs)) / mean < 1.005


def test_non_causal_attention_keeps_the_paired_order():
    order, table = work_order.choose(16, 128, 128, 16384, 0, False, 128, H100_SMS, head_bytes(16384), L2_BUDGET,
                                     min_gain=-math.inf)
    assert (order, table) == (work_order.PAIRED, None)


def test_paired_order_is_kept_unless_listing_gains_the_minimum():
    order, table = work_order.choose(16, 128, 128, 16384, 0, True, 128, H100_SMS, head_bytes(16384), L2_BUDGET,
                                     min_gain=math.inf)
    assert (order, table) == (work_order.PAIRED, None)


@pytest.mark.parametrize("n_blocks", [8, 9])
def test_paired_loads_count_every_block_once(n_blocks):
    item_costs = [float(m + 1) for m in range(n_blocks)]
    loads = work_order.paired_loads(item_costs, 5, 7)
    assert sum(loads) == pytest.approx(5 * sum(item_costs))


def test_listed_groups_of_heads_keep_their_keys_within_half_the_l2_budget():
    # 64 blocks a head, 4 MiB of keys and values a head: without room for two heads' keys in the budget, the blocks
    # are listed one head at a time, so the first round's items come from the first three heads only
    order, table = work_order.choose(16, 64, 128, 8192, 0, True, 128, H100_SMS, head_bytes(8192, 128),
                                     l2_budget=head_bytes(8192, 128), min_gain=-math.inf)
    assert order == work_order.LISTED
    assert {item // 64 for item in table[0]} == {0, 1, 2}


def test_key_tiles_end_at_the_last_query_of_the_block_under_causal_masking():
    assert work_order.key_tiles(0, 128, 4100, 0, True, 128) == 1
    assert work_order.key_tiles(31, 128, 4100, 0, True, 128) == 32
    assert work_order.key_tiles(32, 128, 4100, 0, True, 128) == 33  # the last, partial block: keys up to 4099
    assert work_order.key_tiles(0, 128, 1200, 900, True, 64) == 17  # queries at positions 900 .. 1027
    assert work_order.key_tiles(0, 128, 1200, 900, False, 64) == 19
