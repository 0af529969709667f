"""The sparse page index of a file (pure)."""

import numpy as np

from pkramfs.file_pages import CHUNK_PAGES, HOLE, FilePages


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
    dropped = pages.truncate(700)
    assert sorted(dropped.tolist()) == list(range(1200, 1600))
    assert pages.nr_pages == 200
    assert (pages.lookup(700, 10) == HOLE).all()


def test_huge_chunk_is_split_by_truncate() -> None:
    pages = FilePages()
    pages.assign_huge(1, 512 * 3)
    assert pages.is_huge(1)
    assert pages.lookup(CHUNK_PAGES, 2).tolist() == [1536, 1537]
    dropped = pages.truncate(CHUNK_PAGES + 10)
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
