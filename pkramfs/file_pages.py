"""The page index of one regular file: which pfn holds each 4 KiB page of the file.

A file's pages are kept in chunks of 512 entries (one 2 MiB huge page's worth), so a sparse file
costs nothing for its holes, whatever its size: a chunk exists only where a page was written.
A chunk is an int64 array of pfns, ``HOLE`` (-1) where no page is allocated. A chunk may be one
huge page (order 9): its 512 pfns are then consecutive from a 512-aligned base.
"""

from collections.abc import Iterator

import numpy as np

from kexec_sim import HUGE_ORDER, HUGE_PAGES, PfnArray

HOLE = -1
CHUNK_SHIFT = HUGE_ORDER
CHUNK_PAGES = HUGE_PAGES
CHUNK_MASK = CHUNK_PAGES - 1
_BATCH_CHUNKS = 4096  # chunks stacked at once by page_entries (16 MiB)


class FilePages:
    """Map file page index -> pfn for one file, sparse, in 512-entry chunks."""

    __slots__ = ("_chunks", "_huge", "nr_pages")

    def __init__(self) -> None:
        self._chunks: dict[int, PfnArray] = {}
        self._huge: set[int] = set()  # chunk numbers that are one whole huge page
        self.nr_pages = 0  # pages owned (excluding holes)

    def lookup(self, first_index: int, count: int) -> PfnArray:
        """Return the pfns of pages [first_index, first_index+count), HOLE for holes."""
        out = np.full(count, HOLE, dtype=np.int64)
        for chunk_no, lo, hi, out_lo in self._spans(first_index, count):
            chunk = self._chunks.get(chunk_no)
            if chunk is not None:
                out[out_lo : out_lo + hi - lo] = chunk[lo:hi]
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
        return pfns

    def set_page(self, index: int, pfn: int) -> None:
        """Record *pfn* for the hole at page *index* (one page of `assign`)."""
        chunk_no = index >> CHUNK_SHIFT
        chunk = self._chunks.get(chunk_no)
        if chunk is None:
            chunk = self._chunks[chunk_no] = np.full(CHUNK_PAGES, HOLE, dtype=np.int64)
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
            chunk = self._chunks.get(chunk_no)
            if chunk is None:
                chunk = self._chunks[chunk_no] = np.full(CHUNK_PAGES, HOLE, dtype=np.int64)
            target = chunk[lo:hi]
            assert not (target[fill] != HOLE).any(), "page assigned twice"
            target[fill] = part[fill]
            self.nr_pages += int(np.count_nonzero(fill))

    def assign_huge(self, chunk_no: int, base_pfn: int) -> None:
        """Make chunk *chunk_no*, which must be all holes, one huge page starting at *base_pfn*."""
        assert chunk_no not in self._chunks, "huge page over existing pages"
        self._chunks[chunk_no] = np.arange(base_pfn, base_pfn + CHUNK_PAGES, dtype=np.int64)
        self._huge.add(chunk_no)
        self.nr_pages += CHUNK_PAGES

    def remove_huge(self, chunk_no: int) -> PfnArray:
        """Undo `assign_huge`: drop huge chunk *chunk_no* and return its 512 pfns."""
        assert chunk_no in self._huge, "not a huge chunk"
        self._huge.discard(chunk_no)
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
            if lo == 0:
                del self._chunks[chunk_no]
            else:
                tail[:] = HOLE
            self._huge.discard(chunk_no)  # a cut huge page becomes small pages
        if not dropped:
            return np.empty(0, dtype=np.int64)
        pfns = np.concatenate(dropped)
        self.nr_pages -= len(pfns)
        return pfns

    def entries(self) -> tuple[np.ndarray, PfnArray]:
        """Return (file page indexes, pfns) of every present page, in index order."""
        if not self._chunks:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        order = sorted(self._chunks)
        stacked = np.stack([self._chunks[c] for c in order])
        index = (np.asarray(order, dtype=np.int64)[:, None] << CHUNK_SHIFT) + np.arange(
            CHUNK_PAGES, dtype=np.int64
        )
        present = stacked != HOLE
        return index[present], stacked[present]

    def chunks(self) -> list[tuple[int, PfnArray, bool]]:
        """Return (chunk number, its 512 pfns, whether it is one huge page), by chunk number."""
        return [(c, self._chunks[c], c in self._huge) for c in sorted(self._chunks)]

    def adopt_chunk(self, chunk_no: int, pfns: PfnArray, huge: bool, n_pages: int) -> None:
        """Install a whole chunk rebuilt from a preserved node (*n_pages* present in it)."""
        assert chunk_no not in self._chunks, "chunk adopted twice"
        self._chunks[chunk_no] = pfns
        if huge:
            self._huge.add(chunk_no)
        self.nr_pages += n_pages

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


def page_entries(files: list[FilePages]) -> tuple[PfnArray, PfnArray, PfnArray, PfnArray]:
    """Return the page-stream entries of *files* in order (pfns, orders, file indexes) and
    how many belong to each file.

    Chunks of small pages are stacked and masked in batches; a huge chunk is one entry (its
    first pfn, order 9) and is never stacked.
    """
    arrays: list[PfnArray] = []
    chunk_nos: list[int] = []
    huge_pfns: list[int] = []  # first pfn of each huge chunk, -1 for small ones
    owners: list[int] = []
    for file_no, pages in enumerate(files):
        for chunk_no, chunk, is_huge in pages.chunks():
            if is_huge:
                huge_pfns.append(int(chunk[0]))
            else:
                arrays.append(chunk)
                huge_pfns.append(-1)
            chunk_nos.append(chunk_no)
            owners.append(file_no)
    if not chunk_nos:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty, np.zeros(len(files), dtype=np.int64)
    first_pfn = np.array(huge_pfns, dtype=np.int64)
    huge = first_pfn >= 0
    bases = np.array(chunk_nos, dtype=np.int64) << CHUNK_SHIFT
    small_pfns, small_index, small_counts = _small_entries(arrays, bases[~huge])
    per_chunk = np.ones(len(chunk_nos), dtype=np.int64)
    per_chunk[~huge] = small_counts
    if not huge.any():
        pfns, indexes = small_pfns, small_index
        orders = np.zeros(len(pfns), dtype=np.int64)
    else:  # interleave: each chunk's entries go where its count says
        begin = np.cumsum(per_chunk) - per_chunk
        pfns = np.empty(int(per_chunk.sum()), dtype=np.int64)
        indexes = np.empty_like(pfns)
        orders = np.zeros_like(pfns)
        pfns[begin[huge]], indexes[begin[huge]], orders[begin[huge]] = (
            first_pfn[huge],
            bases[huge],
            HUGE_ORDER,
        )
        small_at = np.repeat(begin[~huge], small_counts)
        small_at += np.arange(len(small_pfns)) - np.repeat(
            np.cumsum(small_counts) - small_counts, small_counts
        )
        pfns[small_at], indexes[small_at] = small_pfns, small_index
    counts = np.bincount(owners, weights=per_chunk, minlength=len(files))
    return pfns, orders, indexes, counts.astype(np.int64)


def _small_entries(arrays: list[PfnArray], bases: PfnArray) -> tuple[PfnArray, PfnArray, PfnArray]:
    """The present pages of chunks of small pages: (pfns, file indexes, count per chunk)."""
    parts: list[tuple[PfnArray, PfnArray]] = []
    counts: list[PfnArray] = []
    span = np.arange(CHUNK_PAGES, dtype=np.int64)
    for lo in range(0, len(arrays), _BATCH_CHUNKS):
        hi = min(lo + _BATCH_CHUNKS, len(arrays))
        stacked = np.stack(arrays[lo:hi])
        present = stacked != HOLE
        if present.all():  # dense: no masking at all
            parts.append((stacked.reshape(-1), (bases[lo:hi, None] + span).reshape(-1)))
            counts.append(np.full(hi - lo, CHUNK_PAGES, dtype=np.int64))
            continue
        where = np.flatnonzero(present.reshape(-1))
        parts.append(
            (stacked.reshape(-1)[where], bases[lo:hi][where >> CHUNK_SHIFT] + (where & CHUNK_MASK))
        )
        counts.append(present.sum(axis=1))
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    if len(parts) == 1:
        return parts[0][0], parts[0][1], counts[0]
    pfns, indexes = (np.concatenate(column) for column in zip(*parts, strict=True))
    return pfns, indexes, np.concatenate(counts)
