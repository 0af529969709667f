"""Page geometry of the simulated machine: page and huge page sizes, pfns and pfn ranges.

Plain numbers, no numpy: a command that only needs them (a remount helper, say) starts
without it. kexec_sim.pages re-exports them beside the numpy pfn arrays.
"""

from typing import NewType

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
HUGE_ORDER = 9
HUGE_PAGES = 1 << HUGE_ORDER  # 4 KiB pages in one 2 MiB huge page
HUGE_SIZE = PAGE_SIZE << HUGE_ORDER

Pfn = NewType("Pfn", int)
"""A page frame number: the index of a 4 KiB page in the machine's RAM."""

PfnRange = tuple[int, int]
"""A range of pfns ``(start, end_exclusive)``."""


def pages_for_bytes(size_bytes: int) -> int:
    """Return how many 4 KiB pages hold *size_bytes* (rounded up)."""
    return (size_bytes + PAGE_SIZE - 1) >> PAGE_SHIFT
