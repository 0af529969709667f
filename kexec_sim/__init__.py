"""kexec_sim: a simulated machine — RAM addressed by pfn, its firmware map, page ownership,
boot, kexec and the PKRAM handover (super block, preserved-pages table).

kexec_sim knows pages and owners, never files. The public surface is re-exported here.
"""

from kexec_sim.errors import (
    CorruptHandover,
    CorruptMachine,
    Error,
    InvalidRequest,
    MachineBusy,
    MachineError,
    MachineExists,
    OutOfMemory,
)
from kexec_sim.kexec import (
    ExecReport,
    HandoverRefused,
    LoadedImage,
    exec_,
    load,
    loaded_image,
    next_kernel_range,
    power_on,
    poweroff,
    reboot,
    unload,
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
    "Error",
    "ExecReport",
    "HandoverRefused",
    "InvalidRequest",
    "LoadedImage",
    "Machine",
    "MachineBusy",
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
    "exec_",
    "load",
    "loaded_image",
    "next_kernel_range",
    "pages_for_bytes",
    "power_on",
    "poweroff",
    "reboot",
    "resolve_machine_dir",
    "unload",
]
