"""Storage keys: one key byte per page frame, held outside RAM (s390's storage keys).

The byte of pfn *p* is byte *p* of the machine's ``KEYS`` file (mapped shared, 0600), so
every process of a boot sees the same keys, and they are not part of the RAM a kexec or a
hibernation image carries. Its bits, as on s390 (the key of SSKE/ISKE)::

    0xF0  ACCESS_MASK    the access-control bits (4 bits)
    0x08  FETCH_PROTECT  fetch protection
    0x04  REFERENCED     set by the "hardware" on every read of the page
    0x02  CHANGED        set by the "hardware" on every store into the page
    0x01  SINCE_IMAGE    the simulator's own (s390 leaves this bit unused): the page was
                         stored into since the last hibernation image completed or resumed

Here "the hardware" is whoever stores into or reads RAM: kexec_sim marks the pages it writes
(Ram's writing methods do), pkramfs marks the pages its reads and writes touch. Hibernation
saves the architectural bits (all but SINCE_IMAGE) of every saved page and restores them
after the page data, so resuming leaves CHANGED exactly as it was; an incremental image saves
the pages whose SINCE_IMAGE bit is set. Power off clears every key.
"""

import mmap
import os
from contextlib import suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kexec_sim.closing import Closing
from kexec_sim.errors import CorruptMachine
from kexec_sim.pages import as_pfn_array

KEYS_FILE = "KEYS"
ACCESS_MASK = 0xF0
FETCH_PROTECT = 0x08
REFERENCED = 0x04
CHANGED = 0x02
SINCE_IMAGE = 0x01
ARCHITECTURAL = 0xFE
"""The bits s390 defines: what an image saves and resume restores."""

KeyArray = npt.NDArray[np.uint8]


def create_keys_file(path: Path, nr_pages: int) -> None:
    """Create an all-zero key file for *nr_pages* pages at *path* (0600) if none is there."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.ftruncate(fd, nr_pages)
    finally:
        os.close(fd)


class StorageKeys(Closing):
    """The key bytes of a machine's pages, mapped shared. Close when done."""

    def __init__(self, path: Path, nr_pages: int) -> None:
        """Map *path* (created all-zero when missing); CorruptMachine unless *nr_pages* long."""
        self.path = path
        self.nr_pages = nr_pages
        create_keys_file(path, nr_pages)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != nr_pages:
                raise CorruptMachine(
                    f"{path}: {size} key bytes, expected one per page ({nr_pages})"
                )
            self._mmap = mmap.mmap(fd, nr_pages, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._keys: KeyArray | None = np.frombuffer(self._mmap, dtype=np.uint8)

    @property
    def array(self) -> KeyArray:
        """Every key, one uint8 per pfn (a writable view of the shared mapping)."""
        if self._keys is None:
            raise ValueError(f"{self.path}: the storage keys are closed")
        return self._keys

    def mark_referenced(self, pfns: npt.ArrayLike) -> None:
        """Set REFERENCED on *pfns* (a read touched them)."""
        self.array[np.asarray(pfns, dtype=np.int64)] |= REFERENCED

    def mark_changed(self, pfns: npt.ArrayLike) -> None:
        """Set REFERENCED, CHANGED and SINCE_IMAGE on *pfns* (a store touched them)."""
        self.array[np.asarray(pfns, dtype=np.int64)] |= REFERENCED | CHANGED | SINCE_IMAGE

    def mark_changed_range(self, start_pfn: int, nr_pages: int) -> None:
        """mark_changed for the pfns ``start_pfn .. start_pfn + nr_pages - 1``."""
        self.array[start_pfn : start_pfn + nr_pages] |= REFERENCED | CHANGED | SINCE_IMAGE

    def read(self, pfns: npt.ArrayLike) -> KeyArray:
        """A copy of the keys of *pfns* (MachineError for a pfn outside RAM)."""
        return self.array[as_pfn_array(pfns, self.nr_pages)].copy()

    def restore(self, pfns: npt.ArrayLike, keys: npt.ArrayLike) -> None:
        """Set the keys of *pfns* to *keys* (architectural bits; SINCE_IMAGE cleared)."""
        values = np.asarray(keys, dtype=np.uint8) & np.uint8(ARCHITECTURAL)
        self.array[as_pfn_array(pfns, self.nr_pages)] = values

    def changed_since_image(self) -> npt.NDArray[np.bool_]:
        """One bool per pfn: stored into since the last image completed or resumed."""
        changed: npt.NDArray[np.bool_] = (self.array & SINCE_IMAGE) != 0
        return changed

    def image_completed(self) -> None:
        """Clear SINCE_IMAGE on every page: an image now holds what RAM holds."""
        keys = self.array
        keys &= np.uint8(~SINCE_IMAGE & 0xFF)

    def clear(self) -> None:
        """Zero every key (power off)."""
        self.array[:] = 0

    def close(self) -> None:
        """Unmap the keys."""
        if self._keys is None:
            return
        self._keys = None
        with suppress(BufferError):  # a caller holds a view: the mapping goes with it
            self._mmap.close()
