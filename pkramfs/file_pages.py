"""The page index of one regular file: which pfn holds each 4 KiB page of the file.

A file's pages are kept in chunks of 512 entries (one 2 MiB huge page's worth), so a sparse file
costs nothing for its holes, whatever its size: a chunk exists only where a page was written.
A chunk is an int64 array of pfns, ``HOLE`` (-1) where no page is allocated. A chunk may be one
huge page (order 9): its 512 pfns are then consecutive from a 512-aligned base.
"""

from collections.abc import Iterator

import numpy as np

from kexec_sim.pages import HUGE_ORDER, HUGE_PAGES, PfnArray

HOLE = -1
CHUNK_SHIFT = HUGE_ORDER
CHUNK_PAGES = HUGE_PAGES
CHUNK_MASK = CHUNK_PAGES - 1


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
