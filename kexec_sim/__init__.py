"""kexec_sim: a simulated machine — RAM addressed by pfn, its firmware map, page ownership.

kexec_sim knows pages and owners, never files. The public surface is re-exported here.
"""

from kexec_sim.errors import (
    CorruptHandover,
    CorruptMachine,
    MachineError,
    MachineExists,
    OutOfMemory,
)
from kexec_sim.machine import (
    DEFAULT_MACHINE_DIR,
    DEFAULT_RAM_BYTES,
    MACHINE_ENV,
    BootRecord,
    Machine,
    resolve_machine_dir,
)
from kexec_sim.memmap import MemoryMap, MemoryRegion, RegionType
from kexec_sim.owners import FIRMWARE, FREE, HANDOVER, KERNEL, NOSAVE, PRESERVED, OwnerInfo
from kexec_sim.ownership import PageOwnership
from kexec_sim.pages import (
    HUGE_ORDER,
    HUGE_PAGES,
    HUGE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    Pfn,
    PfnArray,
    as_pfn_array,
    pages_for_bytes,
)
from kexec_sim.ram import Ram

__all__ = [
    "DEFAULT_MACHINE_DIR",
    "DEFAULT_RAM_BYTES",
    "FIRMWARE",
    "FREE",
    "HANDOVER",
    "HUGE_ORDER",
    "HUGE_PAGES",
    "HUGE_SIZE",
    "KERNEL",
    "MACHINE_ENV",
    "NOSAVE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PRESERVED",
    "BootRecord",
    "CorruptHandover",
    "CorruptMachine",
    "Machine",
    "MachineError",
    "MachineExists",
    "MemoryMap",
    "MemoryRegion",
    "OutOfMemory",
    "OwnerInfo",
    "PageOwnership",
    "Pfn",
    "PfnArray",
    "Ram",
    "RegionType",
    "as_pfn_array",
    "pages_for_bytes",
    "resolve_machine_dir",
]
