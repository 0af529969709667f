"""Scrubbing RAM at kexec and reboot: every page not handed over becomes garbage, loudly.

``poison`` fills the pages with POISON_BYTE (0xAA, the kernel's PAGE_POISON pattern), so code
that reads memory nobody preserved sees an unmistakable pattern; it makes the host allocate
every page it fills. ``punch`` punches holes in the RAM file instead: the pages read as zeros
and their memory goes back to the host, which is cheap on any RAM size. Both work on runs of
consecutive pfns (one call per run, never per page).
"""

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import InvalidRequest
from kexec_sim.pages import mask_runs
from kexec_sim.ram import Ram

POISON_BYTE = 0xAA
"""What ``poison`` fills pages with (like the kernel's PAGE_POISON)."""
SCRUB_MODES = ("punch", "poison")


def scrub(ram: Ram, keep: npt.NDArray[np.bool_], mode: str) -> int:
    """Scrub every page of *ram* whose entry in *keep* is False; return how many.

    Raises InvalidRequest for an unknown *mode*, OSError when the host refuses.
    """
    if mode not in SCRUB_MODES:
        raise InvalidRequest(f"scrub mode must be one of {', '.join(SCRUB_MODES)}, got {mode!r}")
    starts, counts = mask_runs(~keep)
    for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
        if mode == "punch":
            ram.punch_range(start, count)
        else:
            ram.fill_range(start, count, POISON_BYTE)
    return int(counts.sum())
