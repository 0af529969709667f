"""What a file's page index keeps of its folios besides pfns, as Linux 6.18's tmpfs has them.

tmpfs holds a file's pages in folios of 2**order pages (order 0 to 9), each aligned to its
size. With huge=always it gives a page it must allocate the largest aligned block of holes
around it, up to 2 MiB (`largest_hole_block`), and it splits a folio that a punch or a
truncate cuts non-uniformly: around one page, into that page and one block of each smaller
order beside it (`buddy_blocks`), dropping the blocks that start past the end of the file.
A folio fallocate made is not uptodate until a store reaches it (then all of it is): SEEK_DATA
passes it. ``Folios`` records, per file, what the pfns alone do not say:

- the head and order of each folio of order 1 to 8 (an order-9 folio is a huge page, known
  to FilePages; order 0 is the default), as an int8 per page of a 2 MiB chunk, -1 where no
  large folio starts;
- the unwritten pages (fallocated, not stored to since), a bool per page of a chunk;
- ``fallocend``, the page fallocate reached: a split keeps blocks up to there past EOF.

Most files have none of this: their FilePages holds None instead of a Folios.
"""

import numpy as np
import numpy.typing as npt

from kexec_sim import HUGE_ORDER, HUGE_PAGES, PfnArray

NOT_HEAD = -1
CHUNK_SHIFT = HUGE_ORDER
CHUNK_MASK = HUGE_PAGES - 1

BoolArray = npt.NDArray[np.bool_]
OrderArray = npt.NDArray[np.int8]
Block = tuple[int, int]  # (first page, order)


class Folios:
    """Large folios, unwritten pages and fallocend of one file (see the module)."""

    __slots__ = ("fallocend", "orders", "unwritten")

    def __init__(self) -> None:
        self.orders: dict[int, OrderArray] = {}  # chunk -> order of the folio at each page
        self.unwritten: dict[int, BoolArray] = {}  # chunk -> unwritten pages
        self.fallocend = 0

    def is_empty(self) -> bool:
        """Whether nothing is recorded (the file may drop this)."""
        return not self.orders and not self.unwritten and not self.fallocend

    def folio(self, chunk_no: int, page: int) -> Block:
        """The (first page, order) of the folio holding *page* of a chunk of small pages."""
        orders = self.orders.get(chunk_no)
        if orders is not None:
            for order in range(1, HUGE_ORDER):
                start = page >> order << order
                if orders[start] == order:
                    return start, order
        return page, 0

    def set_blocks(self, chunk_no: int, blocks: list[Block]) -> None:
        """Record *blocks* (first page, order) as the folios of their pages in a chunk."""
        orders = self.orders.get(chunk_no)
        for start, order in blocks:
            if orders is None:
                if not order:
                    continue
                orders = self.orders[chunk_no] = np.full(HUGE_PAGES, NOT_HEAD, dtype=np.int8)
            orders[start : start + (1 << order)] = NOT_HEAD
            if order:
                orders[start] = order
        self._settle(chunk_no)

    def add_large(self, blocks: list[Block]) -> None:
        """Record *blocks* (first file page index, order 1 to 8) as large folios."""
        for start, order in blocks:
            self.set_blocks(start >> CHUNK_SHIFT, [(start & CHUNK_MASK, order)])

    def split(self, chunk_no: int, lo: int, hi: int, kept: list[Block]) -> None:
        """The folio of pages [lo, hi) of a chunk is now the blocks *kept*; its other pages
        are gone (unwritten marks stay on the kept pages, as split folios keep the flag)."""
        mask = self.unwritten.get(chunk_no)
        if mask is not None:
            keep = np.zeros(hi - lo, dtype=bool)
            for start, order in kept:
                keep[start - lo : start - lo + (1 << order)] = True
            mask[lo:hi] &= keep
        orders = self.orders.get(chunk_no)
        if orders is not None:
            orders[lo:hi] = NOT_HEAD
        self.set_blocks(chunk_no, kept)

    def add_unwritten(self, indexes: PfnArray) -> None:
        """Mark the pages at *indexes* (ascending) unwritten."""
        if not len(indexes):
            return
        chunk_nos = indexes >> CHUNK_SHIFT
        starts = np.flatnonzero(np.diff(chunk_nos, prepend=-1))
        for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(indexes)], strict=True):
            chunk_no = int(chunk_nos[lo])
            mask = self.unwritten.setdefault(chunk_no, np.zeros(HUGE_PAGES, dtype=bool))
            mask[indexes[lo:hi] & CHUNK_MASK] = True

    def clear(self, chunk_no: int, lo: int, hi: int) -> None:
        """Pages [lo, hi) of a chunk are gone, or one folio each: forget their marks."""
        for table, blank in ((self.orders, NOT_HEAD), (self.unwritten, False)):
            row = table.get(chunk_no)
            if row is not None:
                row[lo:hi] = blank
        self._settle(chunk_no)

    def written(self, chunk_no: int, lo: int, hi: int) -> None:
        """A store reached pages [lo, hi) of a chunk of small pages: their folios are
        written, whole."""
        mask = self.unwritten.get(chunk_no)
        if mask is None:
            return
        start = self.folio(chunk_no, lo)[0]
        last, order = self.folio(chunk_no, hi - 1)
        mask[start : last + (1 << order)] = False
        self._settle(chunk_no)

    def clear_unwritten(self, chunk_no: int) -> None:
        """A store reached a chunk that is one huge page: all of it is written."""
        self.unwritten.pop(chunk_no, None)

    def unwritten_indexes(self) -> PfnArray:
        """The indexes of the unwritten pages, ascending."""
        return _indexes({c: np.flatnonzero(m) for c, m in self.unwritten.items()})

    def large(self) -> tuple[PfnArray, PfnArray]:
        """(first index, order) of every folio of order 1 to 8, ascending."""
        heads = {c: np.flatnonzero(o != NOT_HEAD) for c, o in self.orders.items()}
        orders = [self.orders[c][heads[c]] for c in sorted(heads)]
        joined = np.concatenate(orders).astype(np.int64) if orders else _EMPTY
        return _indexes(heads), joined

    def _settle(self, chunk_no: int) -> None:
        """Drop a chunk's rows that record nothing any more."""
        orders = self.orders.get(chunk_no)
        if orders is not None and (orders == NOT_HEAD).all():
            del self.orders[chunk_no]
        mask = self.unwritten.get(chunk_no)
        if mask is not None and not mask.any():
            del self.unwritten[chunk_no]


_EMPTY = np.empty(0, dtype=np.int64)


def _indexes(by_chunk: dict[int, npt.NDArray[np.int64]]) -> PfnArray:
    found = [by_chunk[c] + (c << CHUNK_SHIFT) for c in sorted(by_chunk)]
    return np.concatenate(found).astype(np.int64) if found else _EMPTY


def buddy_blocks(at: int, start: int, order: int) -> list[Block]:
    """The folios a non-uniform split of the 2**order pages from *start* around page *at*
    makes: *at* alone, then beside it one block of each order from 0 up to *order* - 1."""
    rel = at - start
    return [(at, 0), *[(start + (((rel >> k) ^ 1) << k), k) for k in range(order)]]


def split(start: int, order: int, at: int, after: int | None, keep_below: int) -> list[Block]:
    """The folios kept of folio (*start*, *order*) when a punch or truncate cuts it, as
    truncate_inode_partial_folio splits it: around page *at*, then the block holding page
    *after* (if given and kept) around that; every new block but the one at the start of the
    folio split goes if it starts at or past page *keep_below*."""
    blocks = [b for b in buddy_blocks(at, start, order) if b[0] < keep_below or b[0] == start]
    if after is not None:
        holder = next((b for b in blocks if b[0] <= after < b[0] + (1 << b[1])), None)
        if holder is not None and holder[1]:
            blocks.remove(holder)
            blocks += [
                b
                for b in buddy_blocks(after, holder[0], holder[1])
                if b[0] < keep_below or b[0] == holder[0]
            ]
    return sorted(blocks)


def largest_hole_block(held: BoolArray, page: int, most: int) -> int:
    """The order of the folio tmpfs (huge=always) gives hole *page* of a chunk whose held pages
    are *held*: the largest, up to *most*, whose aligned block holds nothing."""
    for order in range(most, 0, -1):
        start = page >> order << order
        if not held[start : start + (1 << order)].any():
            return order
    return 0
