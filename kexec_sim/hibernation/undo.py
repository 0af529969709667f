"""What resume overwrote in RAM, kept so that a refused image leaves RAM exactly as it was.

Resume reads each image once and places each chunk's pages as soon as the chunk has passed
its checks (kexec_sim.hibernation.reader), so a bad chunk further on is found after RAM was
written. Before each run of pages is stored into, ``RamUndo.save`` keeps what the run held;
``put_back`` restores all of it, and the storage keys, byte for byte. What it costs depends on
what RAM holds, which for a powered-off machine is what its power off's scrub left there:

* holes (``punch``, the default): nothing but the run's place (punched again);
* pages of one repeated byte (``poison``): that byte, per page;
* anything else: a copy of the page, unless it holds what is stored into it already (what an
  interrupted resume wrote there from the same image).
"""

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.pages import PfnArray, runs_in_order
from kexec_sim.ram import Ram

_WORDS = PAGE_SIZE // 8
_BYTE_REPEATED = np.uint64(0x0101010101010101)


@dataclass(slots=True)
class _Saved:
    """The old content of some pages: which were holes, and the others' bytes."""

    holes: PfnArray
    """The pages that were holes."""
    filled: PfnArray
    """The pages that held one byte repeated..."""
    fills: npt.NDArray[np.uint8]
    """... that byte, for each."""
    copied: PfnArray
    """The other pages ..."""
    copies: npt.NDArray[np.uint8]
    """... and what they held, (n, PAGE_SIZE)."""


class RamUndo:
    """The old content of every page saved from *ram* (thread-safe: workers save disjoint
    pages), and its storage keys as they were when this was made."""

    def __init__(self, ram: Ram) -> None:
        self._ram = ram
        self._backed = ram.backed_mask()
        self._keys = ram.keys.array.copy()
        self._saved: list[_Saved] = []
        self._lock = threading.Lock()

    def backed(self, pfns: PfnArray) -> npt.NDArray[np.bool_]:
        """Whether each pfn of *pfns* held data when this was made (False: a hole)."""
        held: npt.NDArray[np.bool_] = self._backed[pfns]
        return held

    def save(
        self,
        pfns: PfnArray,
        rows: npt.NDArray[np.uint8] | None = None,
        at: npt.NDArray[np.int64] | None = None,
    ) -> None:
        """Keep what the pages *pfns* hold; call before storing into them, once per page.

        If given, ``rows[at]`` is what will be stored (a page each): a page that already holds
        it needs nothing kept (RAM an interrupted resume left holding the image's data).
        """
        backed = self._backed[pfns]
        if not backed.any():  # holes: the common case, nothing to copy
            saved = _Saved(pfns, _NO_PFNS, _NO_BYTES, _NO_PFNS, _NO_PAGES)
        else:
            held = pfns[backed]
            old = self._ram.pages[held]
            if rows is not None and at is not None:
                changing = (old != rows[at[backed]]).any(axis=1)
                held, old = held[changing], old[changing]
            words = old.view(np.uint64).reshape(-1, _WORDS)
            first = words[:, 0]
            uniform = (words == first[:, None]).all(axis=1)
            uniform &= first == (first & np.uint64(0xFF)) * _BYTE_REPEATED
            fills = (first[uniform] & np.uint64(0xFF)).astype(np.uint8)
            saved = _Saved(pfns[~backed], held[uniform], fills, held[~uniform], old[~uniform])
        with self._lock:
            self._saved.append(saved)

    @property
    def copied_pages(self) -> int:
        """How many pages are kept as copies (neither holes nor one byte repeated, nor
        holding what was stored into them already)."""
        with self._lock:
            return sum(saved.copied.size for saved in self._saved)

    def put_back(self) -> None:
        """Restore every saved page and the storage keys as they were (OSError if the host
        refuses)."""
        ram = self._ram
        with self._lock:
            saved, self._saved = self._saved, []
        for pages in saved:
            ram.punch_holes(pages.holes)
            for byte in np.unique(pages.fills).tolist():
                same = pages.filled[pages.fills == byte]
                for start, count in zip(*(a.tolist() for a in runs_in_order(same)), strict=True):
                    ram.fill_range(start, count, byte)
            if pages.copied.size:
                ram.store_pages(pages.copied, pages.copies)
        ram.keys.array[:] = self._keys


_NO_PFNS = np.zeros(0, np.int64)
_NO_BYTES = np.zeros(0, np.uint8)
_NO_PAGES = np.zeros((0, PAGE_SIZE), np.uint8)
