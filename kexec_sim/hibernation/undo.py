"""What resume overwrote in RAM, kept so that a refused image leaves RAM exactly as it was.

Resume reads each image once and places each chunk's pages as soon as the chunk has passed
its checks (kexec_sim.hibernation.reader), so a bad chunk further on is found after RAM was
written. Before each run of pages is stored into, ``RamUndo.save`` keeps what the run held;
``put_back`` restores all of it, and the storage keys, byte for byte. What it costs depends on
what RAM holds, which for a powered-off machine is what its power off's scrub left there:

* holes (``punch``, the default): nothing but the run's place (punched again);
* pages of one repeated byte (``poison``): that byte, per page;
* anything else (e.g. what an interrupted resume wrote): a copy of the page.
"""

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kexec_sim.pages import PAGE_SIZE, mask_runs, runs_in_order
from kexec_sim.ram import Ram

_WORDS = PAGE_SIZE // 8
_BYTE_REPEATED = np.uint64(0x0101010101010101)


@dataclass(slots=True)
class _Saved:
    """The old content of one run: which pages were holes, and the others' bytes."""

    start_pfn: int
    hole: npt.NDArray[np.bool_]
    """Per page of the run."""
    fills: npt.NDArray[np.uint8]
    """Per page that held data: its byte, if it was one byte repeated."""
    uniform: npt.NDArray[np.bool_]
    """Per page that held data: whether it was."""
    copies: npt.NDArray[np.uint8]
    """The other pages that held data, in order."""


class RamUndo:
    """The old content of every run saved from *ram* (thread-safe: workers save disjoint
    runs), and its storage keys as they were when this was made."""

    def __init__(self, ram: Ram) -> None:
        self._ram = ram
        self._backed = ram.backed_mask()
        self._keys = ram.keys.array.copy()
        self._saved: list[_Saved] = []
        self._lock = threading.Lock()

    def backed(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Whether each pfn of *pfns* held data when this was made (False: a hole)."""
        held: npt.NDArray[np.bool_] = self._backed[pfns]
        return held

    def save(self, start_pfn: int, nr_pages: int) -> None:
        """Keep what pages ``start_pfn ..+nr_pages`` hold; call before storing into them,
        once per page."""
        backed = self._backed[start_pfn : start_pfn + nr_pages]
        if not backed.any():  # holes: the common case, nothing to copy
            saved = _Saved(start_pfn, ~backed, _NO_BYTES, _NO_FLAGS, _NO_PAGES)
        else:
            old = self._ram.pages[start_pfn : start_pfn + nr_pages][backed]
            words = old.view(np.uint64).reshape(-1, _WORDS)
            first = words[:, 0]
            uniform = (words == first[:, None]).all(axis=1)
            uniform &= first == (first & np.uint64(0xFF)) * _BYTE_REPEATED
            fills = (first & np.uint64(0xFF)).astype(np.uint8)
            saved = _Saved(start_pfn, ~backed, fills, uniform, old[~uniform])
        with self._lock:
            self._saved.append(saved)

    def put_back(self) -> None:
        """Restore every saved run and the storage keys as they were (OSError if the host
        refuses)."""
        ram = self._ram
        with self._lock:
            saved, self._saved = self._saved, []
        for run in saved:
            starts, counts = mask_runs(run.hole)
            for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
                ram.punch_range(run.start_pfn + start, count)
            pfns = run.start_pfn + np.flatnonzero(~run.hole)
            for byte in np.unique(run.fills[run.uniform]).tolist():
                same = pfns[run.uniform & (run.fills == byte)]
                for start, count in zip(*(a.tolist() for a in runs_in_order(same)), strict=True):
                    ram.fill_range(start, count, byte)
            for pfn, page in zip(pfns[~run.uniform].tolist(), run.copies, strict=True):
                ram.store_run(pfn, page.data)
        ram.keys.array[:] = self._keys


_NO_BYTES = np.zeros(0, np.uint8)
_NO_FLAGS = np.zeros(0, np.bool_)
_NO_PAGES = np.zeros((0, PAGE_SIZE), np.uint8)
