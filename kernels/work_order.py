"""Which work items each program of the persistent Hopper passes takes, and in what order (flash_hopper._work).

The forward and the dq pass run one program per SM, each looping over work items: blocks of query rows of one batch
and head. Under causal attention a block's cost grows with its index (it sees more keys), so which blocks a program
takes decides when the last program finishes. flash_hopper._work knows three orders:

- SNAKING: one block a round, longest first, every program's p-th block of a round counted from the other end in
  odd rounds. It evens the programs out but reads every head's keys at once: for shapes whose keys fit in L2.
- PAIRED: units of one head's blocks m and n - 1 - m, which all cost about the same, head-major, so that the
  programs of a round read the keys of a few heads only. Its cost is granularity: where the units do not divide
  evenly among the programs, some run one unit more. At (1, 16, 16384), 1,024 units on 132 SMs take 8 rounds where
  7.76 would do (3% of the pass).
- LISTED: each program reads its blocks from a table built here on the host. Blocks are listed head-group by head
  group, longest first within a group, and each goes to the program that a cost model says is free first (greedy
  list scheduling): the long blocks of a group start together and the short ones fill the gaps, and the last blocks
  of all are short, so the programs end together. A group spans enough heads to give every program a few blocks and
  few enough that about two groups' keys fit in L2.

`choose` picks LISTED over PAIRED where the cost model predicts it ends sooner by a given fraction
(flash_hopper.LISTED_GAIN). The model's item cost is its key tiles plus ITEM_OVERHEAD_TILES. Simulated with each
item's cost off by up to 5% at random, LISTED still ends about 3% earlier than PAIRED at (1, 16, 16384). Measured on
an H100 against PAIRED (attention_notes.md, session 34): the forward -5% and the dq pass -4% to -6% at the 124M
pretraining shape (16, 12, 1024), the dq pass 0% and -5% in two runs at (1, 16, 16384), the rest within 3% either
way. The model leaves out how the order changes what stays in L2 and when short blocks run.
"""

from __future__ import annotations

import heapq
import math

SNAKING, PAIRED, LISTED = 0, 1, 2
ITEM_OVERHEAD_TILES = 2.0  # an item's fixed cost (its query rows' build, its output), in key tiles: a guess


def key_tiles(block: int, rows: int, n_k: int, q_offset: int, causal: bool, block_n: int) -> int:
    """How many key tiles query block `block` (`rows` rows a block) sees: flash_hopper._work's n_tiles."""
    end = min(q_offset + (block + 1) * rows, n_k) if causal else n_k
    return -(-end // block_n)


def paired_loads(costs: list[float], heads: int, programs: int) -> list[float]:
    """Each program's total cost in the PAIRED order (_work): unit u, the pair (n - 1 - j, j) of head u // half with
    j = u % half (the middle block alone for odd n), goes to program u % programs."""
    n = len(costs)
    half = -(-n // 2)
    loads = [0.0] * programs
    for u in range(heads * half):
        j = u % half
        loads[u % programs] += costs[n - 1 - j] + (costs[j] if 2 * j + 1 != n else 0.0)
    return loads


def listed_programs(costs: list[float], heads: int, programs: int, group: int) -> tuple[list[list[int]], list[float]]:
    """Greedy list scheduling of every (head, block) item, head-group by head-group and longest block first within a
    group: each program's items (head * n + block) in order, and its total cost."""
    n = len(costs)
    longest_first = sorted(range(n), key=lambda m: -costs[m])
    free = [(0.0, p) for p in range(programs)]  # (when it is free, program), a heap
    items: list[list[int]] = [[] for _ in range(programs)]
    loads = [0.0] * programs
    for first in range(0, heads, group):
        for m in longest_first:
            for head in range(first, min(first + group, heads)):
                t, p = heapq.heappop(free)
                items[p].append(head * n + m)
                loads[p] = t + costs[m]
                heapq.heappush(free, (loads[p], p))
    return items, loads


def choose(heads: int, n_blocks: int, rows: int, n_k: int, q_offset: int, causal: bool, block_n: int, programs: int,
           head_bytes: int, l2_budget: float, min_gain: float) -> tuple[int, list[list[int]] | None]:
    """PAIRED, or LISTED and its table (rounds x programs item indices, -1 past a program's last item) where the cost
    model says the listed programs end at least the fraction min_gain sooner. For shapes whose keys outgrow L2
    (flash_hopper._schedule): a group of heads holds at most half of l2_budget bytes (head_bytes of keys and values a
    head)."""
    if not causal:  # every block costs the same: nothing to balance
        return PAIRED, None
    costs = [ITEM_OVERHEAD_TILES + key_tiles(m, rows, n_k, q_offset, causal, block_n) for m in range(n_blocks)]
    paired = max(paired_loads(costs, heads, programs))
    best, best_items = paired * (1 - min_gain), None
    # heads a group: one, or enough for about 1, 2 or 4 blocks a program
    for group in sorted({1} | {min(heads, math.ceil(spread * programs / n_blocks)) for spread in (1, 2, 4)}):
        if group > 1 and group * head_bytes > l2_budget / 2:
            continue
        items, loads = listed_programs(costs, heads, programs, group)
        if max(loads) < best:
            best, best_items = max(loads), items
    if best_items is None:
        return PAIRED, None
    rounds = max(len(p) for p in best_items)
    return LISTED, [[p[r] if r < len(p) else -1 for p in best_items] for r in range(rounds)]
