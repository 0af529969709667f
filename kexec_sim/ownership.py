"""The page-ownership map of one boot: who owns every pfn, shared by all its processes.

``boot/page-owners`` holds a header (``_HEADER``) followed by one little-endian int32 owner
id per pfn (see kexec_sim.owners for the ids). Every process of the boot maps it shared and
changes it only while holding ``boot/lock`` (``PageOwnership.locked()``); the registry of
owners is ``boot/owners.json``. A process that dies leaves its owner registered until
``reclaim_dead_owners`` (run on every registration and before reporting OutOfMemory) frees
its pages. A transfer is journaled (kexec_sim.transfer_journal): a process killed in the middle
of one leaves none or all of its pfns moved, as the next holder of the lock sees the map.

Header (little-endian, padded to HEADER_BYTES so the owner array is page aligned)::

    0   8s  magic b"KSIMOWN\\0"
    8   u32 version (1)
    12  u32 header size in bytes (4096)
    16  u64 nr_pages
    24  u64 allocator next-fit cursor (pfn)
    32  u64 registry serial (bumped on every owners.json write; caches key on it)
    40      zero to HEADER_BYTES (version 1 maps made before boot.json held the boot's
            super block and kernel image kept them here; they are ignored)
"""

import mmap
import os
import signal
import struct
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kexec_sim.allocator import PfnRange, find_free
from kexec_sim.closing import Closing
from kexec_sim.errors import CorruptMachine, InvalidRequest, MachineError, OutOfMemory
from kexec_sim.filelock import FileLock
from kexec_sim.geometry import HUGE_PAGES, PAGE_SIZE
from kexec_sim.memmap import MemoryMap
from kexec_sim.owners import (
    FIRMWARE,
    FREE,
    HANDOVER,
    KERNEL,
    MAX_NAME_CHARS,
    MAX_OWNER_ID,
    NOSAVE,
    PRESERVED,
    OwnerInfo,
    OwnerRegistry,
    check_mountpoint,
    count_owners,
    owned_by_any,
    owner_name,
)
from kexec_sim.ownership_check import find_problems
from kexec_sim.pages import MANY_RUNS, PageRuns, PfnArray, as_pfn_array
from kexec_sim.process import is_alive, process_start_time
from kexec_sim.transfer_journal import (
    read_journal,
    remove_journal,
    write_journal_runs,
)
from kexec_sim.transition import refuse_changes

if TYPE_CHECKING:
    from kexec_sim.machine import BootRecord

__all__ = [
    "FIRMWARE",
    "FREE",
    "HANDOVER",
    "KERNEL",
    "NOSAVE",
    "PRESERVED",
    "OwnerInfo",
    "PageOwnership",
]

MAP_FILE = "page-owners"
REGISTRY_FILE = "owners.json"
LOCK_FILE = "lock"
MAGIC = b"KSIMOWN\0"
VERSION = 1
HEADER_BYTES = PAGE_SIZE
_HEADER = struct.Struct("<8sIIQQQ")
_CURSOR_OFFSET = 24
_SERIAL_OFFSET = 32
FAULT_ENV = "KEXEC_SIM_FAULT"
"""Fault injection for tests: ``transfer-midway`` kills a transfer half applied."""
_FORMAT_CHUNK_PAGES = 1 << 18  # a fresh map is written in chunks of 1 MiB, all-FREE ones skipped
_CHECK_BLOCK = 1 << 16  # entries compared at once when checking a run's owner (64 KiB of bools)


def _describe(pfns: PfnArray, owners: npt.NDArray[np.int32]) -> str:
    return ", ".join(
        f"pfn {int(p)} ({owner_name(int(o))})" for p, o in zip(pfns[:3], owners[:3], strict=True)
    )


class PageOwnership(Closing):
    """The shared page-ownership map and owner registry of the current boot.

    Open it with ``Machine.page_ownership()``; close it (or use ``with``) when done. Every
    method takes the cross-process lock itself; wrap several calls in ``locked()`` to make
    them one atomic step. Raises MachineError once the machine has booted again (the map is
    then the previous boot's).
    """

    def __init__(self, boot_dir: Path, memory_map: MemoryMap, nr_pages: int) -> None:
        """Open the map in *boot_dir*; raise CorruptMachine when its header is wrong."""
        self.boot_dir = boot_dir
        self.memory_map = memory_map
        self.nr_pages = nr_pages
        self._registry_path = boot_dir / REGISTRY_FILE
        self._registry: OwnerRegistry | None = None
        self._registry_serial = -1
        self._lock = FileLock(boot_dir / LOCK_FILE)
        map_path = boot_dir / MAP_FILE
        try:
            self._fd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self._lock.close()
            raise MachineError(f"{map_path}: missing (no boot state)") from None
        try:
            self._ino = os.fstat(self._fd).st_ino
            self._mmap = self._map_file(map_path)
        except BaseException:
            os.close(self._fd)
            self._lock.close()
            raise
        self._owners = np.frombuffer(self._mmap, dtype="<i4", count=nr_pages, offset=HEADER_BYTES)
        self._cursor = np.frombuffer(self._mmap, dtype="<u8", count=1, offset=_CURSOR_OFFSET)
        self._serial = np.frombuffer(self._mmap, dtype="<u8", count=1, offset=_SERIAL_OFFSET)

    def _map_file(self, map_path: Path) -> mmap.mmap:
        size_bytes = os.fstat(self._fd).st_size
        if size_bytes != HEADER_BYTES + 4 * self.nr_pages:
            raise CorruptMachine(
                f"{map_path}: {size_bytes} bytes, expected a map of {self.nr_pages} pages"
            )
        mapped = mmap.mmap(self._fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        magic, version, header_bytes, nr_pages, cursor, _ = _HEADER.unpack_from(mapped)
        problem = None
        if magic != MAGIC:
            problem = f"bad magic {magic!r}"
        elif version != VERSION or header_bytes != HEADER_BYTES:
            problem = f"unsupported version {version} (header {header_bytes} bytes)"
        elif nr_pages != self.nr_pages or cursor >= nr_pages:
            problem = f"header says {nr_pages} pages (cursor {cursor}), machine has {self.nr_pages}"
        if problem is not None:
            mapped.close()
            raise CorruptMachine(f"{map_path}: {problem}")
        return mapped

    @staticmethod
    def format(boot_dir: Path, owner_map: npt.NDArray[np.int32]) -> None:
        """Write a fresh boot state in *boot_dir*: the map *owner_map* (one id per pfn), no owners.

        Replaces the files by rename, so processes of an older boot keep a detached copy.
        The caller holds ``boot/lock`` (or is the only user of *boot_dir*).
        """
        nr_pages = owner_map.size
        header = _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, nr_pages, 0, 0)
        tmp = boot_dir / f".{MAP_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + 4 * nr_pages)  # sparse: FREE is zero
            os.pwrite(fd, header, 0)
            for start in range(0, nr_pages, _FORMAT_CHUNK_PAGES):
                chunk = owner_map[start : start + _FORMAT_CHUNK_PAGES]
                if chunk.any():
                    os.pwrite(fd, chunk.astype("<i4").tobytes(), HEADER_BYTES + 4 * start)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, boot_dir / MAP_FILE)
        OwnerRegistry().save(boot_dir / REGISTRY_FILE)
        (boot_dir / LOCK_FILE).touch(mode=0o600)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the map and close the files (views from ``owner_map`` become invalid)."""
        if self._fd < 0:
            return
        del self._owners, self._cursor, self._serial
        with suppress(BufferError):  # a caller still holds a view: unmapped when collected
            self._mmap.close()
        os.close(self._fd)
        self._fd = -1
        self._lock.close()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the boot's ownership lock (re-entrant in this process) for the block.

        Raises MachineError if the machine booted again since this map was opened.
        """
        if self._fd < 0:
            raise MachineError("page ownership map is closed")
        with self._lock.held():
            if self._lock.depth == 1:
                self._check_current()
                self._replay_journal()  # first of all: a half-done transfer is finished
            yield

    def _check_current(self) -> None:
        """Raise MachineError unless boot/page-owners is still the file this object maps."""
        try:
            current = os.stat(self.boot_dir / MAP_FILE).st_ino
        except FileNotFoundError:
            current = -1
        if current != self._ino:
            raise MachineError(
                "the machine has booted again or powered off: this page ownership map is stale"
            )

    def _replay_journal(self) -> None:
        """Finish a transfer whose process was killed midway (see kexec_sim.transfer_journal)."""
        journal = read_journal(self.boot_dir, self.nr_pages)
        if journal is None:
            return
        current = self._owners[journal.pfns]
        started = (current == journal.from_owner) | (current == journal.to_owner)
        self._owners[journal.pfns[started]] = journal.to_owner
        remove_journal(self.boot_dir)

    @property
    def owner_map(self) -> npt.NDArray[np.int32]:
        """A read-only view of the owner of every pfn (read it under ``locked()``)."""
        view = self._owners.view()
        view.flags.writeable = False
        return view

    @property
    def cursor_pfn(self) -> int:
        """Where the next-fit search for free pages starts (read it under ``locked()``)."""
        return int(self._cursor[0])

    # -- owners ---------------------------------------------------------------------------

    def _load_registry(self) -> OwnerRegistry:
        serial = int(self._serial[0])
        if self._registry is None or serial != self._registry_serial:
            self._registry = OwnerRegistry.load(self._registry_path)
            self._registry_serial = serial
        return self._registry

    def _save_registry(self, registry: OwnerRegistry) -> None:
        # Bump the serial first: if the write fails, every cache reloads the file anyway.
        self._serial[0] += 1
        registry.save(self._registry_path)
        self._registry, self._registry_serial = registry, int(self._serial[0])

    def register_owner(
        self, name: str, pid: int, mountpoint: str | None = None, *, preservable: bool = False
    ) -> int:
        """Register an owner kept alive by process *pid*; return its new id.

        *mountpoint* is the mount the owner serves, if any: ``kexec-sim exec`` unmounts it;
        *preservable* says the mount can preserve its pages (``remount,preserve``).
        Reclaims dead owners first. Raises InvalidRequest for a bad name or mountpoint,
        MachineBusy while the machine's power state is changing (an owner registered then
        would escape the exec or hibernate deciding what to stop and keep), MachineError when
        *pid* is not a running process or the ids of this boot are exhausted.
        """
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise InvalidRequest(f"owner name must be 1..{MAX_NAME_CHARS} printable characters")
        check_mountpoint(mountpoint)
        with self.locked():
            refuse_changes(self.boot_dir.parent, f"cannot register owner {name!r}")
            self.reclaim_dead_owners()
            start_time = process_start_time(pid)
            if start_time is None:
                raise MachineError(f"cannot register owner {name!r}: no running process {pid}")
            old = self._load_registry()
            owner_id = old.next_id
            if owner_id > MAX_OWNER_ID:
                raise MachineError("owner ids of this boot are exhausted")
            info = OwnerInfo(
                owner_id, name, pid, start_time, time.time_ns(), mountpoint, preservable
            )
            self._save_registry(OwnerRegistry(owner_id + 1, {**old.owners, owner_id: info}))
            return owner_id

    def unregister_owner(self, owner_id: int) -> None:
        """Free every page of *owner_id* and remove it; MachineError if it is not registered."""
        with self.locked():
            old = self._require_registered(owner_id)
            self._owners[self._owners == owner_id] = FREE
            owners = {i: info for i, info in old.owners.items() if i != owner_id}
            self._save_registry(OwnerRegistry(old.next_id, owners))

    def reclaim_dead_owners(self) -> list[int]:
        """Free the pages and registrations of owners whose process is gone; return their ids."""
        with self.locked():
            old = self._load_registry()
            dead = sorted(i for i, o in old.owners.items() if not is_alive(o.pid, o.pid_start_time))
            if dead:
                self._owners[owned_by_any(self._owners, dead)] = FREE
                owners = {i: info for i, info in old.owners.items() if i not in dead}
                self._save_registry(OwnerRegistry(old.next_id, owners))
            return dead

    def owners(self) -> dict[int, OwnerInfo]:
        """Return the registered owners by id."""
        with self.locked():
            return dict(self._load_registry().owners)

    def _require_registered(self, owner_id: int) -> OwnerRegistry:
        registry = self._load_registry()
        if owner_id not in registry.owners:
            raise MachineError(f"{owner_name(owner_id)} is not a registered owner")
        return registry

    def _require_holder(self, owner_id: int, *, allow_free: bool = False) -> None:
        """A holder of pages a caller may move: registered, PRESERVED, HANDOVER (or FREE)."""
        if owner_id in (PRESERVED, HANDOVER) or (allow_free and owner_id == FREE):
            return
        self._require_registered(owner_id)

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, owner_id: int, n_pages: int, avoid: PfnRange | None = None) -> PfnArray:
        """Give *n_pages* free usable pages to *owner_id*; return their pfns (next-fit order).

        No page of *avoid* (a pfn range ``(start, end_exclusive)``) is given. All or nothing:
        raises OutOfMemory (nothing allocated) when fewer than *n_pages* are free after
        reclaiming dead owners, MachineError when *owner_id* is not registered.
        """
        return self._allocate(owner_id, n_pages, 1, avoid)

    def allocate_huge(self, owner_id: int, n_huge: int, avoid: PfnRange | None = None) -> PfnArray:
        """Give *owner_id* *n_huge* free, naturally aligned runs of HUGE_PAGES pages.

        Returns the base pfn of each run; no run overlaps *avoid* (a pfn range). All or
        nothing: raises OutOfMemory (the caller may fall back to small pages), MachineError
        when *owner_id* is not registered.
        """
        return self._allocate(owner_id, n_huge, HUGE_PAGES, avoid)

    def _allocate(
        self, owner_id: int, n_units: int, unit_pages: int, avoid: PfnRange | None
    ) -> PfnArray:
        if n_units < 0:
            raise InvalidRequest(f"cannot allocate {n_units} units")
        with self.locked():
            self._require_registered(owner_id)
            cursor = int(self._cursor[0])
            found = find_free(self._owners, n_units, cursor, avoid, unit_pages=unit_pages)
            if found is None and self.reclaim_dead_owners():
                found = find_free(self._owners, n_units, cursor, avoid, unit_pages=unit_pages)
            if found is None:
                what = "pages" if unit_pages == 1 else "huge pages"
                raise OutOfMemory(
                    f"cannot allocate {n_units} {what} for {owner_name(owner_id)}: "
                    f"{self.free_pages()} pages free"
                )
            if found.size == 0:
                return found
            if unit_pages == 1:
                self._owners[found] = owner_id
            else:
                whole_units = self._owners[: self.nr_pages - self.nr_pages % unit_pages]
                whole_units.reshape(-1, unit_pages)[found // unit_pages] = owner_id
            self._cursor[0] = (int(found[-1]) + unit_pages) % self.nr_pages
            return found

    def free(self, owner_id: int, pfns: npt.ArrayLike) -> None:
        """Mark *pfns* FREE; each must be owned by *owner_id* (registered, PRESERVED, HANDOVER).

        The allocator reuses the lowest of them first.

        Raises MachineError, changing nothing, when one is not (or is listed twice).
        """
        with self.locked():
            self._require_holder(owner_id)
            checked = self._owned_pfns(pfns, owner_id, "free")
            self._set_owner(PageRuns.of_pfns(checked), FREE)
            # Rewind the next-fit cursor to the lowest page freed: pages just given back are
            # handed out again first (the host has them resident; allocation stays compact).
            if checked.size:
                self._cursor[0] = min(int(self._cursor[0]), int(checked.min()))

    def transfer(self, pfns: npt.ArrayLike, from_owner: int, to_owner: int) -> None:
        """Move *pfns* from *from_owner* to *to_owner* (registered, PRESERVED or HANDOVER).

        *from_owner* may also be FREE, to claim specific free pages. Crash-atomic: a process
        killed midway leaves none or all of *pfns* moved, as the next lock holder sees it.
        Raises MachineError, changing nothing, when a pfn is not owned by *from_owner* (or is
        listed twice).
        """
        with self.locked():
            self._require_holder(from_owner, allow_free=True)
            self._require_holder(to_owner)
            checked = self._owned_pfns(pfns, from_owner, "transfer")
            if checked.size:
                self._move(PageRuns.of_pfns(checked), from_owner, to_owner)

    def transfer_runs(self, runs: PageRuns, from_owner: int, to_owner: int) -> None:
        """`transfer` for pages given as runs: checks, journal and moves cost per run."""
        if runs.starts.size > MANY_RUNS or runs.starts.size == 0:
            self.transfer(runs.expand(), from_owner, to_owner)
            return
        with self.locked():
            self._require_holder(from_owner, allow_free=True)
            self._require_holder(to_owner)
            if (runs.lengths < 1).any() or (runs.starts < 0).any():
                raise MachineError("transfer: a run is empty or starts below pfn 0")
            if int((runs.starts + runs.lengths).max()) > self.nr_pages:
                raise MachineError("transfer: a run goes past the end of RAM")
            twice = runs.first_repeat(self.nr_pages)
            if twice is not None:
                raise MachineError(f"transfer: pfn {twice} is listed more than once")
            wrong = self._first_not_owned(runs, from_owner)
            if wrong is not None:
                actual = int(self._owners[wrong])
                raise MachineError(
                    f"transfer: pfn {wrong} is not owned by {owner_name(from_owner)} "
                    f"({owner_name(actual)})"
                )
            self._move(runs, from_owner, to_owner)

    def _move(self, runs: PageRuns, from_owner: int, to_owner: int) -> None:
        """Give checked *runs* to *to_owner*, journaled so that a crash midway is replayed."""
        write_journal_runs(self.boot_dir, runs.starts, runs.lengths, from_owner, to_owner)
        if os.environ.get(FAULT_ENV) == "transfer-midway":
            half = runs.expand()
            self._owners[half[: half.size // 2]] = to_owner
            os.kill(os.getpid(), signal.SIGKILL)
        self._set_owner(runs, to_owner)
        remove_journal(self.boot_dir)

    def first_not_owned(self, runs: PageRuns, owner_id: int) -> int | None:
        """Return the first pfn of *runs* not owned by *owner_id*, or None if all are."""
        with self.locked():
            return self._first_not_owned(runs, owner_id)

    def _first_not_owned(self, runs: PageRuns, owner_id: int) -> int | None:
        if runs.starts.size > MANY_RUNS:
            pfns = runs.expand()
            wrong = np.flatnonzero(self._owners[pfns] != owner_id)
            return int(pfns[wrong[0]]) if wrong.size else None
        for start, length in zip(runs.starts.tolist(), runs.lengths.tolist(), strict=True):
            for lo in range(start, start + length, _CHECK_BLOCK):  # temporaries stay warm
                hi = min(lo + _CHECK_BLOCK, start + length)
                wrong = np.flatnonzero(self._owners[lo:hi] != owner_id)
                if wrong.size:
                    return lo + int(wrong[0])
        return None

    def _set_owner(self, runs: PageRuns, owner_id: int) -> None:
        """Set the owner of every page of *runs*: a slice per run when there are few."""
        if runs.starts.size > MANY_RUNS:
            self._owners[runs.expand()] = owner_id
            return
        for start, length in zip(runs.starts.tolist(), runs.lengths.tolist(), strict=True):
            self._owners[start : start + length] = owner_id

    def _owned_pfns(self, pfns: npt.ArrayLike, owner_id: int, verb: str) -> PfnArray:
        """Return *pfns* checked: in RAM, distinct, all owned by *owner_id*."""
        checked = as_pfn_array(pfns, self.nr_pages)
        runs = PageRuns.of_pfns(checked)
        if (
            runs.starts.size <= MANY_RUNS
            and runs.first_repeat(self.nr_pages) is None
            and self._first_not_owned(runs, owner_id) is None
        ):
            return checked  # distinct (runs do not overlap) and all owned: the fast path
        if checked.size > 1 and not (np.diff(checked) > 0).all():
            ordered = np.sort(checked)
            twice = ordered[1:][ordered[1:] == ordered[:-1]]
            if twice.size:
                raise MachineError(f"{verb}: pfn {int(twice[0])} is listed more than once")
        actual = self._owners[checked]
        wrong = np.flatnonzero(actual != owner_id)
        if wrong.size:
            raise MachineError(
                f"{verb}: {wrong.size} of {checked.size} pfns are not owned by "
                f"{owner_name(owner_id)}: {_describe(checked[wrong], actual[wrong])}"
            )
        return checked

    # -- queries --------------------------------------------------------------------------

    def pages_of(self, owner_id: int) -> PfnArray:
        """Return the pfns owned by *owner_id* (any id, special ones included), ascending."""
        with self.locked():
            return np.flatnonzero(self._owners == owner_id).astype(np.int64, copy=False)

    def count_by_owner(self) -> dict[int, int]:
        """Return how many pages each owner id present in the map holds (FREE and specials too)."""
        with self.locked():
            return count_owners(self._owners)

    def free_pages(self) -> int:
        """Return how many pages are FREE."""
        with self.locked():
            return int(np.count_nonzero(self._owners == FREE))

    def check(self, claims: Mapping[int, PfnArray], boot: "BootRecord") -> list[str]:
        """Return the problems of the map against *claims* (owner id -> pfns it believes it owns)
        and the facts of *boot* (its super block and kernel image).

        Empty means clean. Reports pfns claimed twice, claimed but owned by someone else,
        owned by a claiming owner that does not claim them (leaks), owned by unregistered
        ids, and reserved owners not matching the memory map. Owners absent from *claims*
        are not checked for leaks.
        """
        with self.locked():
            registered = self._load_registry().owners.keys()
            return find_problems(
                self._owners,
                self.memory_map,
                registered,
                claims,
                super_block_pfn=boot.super_block_pfn,
                kernel_image=boot.kernel_image or (0, 0),
            )
