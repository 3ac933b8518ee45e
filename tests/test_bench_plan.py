"""The interleaved, shuffled order of rounds is complete and reproducible from its seed."""

from __future__ import annotations

import pytest

from bench.run.plan import round_order

CELLS = [f"cell-{i}" for i in range(8)]


def test_round_order_measures_every_cell_once_per_round_in_round_order() -> None:
    order = round_order(CELLS, rounds=3, seed=5)
    assert [r for r, _ in order] == [1] * 8 + [2] * 8 + [3] * 8
    for number in (1, 2, 3):
        assert sorted(c for r, c in order if r == number) == sorted(CELLS)


def test_round_order_is_reproducible_from_its_seed_and_shuffles_each_round() -> None:
    assert round_order(CELLS, 4, seed=11) == round_order(CELLS, 4, seed=11)
    assert round_order(CELLS, 4, seed=11) != round_order(CELLS, 4, seed=12)
    rounds = [[c for r, c in round_order(CELLS, 4, seed=11) if r == n] for n in range(1, 5)]
    assert len({tuple(r) for r in rounds}) > 1  # not the same order every round
    assert round_order(CELLS, 2, seed=11) == round_order(CELLS, 4, seed=11)[:16]  # round r never depends on R


def test_round_order_needs_a_round() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        round_order(CELLS, 0, seed=0)


def test_round_order_of_one_round_keeps_the_cells_order() -> None:
    assert round_order(CELLS, 1, seed=3) == [(1, c) for c in CELLS]
