"""The machine's physical RAM: the sparse ``RAM`` file mapped shared, addressed by pfn."""

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kexec_sim.closing import Closing
from kexec_sim.errors import CorruptMachine, InvalidRequest, MachineError
from kexec_sim.geometry import PAGE_SIZE, Pfn
from kexec_sim.pages import as_pfn_array, run_positions, runs_in_order
from kexec_sim.storage_keys import KEYS_FILE, StorageKeys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PROT_NONE = 0  # not in the mmap module
MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in writable, in one call

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_mprotect = _libc.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mprotect.restype = ctypes.c_int


def _pfn_runs(pfns: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Return (first pfn, pages) of each run of consecutive pfns in *pfns* (any order).

    Sorts and drops repeats by hand: numpy's np.unique (hash-based) was ~18x slower on 2M pfns.
    """
    ordered = np.sort(pfns)
    return runs_in_order(ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))])


class Ram(Closing):
    """The RAM file mapped read/write and shared: what every process of a boot sees.

    Views from ``buffer`` and ``pages`` are valid until ``close()``. ``keys`` are the pages'
    storage keys (the ``KEYS`` file next to the RAM file): this class's writing methods mark
    the pages they store into changed; whoever writes through ``buffer`` or ``pages`` marks
    them itself.
    """

    def __init__(self, path: Path, nr_pages: int) -> None:
        """Map *path*; raise CorruptMachine unless it is exactly *nr_pages* pages long."""
        self.path = path
        self.nr_pages = nr_pages
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size_bytes = os.fstat(self._fd).st_size
            if size_bytes != nr_pages * PAGE_SIZE:
                raise CorruptMachine(f"{path}: {size_bytes} bytes, expected {nr_pages * PAGE_SIZE}")
            self._mmap = mmap.mmap(
                self._fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            self.keys = StorageKeys(path.with_name(KEYS_FILE), nr_pages)
        except BaseException:
            if hasattr(self, "_mmap"):
                self._mmap.close()
            os.close(self._fd)
            raise
        self._buffer = memoryview(self._mmap)
        self._pages = np.frombuffer(self._mmap, dtype=np.uint8).reshape(nr_pages, PAGE_SIZE)
        self._address = int(self._pages.ctypes.data)
        self._unmapped = np.zeros(nr_pages, dtype=np.bool_)  # out of the direct map

    @property
    def buffer(self) -> memoryview:
        """The whole RAM as one writable byte buffer (offset = pfn * PAGE_SIZE)."""
        return self._buffer

    @property
    def pages(self) -> npt.NDArray[np.uint8]:
        """The whole RAM as a writable uint8 array shaped (nr_pages, PAGE_SIZE)."""
        return self._pages

    def _check_pfn(self, pfn: int) -> None:
        if not 0 <= pfn < self.nr_pages:
            raise MachineError(f"pfn {pfn} is outside the machine's RAM (0..{self.nr_pages - 1})")

    def read_page(self, pfn: Pfn | int) -> bytes:
        """Return a copy of page *pfn*; MachineError if it is not a page of RAM."""
        self._check_pfn(pfn)
        return self._buffer[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE].tobytes()

    def write_page(self, pfn: Pfn | int, data: bytes | bytearray | memoryview) -> None:
        """Overwrite page *pfn* with *data* (exactly PAGE_SIZE bytes); MachineError otherwise."""
        self._check_pfn(pfn)
        if len(data) != PAGE_SIZE:
            raise MachineError(f"a page write needs {PAGE_SIZE} bytes, got {len(data)}")
        self._buffer[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data
        self.keys.mark_changed_range(pfn, 1)

    def store_word(self, pfn: int, index: int, value: int) -> None:
        """Store *value* as the little-endian u64 word *index* of page *pfn*: one aligned
        8-byte store, which readers see whole (old or new), never a mix."""
        self._check_pfn(pfn)
        self._pages[pfn].view("<u8")[index] = value
        self.keys.mark_changed_range(pfn, 1)

    def store_pages(self, pfns: npt.ArrayLike, rows: npt.NDArray[np.uint8]) -> None:
        """Store *rows* (one page each, shaped (n, PAGE_SIZE)) into the pages *pfns*."""
        checked = as_pfn_array(pfns, self.nr_pages)
        self._pages[checked] = rows
        self.keys.mark_changed(checked)

    def store_run(self, start_pfn: int, data: bytes | bytearray | memoryview) -> None:
        """Store *data* (whole pages) into the pages from *start_pfn* on, through the RAM file
        (pwrite) rather than the mapping: a page of a hole written whole costs the host no
        page fault and no zeroing first. Marks them changed; MachineError for a bad range,
        OSError when the host refuses (e.g. out of memory)."""
        view = memoryview(data).cast("B")
        nr_pages, rest = divmod(view.nbytes, PAGE_SIZE)
        if rest:
            raise MachineError(f"a store of whole pages needs a multiple of {PAGE_SIZE} bytes")
        self._check_range(start_pfn, nr_pages)
        at, done = start_pfn * PAGE_SIZE, 0
        try:
            while done < view.nbytes:
                done += os.pwrite(self._fd, view[done:], at + done)
        except OSError as exc:
            raise OSError(exc.errno, f"writing {self.path}: {exc.strerror}") from None
        finally:
            self.keys.mark_changed_range(start_pfn, nr_pages)

    def backed_mask(self) -> npt.NDArray[np.bool_]:
        """One bool per page: whether it holds data in the RAM file (False: a hole, which
        reads as zeros and takes no memory). From the file's extents (SEEK_DATA/SEEK_HOLE):
        a cost per extent, not per page; a host that cannot tell says every page is data."""
        backed = np.zeros(self.nr_pages, dtype=np.bool_)
        end, at = self.nr_pages * PAGE_SIZE, 0
        while at < end:
            try:
                data = os.lseek(self._fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only holes from *at* on
                    break
                raise
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            backed[data // PAGE_SIZE : -(-hole // PAGE_SIZE)] = True
            at = hole
        return backed

    def writable_run(self, start_pfn: int, nr_pages: int) -> npt.NDArray[np.uint8]:
        """The pages ``start_pfn .. start_pfn + nr_pages - 1`` as a writable (n, PAGE_SIZE)
        view, marked changed: for a caller that builds their content in place."""
        self._check_range(start_pfn, nr_pages)
        self.keys.mark_changed_range(start_pfn, nr_pages)
        return self._pages[start_pfn : start_pfn + nr_pages]

    def punch_holes(self, pfns: npt.ArrayLike) -> None:
        """Give the pages *pfns* back to the host: afterwards they read as zeros.

        One fallocate(PUNCH_HOLE) per run of consecutive pfns; falls back to zero-filling
        when the host filesystem cannot punch holes. Raises MachineError for a bad pfn,
        OSError when the host refuses.
        """
        checked = as_pfn_array(pfns, self.nr_pages)
        if checked.size == 0:
            return
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        for start, count in zip(*(a.tolist() for a in _pfn_runs(checked)), strict=True):
            if _fallocate(self._fd, mode, start * PAGE_SIZE, count * PAGE_SIZE) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise OSError(err, f"punching a hole in {self.path}: {os.strerror(err)}")
                self._pages[start : start + count] = 0
            self.keys.mark_changed_range(start, count)

    def punch_range(self, start_pfn: int, nr_pages: int) -> None:
        """Give the pages ``start_pfn .. start_pfn + nr_pages - 1`` back to the host (zeros).

        Falls back to zero-filling when the host cannot punch holes. Raises MachineError for
        a range outside RAM, OSError when the host refuses.
        """
        self._check_range(start_pfn, nr_pages)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if nr_pages and _fallocate(self._fd, mode, start_pfn * PAGE_SIZE, nr_pages * PAGE_SIZE):
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, f"punching a hole in {self.path}: {os.strerror(err)}")
            self._pages[start_pfn : start_pfn + nr_pages] = 0
        self.keys.mark_changed_range(start_pfn, nr_pages)

    def fill_range(self, start_pfn: int, nr_pages: int, pattern_byte: int) -> None:
        """Fill the pages ``start_pfn .. start_pfn + nr_pages - 1`` with *pattern_byte*."""
        if not 0 <= pattern_byte <= 0xFF:
            raise InvalidRequest(f"pattern byte {pattern_byte} is not in 0..255")
        self._check_range(start_pfn, nr_pages)
        self._pages[start_pfn : start_pfn + nr_pages] = pattern_byte
        self.keys.mark_changed_range(start_pfn, nr_pages)

    def _check_range(self, start_pfn: int, nr_pages: int) -> None:
        if start_pfn < 0 or nr_pages < 0 or start_pfn + nr_pages > self.nr_pages:
            raise MachineError(
                f"pages {start_pfn}+{nr_pages} are outside the machine's RAM "
                f"(0..{self.nr_pages - 1})"
            )

    def populate(self, pfns: npt.ArrayLike) -> None:
        """Make the pages *pfns* resident and mapped writable ahead of use (best effort).

        Writing a page of the sparse RAM file for the first time costs the host a page fault
        per 4 KiB; populating a whole batch at allocation time takes one madvise per run.
        """
        checked = as_pfn_array(pfns, self.nr_pages)
        if checked.size == 0:
            return
        for start, count in zip(*(a.tolist() for a in _pfn_runs(checked)), strict=True):
            try:
                self._mmap.madvise(MADV_POPULATE_WRITE, start * PAGE_SIZE, count * PAGE_SIZE)
            except OSError:
                return  # an older host kernel: pages fault in on first write instead

    def fill(self, pfns: npt.ArrayLike, pattern_byte: int) -> None:
        """Fill every page of *pfns* with *pattern_byte* (0..255); MachineError for a bad pfn."""
        if not 0 <= pattern_byte <= 0xFF:
            raise InvalidRequest(f"pattern byte {pattern_byte} is not in 0..255")
        checked = as_pfn_array(pfns, self.nr_pages)
        self._pages[checked] = pattern_byte
        self.keys.mark_changed(checked)

    # --- the direct map: pages this process cannot reach through ``buffer`` or ``pages`` ---

    def _protect(self, start_pfn: int, nr_pages: int, prot: int) -> None:
        self._check_range(start_pfn, nr_pages)
        address = self._address + start_pfn * PAGE_SIZE
        if nr_pages and _mprotect(address, nr_pages * PAGE_SIZE, prot) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect of pages {start_pfn}+{nr_pages}: {os.strerror(err)}")

    def remove_from_direct_map(self, start_pfn: int, nr_pages: int) -> None:
        """Make pages ``start_pfn ..+nr_pages`` inaccessible through ``buffer`` and ``pages``.

        Like memfd_secret's pages: any access through the main mapping faults (SIGSEGV); use
        `temporary_mapping`. MachineError for a range outside RAM, OSError if mprotect fails.
        """
        self._protect(start_pfn, nr_pages, PROT_NONE)
        self._unmapped[start_pfn : start_pfn + nr_pages] = True

    def restore_direct_map(self, start_pfn: int, nr_pages: int) -> None:
        """Undo `remove_from_direct_map` for pages ``start_pfn ..+nr_pages`` (read/write)."""
        self._protect(start_pfn, nr_pages, mmap.PROT_READ | mmap.PROT_WRITE)
        self._unmapped[start_pfn : start_pfn + nr_pages] = False

    def remove_pfns_from_direct_map(self, pfns: npt.ArrayLike) -> None:
        """`remove_from_direct_map` for every run of consecutive pfns in *pfns* (any order)."""
        checked = as_pfn_array(pfns, self.nr_pages)
        if checked.size:
            for start, count in zip(*(a.tolist() for a in _pfn_runs(checked)), strict=True):
                self.remove_from_direct_map(start, count)

    def restore_pfns_to_direct_map(self, pfns: npt.ArrayLike) -> None:
        """`restore_direct_map` for every run of consecutive pfns in *pfns* that is unmapped."""
        checked = as_pfn_array(pfns, self.nr_pages)
        checked = checked[self._unmapped[checked]]
        if checked.size:
            for start, count in zip(*(a.tolist() for a in _pfn_runs(checked)), strict=True):
                self.restore_direct_map(start, count)

    def unmapped_runs(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(first pfn, pages) of each run of pages removed from the direct map, ascending."""
        return runs_in_order(np.flatnonzero(self._unmapped).astype(np.int64))

    def unmapped_mask(self, pfns: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """One bool per pfn of *pfns*: whether it is removed from the direct map."""
        mask: npt.NDArray[np.bool_] = self._unmapped[as_pfn_array(pfns, self.nr_pages)]
        return mask

    @property
    def unmapped_pages(self) -> int:
        """How many pages are removed from the direct map."""
        return int(np.count_nonzero(self._unmapped))

    @contextmanager
    def temporary_mapping(self, start_pfn: int, nr_pages: int) -> Iterator[npt.NDArray[np.uint8]]:
        """Map only pages ``start_pfn ..+nr_pages`` for the block (x86 hibernation's fixmap).

        Yields a writable uint8 array shaped (nr_pages, PAGE_SIZE); views of it must not
        outlive the block. Does not touch the storage keys: the caller marks what it does.
        """
        self._check_range(start_pfn, nr_pages)
        window = mmap.mmap(
            self._fd,
            nr_pages * PAGE_SIZE,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start_pfn * PAGE_SIZE,
        )
        array = np.frombuffer(window, dtype=np.uint8).reshape(nr_pages, PAGE_SIZE)
        try:
            yield array
        finally:
            del array
            with suppress(BufferError):  # a view escaped the block: it goes when collected
                window.close()

    def copy_pages(self, pfns: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """A copy of the pages *pfns*, shaped (n, PAGE_SIZE): those in the direct map read
        through it, the others through a temporary mapping of each run. Keys untouched."""
        checked = as_pfn_array(pfns, self.nr_pages)
        hidden = self._unmapped[checked]
        if not hidden.any():
            copied: npt.NDArray[np.uint8] = self._pages[checked]
            return copied
        out = np.empty((checked.size, PAGE_SIZE), dtype=np.uint8)
        out[~hidden] = self._pages[checked[~hidden]]
        at = np.flatnonzero(hidden)
        for begin, length in zip(*(a.tolist() for a in run_positions(checked[at])), strict=True):
            run = at[begin : begin + length]
            with self.temporary_mapping(int(checked[run[0]]), length) as window:
                out[run] = window
        return out

    def close(self) -> None:
        """Unmap the RAM and close the file."""
        if self._fd < 0:
            return
        self.keys.close()
        del self._pages
        try:
            self._buffer.release()
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is collected
        os.close(self._fd)
        self._fd = -1
