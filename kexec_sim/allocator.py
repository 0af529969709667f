"""Next-fit search for free pages in an owner map, in numpy windows.

The search starts at a cursor, scans growing windows forward to the end of RAM, then wraps
to pfn 0 (freeing pages rewinds the cursor to them, see PageOwnership.free). A window is one
vectorized comparison, so a request near free pages touches only
a few times its own size of the map, never the whole map. An optional ``avoid`` range of pfns
(``start, end_exclusive``) is masked out of every window: its pages are never returned.
"""

import numpy as np
import numpy.typing as npt

from kexec_sim.geometry import PfnRange
from kexec_sim.owners import FREE
from kexec_sim.pages import PfnArray

__all__ = ["MIN_WINDOW_PAGES", "PfnRange", "find_free"]

MIN_WINDOW_PAGES = 16384
"""The first window scanned for a request (grown x2 per window)."""


def find_free(
    owner_map: npt.NDArray[np.int32],
    n_units: int,
    cursor_pfn: int,
    avoid: PfnRange | None = None,
    *,
    unit_pages: int = 1,
) -> PfnArray | None:
    """Return the first pfn of each of *n_units* free, naturally aligned runs of *unit_pages*
    pages (1: single pages; HUGE_PAGES: huge pages) in next-fit order from *cursor_pfn*, or
    None if fewer exist. No run overlaps the range *avoid*.
    """
    units = _find_free_units(owner_map, unit_pages, n_units, cursor_pfn, avoid)
    return units if units is None or unit_pages == 1 else units * unit_pages


def _find_free_units(
    owner_map: npt.NDArray[np.int32],
    unit_pages: int,
    n_units: int,
    cursor_pfn: int,
    avoid: PfnRange | None,
) -> PfnArray | None:
    """Return indexes of *n_units* free units of *unit_pages* pages (all FREE), or None."""
    nr_units = owner_map.size // unit_pages
    # The units overlapping *avoid*, as a half-open range of unit indexes (empty if none).
    avoid_first, avoid_end = 0, 0
    if avoid is not None and avoid[1] > avoid[0]:
        avoid_first, avoid_end = avoid[0] // unit_pages, -(-avoid[1] // unit_pages)
    if n_units == 0:
        return np.empty(0, dtype=np.int64)
    if n_units > nr_units:
        return None
    units = owner_map[: nr_units * unit_pages].reshape(nr_units, unit_pages)
    start = -(-cursor_pfn // unit_pages) % nr_units  # first whole unit at or after the cursor
    window = max(2 * n_units, MIN_WINDOW_PAGES // unit_pages)
    found: list[PfnArray] = []
    missing = n_units
    for segment_start, segment_end in ((start, nr_units), (0, start)):
        position = segment_start
        while position < segment_end:
            end = min(position + window, segment_end)
            if unit_pages == 1:
                free = owner_map[position:end] == FREE
            else:
                free = ~units[position:end].any(axis=1)
            if avoid_first < end and avoid_end > position:
                free[max(avoid_first - position, 0) : avoid_end - position] = False
            hits = np.flatnonzero(free)[:missing]
            if hits.size:
                found.append(hits.astype(np.int64, copy=False) + position)
                missing -= hits.size
                if missing == 0:
                    return np.concatenate(found)
            position = end
            window *= 2
    return None
