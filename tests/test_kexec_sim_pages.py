"""Runs of consecutive pfns and repeat detection (pure functions of kexec_sim.pages)."""

import numpy as np
import pytest

from kexec_sim.pages import expand_runs, first_repeat, runs_in_order


def test_runs_round_trip_in_the_given_order() -> None:
    pfns = np.array([5, 6, 7, 100, 3, 4, 50], dtype=np.int64)
    starts, lengths = runs_in_order(pfns)
    assert starts.tolist() == [5, 100, 3, 50] and lengths.tolist() == [3, 1, 2, 1]
    assert expand_runs(starts, lengths).tolist() == pfns.tolist()


@pytest.mark.parametrize(
    "pfns, repeat",
    [
        ([0, 1, 2, 3, 10, 11], None),
        ([10, 11, 12, 0, 1, 11], 11),  # a run inside an earlier one
        ([*range(100), 20, 21, 50], 20),  # nested: only the first run reaches
        ([7, 7], 7),
    ],
)
def test_first_repeat_with_few_runs(pfns: list[int], repeat: int | None) -> None:
    assert first_repeat(np.array(pfns, dtype=np.int64), 1000) == repeat


def test_first_repeat_with_many_runs_uses_the_bitmap() -> None:
    rng = np.random.default_rng(5)
    pfns = rng.permutation(200_000)[:50_000].astype(np.int64)  # thousands of runs
    assert first_repeat(pfns, 200_000) is None
    with_repeat = np.concatenate([pfns, pfns[1234:1235]])
    assert first_repeat(with_repeat, 200_000) == int(pfns[1234])


def test_runs_across_the_blocks_they_are_found_in() -> None:
    """run_positions compares a block of pfns at a time: breaks on either side of a block's
    edge, a run across several blocks and random pfns give what one pass over all gives."""
    block = 1 << 15
    cases = [
        np.arange(10, 10 + 3 * block + 5),  # one run over four blocks
        np.concatenate([np.arange(block), [0], np.arange(7, 7 + block)]),  # a break at the edge
        np.concatenate([np.arange(block - 1), [5], np.arange(9, 9 + block)]),  # one before it
        np.random.default_rng(3).integers(0, 1 << 20, 2 * block + 3),
        np.array([4]),
    ]
    for pfns in cases:
        pfns = pfns.astype(np.int64)
        starts, lengths = runs_in_order(pfns)
        at = np.concatenate(([0], np.flatnonzero(np.diff(pfns) != 1) + 1))
        assert starts.tolist() == pfns[at].tolist()
        assert lengths.tolist() == np.diff(np.append(at, pfns.size)).tolist()
        assert (expand_runs(starts, lengths) == pfns).all()
