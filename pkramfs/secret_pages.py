"""Secret files' pages: out of the daemon's direct map of RAM, reached by temporary mappings.

As with memfd_secret, the pages of a secret file are removed from the daemon's own mapping of
RAM (``Ram.remove_from_direct_map``): a stray access through ``ram.pages`` or ``ram.buffer``
faults. Every access to their bytes goes through a temporary mapping of just the run of pages
it needs, made, used and closed (as x86 hibernation reaches pages through a fixmap). These
functions mark the storage keys of what they touch; hidden pages carry FETCH_PROTECT in their
keys, so the hibernation image writer, a process of its own, reads them the same way.
"""

import numpy as np
import numpy.typing as npt

from kexec_sim import FETCH_PROTECT, PfnArray, Ram, run_positions

Pages = npt.NDArray[np.uint8]


def _runs(pfns: PfnArray) -> list[tuple[int, int, int]]:
    """(position in *pfns*, first pfn, pages) of each run of consecutive pfns, in order."""
    at, lengths = run_positions(pfns)
    return list(zip(at.tolist(), pfns[at].tolist(), lengths.tolist(), strict=True))


def gather(ram: Ram, pfns: PfnArray) -> Pages:
    """Return a copy of the pages *pfns*, shaped (len(pfns), PAGE_SIZE); marks them referenced."""
    out = ram.copy_pages(pfns)
    ram.keys.mark_referenced(pfns)
    return out


def scatter(ram: Ram, pfns: PfnArray, pages: Pages) -> None:
    """Store *pages* (one row per pfn of *pfns*) into RAM; marks them changed."""
    for at, first, count in _runs(pfns):
        with ram.temporary_mapping(first, count) as window:
            window[:] = pages[at : at + count]
    ram.keys.mark_changed(pfns)


def zero(ram: Ram, pfn: int, in_page: int, length: int) -> None:
    """Zero *length* bytes of page *pfn* from byte *in_page*; marks it changed."""
    with ram.temporary_mapping(pfn, 1) as window:
        window[0, in_page : in_page + length] = 0
    ram.keys.mark_changed_range(pfn, 1)


def hide(ram: Ram, pfns: PfnArray) -> None:
    """Remove the pages *pfns* from the direct map (they now belong to a secret file) and set
    their keys' FETCH_PROTECT, which tells other processes (the image writer) the same."""
    ram.remove_pfns_from_direct_map(pfns)
    ram.keys.array[pfns] |= FETCH_PROTECT


def unhide(ram: Ram, pfns: PfnArray) -> None:
    """Give the pages *pfns*, leaving a secret file, their direct mapping back (and clear
    FETCH_PROTECT)."""
    ram.restore_pfns_to_direct_map(pfns)
    ram.keys.array[pfns] &= np.uint8(~FETCH_PROTECT & 0xFF)
