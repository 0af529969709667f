"""kexec_sim: a simulated machine — RAM addressed by pfn, its firmware map, page ownership,
boot, kexec and the PKRAM handover (super block, preserved-pages table), hibernation.

kexec_sim knows pages and owners, never files. The public surface is re-exported here, and
pkramfs imports only from here: the modules behind it are free to change.
"""

from kexec_sim.allocator import PfnRange
from kexec_sim.errors import (
    CorruptHandover,
    CorruptMachine,
    Error,
    ImageTooLarge,
    InvalidRequest,
    MachineBusy,
    MachineError,
    MachineExists,
    OutOfMemory,
    UsageError,
)
from kexec_sim.internal_error import EXIT_INTERNAL, report_internal_error
from kexec_sim.kernel_image import LoadedImage, load, loaded_image, next_kernel_range, unload
from kexec_sim.kexec import HandoverRefused, exec_
from kexec_sim.machine import (
    DEFAULT_MACHINE_DIR,
    DEFAULT_RAM_BYTES,
    MACHINE_ENV,
    BootRecord,
    Machine,
    resolve_machine_dir,
)
from kexec_sim.memmap import MemoryMap, MemoryRegion, RegionType
from kexec_sim.mounts import MountEntry, read_mounts, unescape_field
from kexec_sim.owners import FIRMWARE, FREE, HANDOVER, KERNEL, NOSAVE, PRESERVED, OwnerInfo
from kexec_sim.ownership import PageOwnership
from kexec_sim.ownership_check import handover_problems
from kexec_sim.pages import (
    HUGE_ORDER,
    HUGE_PAGES,
    HUGE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PageRuns,
    Pfn,
    PfnArray,
    as_pfn_array,
    pages_for_bytes,
    run_positions,
)
from kexec_sim.power import power_on, poweroff, reboot
from kexec_sim.ram import Ram
from kexec_sim.recovery import open_machine
from kexec_sim.report import ExecReport
from kexec_sim.sizes import parse_size
from kexec_sim.storage_keys import CHANGED, FETCH_PROTECT, REFERENCED, StorageKeys
from kexec_sim.super_block import node_list_head, read_super_block, set_node_list_head
from kexec_sim.transition import PRESERVING, read_record, refuse_changes

__all__ = [
    "CHANGED",
    "DEFAULT_MACHINE_DIR",
    "DEFAULT_RAM_BYTES",
    "EXIT_INTERNAL",
    "FETCH_PROTECT",
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
    "PRESERVING",
    "REFERENCED",
    "BootRecord",
    "CorruptHandover",
    "CorruptMachine",
    "Error",
    "ExecReport",
    "HandoverRefused",
    "ImageTooLarge",
    "InvalidRequest",
    "LoadedImage",
    "Machine",
    "MachineBusy",
    "MachineError",
    "MachineExists",
    "MemoryMap",
    "MemoryRegion",
    "MountEntry",
    "OutOfMemory",
    "OwnerInfo",
    "PageOwnership",
    "PageRuns",
    "Pfn",
    "PfnArray",
    "PfnRange",
    "Ram",
    "RegionType",
    "StorageKeys",
    "UsageError",
    "as_pfn_array",
    "exec_",
    "handover_problems",
    "load",
    "loaded_image",
    "next_kernel_range",
    "node_list_head",
    "open_machine",
    "pages_for_bytes",
    "parse_size",
    "power_on",
    "poweroff",
    "read_mounts",
    "read_record",
    "read_super_block",
    "reboot",
    "refuse_changes",
    "report_internal_error",
    "resolve_machine_dir",
    "run_positions",
    "set_node_list_head",
    "unescape_field",
    "unload",
]
