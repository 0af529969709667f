"""The firmware memory map: default layout, scaling to small RAM, validation."""

from typing import Any

import numpy as np
import pytest

from kexec_sim.errors import CorruptMachine, InvalidRequest
from kexec_sim.memmap import MIN_PAGES, MemoryMap, MemoryRegion, RegionType

MIB_PAGES = 256
U, F, K, N = RegionType.USABLE, RegionType.FIRMWARE, RegionType.KERNEL, RegionType.NOSAVE


def layout(memory_map: MemoryMap) -> list[tuple[int, int, RegionType]]:
    return [(r.start_pfn, r.end_pfn_exclusive, r.type) for r in memory_map.regions]


def test_default_map_of_8_gib() -> None:
    nr_pages = 8 << 18
    assert layout(MemoryMap.default_for(nr_pages)) == [
        (0, 1 * MIB_PAGES, F),
        (1 * MIB_PAGES, 16 * MIB_PAGES, U),
        (16 * MIB_PAGES, 48 * MIB_PAGES, K),
        (48 * MIB_PAGES, 49 * MIB_PAGES, N),
        (49 * MIB_PAGES, nr_pages, U),
    ]


def test_default_map_of_64_mib_is_the_standard_layout() -> None:
    assert layout(MemoryMap.default_for(64 * MIB_PAGES))[2:4] == [
        (16 * MIB_PAGES, 48 * MIB_PAGES, K),
        (48 * MIB_PAGES, 49 * MIB_PAGES, N),
    ]


@pytest.mark.parametrize("ram_mib", [4, 8, 16, 48, 63])
def test_default_map_scales_down_to_small_ram(ram_mib: int) -> None:
    nr_pages = ram_mib * MIB_PAGES
    memory_map = MemoryMap.default_for(nr_pages)
    memory_map.validate(nr_pages)
    assert memory_map.covering(nr_pages) == memory_map.regions  # no holes
    # at 4 MiB the kernel starts right after the firmware: no low usable region
    expected_types = [F, K, N, U] if ram_mib == 4 else [F, U, K, N, U]
    assert [r.type for r in memory_map.regions] == expected_types
    assert memory_map.regions[0] == MemoryRegion(0, MIB_PAGES, F)
    kernel = next(r for r in memory_map.regions if r.type is K)
    assert (kernel.start_pfn, kernel.end_pfn_exclusive) == (nr_pages // 4, nr_pages * 3 // 4)
    assert memory_map.pages_of_type(U) > 0


def test_default_map_refuses_tiny_ram() -> None:
    with pytest.raises(InvalidRequest, match="minimum"):
        MemoryMap.default_for(MIN_PAGES - 1)


def test_usable_mask_matches_regions() -> None:
    nr_pages = 64 * MIB_PAGES
    memory_map = MemoryMap.default_for(nr_pages)
    mask = memory_map.usable_mask(nr_pages)
    assert mask.dtype == np.bool_ and mask.shape == (nr_pages,)
    assert (
        int(mask.sum()) == memory_map.pages_of_type(U) == nr_pages - 49 * MIB_PAGES + 15 * MIB_PAGES
    )
    assert not mask[:MIB_PAGES].any() and mask[MIB_PAGES : 16 * MIB_PAGES].all()
    assert not mask[16 * MIB_PAGES : 49 * MIB_PAGES].any() and mask[49 * MIB_PAGES :].all()


def test_round_trip_through_dict() -> None:
    nr_pages = 64 * MIB_PAGES
    memory_map = MemoryMap.default_for(nr_pages)
    assert MemoryMap.from_dict(memory_map.to_dict(), nr_pages) == memory_map


def test_holes_are_covered_as_firmware() -> None:
    memory_map = MemoryMap((MemoryRegion(10, 20, U), MemoryRegion(30, 40, K)))
    assert memory_map.covering(50) == (
        MemoryRegion(0, 10, F),
        MemoryRegion(10, 20, U),
        MemoryRegion(20, 30, F),
        MemoryRegion(30, 40, K),
        MemoryRegion(40, 50, F),
    )
    assert int(memory_map.usable_mask(50).sum()) == 10


def region(start: Any, end: Any, kind: Any = "usable") -> dict[str, Any]:
    return {"start_pfn": start, "end_pfn_exclusive": end, "type": kind}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "regions"),
        ({"regions": "x"}, "regions"),
        ({"regions": [5]}, "expected an object"),
        ({"regions": [region(0, 10, "ram")]}, "unknown type"),
        ({"regions": [region("0", 10)]}, "integers"),
        ({"regions": [region(True, 10)]}, "integers"),
        ({"regions": [region(-1, 10)]}, "integers"),
        ({"regions": [region(5, 5)]}, "empty"),
        ({"regions": [region(10, 5)]}, "empty"),
        ({"regions": [region(10, 20), region(0, 5)]}, "unsorted or overlapping"),
        ({"regions": [region(0, 20), region(10, 30)]}, "unsorted or overlapping"),
        ({"regions": [region(0, 101)]}, "beyond the end of RAM"),
        ({"regions": [region(i, i + 1) for i in range(2000)]}, "at most"),
    ],
)
def test_from_dict_rejects_bad_maps(data: object, message: str) -> None:
    with pytest.raises(CorruptMachine, match=message):
        MemoryMap.from_dict(data, 100)
