"""Quiet inodes: those not in use, kept as columns instead of Inode objects, so a restore and
the next preserve cost a few array operations per column, not Python code per inode.

Two kinds of inodes are quiet: those restored from a node and not used since, and those the
prepare phase (prepare.py) froze back into columns while the mount served. The rows live in
segments, each sorted by inode number: the restored tree is one, each freeze adds one (its
directories' entries packed as the record holds them), and then merges the newest segments
while they are of like size and drops the dead rows of one other small segment, so a lookup
searches a few segments, not one per freeze. An inode is in one place at a time: a row here,
or an Inode object in the table (inode_table.py); taking it makes the object and the row
dead. Rows keep the kernel's lookup count, which the record does not hold.
"""

from collections.abc import Callable, Iterator
from operator import attrgetter

import numpy as np

from kexec_sim import PageRuns, PfnArray

from . import tree_record, xattrs
from .file_pages import FilePages
from .inode import Inode
from .tree_record import Column, InodeColumns, PackedEntries, PageEntries, join_times

MERGE_MAX_ROWS = 1 << 15  # a merge copies up to this many rows (a few ms); larger ones stay apart


class _Segment:
    """Rows sorted by inode number, with their page entries and lookup counts; rows taken
    since are dead (``live`` False)."""

    def __init__(self, inodes: InodeColumns, pages: PageEntries, lookups: Column) -> None:
        self.inodes = inodes
        self.pages = pages
        self.lookups = lookups
        self.ino = inodes.columns["ino"]
        self.first_entry = inodes.first_entry
        self.live = np.ones(len(inodes), dtype=bool)
        self.count = len(inodes)
        self.lowest = int(self.ino[0]) if self.count else 0
        self.highest = int(self.ino[-1]) if self.count else -1

    def row(self, ino: int) -> int | None:
        """The live row of inode *ino*, or None."""
        if not self.lowest <= ino <= self.highest:
            return None
        row = int(np.searchsorted(self.ino, ino))
        if self.ino[row] == ino and self.live[row]:
            return row
        return None

    def take(self, row: int) -> Inode:
        """Make live *row* an Inode object; the row is dead from now on."""
        self.live[row] = False
        self.count -= 1
        c = self.inodes.columns
        ino, mode = int(c["ino"][row]), int(c["mode"][row])
        inode = Inode(ino, mode, int(c["uid"][row]), int(c["gid"][row]), 0)
        inode.nlink = int(c["nlink"][row])
        inode.rdev = int(c["rdev"][row])
        inode.size_bytes = int(c["size"][row])
        inode.atime_ns = join_times(int(c["atime_sec"][row]), int(c["atime_nsec"][row]))
        inode.mtime_ns = join_times(int(c["mtime_sec"][row]), int(c["mtime_nsec"][row]))
        inode.ctime_ns = join_times(int(c["ctime_sec"][row]), int(c["ctime_nsec"][row]))
        inode.lookups = int(self.lookups[row])
        entries = self.inodes.entries.get(row)
        if entries is not None:
            if isinstance(entries, PackedEntries):
                entries = entries.unpacked()
            inode.entries = entries
            inode.parent_ino = int(self.inodes.parent[row])
        if inode.pages is not None:
            first, count = int(self.first_entry[row]), int(c["entries"][row])
            inode.pages = FilePages.from_entries(
                self.pages.pfns[first : first + count],
                self.pages.orders[first : first + count],
                self.pages.indexes[first : first + count],
            )
            inode.pages.folios = self.inodes.folios.get(row)
        inode.target = self.inodes.targets.get(row)
        inode.xattrs = self.inodes.xattrs.get(row, {})
        return inode

    def part(self) -> tuple[InodeColumns, PageEntries, Column]:
        """The live rows, their page entries and lookup counts."""
        if self.count == len(self.ino):
            return self.inodes, self.pages, self.lookups
        rows = np.flatnonzero(self.live)
        return self.inodes.select(rows), self.entries_of(self.live), self.lookups[rows]

    def entries_of(self, rows: Column) -> PageEntries:
        """The page entries of the live rows among *rows* (a boolean mask)."""
        if self.count == len(self.ino) and rows is self.live:
            return self.pages
        chosen = np.flatnonzero(self.live & rows)
        counts = self.inodes.columns["entries"][chosen]
        return self.pages.gather(self.first_entry[chosen], counts)


def _segment(parts: list[tuple[InodeColumns, PageEntries, Column]]) -> _Segment:
    """One segment of the rows of *parts*, sorted by inode number."""
    inodes, pages, order = tree_record.merge([(columns, entries) for columns, entries, _ in parts])
    lookups = np.concatenate([counts for _, _, counts in parts])
    return _Segment(inodes, pages, lookups if order is None else lookups[order])


class QuietInodes:
    """The quiet inodes of a tree, as columns in segments; empty to begin with."""

    def __init__(self) -> None:
        self._segments: list[_Segment] = []

    @classmethod
    def restored(cls, inodes: InodeColumns, pages: PageEntries) -> "QuietInodes":
        """The rows of a rebuilt tree (tree_record.rebuild): the kernel knows none of them."""
        quiet = cls()
        quiet._segments.append(_Segment(inodes, pages, np.zeros(len(inodes), dtype=np.int64)))
        return quiet

    def __len__(self) -> int:
        return sum(segment.count for segment in self._segments)

    def __contains__(self, ino: object) -> bool:
        return type(ino) is int and self._find(ino) is not None

    @property
    def segments(self) -> int:
        """How many segments hold the rows."""
        return len(self._segments)

    def _find(self, ino: int) -> tuple[_Segment, int] | None:
        for segment in reversed(self._segments):  # the newest first: more likely used again
            row = segment.row(ino)
            if row is not None:
                return segment, row
        return None

    def take(self, ino: int) -> Inode:
        """Make quiet inode *ino* an Inode object (KeyError if it is not here)."""
        found = self._find(ino)
        if found is None:
            raise KeyError(ino)
        segment, row = found
        return segment.take(row)

    def forget(self, ino: int, count: int) -> bool:
        """Drop *count* kernel lookups of quiet inode *ino*, leaving it quiet (a quiet inode
        is linked: no last lookup frees it); False if it is not here."""
        found = self._find(ino)
        if found is None:
            return False
        segment, row = found
        segment.lookups[row] = max(0, int(segment.lookups[row]) - count)
        return True

    def add(self, inodes: list[Inode]) -> None:
        """Keep *inodes* (linked, not open, leaving the caller's table) as rows: a segment."""
        if not inodes:
            return
        columns, pages = tree_record.inode_columns(inodes)
        columns.entries = {row: PackedEntries.of(e) for row, e in columns.entries.items()}
        lookups = np.fromiter(map(attrgetter("lookups"), inodes), np.int64, count=len(inodes))
        self._segments.append(_segment([(columns, pages, lookups)]))

    def merge(self) -> None:
        """Merge the newest two segments while the older holds no more rows than the newer
        (and both fit MERGE_MAX_ROWS): a few segments of growing size, each merge copying
        what is there at most once per doubling. Then leave out the dead rows of one other
        segment that fits MERGE_MAX_ROWS, so that a preserve finds its rows ready."""
        segments = self._segments
        while len(segments) > 1 and (
            segments[-2].count <= segments[-1].count
            and segments[-2].count + segments[-1].count <= MERGE_MAX_ROWS
        ):
            merged = _segment([segments[-2].part(), segments[-1].part()])
            segments[-2:] = [merged]
        for at, segment in enumerate(segments):
            if segment.count < len(segment.ino) <= MERGE_MAX_ROWS:
                segments[at : at + 1] = [_segment([segment.part()])] if segment.count else []
                return

    def parts(self) -> list[tuple[InodeColumns, PageEntries]]:
        """The rows still here and their page entries, for the next preserve."""
        return [(columns, pages) for columns, pages, _ in self._parts()]

    def _parts(self) -> Iterator[tuple[InodeColumns, PageEntries, Column]]:
        return (segment.part() for segment in self._segments if segment.count)

    def inos(self) -> list[int]:
        """The numbers of the inodes still here."""
        return [ino for s in self._segments for ino in s.ino[s.live].tolist()]

    def data_pages(self) -> int:
        """Pages of the files still here."""
        total = 0
        for s in self._segments:
            every_file = s.live[s.inodes.columns["entries"] > 0].all()  # as frozen: no gather
            orders = s.pages.orders if every_file else s.entries_of(s.live).orders
            total += len(orders) if not orders.any() else int((np.int64(1) << orders).sum())
        return total

    def xattr_bytes(self) -> int:
        """Bytes of the xattr names and values of the inodes still here."""
        return sum(
            len(k) + len(v)
            for s in self._segments
            for row, attrs in s.inodes.xattrs.items()
            if s.live[row]
            for k, v in attrs.items()
        )

    def pfns(self) -> PfnArray:
        """Every pfn of the files still here."""
        return self._pfns(lambda s: s.live)

    def secret_pfns(self, every_file: bool) -> PfnArray:
        """The pfns of the secret files still here: every file's if *every_file* (a secret
        mount), else those of files with the secret xattr."""
        if every_file:
            return self.pfns()

        def secret(s: _Segment) -> Column:
            mask = np.zeros(len(s.ino), dtype=bool)
            for row, attrs in s.inodes.xattrs.items():
                mask[row] = attrs.get(xattrs.SECRET) == xattrs.SECRET_VALUE
            return mask

        return self._pfns(secret)

    def _pfns(self, rows: Callable[[_Segment], Column]) -> PfnArray:
        """The pfns of the live rows each segment's *rows* (a boolean mask) chooses."""
        entries = [s.entries_of(rows(s)) for s in self._segments]
        if not entries:
            return np.empty(0, dtype=np.int64)
        joined = PageEntries.concat(entries)
        return PageRuns.of_entries(joined.pfns, joined.orders).expand()

    def inos_with_pages_in(self, start: int, end: int) -> list[int]:
        """The inodes still here with a page in pfns ``start .. end - 1``."""
        found: list[int] = []
        for s in self._segments:
            ends = s.pages.pfns + (np.int64(1) << s.pages.orders)
            inside = np.flatnonzero((s.pages.pfns < end) & (ends > start))
            if inside.size:
                rows = np.searchsorted(s.first_entry, inside, side="right") - 1
                rows = rows[s.live[rows]]  # ascending, as *inside* is (np.unique: numpy.ma)
                rows = rows[np.concatenate((rows[:1] >= 0, rows[1:] != rows[:-1]))]
                found += s.ino[rows].tolist()
        return found
