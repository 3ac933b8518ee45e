"""The order a run measures in: round 1 of every cell, then round 2 of every cell, ..., each round in a
shuffled order drawn from a recorded seed.

Interleaving spreads the machine's slow drift (thermal state, neighbours, background work) over every cell
instead of landing on whichever cell happened to be measured last; shuffling each round keeps a cell from
always following the same neighbour. The order is a pure function of (cells, rounds, seed), so a run's
order can be reproduced from its run.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def round_order(cells: Sequence[T], rounds: int, seed: int) -> list[tuple[int, T]]:
    """(round number from 1, cell) in measuring order: every cell once per round, each round shuffled.

    One round keeps the cells' own order (framework, execution, precision, batch, phase): with nothing to
    interleave, a predictable order is worth more to a reader of the progress bar than a shuffle.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if rounds == 1:
        return [(1, cell) for cell in cells]
    order: list[tuple[int, T]] = []
    for number in range(1, rounds + 1):
        rng = np.random.default_rng([seed, number])  # one stream per round: round r's order never depends on R
        order += [(number, cells[i]) for i in rng.permutation(len(cells))]
    return order
