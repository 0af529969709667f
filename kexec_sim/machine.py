"""A simulated machine: a directory holding its RAM, firmware map and current boot.

Layout (directories 0700, files 0600)::

    machine.json    {"format": 1, "ram_bytes", "page_size", "memory_map", "created_ns",
                    "machine_id"} (machine_id: 32 hex digits, random at creation; machines
                    made before it existed derive theirs from created_ns and ram_bytes)
    RAM             the physical memory, a sparse file of ram_bytes
    KEYS            the storage keys, one byte per page (kexec_sim.storage_keys)
    boot.json       {"generation", "cmdline", "booted_ns", "powered", "kernel_image",
                    "super_block_pfn"} of the current boot (1 = first); kernel_image is
                    {"start_pfn", "nr_pages"} of the image a kexec loaded, or null (the
                    memory map's KERNEL region). The one source of the boot's facts.
    cmdline         the current boot's command line, like /proc/cmdline
    sys/kernel/     values the running kernel exports (like /sys/kernel)
      pkram         this boot's PKRAM super block pfn, decimal, newline-terminated (an
                    export for users and scripts; kexec-sim reads boot.json)
    logs/           boot-<generation>.log: what early boot did (pkramfs daemons log here too)
    boot/           state of the current boot only, recreated by every boot:
      page-owners   the page-ownership map (kexec_sim.ownership)
      owners.json   the registry of owners
      lock          the lock serializing changes to both
      kexec-load.json  the image ``kexec-sim load`` staged (kexec_sim.kernel_image), if any

A powered-off machine (``kexec-sim poweroff``) has "powered": false in boot.json and no boot
state: nothing can open its page ownership until ``kexec-sim boot``.

The directory is the explicit path given, else ``$KEXEC_SIM_MACHINE``, else
``/dev/shm/kexec-sim/default``.
"""

import errno
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kexec_sim.cmdline import MAX_CMDLINE_BYTES, check_cmdline
from kexec_sim.errors import CorruptMachine, InvalidRequest, MachineError, MachineExists
from kexec_sim.filelock import FileLock
from kexec_sim.geometry import PAGE_SIZE, PfnRange
from kexec_sim.jsonfile import (
    fsync_dir,
    get_int,
    get_str,
    read_json_object,
    write_json_atomic,
    write_text_atomic,
)
from kexec_sim.machine_dir import DEFAULT_MACHINE_PATH, MACHINE_ENV, machine_path
from kexec_sim.memmap import MIN_PAGES, MemoryMap
from kexec_sim.transition import PowerLock, busy, read_record

# What works on pages (boot, owners, ownership, ram: numpy) is imported where it is used:
# opening a machine, every command's first step, stays light (a remount helper's start-up).
if TYPE_CHECKING:
    from kexec_sim.boot import EarlyBoot
    from kexec_sim.owners import OwnerInfo
    from kexec_sim.ownership import PageOwnership
    from kexec_sim.ram import Ram

__all__ = [
    "DEFAULT_MACHINE_DIR",
    "DEFAULT_RAM_BYTES",
    "MACHINE_ENV",
    "MAX_CMDLINE_BYTES",
    "BootRecord",
    "Machine",
    "check_cmdline",
    "check_ram_bytes",
    "resolve_machine_dir",
]

DEFAULT_MACHINE_DIR = Path(DEFAULT_MACHINE_PATH)
DEFAULT_RAM_BYTES = 8 << 30
MIN_RAM_BYTES = MIN_PAGES * PAGE_SIZE
MAX_RAM_BYTES = 1 << 40
MACHINE_FORMAT = 1
MACHINE_ID_BYTES = 16

MACHINE_FILE = "machine.json"
RAM_FILE = "RAM"
BOOT_FILE = "boot.json"
CMDLINE_FILE = "cmdline"
BOOT_DIR = "boot"
SYS_KERNEL_DIR = "sys/kernel"
PKRAM_EXPORT = "pkram"
LOGS_DIR = "logs"


@dataclass(frozen=True)
class BootRecord:
    """The current boot of a machine (``boot.json``): the one source of its facts."""

    generation: int
    cmdline: str
    booted_ns: int
    powered: bool = True
    kernel_image: PfnRange | None = None
    """The pfn range of the image a kexec loaded; None: the memory map's KERNEL region."""
    super_block_pfn: int = 0
    """This boot's PKRAM super block (its HANDOVER page); 0: none (booted by an older
    kexec-sim). ``sys/kernel/pkram`` exports it; nothing reads the export back."""


def resolve_machine_dir(path: str | os.PathLike[str] | None) -> Path:
    """Return the machine directory: *path*, else $KEXEC_SIM_MACHINE, else the default."""
    return Path(machine_path(path))


def check_ram_bytes(ram_bytes: int) -> None:
    """Raise InvalidRequest unless *ram_bytes* is a whole number of pages in the supported range."""
    if ram_bytes % PAGE_SIZE or not MIN_RAM_BYTES <= ram_bytes <= MAX_RAM_BYTES:
        raise InvalidRequest(
            f"RAM size {ram_bytes} bytes must be a multiple of {PAGE_SIZE} "
            f"between {MIN_RAM_BYTES >> 20} MiB and {MAX_RAM_BYTES >> 40} TiB"
        )


class Machine:
    """An open machine directory. Get one with ``Machine.open()`` or ``Machine.create()``."""

    def __init__(
        self,
        path: Path,
        ram_bytes: int,
        memory_map: MemoryMap,
        created_ns: int,
        machine_id: bytes | None = None,
    ) -> None:
        self.path = path
        self.ram_bytes = ram_bytes
        self.memory_map = memory_map
        self.created_ns = created_ns
        self.machine_id = machine_id or _derived_id(created_ns, ram_bytes)
        """16 bytes naming this machine (what a hibernation image must have been taken on)."""

    def __repr__(self) -> str:
        return f"Machine({str(self.path)!r}, ram_bytes={self.ram_bytes})"

    @property
    def nr_pages(self) -> int:
        """How many pages of PAGE_SIZE the RAM holds."""
        return self.ram_bytes // PAGE_SIZE

    @property
    def boot_dir(self) -> Path:
        """The directory of the current boot's state."""
        return self.path / BOOT_DIR

    @property
    def sys_kernel_dir(self) -> Path:
        """Where the running kernel exports values (``sys/kernel``)."""
        return self.path / SYS_KERNEL_DIR

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, create: bool = True) -> "Machine":
        """Open the machine at *path* (see resolve_machine_dir).

        A missing machine is created with the defaults when *create*, else MachineError.
        Raises CorruptMachine when its files fail validation.
        """
        target = resolve_machine_dir(path)
        if not (target / MACHINE_FILE).exists():
            if not create:
                raise MachineError(
                    f"no machine at {target} yet: the first pkramfs mount makes it, or "
                    "'kexec-sim init'"
                )
            try:
                return cls.create(target)
            except MachineExists:
                if not (target / MACHINE_FILE).exists():
                    raise
                # another process created it meanwhile: open theirs
        return cls._load(target)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str] | None,
        ram_bytes: int = DEFAULT_RAM_BYTES,
        *,
        force: bool = False,
        cmdline: str = "",
    ) -> "Machine":
        """Create a fresh machine at *path* with *ram_bytes* of RAM, booted (generation 1).

        An existing machine there is wiped when *force* (MachineBusy while a power-state change
        holds it), else MachineExists; a directory that
        is neither empty nor a machine is never wiped (MachineError). Raises InvalidRequest for a
        bad size or command line.
        """
        check_ram_bytes(ram_bytes)
        check_cmdline(cmdline)
        target = resolve_machine_dir(path)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        wipe = _must_wipe(target, force)
        power = PowerLock(target) if wipe else None  # never wipe a machine mid-transition
        if power is not None and not power.try_acquire():
            power.release()
            raise busy(target, read_record(target))
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
        trash = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            _populate(staging, ram_bytes, cmdline)
            if wipe:
                os.rename(target, trash)
            try:
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise MachineExists(f"a machine already exists at {target}") from None
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if power is not None:
                power.release()
            shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(target.parent)
        return cls._load(target)

    @classmethod
    def _load(cls, path: Path) -> "Machine":
        where = str(path / MACHINE_FILE)
        try:
            data = read_json_object(path / MACHINE_FILE)
        except FileNotFoundError:
            raise MachineError(f"no machine at {path}") from None
        if data.get("format") != MACHINE_FORMAT:
            raise CorruptMachine(f"{where}: unsupported format {data.get('format')!r}")
        if data.get("page_size") != PAGE_SIZE:
            raise CorruptMachine(
                f"{where}: page_size must be {PAGE_SIZE}, got {data.get('page_size')!r}"
            )
        ram_bytes = get_int(data, "ram_bytes", where, minimum=1)
        try:
            check_ram_bytes(ram_bytes)
        except InvalidRequest as exc:
            raise CorruptMachine(f"{where}: {exc}") from None
        created_ns = get_int(data, "created_ns", where)
        try:
            memory_map = MemoryMap.from_dict(data.get("memory_map"), ram_bytes // PAGE_SIZE)
        except CorruptMachine as exc:
            raise CorruptMachine(f"{where}: {exc}") from None
        try:
            ram_file_bytes = (path / RAM_FILE).stat().st_size
        except FileNotFoundError:
            raise CorruptMachine(f"{path / RAM_FILE}: missing") from None
        if ram_file_bytes != ram_bytes:
            raise CorruptMachine(
                f"{path / RAM_FILE}: {ram_file_bytes} bytes, machine.json says {ram_bytes}"
            )
        machine_id = None
        if "machine_id" in data:
            text = get_str(data, "machine_id", where)
            try:
                machine_id = bytes.fromhex(text)
            except ValueError:
                machine_id = b""
            if len(machine_id) != MACHINE_ID_BYTES:
                raise CorruptMachine(f"{where}: machine_id {text[:40]!r} is not 32 hex digits")
        machine = cls(path, ram_bytes, memory_map, created_ns, machine_id)
        machine.boot_record()
        return machine

    # -- the current boot -----------------------------------------------------------------

    def boot_record(self) -> BootRecord:
        """Read the current boot record; raise CorruptMachine when boot.json is bad."""
        where = str(self.path / BOOT_FILE)
        try:
            data = read_json_object(self.path / BOOT_FILE)
        except FileNotFoundError:
            raise CorruptMachine(f"{where}: missing") from None
        powered = data.get("powered", True)
        if not isinstance(powered, bool):
            raise CorruptMachine(f"{where}: 'powered' must be true or false, got {powered!r}")
        image = data.get("kernel_image")
        kernel_image = None
        if image is not None:
            if not isinstance(image, dict):
                raise CorruptMachine(f"{where}: 'kernel_image' must be an object or null")
            start = get_int(image, "start_pfn", where)
            end = start + get_int(image, "nr_pages", where)
            if end > self.nr_pages:
                raise CorruptMachine(f"{where}: kernel image {start}..{end} is outside RAM")
            kernel_image = (start, end)
        super_block_pfn = 0  # none: booted by a kexec-sim older than the field
        if "super_block_pfn" in data:
            super_block_pfn = get_int(data, "super_block_pfn", where)
        if super_block_pfn >= self.nr_pages:
            raise CorruptMachine(f"{where}: super block pfn {super_block_pfn} is outside RAM")
        return BootRecord(
            generation=get_int(data, "generation", where, minimum=1),
            cmdline=get_str(data, "cmdline", where),
            booted_ns=get_int(data, "booted_ns", where),
            powered=powered,
            kernel_image=kernel_image,
            super_block_pfn=super_block_pfn,
        )

    @property
    def generation(self) -> int:
        """The current boot generation (1 for the first boot, +1 per boot)."""
        return self.boot_record().generation

    @property
    def cmdline(self) -> str:
        """The current boot's command line."""
        return self.boot_record().cmdline

    @property
    def powered(self) -> bool:
        """Whether the machine is running (False after ``kexec-sim poweroff``)."""
        return self.boot_record().powered

    @property
    def super_block_pfn(self) -> int:
        """The current boot's PKRAM super block pfn (boot.json; exported in ``sys/kernel/pkram``).

        Raises MachineError when the machine is powered off, CorruptMachine when the boot
        has none (a machine booted by an older kexec-sim).
        """
        self.require_powered()
        pfn = self.boot_record().super_block_pfn
        if not pfn:
            raise CorruptMachine(
                f"{self.path / BOOT_FILE}: no super block (a machine booted by an older "
                f"kexec-sim has none: 'kexec-sim --machine {self.path} reboot' gives it one)"
            )
        return pfn

    def require_powered(self) -> None:
        if not self.powered:
            raise MachineError(f"machine {self.path} is powered off: run 'kexec-sim boot'")

    def start_boot(
        self,
        cmdline: str,
        *,
        kernel_image: PfnRange | None = None,
        held: "PageOwnership | None" = None,
    ) -> "EarlyBoot":
        """Boot the machine again with *cmdline*: next generation, fresh boot/ state.

        The new ownership map has every usable page FREE, the pages of *kernel_image* (a pfn
        range: where a kexec wrote the new kernel; None: the memory map's KERNEL region)
        KERNEL, and no owners; early boot (kexec_sim.boot) then reserves what ``pkram=``
        hands over and exports the super block pfn in ``sys/kernel/pkram``. Processes of the
        previous boot keep a detached copy of the map and get MachineError from it. RAM is
        untouched but for the super block. Powers the machine on if it was off.

        Takes boot/lock, unless the caller holds it through *held* (a PageOwnership of the
        previous boot inside its ``locked()``); never call it inside another object's
        ``locked()`` (that deadlocks). Raises InvalidRequest for a bad command line.
        """
        check_cmdline(cmdline)
        generation = self.boot_record().generation + 1
        with self._boot_locked(held):
            return _write_boot(self.path, generation, cmdline, self.memory_map, kernel_image)

    def record_power_off(self, held: "PageOwnership | None" = None) -> None:
        """Mark the machine powered off, then drop the boot state (under boot/lock: through
        *held* when the caller holds it, else taken here).

        Open ownership maps become stale, nothing is exported in ``sys/kernel``, and
        ``page_ownership()`` raises MachineError until the next ``start_boot``. The record
        comes first: a power off cut short leaves an off machine with stale boot files,
        which the next boot clears.
        """
        from kexec_sim.ownership import MAP_FILE, REGISTRY_FILE

        with self._boot_locked(held):
            record = self.boot_record()
            _write_boot_record(self.path, replace(record, powered=False))
            for name in (MAP_FILE, REGISTRY_FILE):
                with suppress(FileNotFoundError):
                    (self.boot_dir / name).unlink()
            _clear_boot_dir(self.boot_dir)
            with suppress(FileNotFoundError):
                (self.sys_kernel_dir / PKRAM_EXPORT).unlink()

    @contextmanager
    def _boot_locked(self, held: "PageOwnership | None") -> Iterator[None]:
        """Hold boot/lock: through *held* when the caller holds it, else taken here."""
        from kexec_sim.ownership import LOCK_FILE

        if held is not None:
            with held.locked():
                yield
            return
        lock = FileLock(self.boot_dir / LOCK_FILE)
        try:
            with lock.held():
                yield
        finally:
            lock.close()

    def live_owners(self) -> list["OwnerInfo"]:
        """The registered owners whose process still runs: a look at ``boot/owners.json``
        without the ownership lock (a snapshot that may be stale at once); none when the
        machine is off or the registry unreadable."""
        from kexec_sim.owners import OwnerRegistry
        from kexec_sim.ownership import REGISTRY_FILE
        from kexec_sim.process import is_alive

        try:
            registry = OwnerRegistry.load(self.boot_dir / REGISTRY_FILE)
        except (MachineError, OSError):
            return []
        return [o for o in registry.owners.values() if is_alive(o.pid, o.pid_start_time)]

    # -- the hardware ---------------------------------------------------------------------

    def ram(self) -> "Ram":
        """Map the RAM (close the result when done)."""
        from kexec_sim.ram import Ram

        return Ram(self.path / RAM_FILE, self.nr_pages)

    def page_ownership(self) -> "PageOwnership":
        """Open the current boot's page-ownership map (close the result when done).

        Raises MachineError when the machine is powered off.
        """
        from kexec_sim.ownership import PageOwnership

        self.require_powered()
        return PageOwnership(self.boot_dir, self.memory_map, self.nr_pages)


def _derived_id(created_ns: int, ram_bytes: int) -> bytes:
    """The id of a machine whose machine.json predates machine_id."""
    seed = f"kexec-sim machine {created_ns} {ram_bytes}".encode()
    return hashlib.blake2b(seed, digest_size=MACHINE_ID_BYTES).digest()


def _must_wipe(target: Path, force: bool) -> bool:
    """Whether *target* holds a machine that creating one there must wipe first."""
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise MachineError(f"{target} exists and is not a directory")
    if not any(target.iterdir()):
        return False
    if not (target / MACHINE_FILE).exists():
        raise MachineError(f"refusing to use {target}: not empty and not a machine directory")
    if not force:
        raise MachineExists(f"a machine already exists at {target}")
    return True


def _populate(path: Path, ram_bytes: int, cmdline: str) -> None:
    """Write every file of a fresh machine into the (empty) directory *path*."""
    nr_pages = ram_bytes // PAGE_SIZE
    memory_map = MemoryMap.default_for(nr_pages)
    fd = os.open(path / RAM_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, ram_bytes)  # sparse: pages cost nothing until written
    finally:
        os.close(fd)
    write_json_atomic(
        path / MACHINE_FILE,
        {
            "format": MACHINE_FORMAT,
            "ram_bytes": ram_bytes,
            "page_size": PAGE_SIZE,
            "memory_map": memory_map.to_dict(),
            "created_ns": time.time_ns(),
            "machine_id": secrets.token_hex(MACHINE_ID_BYTES),
        },
    )
    (path / "sys").mkdir(mode=0o700)
    (path / SYS_KERNEL_DIR).mkdir(mode=0o700)
    (path / BOOT_DIR).mkdir(mode=0o700)
    _write_boot(path, 1, cmdline, memory_map, None)


def _clear_boot_dir(boot_dir: Path) -> None:
    """Remove the previous boot's files from *boot_dir*, but those replaced by rename."""
    from kexec_sim.ownership import LOCK_FILE, MAP_FILE, REGISTRY_FILE

    keep = {LOCK_FILE, MAP_FILE, REGISTRY_FILE}  # replaced by rename, never missing
    for entry in boot_dir.iterdir():
        if entry.name not in keep:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _write_boot(
    path: Path,
    generation: int,
    cmdline: str,
    memory_map: MemoryMap,
    kernel_image: PfnRange | None,
) -> "EarlyBoot":
    """Make *generation* the current boot: fresh boot/ state after early boot, boot.json."""
    from kexec_sim.boot import early_boot
    from kexec_sim.owners import FREE, KERNEL, boot_owner_map
    from kexec_sim.ownership import PageOwnership
    from kexec_sim.ram import Ram

    boot_dir = path / BOOT_DIR
    _clear_boot_dir(boot_dir)
    nr_pages = (path / RAM_FILE).stat().st_size // PAGE_SIZE
    owner_map = boot_owner_map(memory_map, nr_pages)
    if kernel_image is not None:
        image = owner_map[kernel_image[0] : kernel_image[1]]
        image[image == FREE] = KERNEL
    with Ram(path / RAM_FILE, nr_pages) as ram:
        booted = early_boot(ram, owner_map, cmdline, generation)
    PageOwnership.format(boot_dir, owner_map)
    write_text_atomic(path / SYS_KERNEL_DIR / PKRAM_EXPORT, f"{booted.super_block_pfn}\n")
    logs = path / LOGS_DIR
    logs.mkdir(mode=0o700, exist_ok=True)
    write_text_atomic(logs / f"boot-{generation}.log", "".join(f"{line}\n" for line in booted.log))
    _write_boot_record(
        path,
        BootRecord(generation, cmdline, time.time_ns(), True, kernel_image, booted.super_block_pfn),
    )
    return booted


def _write_boot_record(path: Path, record: BootRecord) -> None:
    """Write boot.json and cmdline for *record*."""
    image = record.kernel_image
    write_json_atomic(
        path / BOOT_FILE,
        {
            "generation": record.generation,
            "cmdline": record.cmdline,
            "booted_ns": record.booted_ns,
            "powered": record.powered,
            "kernel_image": None
            if image is None
            else {"start_pfn": image[0], "nr_pages": image[1] - image[0]},
            "super_block_pfn": record.super_block_pfn,
        },
    )
    write_text_atomic(path / CMDLINE_FILE, record.cmdline + "\n")
