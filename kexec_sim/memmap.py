"""The firmware memory map (like the e820 table): which pfn ranges are usable RAM.

The default map of a machine of ``nr_pages`` pages, for RAM of at least 64 MiB::

    pfn 0 .. 1 MiB              FIRMWARE   (real-mode area, BIOS, ACPI tables)
    1 MiB .. 16 MiB             USABLE
    16 MiB .. 48 MiB            KERNEL     (the kernel image; a kexec segment lands here)
    48 MiB .. 49 MiB            NOSAVE     (never saved by hibernation, never preserved)
    49 MiB .. end of RAM        USABLE

Smaller machines (4 MiB to 64 MiB) get the same shape scaled to their size: FIRMWARE stays
the first 1 MiB, KERNEL covers the second and third quarters of RAM and NOSAVE the next 1/64,
so a 64 MiB machine gets exactly the layout above. Machines under 4 MiB are refused.
"""

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kexec_sim.errors import CorruptMachine, InvalidRequest
from kexec_sim.geometry import PAGE_SIZE

if TYPE_CHECKING:  # numpy is imported where used: opening a machine reads the map without it
    import numpy as np
    import numpy.typing as npt

_MIB_PAGES = (1 << 20) // PAGE_SIZE
FIRMWARE_END_PFN = 1 * _MIB_PAGES
KERNEL_START_PFN = 16 * _MIB_PAGES
KERNEL_END_PFN = 48 * _MIB_PAGES
NOSAVE_END_PFN = 49 * _MIB_PAGES
STANDARD_LAYOUT_MIN_PAGES = 64 * _MIB_PAGES
"""From this size on the default map uses the fixed addresses above."""
MIN_PAGES = 4 * _MIB_PAGES
"""The smallest RAM the default map supports (4 MiB)."""
MAX_REGIONS = 1024
"""Most regions a stored map may have (validation bound for untrusted input)."""


class RegionType(enum.Enum):
    """What a range of physical memory is, as the firmware reports it."""

    USABLE = "usable"
    FIRMWARE = "firmware"
    KERNEL = "kernel"
    NOSAVE = "nosave"


@dataclass(frozen=True)
class MemoryRegion:
    """The pfns ``start_pfn .. end_pfn_exclusive - 1``, all of one *type*."""

    start_pfn: int
    end_pfn_exclusive: int
    type: RegionType

    @property
    def nr_pages(self) -> int:
        """How many pages the region spans."""
        return self.end_pfn_exclusive - self.start_pfn


@dataclass(frozen=True)
class MemoryMap:
    """A sorted tuple of non-overlapping regions; pfns in no region are not usable RAM."""

    regions: tuple[MemoryRegion, ...]

    @classmethod
    def default_for(cls, nr_pages: int) -> "MemoryMap":
        """Return the default map of a machine with *nr_pages* pages (see module docstring).

        Raises InvalidRequest when *nr_pages* is below MIN_PAGES.
        """
        if nr_pages < MIN_PAGES:
            raise InvalidRequest(
                f"RAM of {nr_pages} pages is below the minimum of {MIN_PAGES} pages"
            )
        if nr_pages >= STANDARD_LAYOUT_MIN_PAGES:
            kernel_start, kernel_end, nosave_end = KERNEL_START_PFN, KERNEL_END_PFN, NOSAVE_END_PFN
        else:
            kernel_start, kernel_end = nr_pages // 4, nr_pages * 3 // 4
            nosave_end = kernel_end + nr_pages // 64
        bounds = [
            (0, FIRMWARE_END_PFN, RegionType.FIRMWARE),
            (FIRMWARE_END_PFN, kernel_start, RegionType.USABLE),
            (kernel_start, kernel_end, RegionType.KERNEL),
            (kernel_end, nosave_end, RegionType.NOSAVE),
            (nosave_end, nr_pages, RegionType.USABLE),
        ]
        return cls(tuple(MemoryRegion(s, e, t) for s, e, t in bounds if e > s))

    def to_dict(self) -> dict[str, object]:
        """Return the map as plain JSON-able data (``{"regions": [...]}``)."""
        return {
            "regions": [
                {
                    "start_pfn": r.start_pfn,
                    "end_pfn_exclusive": r.end_pfn_exclusive,
                    "type": r.type.value,
                }
                for r in self.regions
            ]
        }

    @classmethod
    def from_dict(cls, data: object, nr_pages: int) -> "MemoryMap":
        """Parse and validate *data* (from to_dict) for a RAM of *nr_pages* pages.

        Raises CorruptMachine when it is malformed, unsorted, overlapping or outside RAM.
        """
        raw = data.get("regions") if isinstance(data, Mapping) else None
        if not isinstance(raw, list) or len(raw) > MAX_REGIONS:
            raise CorruptMachine(f"memory map: 'regions' must be a list of at most {MAX_REGIONS}")
        regions = tuple(_parse_region(item, index) for index, item in enumerate(raw))
        memory_map = cls(regions)
        memory_map.validate(nr_pages)
        return memory_map

    def validate(self, nr_pages: int) -> None:
        """Check the regions are non-empty, sorted, non-overlapping and inside RAM.

        Raises CorruptMachine naming the first offending region.
        """
        previous_end = 0
        for index, region in enumerate(self.regions):
            where = f"memory map region {index} ({region.start_pfn}..{region.end_pfn_exclusive})"
            if region.start_pfn >= region.end_pfn_exclusive:
                raise CorruptMachine(f"{where}: empty or reversed")
            if region.start_pfn < previous_end:
                raise CorruptMachine(f"{where}: unsorted or overlapping the previous region")
            if region.end_pfn_exclusive > nr_pages:
                raise CorruptMachine(f"{where}: beyond the end of RAM ({nr_pages} pages)")
            previous_end = region.end_pfn_exclusive

    def usable_mask(self, nr_pages: int) -> "npt.NDArray[np.bool_]":
        """Return a bool per pfn of a RAM of *nr_pages* pages: True where the page is USABLE."""
        import numpy as np

        mask = np.zeros(nr_pages, dtype=np.bool_)
        for region in self.regions:
            if region.type is RegionType.USABLE:
                mask[region.start_pfn : region.end_pfn_exclusive] = True
        return mask

    def covering(self, nr_pages: int) -> tuple[MemoryRegion, ...]:
        """Return the regions plus FIRMWARE regions for every hole, covering ``0..nr_pages``."""
        covered: list[MemoryRegion] = []
        position = 0
        for region in (*self.regions, MemoryRegion(nr_pages, nr_pages, RegionType.FIRMWARE)):
            if region.start_pfn > position:
                covered.append(MemoryRegion(position, region.start_pfn, RegionType.FIRMWARE))
            if region.nr_pages > 0:
                covered.append(region)
            position = region.end_pfn_exclusive
        return tuple(covered)

    def pages_of_type(self, region_type: RegionType) -> int:
        """Return how many pages the regions of *region_type* span."""
        return sum(r.nr_pages for r in self.regions if r.type is region_type)


def _parse_region(item: object, index: int) -> MemoryRegion:
    where = f"memory map region {index}"
    if not isinstance(item, Mapping):
        raise CorruptMachine(f"{where}: expected an object, got {item!r}")
    start, end, type_name = item.get("start_pfn"), item.get("end_pfn_exclusive"), item.get("type")
    if type(start) is not int or type(end) is not int or start < 0:
        raise CorruptMachine(f"{where}: start_pfn/end_pfn_exclusive must be integers >= 0")
    try:
        region_type = RegionType(type_name)
    except ValueError:
        raise CorruptMachine(f"{where}: unknown type {type_name!r}") from None
    return MemoryRegion(start, end, region_type)
