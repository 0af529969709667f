"""The page index of one regular file: which pfn holds each 4 KiB page of the file.

A file's pages are kept in chunks of up to 512 entries (one 2 MiB huge page's worth), so a sparse
file costs nothing for its holes, whatever its size: a chunk exists only where a page was written.
A chunk is an int64 array of pfns, ``HOLE`` (-1) where no page is allocated, only as long as
its last page needs (grown by doubling, from ``MIN_CHUNK_ENTRIES``): entries past its end are
holes, so a one-page file costs a few words, not 4 KiB. A chunk may be one huge page (order 9):
its 512 pfns are then consecutive from a 512-aligned base.

Pages fallocate(2) allocated and nothing wrote since are *unwritten*, as tmpfs's folios that
are not uptodate: they hold zeros, count in st_blocks, and SEEK_DATA passes them. A store
makes them written (a huge page whole, as a folio is), and so does a second fallocate.
"""

from collections.abc import Iterator
from itertools import chain
from operator import attrgetter, itemgetter

import numpy as np

from kexec_sim import HUGE_ORDER, HUGE_PAGES, PAGE_SHIFT, PfnArray

from .folios import BoolArray, Folios, largest_hole_block, split

HOLE = -1
CHUNK_SHIFT = HUGE_ORDER
CHUNK_PAGES = HUGE_PAGES
CHUNK_MASK = CHUNK_PAGES - 1
MIN_CHUNK_ENTRIES = 4
_NO_HUGE: frozenset[int] = frozenset()
_CHUNK_OFFSETS = np.arange(CHUNK_PAGES, dtype=np.int64)
_NONE = np.empty(0, dtype=np.int64)


class FilePages:
    """Map file page index -> pfn for one file, sparse, in chunks of up to 512 entries."""

    __slots__ = ("_chunks", "_huge", "folios", "nr_pages")

    def __init__(self) -> None:
        self._chunks: dict[int, PfnArray] = {}
        self._huge: set[int] | frozenset[int] = _NO_HUGE  # chunks that are one huge page
        self.nr_pages = 0  # pages owned (excluding holes)
        self.folios: Folios | None = None  # None: small pages and huge pages only, written

    def lookup(self, first_index: int, count: int) -> PfnArray:
        """Return the pfns of pages [first_index, first_index+count), HOLE for holes."""
        out = np.full(count, HOLE, dtype=np.int64)
        for chunk_no, lo, hi, out_lo in self._spans(first_index, count):
            chunk = self._chunks.get(chunk_no)
            if chunk is not None:
                held = chunk[lo:hi]  # shorter than asked where the chunk ends
                out[out_lo : out_lo + len(held)] = held
        return out

    def lookup_list(self, first_index: int, count: int) -> list[int]:
        """Like `lookup`, as Python ints: cheaper than numpy for a few pages."""
        chunk_no = first_index >> CHUNK_SHIFT
        lo = first_index & CHUNK_MASK
        if lo + count > CHUNK_PAGES:
            pfns: list[int] = self.lookup(first_index, count).tolist()
            return pfns
        chunk = self._chunks.get(chunk_no)  # the usual case: one chunk
        if chunk is None:
            return [HOLE] * count
        pfns = chunk[lo : lo + count].tolist()
        if len(pfns) < count:
            pfns += [HOLE] * (count - len(pfns))
        return pfns

    def set_page(self, index: int, pfn: int) -> None:
        """Record *pfn* for the hole at page *index* (one page of `assign`)."""
        chunk = self._chunk_to(index >> CHUNK_SHIFT, (index & CHUNK_MASK) + 1)
        assert chunk[index & CHUNK_MASK] == HOLE, "page assigned twice"
        chunk[index & CHUNK_MASK] = pfn
        self.nr_pages += 1

    def assign(self, first_index: int, pfns: PfnArray) -> None:
        """Record *pfns* for pages from *first_index*; HOLE entries leave a page unchanged.

        Only holes may be filled: assigning over an existing page is a bug (AssertionError).
        """
        for chunk_no, lo, hi, out_lo in self._spans(first_index, len(pfns)):
            part = pfns[out_lo : out_lo + hi - lo]
            fill = part != HOLE
            if not fill.any():
                continue
            chunk = self._chunk_to(chunk_no, lo + int(np.flatnonzero(fill)[-1]) + 1)
            target = chunk[lo:hi]
            assert not (target[fill] != HOLE).any(), "page assigned twice"
            target[fill] = part[fill]
            self.nr_pages += int(np.count_nonzero(fill))

    def assign_at(self, indexes: PfnArray, pfns: PfnArray) -> None:
        """Record *pfns* for the holes at *indexes* (ascending)."""
        if not len(indexes):
            return
        lo = int(indexes[0])
        fresh = np.full(int(indexes[-1]) + 1 - lo, HOLE, dtype=np.int64)
        fresh[indexes - lo] = pfns
        self.assign(lo, fresh)

    def pfns_at(self, indexes: PfnArray) -> PfnArray:
        """The pfns of the pages at *indexes* (ascending), HOLE for holes."""
        if not len(indexes):
            return _NONE
        lo = int(indexes[0])
        return self.lookup(lo, int(indexes[-1]) + 1 - lo)[indexes - lo]

    def assign_huge(self, chunk_no: int, base_pfn: int) -> None:
        """Make chunk *chunk_no*, which must be all holes, one huge page starting at *base_pfn*."""
        assert chunk_no not in self._chunks, "huge page over existing pages"
        self._chunks[chunk_no] = np.arange(base_pfn, base_pfn + CHUNK_PAGES, dtype=np.int64)
        self._huge = self._huge | {chunk_no}
        self.nr_pages += CHUNK_PAGES

    def remove_huge(self, chunk_no: int) -> PfnArray:
        """Undo `assign_huge`: drop huge chunk *chunk_no* and return its 512 pfns."""
        assert chunk_no in self._huge, "not a huge chunk"
        self._huge = self._huge - {chunk_no}
        self.nr_pages -= CHUNK_PAGES
        return self._chunks.pop(chunk_no)

    def is_huge(self, chunk_no: int) -> bool:
        """Return whether chunk *chunk_no* is one whole huge page."""
        return chunk_no in self._huge

    def chunk_is_empty(self, chunk_no: int) -> bool:
        """Return whether chunk *chunk_no* holds no page at all."""
        return chunk_no not in self._chunks

    def truncate(self, size_bytes: int) -> PfnArray:
        """Drop every page past a file end at *size_bytes*; return the pfns dropped.

        A folio the end cuts is split as tmpfs splits it (see folios): around the page
        holding the end; its blocks before the end stay."""
        keep_pages = -(-size_bytes >> PAGE_SHIFT)
        folios = self.folios
        if folios is not None and folios.fallocend > keep_pages:
            folios.fallocend = keep_pages  # as shmem_undo_range moves it
        dropped = [self._cut_folio(size_bytes >> PAGE_SHIFT, None, keep_pages, size_bytes)]
        first_chunk = keep_pages >> CHUNK_SHIFT
        for chunk_no in [c for c in self._chunks if c >= first_chunk]:
            chunk = self._chunks[chunk_no]
            lo = keep_pages - (chunk_no << CHUNK_SHIFT) if chunk_no == first_chunk else 0
            tail = chunk[lo:]
            dropped.append(tail[tail != HOLE].copy())
            if lo == 0 or not (chunk[:lo] != HOLE).any():
                del self._chunks[chunk_no]
            else:
                self._chunks[chunk_no] = _fitted(chunk[:lo])
            self._huge = self._huge - {chunk_no}
            if folios is not None:
                folios.clear(chunk_no, lo, CHUNK_PAGES)
        return self._dropped(dropped)

    def punch(self, start_byte: int, end_byte: int, eof_pages: int) -> PfnArray:
        """Drop the whole pages of bytes [start_byte, end_byte); return the pfns dropped.

        A folio the range cuts (the one holding its first byte, the one holding its last)
        is split first, as tmpfs splits it for a punch (see folios); its blocks that start at
        or past the end of the file (*eof_pages*, or fallocend if further) go too."""
        first, end = -(-start_byte >> PAGE_SHIFT), end_byte >> PAGE_SHIFT
        folios = self.folios
        if folios is not None and first < folios.fallocend <= end:
            folios.fallocend = first  # as shmem_undo_range moves it, before the splits
        keep_below = max(eof_pages, folios.fallocend if folios else 0)
        first_page, last_page = start_byte >> PAGE_SHIFT, (end_byte - 1) >> PAGE_SHIFT
        folio_start, order = self._folio(first_page)  # before the split, as tmpfs's same_folio
        same_folio = last_page < folio_start + (1 << order)
        dropped = [self._cut_folio(first_page, end, keep_below, start_byte)]
        if not same_folio:
            dropped.append(self._cut_folio(last_page, end, keep_below, start_byte))
        for chunk_no in [
            c for c in self._chunks if first >> CHUNK_SHIFT <= c <= (end - 1) >> CHUNK_SHIFT
        ]:
            base = chunk_no << CHUNK_SHIFT
            lo, hi = max(first - base, 0), min(end - base, CHUNK_PAGES)
            if chunk_no in self._huge:  # covered whole: one cut is split by now
                self._huge = self._huge - {chunk_no}
                dropped.append(self._chunks.pop(chunk_no))
                continue
            chunk = self._chunks[chunk_no].copy()  # a restored chunk may be a view of a stream
            part = chunk[lo:hi]
            dropped.append(part[part != HOLE].copy())
            part[:] = HOLE
            if (chunk != HOLE).any():
                self._chunks[chunk_no] = _fitted(chunk)
            else:
                del self._chunks[chunk_no]
            if folios is not None:
                folios.clear(chunk_no, lo, hi)
        return self._dropped(dropped)

    def _folio(self, index: int) -> tuple[int, int]:
        """(first index, order) of the folio holding the (held) page at *index*."""
        chunk_no = index >> CHUNK_SHIFT
        base = chunk_no << CHUNK_SHIFT
        if chunk_no in self._huge:
            return base, HUGE_ORDER
        if self.folios is None:
            return index, 0
        start, order = self.folios.folio(chunk_no, index - base)
        return base + start, order

    def _cut_folio(self, index: int, end: int | None, keep_below: int, start_byte: int) -> PfnArray:
        """Split the large folio holding page *index* if a cut of bytes from *start_byte* (up
        to page *end*, or the end of the file if None) leaves part of it, as
        truncate_inode_partial_folio does: around the page of *start_byte* (or the folio's
        first page, if the cut starts before it), then around page *end* if inside. The new
        blocks that start at or past *keep_below* go: returns their pfns."""
        if self.lookup_list(index, 1)[0] == HOLE:
            return _NONE
        start, order = self._folio(index)
        size = 1 << order
        if not order or (
            start_byte <= start << PAGE_SHIFT and (end is None or end >= start + size)
        ):
            return _NONE  # a small page, or all of the folio goes
        at = max(start_byte >> PAGE_SHIFT, start)
        after = end if end is not None and end < start + size else None
        chunk_no = start >> CHUNK_SHIFT
        base = chunk_no << CHUNK_SHIFT
        lo, hi = start - base, start - base + size
        kept = split(
            lo, order, at - base, None if after is None else after - base, keep_below - base
        )
        keep = np.ones(CHUNK_PAGES, dtype=bool)
        keep[lo:hi] = False
        for block_start, block_order in kept:
            keep[block_start : block_start + (1 << block_order)] = True
        chunk = self._chunks[chunk_no].copy()  # a huge page's, or a view of a stream
        keep = keep[: len(chunk)]
        gone = chunk[~keep]
        chunk[~keep] = HOLE
        self._huge = self._huge - {chunk_no}
        if (chunk != HOLE).any():
            self._chunks[chunk_no] = _fitted(chunk)
        else:
            del self._chunks[chunk_no]
        self._own_folios().split(chunk_no, lo, hi, kept)
        dropped: PfnArray = gone[gone != HOLE]
        return dropped

    def _dropped(self, parts: list[PfnArray]) -> PfnArray:
        """The pfns of *parts* joined, taken off the page count."""
        self._settle()
        parts = [p for p in parts if len(p)]
        if not parts:
            return _NONE
        pfns = np.concatenate(parts)
        self.nr_pages -= len(pfns)
        return pfns

    def _own_folios(self) -> Folios:
        """This file's Folios, made if it had none."""
        if self.folios is None:
            self.folios = Folios()
        return self.folios

    def _settle(self) -> None:
        """Drop the Folios record when it records nothing."""
        if self.folios is not None and self.folios.is_empty():
            self.folios = None

    def plan_folios(self, first: int, count: int) -> tuple[PfnArray, list[tuple[int, int]]]:
        """The pages tmpfs with huge=always allocates for the holes of [first, first + count)
        in chunks that hold pages (an empty chunk takes a huge page): each hole with the
        largest aligned block of holes around it, up to 1 MiB. Returns their indexes,
        ascending, and the blocks of order 1 and more as (first index, order)."""
        indexes: list[PfnArray] = []
        blocks: list[tuple[int, int]] = []
        for chunk_no, lo, hi, _ in self._spans(first, count):
            chunk = self._chunks.get(chunk_no)
            if chunk_no in self._huge:
                continue
            held = np.zeros(CHUNK_PAGES, dtype=bool)
            if chunk is not None:
                held[: len(chunk)] = chunk != HOLE
            most = HUGE_ORDER - 1  # an empty chunk comes here only if no huge page was free
            base = chunk_no << CHUNK_SHIFT
            page = lo
            while page < hi:
                if held[page]:
                    holes = np.flatnonzero(~held[page:hi])
                    if not holes.size:
                        break
                    page += int(holes[0])
                    continue
                order = largest_hole_block(held, page, most)
                start = page >> order << order
                held[start : start + (1 << order)] = True
                indexes.append(np.arange(base + start, base + start + (1 << order)))
                if order:
                    blocks.append((base + start, order))
                page = start + (1 << order)
        joined = np.concatenate(indexes).astype(np.int64) if indexes else _NONE
        return joined, blocks

    def record_blocks(self, blocks: list[tuple[int, int]]) -> None:
        """Record *blocks* (first index, order 1 to 8; pages now held) as large folios."""
        if blocks:
            self._own_folios().add_large(blocks)

    def mark_unwritten(self, indexes: PfnArray) -> None:
        """Mark the pages at *indexes* (ascending, held) unwritten: fallocate allocated them."""
        if len(indexes):
            self._own_folios().add_unwritten(indexes)

    def note_fallocated(self, end_index: int) -> None:
        """Fallocate reached page *end_index* (tmpfs's fallocend only grows with it)."""
        folios = self._own_folios()
        folios.fallocend = max(folios.fallocend, end_index)

    def mark_written(self, first_index: int, count: int) -> None:
        """A store reached pages [first_index, first_index + count): their folios are written
        now, whole."""
        folios = self.folios
        if folios is None or not folios.unwritten:
            return
        for chunk_no, lo, hi, _ in self._spans(first_index, count):
            if chunk_no in folios.unwritten:
                if chunk_no in self._huge:
                    folios.clear_unwritten(chunk_no)
                else:
                    folios.written(chunk_no, lo, hi)
        self._settle()

    def _data_mask(self, chunk_no: int, lo: int) -> BoolArray:
        """Which entries of chunk *chunk_no* from *lo* on are data: held and written."""
        chunk = self._chunks[chunk_no]
        data: BoolArray = chunk[lo:] != HOLE
        if self.folios is not None and chunk_no in self.folios.unwritten:
            data &= ~self.folios.unwritten[chunk_no][lo : len(chunk)]
        return data

    def next_data(self, index: int) -> int | None:
        """The first page index from *index* on that holds a written page, or None."""
        first = index >> CHUNK_SHIFT
        for chunk_no in sorted(c for c in self._chunks if c >= first):
            lo = index - (chunk_no << CHUNK_SHIFT) if chunk_no == first else 0
            present = np.flatnonzero(self._data_mask(chunk_no, lo))
            if present.size:
                return (chunk_no << CHUNK_SHIFT) + lo + int(present[0])
        return None

    def next_hole(self, index: int) -> int:
        """The first page index from *index* on that holds no page or an unwritten one (past
        the last page, one does)."""
        chunk_no = index >> CHUNK_SHIFT
        lo = index & CHUNK_MASK
        while (chunk := self._chunks.get(chunk_no)) is not None:
            holes = np.flatnonzero(~self._data_mask(chunk_no, lo))
            if holes.size or len(chunk) < CHUNK_PAGES:  # entries past a chunk's end are holes
                at = lo + int(holes[0]) if holes.size else max(lo, len(chunk))
                return (chunk_no << CHUNK_SHIFT) + at
            chunk_no, lo = chunk_no + 1, 0
        return (chunk_no << CHUNK_SHIFT) + lo

    def entries(self) -> tuple[np.ndarray, PfnArray]:
        """Return (file page indexes, pfns) of every present page, in index order."""
        order = sorted(self._chunks)
        pfns, index, _ = _present(
            [self._chunks[c] for c in order], np.asarray(order, dtype=np.int64) << CHUNK_SHIFT
        )
        return index, pfns

    def chunks(self) -> list[tuple[int, PfnArray, bool]]:
        """Return (chunk number, its pfns, whether it is one huge page), by chunk number; a
        chunk's pfns run to its last page (holes after it are not there)."""
        return [(c, self._chunks[c], c in self._huge) for c in sorted(self._chunks)]

    @classmethod
    def from_entries(cls, pfns: PfnArray, orders: PfnArray, indexes: PfnArray) -> "FilePages":
        """The index of a file from its page-stream entries (checked: ascending, apart, a huge
        one 512-aligned).

        Leading entries that are whole chunks of small pages (a big file written in order)
        become rows of *pfns* itself, not copies: the restored stream they come from is no
        longer read for this file, and a full chunk is only ever replaced, never filled."""
        pages = cls()
        taken = pages._take_full_chunks(pfns, orders, indexes)
        pfns, orders, indexes = pfns[taken:], orders[taken:], indexes[taken:]
        huge = orders == HUGE_ORDER
        if huge.any():  # each alone in its chunk (entries do not overlap): made at once
            huge_nos = (indexes[huge] >> CHUNK_SHIFT).tolist()
            rows = np.add.outer(pfns[huge], _CHUNK_OFFSETS)
            pages._chunks.update(zip(huge_nos, rows, strict=True))
            pages._huge = set(huge_nos)
            pages.nr_pages += CHUNK_PAGES * len(huge_nos)
            pfns, indexes = pfns[~huge], indexes[~huge]
        if not len(pfns):
            return pages
        chunk_nos = indexes >> CHUNK_SHIFT
        starts = np.flatnonzero(np.diff(chunk_nos, prepend=-1))
        ends = np.append(starts[1:], len(pfns))
        for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
            chunk_no = int(chunk_nos[lo])
            offsets = indexes[lo:hi] & CHUNK_MASK
            chunk = pages._chunk_to(chunk_no, int(offsets[-1]) + 1)
            chunk[offsets] = pfns[lo:hi]
            pages.nr_pages += hi - lo
        return pages

    def _take_full_chunks(self, pfns: PfnArray, orders: PfnArray, indexes: PfnArray) -> int:
        """Take each leading block of 512 entries that is one whole chunk of small pages as a
        row of *pfns*; return how many entries that was (all whole blocks, or none)."""
        blocks = len(pfns) // CHUNK_PAGES
        whole = blocks * CHUNK_PAGES
        if not blocks or orders[:whole].any():
            return 0
        firsts = indexes[:whole:CHUNK_PAGES]
        lasts = indexes[CHUNK_PAGES - 1 : whole : CHUNK_PAGES]
        if (firsts & CHUNK_MASK).any() or (lasts - firsts != CHUNK_MASK).any():
            return 0  # ascending and apart: 512 entries spanning 512 indexes are all of them
        rows = pfns[:whole].reshape(blocks, CHUNK_PAGES)
        self._chunks.update(zip((firsts >> CHUNK_SHIFT).tolist(), rows, strict=True))
        self.nr_pages += whole
        return whole

    def replace_pages(self, indexes: PfnArray, new_pfns: PfnArray) -> None:
        """Point the (small, present) pages at *indexes* to *new_pfns* (after a copy)."""
        for index, pfn in zip(indexes.tolist(), new_pfns.tolist(), strict=True):
            chunk = self._chunks[index >> CHUNK_SHIFT]
            assert chunk[index & CHUNK_MASK] != HOLE, "replacing a hole"
            chunk[index & CHUNK_MASK] = pfn

    def replace_huge(self, chunk_no: int, new_base: int) -> None:
        """Point huge chunk *chunk_no* to the 2 MiB run at *new_base* (after a copy)."""
        assert chunk_no in self._huge, "not a huge chunk"
        self._chunks[chunk_no] = np.arange(new_base, new_base + CHUNK_PAGES, dtype=np.int64)

    def huge_chunks(self) -> list[int]:
        """Return the chunk numbers that are whole huge pages, sorted."""
        return sorted(self._huge)

    def all_pfns(self) -> PfnArray:
        """Return every pfn this file owns."""
        return self.entries()[1]

    def _chunk_to(self, chunk_no: int, length: int) -> PfnArray:
        """Chunk *chunk_no*, made or grown to hold at least *length* entries."""
        chunk = self._chunks.get(chunk_no)
        if chunk is not None and len(chunk) >= length:
            return chunk
        grown = np.full(_capacity(length), HOLE, dtype=np.int64)
        if chunk is not None:
            grown[: len(chunk)] = chunk
        self._chunks[chunk_no] = grown
        return grown

    def _spans(self, first_index: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (chunk number, lo, hi within chunk, offset in the request) for a page range."""
        index = first_index
        end = first_index + count
        while index < end:
            chunk_no = index >> CHUNK_SHIFT
            lo = index & CHUNK_MASK
            hi = min(CHUNK_PAGES, lo + end - index)
            yield chunk_no, lo, hi, index - first_index
            index += hi - lo


def _capacity(length: int) -> int:
    """The entries a chunk holding *length* is made with: a power of two, 4 to 512."""
    return min(CHUNK_PAGES, max(MIN_CHUNK_ENTRIES, 1 << (length - 1).bit_length()))


def _fitted(pfns: PfnArray) -> PfnArray:
    """A copy of the chunk *pfns* cut after its last page, at a capacity `_chunk_to` uses."""
    length = int(np.flatnonzero(pfns != HOLE)[-1]) + 1
    fitted = np.full(_capacity(length), HOLE, dtype=np.int64)
    fitted[:length] = pfns[:length]
    return fitted


_CHUNKS = attrgetter("_chunks")
_FIRST = itemgetter(0)
_HUGE = attrgetter("_huge")


def page_entries(files: list[FilePages]) -> tuple[PfnArray, PfnArray, PfnArray, PfnArray]:
    """Return the page-stream entries of *files* in order (pfns, orders, file indexes) and
    how many belong to each file.

    Chunks of small pages are concatenated and masked at once; a huge chunk is one entry (its
    first pfn, order 9). The files' chunks are gathered by C loops (map, chain), not Python
    code per file: a tree of many small files costs little more than one of few big ones.
    """
    chunk_maps: list[dict[int, PfnArray]] = list(map(_CHUNKS, files))
    per_file = np.fromiter(map(len, chunk_maps), np.int64, count=len(files))
    n_chunks = int(per_file.sum())
    if not n_chunks:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty, np.zeros(len(files), dtype=np.int64)
    chunk_nos = np.fromiter(chain.from_iterable(chunk_maps), np.int64, count=n_chunks)
    arrays: list[PfnArray] = list(chain.from_iterable(map(dict.values, chunk_maps)))
    owners = np.repeat(np.arange(len(files)), per_file)
    huge = np.zeros(n_chunks, dtype=bool)
    first_row = np.cumsum(per_file) - per_file
    for file_no, huge_set in enumerate(map(_HUGE, files)):
        if huge_set:  # files with huge pages are few
            rows = range(int(first_row[file_no]), int(first_row[file_no] + per_file[file_no]))
            huge[list(rows)] = np.isin(chunk_nos[rows.start : rows.stop], list(huge_set))
    if (np.diff(chunk_nos)[owners[1:] == owners[:-1]] < 0).any():  # written out of order
        order = np.lexsort((chunk_nos, owners))
        chunk_nos, owners, huge = chunk_nos[order], owners[order], huge[order]
        arrays = [arrays[i] for i in order.tolist()]
    bases = chunk_nos << CHUNK_SHIFT
    small_rows = np.flatnonzero(~huge).tolist()
    small_arrays = arrays if len(small_rows) == n_chunks else [arrays[i] for i in small_rows]
    small_pfns, small_index, small_counts = _present(small_arrays, bases[~huge])
    per_chunk = np.ones(n_chunks, dtype=np.int64)
    per_chunk[~huge] = small_counts
    if not huge.any():
        pfns, indexes = small_pfns, small_index
        orders = small_orders(len(pfns))
    else:  # interleave: each chunk's entries go where its count says
        huge_rows = np.flatnonzero(huge)
        begin = np.cumsum(per_chunk) - per_chunk
        pfns = np.empty(int(per_chunk.sum()), dtype=np.int64)
        indexes = np.empty_like(pfns)
        orders = np.zeros_like(pfns)
        firsts = map(_FIRST, map(arrays.__getitem__, huge_rows.tolist()))
        pfns[begin[huge]] = np.fromiter(firsts, np.int64, count=len(huge_rows))
        indexes[begin[huge]], orders[begin[huge]] = bases[huge], HUGE_ORDER
        small_at = np.repeat(begin[~huge], small_counts)
        small_at += np.arange(len(small_pfns)) - np.repeat(
            np.cumsum(small_counts) - small_counts, small_counts
        )
        pfns[small_at], indexes[small_at] = small_pfns, small_index
    counts = np.bincount(owners, weights=per_chunk, minlength=len(files))
    return pfns, orders, indexes, counts.astype(np.int64)


def small_orders(count: int) -> PfnArray:
    """The orders of *count* entries of small pages (all 0), as one read-only zero seen *count*
    times: reading it touches no memory (fresh zeros cost a page fault per 4 KiB read, ~1 ms
    per 4 MiB where this was measured) and a write to it fails."""
    return np.broadcast_to(np.int64(0), (count,))


def _present(arrays: list[PfnArray], bases: PfnArray) -> tuple[PfnArray, PfnArray, PfnArray]:
    """The present pages of chunks of small pages (*arrays*, each of any length up to 512,
    starting at file index *bases*): (pfns, file indexes, count per chunk)."""
    if not arrays:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays)
    if (lengths == CHUNK_PAGES).all() and int(flat.min()) != HOLE:  # full chunks: a big file
        index = np.add.outer(bases, _CHUNK_OFFSETS).reshape(-1)  # no mask, no temporaries
        return flat, index, lengths
    starts = np.cumsum(lengths) - lengths
    present = flat != HOLE
    index = np.repeat(bases - starts, lengths) + np.arange(len(flat), dtype=np.int64)
    chunk_of = np.repeat(np.arange(len(arrays)), lengths)
    counts = np.bincount(chunk_of[present], minlength=len(arrays)).astype(np.int64)
    return flat[present], index[present], counts
