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
import numpy.typing as npt

from kexec_sim import HUGE_ORDER, HUGE_PAGES, PAGE_SHIFT, PfnArray

BoolArray = npt.NDArray[np.bool_]

HOLE = -1
CHUNK_SHIFT = HUGE_ORDER
CHUNK_PAGES = HUGE_PAGES
CHUNK_MASK = CHUNK_PAGES - 1
MIN_CHUNK_ENTRIES = 4
_NO_HUGE: frozenset[int] = frozenset()
_CHUNK_OFFSETS = np.arange(CHUNK_PAGES, dtype=np.int64)


class Fallocated:
    """What fallocate(2) left on a file: its unwritten pages (a mask per chunk that has any)
    and ``end``, the page index fallocate reached (tmpfs's fallocend: a huge page split keeps
    its pages up to there, even past the end of the file)."""

    __slots__ = ("end", "unwritten")

    def __init__(self) -> None:
        self.unwritten: dict[int, BoolArray] = {}
        self.end = 0

    def add(self, indexes: PfnArray) -> None:
        """Mark the pages at *indexes* (ascending) unwritten."""
        chunk_nos = indexes >> CHUNK_SHIFT
        starts = np.flatnonzero(np.diff(chunk_nos, prepend=-1))
        for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(indexes)], strict=True):
            chunk_no = int(chunk_nos[lo])
            mask = self.unwritten.setdefault(chunk_no, np.zeros(CHUNK_PAGES, dtype=bool))
            mask[indexes[lo:hi] & CHUNK_MASK] = True

    def indexes(self) -> PfnArray:
        """The indexes of the unwritten pages, ascending."""
        found = [
            np.flatnonzero(self.unwritten[c]) + (c << CHUNK_SHIFT) for c in sorted(self.unwritten)
        ]
        return np.concatenate(found).astype(np.int64) if found else np.empty(0, dtype=np.int64)


class FilePages:
    """Map file page index -> pfn for one file, sparse, in chunks of up to 512 entries."""

    __slots__ = ("_chunks", "_huge", "fallocated", "nr_pages")

    def __init__(self) -> None:
        self._chunks: dict[int, PfnArray] = {}
        self._huge: set[int] | frozenset[int] = _NO_HUGE  # chunks that are one huge page
        self.nr_pages = 0  # pages owned (excluding holes)
        self.fallocated: Fallocated | None = None  # None: nothing fallocated since made

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

    def truncate(self, nr_index_pages: int) -> PfnArray:
        """Drop every page at index >= *nr_index_pages*; return the pfns that were dropped."""
        dropped: list[PfnArray] = []
        first_chunk = nr_index_pages >> CHUNK_SHIFT
        for chunk_no in [c for c in self._chunks if c >= first_chunk]:
            chunk = self._chunks[chunk_no]
            lo = nr_index_pages - (chunk_no << CHUNK_SHIFT) if chunk_no == first_chunk else 0
            tail = chunk[lo:]
            present = tail[tail != HOLE]
            dropped.append(present.copy())
            if lo == 0 or not (chunk[:lo] != HOLE).any():
                del self._chunks[chunk_no]
            else:
                self._chunks[chunk_no] = _fitted(chunk[:lo])
            self._huge = self._huge - {chunk_no}  # a cut huge page becomes small pages
        self._forget_range(nr_index_pages, None)
        if not dropped:
            return np.empty(0, dtype=np.int64)
        pfns = np.concatenate(dropped)
        self.nr_pages -= len(pfns)
        return pfns

    def punch(self, start_byte: int, end_byte: int, eof_pages: int) -> PfnArray:
        """Drop the whole pages of bytes [start_byte, end_byte); return the pfns dropped.

        A huge page the range covers in part is split first, as Linux 6.18 splits a folio
        for a punch (truncate_inode_partial_folio): into buddy blocks around the page of the
        range's first byte, then around the page of the first byte after it. A block that
        starts at or past the end of the file (*eof_pages*, or fallocend if further) goes too.
        """
        first, end = -(-start_byte >> PAGE_SHIFT), end_byte >> PAGE_SHIFT
        self._forget_range(first, end)  # first: a split keeps pages up to the new fallocend
        keep_below = max(eof_pages, self.fallocated.end if self.fallocated else 0)
        dropped: list[PfnArray] = []
        last_byte_chunk = (end_byte - 1) >> (PAGE_SHIFT + CHUNK_SHIFT)
        for chunk_no in sorted({start_byte >> (PAGE_SHIFT + CHUNK_SHIFT), last_byte_chunk}):
            chunk_byte = chunk_no << (PAGE_SHIFT + CHUNK_SHIFT)
            chunk_end = chunk_byte + (CHUNK_PAGES << PAGE_SHIFT)
            if chunk_no in self._huge and not (start_byte <= chunk_byte and end_byte >= chunk_end):
                at = max(start_byte - chunk_byte, 0) >> PAGE_SHIFT
                after = (end_byte - chunk_byte) >> PAGE_SHIFT if end_byte < chunk_end else None
                keep = _kept_after_split(at, after, keep_below - (chunk_no << CHUNK_SHIFT))
                dropped.append(self._split_huge(chunk_no, keep))
        for chunk_no in [
            c for c in self._chunks if first >> CHUNK_SHIFT <= c <= (end - 1) >> CHUNK_SHIFT
        ]:
            base = chunk_no << CHUNK_SHIFT
            chunk = self._chunks[chunk_no].copy()  # a restored chunk may be a view of a stream
            lo, hi = max(first - base, 0), min(end - base, CHUNK_PAGES)
            if chunk_no in self._huge:  # covered whole: split ones are small pages by now
                dropped.append(self.remove_huge(chunk_no))
                continue
            part = chunk[lo:hi]
            present = part[part != HOLE]
            if not present.size:
                continue
            dropped.append(present.copy())
            self.nr_pages -= len(present)
            part[:] = HOLE
            if (chunk != HOLE).any():
                self._chunks[chunk_no] = _fitted(chunk)
            else:
                del self._chunks[chunk_no]
        return np.concatenate(dropped) if dropped else np.empty(0, dtype=np.int64)

    def _split_huge(self, chunk_no: int, keep: BoolArray) -> PfnArray:
        """Make huge chunk *chunk_no* small pages, keeping those *keep* says; return the rest."""
        self._huge = self._huge - {chunk_no}
        chunk = self._chunks[chunk_no].copy()
        self._chunks[chunk_no] = chunk
        gone = chunk[~keep].copy()
        if gone.size:
            chunk[~keep] = HOLE
            self._chunks[chunk_no] = _fitted(chunk)
            self.nr_pages -= len(gone)
            if self.fallocated and chunk_no in self.fallocated.unwritten:
                self.fallocated.unwritten[chunk_no] &= keep
        return gone

    def _forget_range(self, first: int, end: int | None) -> None:
        """Bookkeeping for pages [first, end) going (None: to the end of the file): their
        unwritten marks go, and fallocend moves back to *first* if it was inside, as
        shmem_undo_range moves it."""
        falloc = self.fallocated
        if falloc is None:
            return
        if falloc.end > first and (end is None or falloc.end <= end):
            falloc.end = first
        for chunk_no, mask in list(falloc.unwritten.items()):
            base = chunk_no << CHUNK_SHIFT
            mask[max(first - base, 0) : CHUNK_PAGES if end is None else max(end - base, 0)] = False
        self._settle()

    def _settle(self) -> None:
        """Drop chunks' empty unwritten masks, and the record when nothing is left in it."""
        falloc = self.fallocated
        if falloc is None:
            return
        for chunk_no in [c for c, mask in falloc.unwritten.items() if not mask.any()]:
            del falloc.unwritten[chunk_no]
        if not falloc.unwritten and not falloc.end:
            self.fallocated = None

    def mark_unwritten(self, indexes: PfnArray) -> None:
        """Mark the pages at *indexes* (ascending, held) unwritten: fallocate allocated them."""
        if not len(indexes):
            return
        if self.fallocated is None:
            self.fallocated = Fallocated()
        self.fallocated.add(indexes)

    def note_fallocated(self, end_index: int) -> None:
        """Fallocate reached page *end_index* (tmpfs's fallocend only grows with it)."""
        if self.fallocated is None:
            self.fallocated = Fallocated()
        self.fallocated.end = max(self.fallocated.end, end_index)

    def mark_written(self, first_index: int, count: int) -> None:
        """A store reached pages [first_index, first_index + count): they are written now, and
        so is the whole of a huge page among them."""
        falloc = self.fallocated
        if falloc is None or not falloc.unwritten:
            return
        for chunk_no, lo, hi, _ in self._spans(first_index, count):
            mask = falloc.unwritten.get(chunk_no)
            if mask is not None:
                if chunk_no in self._huge:
                    mask[:] = False  # a folio is uptodate whole
                else:
                    mask[lo:hi] = False
        self._settle()

    def _data_mask(self, chunk_no: int, lo: int) -> BoolArray:
        """Which entries of chunk *chunk_no* from *lo* on are data: held and written."""
        chunk = self._chunks[chunk_no]
        data: BoolArray = chunk[lo:] != HOLE
        if self.fallocated is not None and chunk_no in self.fallocated.unwritten:
            data &= ~self.fallocated.unwritten[chunk_no][lo : len(chunk)]
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


def _kept_after_split(at: int, after: int | None, keep_below: int) -> BoolArray:
    """Which of a huge page's 512 pages a split for a punch keeps: Linux splits the folio
    around page *at* into buddy blocks (*at* alone, and one block of each order below 9
    beside it), then the block holding page *after* (if any) around it; every new block but
    the one at the split folio's start goes if it starts at or past page *keep_below*."""
    keep = np.ones(CHUNK_PAGES, dtype=bool)
    blocks = _buddy_blocks(at, 0, HUGE_ORDER)
    for start, order in blocks[1:]:
        if start >= keep_below and start != 0:
            keep[start : start + (1 << order)] = False
    if after is not None and keep[after]:
        start, order = next((s, o) for s, o in blocks if s <= after < s + (1 << o))
        for sub, sub_order in _buddy_blocks(after, start, order):
            if sub >= keep_below and sub != start:
                keep[sub : sub + (1 << sub_order)] = False
    return keep


def _buddy_blocks(at: int, start: int, order: int) -> list[tuple[int, int]]:
    """The blocks (first page, order) a non-uniform split of the 2**order pages from *start*
    around page *at* makes: *at* alone, and beside it one block of each smaller order."""
    return [(at, 0), *[(((((at - start) >> k) ^ 1) << k) + start, k) for k in range(order)]]


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
