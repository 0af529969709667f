"""A mount's page allocator: pages taken from the machine in batches, limited by ``size=``.

The machine's ownership map is shared by every mount and guarded by a cross-process lock; taking
pages one write at a time would take that lock on every write. The pool takes a batch at once
(owned by this mount in the map from then on) and hands pages out locally. Pages in the pool
belong to the mount but to no file: the ownership checker counts both.
"""

import errno

import numpy as np

from kexec_sim import HUGE_PAGES, OutOfMemory, PageOwnership, PfnArray, PfnRange, Ram

from .errors import FsError

BATCH_PAGES = 2048  # 8 MiB a lock
MAX_IDLE_PAGES = 4 * BATCH_PAGES  # above this, pages given back go back to the machine


class PagePool:
    """Hand out and take back pages of one mount; ``limit_pages`` 0 means no ``size=`` limit."""

    __slots__ = ("_free", "_next", "_ownership", "_ram", "limit_pages", "owner_id", "used_pages")

    def __init__(self, ownership: PageOwnership, ram: Ram, owner_id: int, limit_pages: int) -> None:
        self._ownership = ownership
        self._ram = ram
        self.owner_id = owner_id
        self.limit_pages = limit_pages
        self.used_pages = 0  # pages held by files (the pool's own idle pages not included)
        self._free: PfnArray = np.empty(0, dtype=np.int64)  # idle pages are _free[_next:]
        self._next = 0

    @property
    def idle_pages(self) -> PfnArray:
        """Pages owned by the mount but held by no file."""
        return self._free[self._next :]

    def take(self, n_pages: int) -> PfnArray:
        """Return *n_pages* pages for a file; raise FsError(ENOSPC), taking none, if impossible."""
        if n_pages == 0:
            return np.empty(0, dtype=np.int64)
        self._check_limit(n_pages)
        if len(self.idle_pages) < n_pages:
            want = n_pages - len(self.idle_pages)
            try:
                batch = self._ownership.allocate(self.owner_id, max(want, BATCH_PAGES))
            except OutOfMemory:
                try:
                    batch = self._ownership.allocate(self.owner_id, want)
                except OutOfMemory:
                    raise FsError(errno.ENOSPC, "the machine's RAM is full") from None
            self._ram.populate(batch)
            self._free = np.concatenate([self.idle_pages, batch])
            self._next = 0
        pages = self._free[self._next : self._next + n_pages]
        self._next += n_pages
        self.used_pages += n_pages
        return pages

    def take_huge(self) -> int | None:
        """Return the base pfn of a free aligned 2 MiB run for a file, or None if there is none
        or ``size=`` leaves no room for one (the caller falls back to small pages, as tmpfs)."""
        if not self.fits(HUGE_PAGES):
            return None
        try:
            base = int(self._ownership.allocate_huge(self.owner_id, 1)[0])
        except OutOfMemory:
            return None
        self._ram.populate(np.arange(base, base + HUGE_PAGES, dtype=np.int64))
        self.used_pages += HUGE_PAGES
        return base

    def give_back(self, pfns: PfnArray) -> None:
        """Take back pages a file no longer holds; keep a few idle, return the rest."""
        if len(pfns) == 0:
            return
        self.used_pages -= len(pfns)
        idle = np.concatenate([self.idle_pages, pfns])
        if len(idle) > MAX_IDLE_PAGES:
            self._ownership.free(self.owner_id, idle[BATCH_PAGES:])
            idle = idle[:BATCH_PAGES]
        self._free, self._next = idle, 0

    def owns_any(self, start: int, end: int) -> bool:
        """Whether the mount owns any of the pfns ``start .. end - 1``."""
        with self._ownership.locked():
            return bool((self._ownership.owner_map[start:end] == self.owner_id).any())

    def replacements(self, n_pages: int, avoid: PfnRange) -> PfnArray:
        """*n_pages* fresh pages outside *avoid* to move file pages to; ``size=`` is unchanged
        (a page for a page: the moved ones go back with `release_replaced`)."""
        return self._ownership.allocate(self.owner_id, n_pages, avoid=avoid)

    def huge_replacement(self, avoid: PfnRange) -> int:
        """The base of a fresh aligned 2 MiB run outside *avoid* (see `replacements`)."""
        return int(self._ownership.allocate_huge(self.owner_id, 1, avoid=avoid)[0])

    def release_replaced(self, pfns: PfnArray) -> None:
        """Return pages whose content moved to `replacements` to the machine."""
        self._ownership.free(self.owner_id, pfns)

    def give_back_idle(self) -> None:
        """Return every idle page to the machine (before a preserve: nothing left over)."""
        if len(self.idle_pages):
            self._ownership.free(self.owner_id, self.idle_pages)
        self._free, self._next = np.empty(0, dtype=np.int64), 0

    def fits(self, n_pages: int) -> bool:
        """Whether files may hold *n_pages* more pages under ``size=``."""
        return not self.limit_pages or self.used_pages + n_pages <= self.limit_pages

    def _check_limit(self, n_pages: int) -> None:
        if not self.fits(n_pages):
            raise FsError(errno.ENOSPC, "the mount's size= limit is reached")
