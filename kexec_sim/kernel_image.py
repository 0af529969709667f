"""The next kernel's image: where ``kexec-sim load`` puts it, the load record, its bytes.

``load`` stages an image (``kexec -l``): it picks a load range of RAM, checks it against the
preserved pages, and records it in ``boot/kexec-load.json`` (with a copy of a kernel file in
``boot/kexec-image``), so the staged image dies with the boot like a real one. ``exec`` writes
the image's bytes over the range, clobbering whatever was there.

The load range is the memory map's KERNEL region (the preferred address) unless a preserved
page (PRESERVED or HANDOVER) lies there; else, and with ``kaslr`` (a random pick), a 2 MiB-
aligned range of RAM holding no preserved and no FIRMWARE page. A synthetic image (no kernel
file given) is a text header naming the generation it boots and its command line, then
deterministic filler: every 8-byte word of image page *i* holds *i*.
"""

import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kexec_sim.allocator import PfnRange
from kexec_sim.cmdline import PKRAM_PARAM, check_cmdline, pkram_pfn
from kexec_sim.errors import CorruptMachine, InvalidRequest, MachineError
from kexec_sim.geometry import HUGE_PAGES, PAGE_SIZE, pages_for_bytes
from kexec_sim.jsonfile import get_int, get_str, read_json_object, write_json_atomic
from kexec_sim.machine import Machine
from kexec_sim.memmap import MemoryMap, RegionType
from kexec_sim.owners import FIRMWARE, HANDOVER, PRESERVED, owner_name
from kexec_sim.ram import Ram

DEFAULT_IMAGE_BYTES = 16 << 20
LOAD_FILE = "kexec-load.json"
IMAGE_COPY_FILE = "kexec-image"
IMAGE_MAGIC = b"KEXEC-SIM KERNEL IMAGE\n"
LOAD_ALIGN_PAGES = HUGE_PAGES
"""Load ranges chosen by the machine (fallback, kaslr) start on a 2 MiB boundary."""
WRITE_CHUNK_PAGES = 256
"""An image is written 1 MiB at a time, through the RAM file (Ram.store_run): no page of it
is faulted into this process, and the buffer is reused."""


@dataclass(frozen=True)
class LoadedImage:
    """A staged next kernel: its command line and the pfn range its image will overwrite."""

    cmdline: str
    start_pfn: int
    nr_pages: int
    kaslr: bool
    loaded_ns: int
    image_bytes: int
    kernel_file: str | None = None
    """The kernel file given to load (its bytes are kept in boot/kexec-image), else None."""
    warnings: tuple[str, ...] = ()
    """What load warned about (pkram= absent or not this boot's super block)."""

    @property
    def end_pfn(self) -> int:
        """The first pfn after the image."""
        return self.start_pfn + self.nr_pages

    @property
    def pfn_range(self) -> PfnRange:
        """``(start_pfn, end_pfn)``."""
        return self.start_pfn, self.end_pfn

    def to_dict(self) -> dict[str, object]:
        """The JSON form (kexec-load.json, ``status --json``)."""
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        return data


def default_image_pages(memory_map: MemoryMap) -> int:
    """Pages of an image of DEFAULT_IMAGE_BYTES (smaller on machines with a smaller KERNEL
    region, so the default image always fits the preferred address)."""
    kernel = memory_map.pages_of_type(RegionType.KERNEL)
    default = pages_for_bytes(DEFAULT_IMAGE_BYTES)
    return min(default, kernel) if kernel else default


def preferred_start_pfn(memory_map: MemoryMap) -> int:
    """The preferred load address: the first KERNEL region, else the first usable one."""
    for region_type in (RegionType.KERNEL, RegionType.USABLE):
        for region in memory_map.regions:
            if region.type is region_type:
                return region.start_pfn
    return 0


def default_kernel_range(machine: Machine) -> PfnRange:
    """Where a kernel of the default size lands at the preferred address."""
    start = preferred_start_pfn(machine.memory_map)
    return start, min(start + default_image_pages(machine.memory_map), machine.nr_pages)


def loaded_image(machine: Machine) -> LoadedImage | None:
    """Return the image staged for the next kexec, or None.

    Raises CorruptMachine when the load record is bad.
    """
    path = machine.boot_dir / LOAD_FILE
    try:
        data = read_json_object(path)
    except FileNotFoundError:
        return None
    where = str(path)
    kaslr, kernel_file, warnings = data.get("kaslr"), data.get("kernel_file"), data.get("warnings")
    if not isinstance(kaslr, bool):
        raise CorruptMachine(f"{where}: 'kaslr' must be true or false")
    if kernel_file is not None and not isinstance(kernel_file, str):
        raise CorruptMachine(f"{where}: 'kernel_file' must be a string or null")
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise CorruptMachine(f"{where}: 'warnings' must be a list of strings")
    image = LoadedImage(
        cmdline=get_str(data, "cmdline", where),
        start_pfn=get_int(data, "start_pfn", where),
        nr_pages=get_int(data, "nr_pages", where, minimum=1),
        kaslr=kaslr,
        loaded_ns=get_int(data, "loaded_ns", where),
        image_bytes=get_int(data, "image_bytes", where, minimum=1),
        kernel_file=kernel_file,
        warnings=tuple(warnings),
    )
    if image.end_pfn > machine.nr_pages or pages_for_bytes(image.image_bytes) != image.nr_pages:
        raise CorruptMachine(f"{where}: image range or size does not fit this RAM")
    return image


def next_kernel_range(machine: Machine) -> PfnRange:
    """The pfn range ``(start, end_exclusive)`` the next kexec will overwrite with its image.

    The staged image's range, else the default kernel range (the preferred address, default
    size). Pages preserved for a handover must lie outside it.
    """
    image = loaded_image(machine)
    return image.pfn_range if image is not None else default_kernel_range(machine)


def unload(machine: Machine) -> bool:
    """Drop the staged image; return whether there was one."""
    found = False
    for name in (LOAD_FILE, IMAGE_COPY_FILE):
        try:
            os.unlink(machine.boot_dir / name)
            found = True
        except FileNotFoundError:
            pass
    return found


def _blocked(owner_map: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
    """A bool per pfn: True where an image must not go (preserved or firmware)."""
    blocked: npt.NDArray[np.bool_] = (
        (owner_map == PRESERVED) | (owner_map == HANDOVER) | (owner_map == FIRMWARE)
    )
    return blocked


def clean_starts(owner_map: npt.NDArray[np.int32], nr_pages: int) -> npt.NDArray[np.int64]:
    """Every LOAD_ALIGN_PAGES-aligned start of *nr_pages* pages of RAM with no blocked page."""
    if nr_pages > owner_map.size:
        return np.empty(0, dtype=np.int64)
    blocked = np.concatenate(([0], np.cumsum(_blocked(owner_map), dtype=np.int64)))
    starts = np.arange(0, owner_map.size - nr_pages + 1, LOAD_ALIGN_PAGES, dtype=np.int64)
    clean: npt.NDArray[np.int64] = starts[blocked[starts + nr_pages] == blocked[starts]]
    return clean


def range_conflict(owner_map: npt.NDArray[np.int32], start_pfn: int, nr_pages: int) -> str | None:
    """Why pfns ``start_pfn .. +nr_pages`` cannot take an image (None when they can)."""
    end = start_pfn + nr_pages
    if start_pfn < 0 or end > owner_map.size:
        return f"pages {start_pfn}..{end - 1} extend beyond RAM (0..{owner_map.size - 1})"
    chunk = owner_map[start_pfn:end]
    for kind, mask in (
        ("preserved", (chunk == PRESERVED) | (chunk == HANDOVER)),
        ("firmware", chunk == FIRMWARE),
    ):
        hits = np.flatnonzero(mask)
        if hits.size:
            pfn = start_pfn + int(hits[0])
            return (
                f"pages {start_pfn}..{end - 1} overlap {hits.size} {kind} pages, the first at "
                f"pfn {pfn} ({owner_name(int(owner_map[pfn]))})"
            )
    return None


def load(
    machine: Machine,
    cmdline: str,
    *,
    addr_pfn: int | None = None,
    kaslr: bool = False,
    image_size: int = DEFAULT_IMAGE_BYTES,
    image_file: str | os.PathLike[str] | None = None,
) -> LoadedImage:
    """Stage the next kernel with *cmdline* (``kexec -l``); return what was staged.

    The image is *image_file*'s contents, else synthetic, *image_size* bytes. It goes at
    *addr_pfn* if given, at a random free 2 MiB-aligned range with *kaslr*, else at the
    preferred address or the lowest clean range (see the module docstring). Replaces a
    previous load. Raises InvalidRequest for a bad command line or ``pkram=``, a bad size, or an
    *addr_pfn* range overlapping preserved or firmware pages or leaving RAM (naming the first
    such pfn); OSError when *image_file* cannot be read; MachineError when no range fits.
    The result's ``warnings`` say when ``pkram=`` is absent though pages are preserved, or
    names another page than this boot's super block.
    """
    check_cmdline(cmdline)
    pkram = pkram_pfn(cmdline, machine.nr_pages)
    if addr_pfn is not None and kaslr:
        raise InvalidRequest("a load address and kaslr exclude each other")
    data: bytes | None = None
    if image_file is not None:
        size = os.stat(image_file).st_size
        if not 0 < size <= machine.ram_bytes:
            raise InvalidRequest(
                f"{os.fspath(image_file)}: {size} bytes is not a kernel for this RAM"
            )
        data = Path(image_file).read_bytes()
        image_size = len(data)
    if not 0 < image_size <= machine.ram_bytes:
        raise InvalidRequest(f"image size {image_size} bytes must be 1 byte to the RAM size")
    nr_pages = pages_for_bytes(image_size)
    sb_pfn = machine.boot_record().super_block_pfn  # 0 (none) is exec's to refuse
    with machine.page_ownership() as po, po.locked():
        owner_map = po.owner_map
        start = _choose_start(machine, owner_map, nr_pages, addr_pfn, kaslr)
        preserved = int(np.count_nonzero(owner_map == PRESERVED))
        warnings = []
        if pkram is None and preserved:
            warnings.append(
                f"{preserved} pages are preserved but the command line has no "
                f"{PKRAM_PARAM}= (add {PKRAM_PARAM}={sb_pfn}): exec will scrub them"
            )
        elif pkram is not None and pkram != sb_pfn:
            warnings.append(
                f"{PKRAM_PARAM}={pkram} is not this boot's super block (pfn {sb_pfn}, "
                f"sys/kernel/{PKRAM_PARAM}): exec refuses it without --force"
            )
        image = LoadedImage(
            cmdline=cmdline,
            start_pfn=start,
            nr_pages=nr_pages,
            kaslr=kaslr,
            loaded_ns=time.time_ns(),
            image_bytes=image_size,
            kernel_file=None if image_file is None else os.path.abspath(image_file),
            warnings=tuple(warnings),
        )
        unload(machine)
        if data is not None:
            (machine.boot_dir / IMAGE_COPY_FILE).write_bytes(data)
        write_json_atomic(machine.boot_dir / LOAD_FILE, image.to_dict())
    return image


def _choose_start(
    machine: Machine,
    owner_map: npt.NDArray[np.int32],
    nr_pages: int,
    addr_pfn: int | None,
    kaslr: bool,
) -> int:
    if addr_pfn is not None:
        conflict = range_conflict(owner_map, addr_pfn, nr_pages)
        if conflict is not None:
            raise InvalidRequest(f"load address {addr_pfn * PAGE_SIZE:#x}: {conflict}")
        return addr_pfn
    preferred = preferred_start_pfn(machine.memory_map)
    if not kaslr and range_conflict(owner_map, preferred, nr_pages) is None:
        return preferred
    starts = clean_starts(owner_map, nr_pages)
    if starts.size == 0:
        raise MachineError(
            f"no 2 MiB-aligned range of {nr_pages} pages free of preserved and firmware pages"
        )
    return int(starts[secrets.randbelow(starts.size)] if kaslr else starts[0])


def write_image(ram: Ram, machine: Machine, image: LoadedImage, generation: int) -> None:
    """Write *image* over its range as it boots *generation* (the kexec segment): every byte
    of its pages, so the range needs no scrubbing before.

    The kernel file's copy if one was loaded, else a synthetic image. Raises CorruptMachine
    when the copy is missing or has the wrong size.
    """
    if image.kernel_file is None:
        write_synthetic_image(ram, image.start_pfn, image.cmdline, generation, image.image_bytes)
        return
    path = machine.boot_dir / IMAGE_COPY_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptMachine(f"{path}: missing (load the kernel again)") from None
    if size != image.image_bytes:
        raise CorruptMachine(f"{path}: {size} bytes, the load record says {image.image_bytes}")
    _check_segment(ram, image.start_pfn, image.nr_pages)
    buffer = np.zeros(WRITE_CHUNK_PAGES * PAGE_SIZE, dtype=np.uint8)
    with open(path, "rb") as copy:
        for first in range(0, image.nr_pages, WRITE_CHUNK_PAGES):
            count = min(WRITE_CHUNK_PAGES, image.nr_pages - first)
            chunk = buffer[: count * PAGE_SIZE]
            got = copy.readinto(chunk.data)
            chunk[got:] = 0  # the last page's tail: nothing of the old boot is left there
            ram.store_run(image.start_pfn + first, chunk.data)


def write_synthetic_image(
    ram: Ram, start_pfn: int, cmdline: str, generation: int, size_bytes: int
) -> None:
    """Write a made-up kernel of *size_bytes* at *start_pfn*: a header, then filler.

    The header is text naming *generation* and *cmdline*, ending in a NUL byte; every 8-byte
    word of image page *i* after it holds *i* (the last page is filled whole).
    """
    nr_pages = pages_for_bytes(size_bytes)
    _check_segment(ram, start_pfn, nr_pages)
    header = IMAGE_MAGIC + f"generation {generation}\ncmdline {cmdline}\n".encode() + b"\0"
    header = header[:size_bytes]
    words = np.empty((WRITE_CHUNK_PAGES, PAGE_SIZE // 8), dtype="<u8")
    for first in range(0, nr_pages, WRITE_CHUNK_PAGES):
        count = min(WRITE_CHUNK_PAGES, nr_pages - first)
        words[:count] = np.arange(first, first + count, dtype="<u8")[:, None]
        chunk = words[:count].reshape(-1).view(np.uint8)
        if first == 0:
            chunk[: len(header)] = np.frombuffer(header, dtype=np.uint8)
        ram.store_run(start_pfn + first, chunk.data)


def _check_segment(ram: Ram, start_pfn: int, nr_pages: int) -> None:
    """MachineError if an image of *nr_pages* at *start_pfn* leaves RAM."""
    if start_pfn < 0 or start_pfn + nr_pages > ram.nr_pages:
        raise MachineError(f"an image of {nr_pages} pages at pfn {start_pfn} leaves RAM")
