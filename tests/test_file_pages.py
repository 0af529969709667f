"""The sparse page index of a file (pure)."""

import numpy as np

from kexec_sim import PAGE_SIZE
from pkramfs.file_pages import CHUNK_PAGES, HOLE, MIN_CHUNK_ENTRIES, FilePages, page_entries


def test_sparse_file_costs_nothing_for_holes() -> None:
    pages = FilePages()
    far = 999_999_999_999_999 // 4096
    pages.assign(far, np.array([7], dtype=np.int64))
    assert pages.nr_pages == 1
    assert pages.lookup(far - 1, 3).tolist() == [HOLE, 7, HOLE]
    index, pfns = pages.entries()
    assert index.tolist() == [far] and pfns.tolist() == [7]


def test_assign_across_chunks_and_truncate() -> None:
    pages = FilePages()
    pfns = np.arange(1000, 1000 + 600, dtype=np.int64)
    pages.assign(500, pfns)
    assert pages.nr_pages == 600
    assert (pages.lookup(500, 600) == pfns).all()
    dropped = pages.truncate(700 * PAGE_SIZE)
    assert sorted(dropped.tolist()) == list(range(1200, 1600))
    assert pages.nr_pages == 200
    assert (pages.lookup(700, 10) == HOLE).all()


def test_huge_chunk_is_split_by_truncate() -> None:
    pages = FilePages()
    pages.assign_huge(1, 512 * 3)
    assert pages.is_huge(1)
    assert pages.lookup(CHUNK_PAGES, 2).tolist() == [1536, 1537]
    dropped = pages.truncate((CHUNK_PAGES + 10) * PAGE_SIZE)
    assert len(dropped) == CHUNK_PAGES - 10
    assert not pages.is_huge(1)
    assert pages.nr_pages == 10


def test_holes_in_assign_leave_pages_alone() -> None:
    pages = FilePages()
    pages.assign(0, np.array([5, HOLE, 6], dtype=np.int64))
    assert pages.lookup(0, 3).tolist() == [5, HOLE, 6]
    pages.assign(0, np.array([HOLE, 9, HOLE], dtype=np.int64))
    assert pages.lookup(0, 3).tolist() == [5, 9, 6]
    assert pages.nr_pages == 3


def test_a_chunk_holds_only_up_to_its_last_page() -> None:
    pages = FilePages()
    pages.set_page(0, 42)
    [(_, chunk, _)] = pages.chunks()
    assert chunk.size == MIN_CHUNK_ENTRIES  # a one-page file costs a few words, not 4 KiB
    pages.assign(100, np.array([43, 44], dtype=np.int64))
    [(_, chunk, _)] = pages.chunks()
    assert chunk.size == 128
    assert pages.lookup(99, 4).tolist() == [HOLE, 43, 44, HOLE]
    assert pages.lookup_list(100, 200) == [43, 44] + [HOLE] * 198
    assert pages.lookup_list(400, 3) == [HOLE] * 3  # past the chunk's end: holes
    dropped = pages.truncate(50 * PAGE_SIZE)
    assert sorted(dropped.tolist()) == [43, 44]
    [(_, chunk, _)] = pages.chunks()
    assert chunk.size == MIN_CHUNK_ENTRIES and pages.lookup(0, 2).tolist() == [42, HOLE]


def test_page_entries_match_every_files_own_entries() -> None:
    rng = np.random.default_rng(7)
    files = []
    next_pfn = 10_000
    for file_no in range(200):
        pages = FilePages()
        for chunk_no in rng.choice(6, size=int(rng.integers(0, 4)), replace=False).tolist():
            if rng.random() < 0.2:
                pages.assign_huge(chunk_no, CHUNK_PAGES * (100 + 8 * file_no + chunk_no))
                continue
            where = rng.choice(CHUNK_PAGES, size=int(rng.integers(1, 40)), replace=False)
            for index in where.tolist():
                pages.set_page(chunk_no * CHUNK_PAGES + index, next_pfn)
                next_pfn += 1
        files.append(pages)
    pfns, orders, indexes, counts = page_entries(files)
    at = 0
    for pages, count in zip(files, counts.tolist(), strict=True):
        got = zip(
            indexes[at : at + count], pfns[at : at + count], orders[at : at + count], strict=True
        )
        small_index, small_pfns = pages.entries()
        expected = []
        for chunk_no, chunk, huge in pages.chunks():
            if huge:
                expected.append((chunk_no * CHUNK_PAGES, int(chunk[0]), 9))
            else:
                mine = small_index // CHUNK_PAGES == chunk_no
                expected += [
                    (int(i), int(p), 0)
                    for i, p in zip(small_index[mine], small_pfns[mine], strict=True)
                ]
        assert [tuple(map(int, entry)) for entry in got] == expected
        at += count
    assert at == len(pfns)


def test_from_entries_rebuilds_an_index() -> None:
    assert FilePages.from_entries(*(np.empty(0, dtype=np.int64),) * 3).nr_pages == 0
    pages = FilePages()
    pages.assign(3, np.array([900, HOLE, 950], dtype=np.int64))
    pages.assign_huge(2, CHUNK_PAGES * 7)
    pages.set_page(3 * CHUNK_PAGES + 100, 77)
    pfns, orders, indexes, _ = page_entries([pages])
    again = FilePages.from_entries(pfns, orders, indexes)
    assert again.nr_pages == pages.nr_pages == 2 + CHUNK_PAGES + 1
    assert again.huge_chunks() == [2]
    assert (again.lookup(0, 4 * CHUNK_PAGES) == pages.lookup(0, 4 * CHUNK_PAGES)).all()


def test_from_entries_takes_whole_chunks_as_rows_of_the_stream() -> None:
    """Two whole chunks then a partial one: the whole ones are rows of the entries' pfns (no
    copy); the index reads, truncates and relocates as one built page by page."""
    pages = FilePages()
    pages.assign(0, np.arange(5000, 5000 + 2 * CHUNK_PAGES + 3, dtype=np.int64))
    pfns, orders, indexes, _ = page_entries([pages])
    again = FilePages.from_entries(pfns, orders, indexes)
    assert again.nr_pages == pages.nr_pages == 2 * CHUNK_PAGES + 3
    chunks = again.chunks()
    assert [c for c, _, _ in chunks] == [0, 1, 2]
    assert np.shares_memory(chunks[0][1], pfns) and np.shares_memory(chunks[1][1], pfns)
    assert (again.lookup(0, 3 * CHUNK_PAGES) == pages.lookup(0, 3 * CHUNK_PAGES)).all()
    again.replace_pages(np.array([1, CHUNK_PAGES + 2]), np.array([7, 8]))
    assert again.lookup_list(0, 3) == [5000, 7, 5002]
    assert again.lookup_list(CHUNK_PAGES + 1, 2) == [5000 + CHUNK_PAGES + 1, 8]
    assert sorted(again.truncate((CHUNK_PAGES + 10) * PAGE_SIZE).tolist()) == list(
        range(5000 + CHUNK_PAGES + 10, 5000 + 2 * CHUNK_PAGES + 3)
    )
    assert again.nr_pages == CHUNK_PAGES + 10


def test_from_entries_of_sparse_blocks_builds_chunks() -> None:
    """512 entries that do not fill one chunk (a hole in each of two chunks) are not taken
    as a row: each chunk is built with its hole."""
    pages = FilePages()
    pages.assign(0, np.arange(100, 100 + CHUNK_PAGES - 1, dtype=np.int64))  # page 511: a hole
    pages.assign(CHUNK_PAGES, np.arange(900, 902, dtype=np.int64))
    pfns, orders, indexes, _ = page_entries([pages])
    assert len(pfns) == CHUNK_PAGES + 1
    again = FilePages.from_entries(pfns, orders, indexes)
    assert (again.lookup(0, 2 * CHUNK_PAGES) == pages.lookup(0, 2 * CHUNK_PAGES)).all()
    assert again.lookup_list(CHUNK_PAGES - 1, 1) == [HOLE] and again.nr_pages == CHUNK_PAGES + 1


def test_next_data_and_next_hole_walk_chunks_and_their_ends() -> None:
    """The page-index side of SEEK_DATA / SEEK_HOLE: a chunk's entries past its end are holes,
    a missing chunk is all hole, a full chunk runs on into the next."""
    pages = FilePages()
    assert pages.next_data(0) is None and pages.next_hole(7) == 7
    pages.set_page(3, 100)  # chunk 0, 4 entries long
    pages.assign(CHUNK_PAGES, np.arange(200, 200 + CHUNK_PAGES, dtype=np.int64))  # chunk 1 full
    pages.set_page(3 * CHUNK_PAGES + 5, 900)  # chunk 3
    assert [pages.next_data(i) for i in (0, 3, 4)] == [3, 3, CHUNK_PAGES]
    assert pages.next_data(2 * CHUNK_PAGES) == 3 * CHUNK_PAGES + 5
    assert pages.next_data(3 * CHUNK_PAGES + 6) is None
    assert [pages.next_hole(i) for i in (0, 3, 4)] == [0, 4, 4]
    assert pages.next_hole(CHUNK_PAGES) == 2 * CHUNK_PAGES  # chunk 1 full, chunk 2 missing
    assert pages.next_hole(3 * CHUNK_PAGES + 5) == 3 * CHUNK_PAGES + 6
