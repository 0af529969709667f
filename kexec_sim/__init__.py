"""kexec_sim: a simulated machine — RAM addressed by pfn, its firmware map, page ownership,
boot, kexec and the PKRAM handover (super block, preserved-pages table), hibernation.

kexec_sim knows pages and owners, never files. The public surface is re-exported here, and
pkramfs imports only from here: the modules behind it are free to change.

The names are imported on first use (PEP 562 ``__getattr__``), each from its module: a command
imports only the modules it uses (a remount helper needs no numpy, ``kexec-sim load`` no
hibernation code), which is most of its start-up time. ``_PUBLIC`` says where each name lives;
the ``TYPE_CHECKING`` imports say the same to type checkers (tests/test_layering.py keeps the
two equal).

Importing the package also caps numpy's OpenBLAS at one thread (unless the environment says
otherwise): nothing here does linear algebra, and starting a BLAS thread per CPU as numpy is
imported cost each command ~50 ms of its start-up on the 2-core machine this was measured on.
Every process of pkramfs and kexec-sim imports this package before numpy.
"""

import importlib
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5-14 ms of a start)

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if TYPE_CHECKING:
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
    from kexec_sim.geometry import (
        HUGE_ORDER,
        HUGE_PAGES,
        HUGE_SIZE,
        PAGE_SHIFT,
        PAGE_SIZE,
        Pfn,
        PfnRange,
        pages_for_bytes,
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
    from kexec_sim.machine_dir import machine_path, transition_recorded
    from kexec_sim.memmap import MemoryMap, MemoryRegion, RegionType
    from kexec_sim.mounts import MountEntry, MountInfo, read_mountinfo, read_mounts, unescape_field
    from kexec_sim.owners import FIRMWARE, FREE, HANDOVER, KERNEL, NOSAVE, PRESERVED, OwnerInfo
    from kexec_sim.ownership import PageOwnership
    from kexec_sim.ownership_check import handover_problems
    from kexec_sim.pages import PageRuns, PfnArray, as_pfn_array, run_positions
    from kexec_sim.power import power_on, poweroff, reboot
    from kexec_sim.ram import Ram
    from kexec_sim.recovery import open_machine
    from kexec_sim.report import ExecReport
    from kexec_sim.sizes import parse_size
    from kexec_sim.storage_keys import CHANGED, FETCH_PROTECT, REFERENCED, StorageKeys
    from kexec_sim.super_block import node_list_head, read_super_block, set_node_list_head
    from kexec_sim.transition import PRESERVING, boot_stopping, read_record, refuse_changes
    from kexec_sim.warm_start import WarmListener, run_warm, running_generation, spawn_detached

_PUBLIC: dict[str, tuple[str, ...]] = {
    "errors": (
        "CorruptHandover",
        "CorruptMachine",
        "Error",
        "ImageTooLarge",
        "InvalidRequest",
        "MachineBusy",
        "MachineError",
        "MachineExists",
        "OutOfMemory",
        "UsageError",
    ),
    "geometry": (
        "HUGE_ORDER",
        "HUGE_PAGES",
        "HUGE_SIZE",
        "PAGE_SHIFT",
        "PAGE_SIZE",
        "Pfn",
        "PfnRange",
        "pages_for_bytes",
    ),
    "internal_error": ("EXIT_INTERNAL", "report_internal_error"),
    "kernel_image": ("LoadedImage", "load", "loaded_image", "next_kernel_range", "unload"),
    "kexec": ("HandoverRefused", "exec_"),
    "machine": (
        "DEFAULT_MACHINE_DIR",
        "DEFAULT_RAM_BYTES",
        "MACHINE_ENV",
        "BootRecord",
        "Machine",
        "resolve_machine_dir",
    ),
    "machine_dir": ("machine_path", "transition_recorded"),
    "memmap": ("MemoryMap", "MemoryRegion", "RegionType"),
    "mounts": ("MountEntry", "MountInfo", "read_mounts", "read_mountinfo", "unescape_field"),
    "owners": ("FIRMWARE", "FREE", "HANDOVER", "KERNEL", "NOSAVE", "PRESERVED", "OwnerInfo"),
    "ownership": ("PageOwnership",),
    "ownership_check": ("handover_problems",),
    "pages": ("PageRuns", "PfnArray", "as_pfn_array", "run_positions"),
    "power": ("power_on", "poweroff", "reboot"),
    "ram": ("Ram",),
    "recovery": ("open_machine",),
    "report": ("ExecReport",),
    "sizes": ("parse_size",),
    "storage_keys": ("CHANGED", "FETCH_PROTECT", "REFERENCED", "StorageKeys"),
    "super_block": ("node_list_head", "read_super_block", "set_node_list_head"),
    "transition": ("PRESERVING", "boot_stopping", "read_record", "refuse_changes"),
    "warm_start": ("WarmListener", "run_warm", "running_generation", "spawn_detached"),
}
"""Module (under kexec_sim) -> the public names it defines."""
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}

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
    "MountInfo",
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
    "WarmListener",
    "as_pfn_array",
    "boot_stopping",
    "exec_",
    "handover_problems",
    "load",
    "loaded_image",
    "machine_path",
    "next_kernel_range",
    "node_list_head",
    "open_machine",
    "pages_for_bytes",
    "parse_size",
    "power_on",
    "poweroff",
    "read_mountinfo",
    "read_mounts",
    "read_record",
    "read_super_block",
    "reboot",
    "refuse_changes",
    "report_internal_error",
    "resolve_machine_dir",
    "run_positions",
    "run_warm",
    "running_generation",
    "set_node_list_head",
    "spawn_detached",
    "transition_recorded",
    "unescape_field",
    "unload",
]


def __getattr__(name: str) -> object:
    """Import public *name* from its module on first use (then it is a plain attribute)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kexec_sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kexec_sim.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
