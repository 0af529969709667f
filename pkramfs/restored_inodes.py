"""Inodes restored from a node and not used since: kept as the node's columns and made Inode
objects on first use, so a restore and the next preserve cost no Python code per inode.

``InodeTable`` is the tree's ``inodes``: a dict of the Inode objects in use, which looks up a
missing number among the restored ones (``RestoredInodes``) and moves it into the dict. An
inode leaves the columns for good once made an object; every change goes through an object.
"""

from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import Any

import numpy as np

from kexec_sim import PageRuns, PfnArray

from . import xattrs
from .file_pages import FilePages
from .inode import Inode
from .tree_record import InodeColumns, PageEntries, join_times

Column = Any


class RestoredInodes:
    """The rows of a rebuilt tree (tree_record.rebuild) not yet made Inode objects."""

    def __init__(self, inodes: InodeColumns, pages: PageEntries) -> None:
        self._inodes = inodes
        self._pages = pages
        self._ino = inodes.columns["ino"]
        self._first_entry = inodes.first_entry
        self._live = np.ones(len(inodes), dtype=bool)
        self._count = len(inodes)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, ino: object) -> bool:
        return type(ino) is int and self._row(ino) is not None

    def _row(self, ino: int) -> int | None:
        row = int(np.searchsorted(self._ino, ino))
        if row < len(self._ino) and self._ino[row] == ino and self._live[row]:
            return row
        return None

    def take(self, ino: int) -> Inode:
        """Make restored inode *ino* an Inode object (KeyError if it is not here)."""
        row = self._row(ino)
        if row is None:
            raise KeyError(ino)
        self._live[row] = False
        self._count -= 1
        c = self._inodes.columns
        inode = Inode(ino, int(c["mode"][row]), int(c["uid"][row]), int(c["gid"][row]), 0)
        inode.nlink = int(c["nlink"][row])
        inode.rdev = int(c["rdev"][row])
        inode.size_bytes = int(c["size"][row])
        inode.atime_ns = join_times(int(c["atime_sec"][row]), int(c["atime_nsec"][row]))
        inode.mtime_ns = join_times(int(c["mtime_sec"][row]), int(c["mtime_nsec"][row]))
        inode.ctime_ns = join_times(int(c["ctime_sec"][row]), int(c["ctime_nsec"][row]))
        entries = self._inodes.entries.get(row)
        if entries is not None:
            inode.entries = entries
            inode.parent_ino = int(self._inodes.parent[row])
        if inode.pages is not None:
            first, count = int(self._first_entry[row]), int(c["entries"][row])
            inode.pages = FilePages.from_entries(
                self._pages.pfns[first : first + count],
                self._pages.orders[first : first + count],
                self._pages.indexes[first : first + count],
            )
        inode.target = self._inodes.targets.get(row)
        inode.xattrs = self._inodes.xattrs.get(row, {})
        return inode

    def part(self) -> tuple[InodeColumns, PageEntries]:
        """The rows still here and their page entries, for the next preserve."""
        return self._inodes.select(np.flatnonzero(self._live)), self._live_entries(self._live)

    def inos(self) -> list[int]:
        """The numbers of the inodes still here."""
        result: list[int] = self._ino[self._live].tolist()
        return result

    def data_pages(self) -> int:
        """Pages of the files still here."""
        every_file = self._live[self._inodes.columns["entries"] > 0].all()  # as at install
        orders = self._pages.orders if every_file else self._live_entries(self._live).orders
        return len(orders) if not orders.any() else int((np.int64(1) << orders).sum())

    def xattr_bytes(self) -> int:
        """Bytes of the xattr names and values of the inodes still here."""
        return sum(
            len(k) + len(v)
            for row, attrs in self._inodes.xattrs.items()
            if self._live[row]
            for k, v in attrs.items()
        )

    def pfns(self, rows: Column | None = None) -> PfnArray:
        """Every pfn of the files still here (of those among *rows*, a boolean mask, if given)."""
        entries = self._live_entries(self._live if rows is None else rows)
        return PageRuns.of_entries(entries.pfns, entries.orders).expand()

    def secret_pfns(self, every_file: bool) -> PfnArray:
        """The pfns of the secret files still here: every file's if *every_file* (a secret
        mount), else those of files with the secret xattr."""
        if every_file:
            return self.pfns()
        mask = np.zeros(len(self._ino), dtype=bool)
        for row, attrs in self._inodes.xattrs.items():
            mask[row] = attrs.get(xattrs.SECRET) == xattrs.SECRET_VALUE
        return self.pfns(mask)

    def inos_with_pages_in(self, start: int, end: int) -> list[int]:
        """The inodes still here with a page in pfns ``start .. end - 1``."""
        ends = self._pages.pfns + (np.int64(1) << self._pages.orders)
        inside = np.flatnonzero((self._pages.pfns < end) & (ends > start))
        if not inside.size:
            return []
        rows = np.searchsorted(self._first_entry, inside, side="right") - 1
        rows = rows[self._live[rows]]  # ascending, as *inside* is
        rows = rows[np.concatenate((rows[:1] >= 0, rows[1:] != rows[:-1]))]
        return [int(i) for i in self._ino[rows]]

    def _live_entries(self, rows: Column) -> PageEntries:
        """The page entries of the rows still here among *rows* (a boolean mask)."""
        chosen = np.flatnonzero(self._live & rows)
        counts = self._inodes.columns["entries"][chosen]
        return self._pages.gather(self._first_entry[chosen], counts)


class InodeTable(dict[int, Inode]):
    """The tree's inodes by number: a dict of the Inode objects in use that finds a missing
    number among the restored inodes (``restored``) and moves it in.

    Looking up, ``in``, ``get`` and ``len`` count the restored inodes; iterating (``values``,
    ``items``, ``keys``) makes every one an object first (use ``in_use`` for the objects alone).
    """

    restored: RestoredInodes | None = None

    def __missing__(self, ino: int) -> Inode:
        if self.restored is None:
            raise KeyError(ino)
        inode = self[ino] = self.restored.take(ino)
        return inode

    def get(self, ino: int, default: Any = None) -> Any:
        try:
            return self[ino]
        except KeyError:
            return default

    def __contains__(self, ino: object) -> bool:
        return dict.__contains__(self, ino) or (self.restored is not None and ino in self.restored)

    def __len__(self) -> int:
        return dict.__len__(self) + (len(self.restored) if self.restored is not None else 0)

    def in_use(self) -> ValuesView[Inode]:
        """The Inode objects (not the restored inodes not used yet)."""
        return dict.values(self)

    def take_all(self) -> None:
        """Make every restored inode an object."""
        if self.restored is not None:
            for ino in self.restored.inos():
                self[ino] = self.restored.take(ino)

    def values(self) -> ValuesView[Inode]:  # type: ignore[override]
        self.take_all()
        return dict.values(self)

    def items(self) -> ItemsView[int, Inode]:  # type: ignore[override]
        self.take_all()
        return dict.items(self)

    def keys(self) -> KeysView[int]:  # type: ignore[override]
        self.take_all()
        return dict.keys(self)

    def __iter__(self) -> Iterator[int]:
        self.take_all()
        return dict.__iter__(self)
