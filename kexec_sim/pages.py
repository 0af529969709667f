"""Pfns in numpy: the pfn array type, runs of consecutive pfns (``PageRuns``) and their
helpers. The page geometry (sizes, orders, ``Pfn``) is kexec_sim.geometry."""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import MachineError

__all__ = [
    "MANY_RUNS",
    "PageRuns",
    "PfnArray",
    "as_pfn_array",
    "expand_runs",
    "first_repeat",
    "mask_runs",
    "run_positions",
    "runs_in_order",
]

PfnArray = npt.NDArray[np.int64]
"""An array of page frame numbers (int64, never negative for a real page)."""


def as_pfn_array(pfns: npt.ArrayLike, nr_pages: int) -> PfnArray:
    """Return *pfns* as a 1-D int64 array after checking every pfn is a page of the machine.

    Raises MachineError when *pfns* is not 1-D integers or a pfn is outside ``0..nr_pages-1``.
    """
    array = np.asarray(pfns)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise MachineError(
            f"pfns must be a 1-D integer array, got {array.dtype} of shape {array.shape}"
        )
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= nr_pages:
        bad = low if low < 0 else high
        raise MachineError(f"pfn {bad} is outside the machine's RAM (0..{nr_pages - 1})")
    return array.astype(np.int64, copy=False)


def run_positions(pfns: PfnArray) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Where in *pfns* (as given, not sorted) each run of consecutive pfns begins, and its
    length: (positions, lengths). The one place runs are found; `runs_in_order` names them by
    their first pfn.

    Pages a file or an allocation holds are mostly consecutive, so a few runs stand for
    millions of pfns and per-run slices replace per-pfn fancy indexing.
    """
    if pfns.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = [np.zeros(1, dtype=np.int64)]
    step = np.empty(min(_RUN_BLOCK, pfns.size - 1), dtype=np.int64)  # reused by every block
    for lo in range(0, pfns.size - 1, _RUN_BLOCK):
        hi = min(lo + _RUN_BLOCK, pfns.size - 1)
        np.subtract(pfns[lo + 1 : hi + 1], pfns[lo:hi], out=step[: hi - lo])
        breaks.append(np.flatnonzero(step[: hi - lo] != 1) + (lo + 1))
    at = np.concatenate(breaks)
    lengths = np.diff(np.concatenate((at, [pfns.size]))).astype(np.int64)
    return at, lengths


_RUN_BLOCK = 1 << 15
"""Pfns `run_positions` compares at a time, in one buffer (256 KiB) reused by every block:
not fresh memory the size of the array (a page fault per 4 KiB: 1-8 ms per 4 MiB where
measured)."""


def runs_in_order(pfns: PfnArray) -> tuple[PfnArray, PfnArray]:
    """Split *pfns* (as given, not sorted) into runs of consecutive pfns: (starts, lengths)."""
    at, lengths = run_positions(pfns)
    return pfns[at], lengths


def mask_runs(mask: npt.NDArray[np.bool_]) -> tuple[PfnArray, PfnArray]:
    """(first pfn, pages) of every run of True in *mask* (one bool per pfn)."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


def expand_runs(starts: PfnArray, lengths: PfnArray) -> PfnArray:
    """Undo `runs_in_order`: every pfn of the runs, in order."""
    total = int(lengths.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    expanded: PfnArray = np.repeat(starts, lengths) + offsets
    return expanded


def first_repeat(pfns: PfnArray, nr_pages: int) -> int | None:
    """Return a pfn listed more than once in *pfns* (all in ``0..nr_pages-1``), or None.

    Few runs of consecutive pfns: the runs are compared; otherwise a bitmap of RAM counts
    the distinct pfns. No sort of the whole array either way.
    """
    runs = PageRuns.of_pfns(pfns)
    if runs.starts.size <= MANY_RUNS:
        return runs.first_repeat(nr_pages)
    seen = np.zeros(nr_pages, dtype=np.bool_)
    seen[pfns] = True
    if np.count_nonzero(seen) == pfns.size:
        return None
    ordered = np.sort(pfns)
    return int(ordered[1:][ordered[1:] == ordered[:-1]][0])


MANY_RUNS = 4096
"""Above this many runs, per-run loops give way to one vectorized pass over every pfn."""


@dataclass(frozen=True)
class PageRuns:
    """A list of pages as runs of consecutive pfns: ``starts[i] .. starts[i]+lengths[i]-1``.

    What a file or a huge page holds is a few long runs: moving ownership of them, checking
    them and journaling them costs per run, not per page.
    """

    starts: PfnArray
    lengths: PfnArray

    @classmethod
    def of_pfns(cls, pfns: PfnArray) -> "PageRuns":
        """The runs of *pfns*, in their order."""
        return cls(*runs_in_order(np.asarray(pfns, dtype=np.int64)))

    @classmethod
    def of_blocks(cls, starts: PfnArray, lengths: PfnArray) -> "PageRuns":
        """Blocks (e.g. a 2 MiB huge page: a start and 512) merged where one ends as the
        next begins."""
        if starts.size == 0 or (lengths == 1).all():
            return cls.of_pfns(starts)
        joined = starts[1:] == starts[:-1] + lengths[:-1]
        firsts = np.flatnonzero(np.concatenate(([True], ~joined)))
        return cls(starts[firsts], np.add.reduceat(lengths, firsts).astype(np.int64))

    @classmethod
    def of_entries(cls, pfns: PfnArray, orders: PfnArray) -> "PageRuns":
        """The pages of entries that each cover ``2**order`` pages from their pfn."""
        if not orders.any():
            return cls.of_pfns(pfns)
        return cls.of_blocks(pfns, np.left_shift(1, orders))

    @classmethod
    def concat(cls, *parts: "PageRuns") -> "PageRuns":
        """All runs of *parts*, in order (not merged)."""
        return cls(
            np.concatenate([p.starts for p in parts]).astype(np.int64),
            np.concatenate([p.lengths for p in parts]).astype(np.int64),
        )

    @property
    def nr_pages(self) -> int:
        """How many pages the runs cover."""
        return int(self.lengths.sum())

    def expand(self) -> PfnArray:
        """Every pfn, in order."""
        return expand_runs(self.starts, self.lengths)

    def first_repeat(self, nr_pages: int) -> int | None:
        """A pfn covered twice, or None (see `first_repeat`)."""
        if self.starts.size > MANY_RUNS:
            return first_repeat(self.expand(), nr_pages)
        order = np.argsort(self.starts, kind="stable")
        ordered, ends = self.starts[order], (self.starts + self.lengths)[order]
        clash = np.flatnonzero(ordered[1:] < np.maximum.accumulate(ends)[:-1])
        return None if clash.size == 0 else int(ordered[clash[0] + 1])
