"""The folio model of a file's pages (pure): splits, allocation blocks and unwritten pages.

The expected numbers were measured on kernel tmpfs (Linux 6.18.44, huge=always) with the same
steps; the mounted tests compare the two file systems directly.
"""

import msgpack
import numpy as np
import pytest

from kexec_sim import PAGE_SIZE
from pkramfs import tree_record
from pkramfs.errors import CorruptNode
from pkramfs.file_pages import CHUNK_PAGES, FilePages
from pkramfs.folios import Folios, buddy_blocks, split
from pkramfs.inode import Inode
from pkramfs.tree_record import MountSettings

HUGE_BASE = 1024  # any 512-aligned pfn


def huge_file() -> FilePages:
    pages = FilePages()
    pages.assign_huge(0, HUGE_BASE)
    return pages


def test_buddy_blocks_cover_the_folio_once() -> None:
    blocks = buddy_blocks(44, 0, 9)
    covered = np.zeros(CHUNK_PAGES, dtype=int)
    for start, order in blocks:
        assert start % (1 << order) == 0
        covered[start : start + (1 << order)] += 1
    assert (covered == 1).all() and (44, 0) in blocks


@pytest.mark.parametrize(
    ("start", "end", "eof_pages", "pages_left"),
    [
        (100, 9100, 5, 7),  # a 20,000-byte file: tmpfs shows 56 blocks (7 pages)
        (8192, 12288, 512, 511),  # one page out of a 2 MiB file
        (0, 1 << 20, 512, 256),  # its first half
        (1 << 20, 2 << 20, 512, 256),  # its second half
        (0, 2 << 20, 512, 0),  # all of it
    ],
)
def test_a_punch_splits_a_huge_page_as_tmpfs(
    start: int, end: int, eof_pages: int, pages_left: int
) -> None:
    pages = huge_file()
    dropped = pages.punch(start, end, eof_pages)
    assert pages.nr_pages == pages_left
    assert len(dropped) == CHUNK_PAGES - pages_left
    assert not pages.is_huge(0) or pages_left == CHUNK_PAGES


def test_a_split_keeps_the_blocks_the_end_of_file_reaches() -> None:
    # Split around page 0 of a 2 MiB folio, then page 2: blocks past page 5 (EOF) go,
    # but [4-7] starts before it and stays whole.
    assert split(0, 9, 0, 2, 5) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 2)]


def test_a_truncate_leaves_the_blocks_below_the_cut() -> None:
    pages = huge_file()
    pages.truncate(20_000)  # page 4 holds the new end: [0-3] and [4] stay
    assert pages.nr_pages == 5
    assert pages.folios is not None
    heads, orders = pages.folios.large()
    assert heads.tolist() == [0] and orders.tolist() == [2]


def test_a_write_into_a_split_range_takes_the_largest_empty_block() -> None:
    # tmpfs: after the punch above, one byte at 1 MiB + 5 takes 256 pages (st_blocks 7 -> 263)
    pages = huge_file()
    pages.punch(100, 9100, 5)
    indexes, blocks = pages.plan_folios(256, 1)
    assert len(indexes) == 256 and blocks == [(256, 8)]


def test_a_write_next_to_held_pages_takes_aligned_blocks() -> None:
    # tmpfs: pages 0x200-0x327 held, a write of 0x33abde + 0x1db74 took 0x330-0x37f: a block
    # of 16 pages and one of 64 (st_blocks up by 640).
    pages = FilePages()
    pages.assign(0x200, np.arange(5000, 5000 + 0x128, dtype=np.int64))
    indexes, blocks = pages.plan_folios(0x33A, 0x358 - 0x33A + 1)
    assert blocks == [(0x330, 4), (0x340, 6)]
    assert indexes.tolist() == list(range(0x330, 0x380))


def test_an_empty_range_in_no_huge_page_takes_blocks_up_to_1_mib() -> None:
    pages = FilePages()
    indexes, blocks = pages.plan_folios(3, 1)
    assert blocks == [(0, 8)] and len(indexes) == 256


def test_unwritten_pages_are_holes_to_seek_until_a_store_reaches_their_folio() -> None:
    pages = huge_file()
    pages.mark_unwritten(np.arange(CHUNK_PAGES, dtype=np.int64))
    pages.note_fallocated(CHUNK_PAGES)
    assert pages.next_data(0) is None and pages.next_hole(0) == 0
    pages.mark_written(7, 1)  # a huge page is one folio: all of it is written
    assert pages.next_data(0) == 0 and pages.next_hole(0) == CHUNK_PAGES

    small = FilePages()
    small.assign(0, np.arange(100, 104, dtype=np.int64))
    small.mark_unwritten(np.arange(4, dtype=np.int64))
    small.record_blocks([(0, 1)])  # pages 0-1 one folio, 2 and 3 alone
    small.mark_written(1, 1)
    assert small.next_data(0) == 0 and small.next_hole(0) == 2


def test_a_punch_moves_fallocend_back_and_forgets_marks() -> None:
    pages = FilePages()
    pages.assign(0, np.arange(100, 108, dtype=np.int64))
    pages.mark_unwritten(np.arange(8, dtype=np.int64))
    pages.note_fallocated(8)
    pages.punch(4 * PAGE_SIZE, 8 * PAGE_SIZE, 8)
    assert pages.folios is not None and pages.folios.fallocend == 4
    assert pages.folios.unwritten_indexes().tolist() == [0, 1, 2, 3]
    pages.punch(0, 4 * PAGE_SIZE, 8)
    assert pages.folios is None  # nothing left to record


def file_snapshot() -> tuple[Inode, tree_record.TreeSnapshot]:
    """A tree of one 20,000-byte file on a huge page, fallocated and punched, recorded."""
    inode = Inode(3, 0o100644, 0, 0, 0)
    inode.nlink = 1
    inode.size_bytes = 20_000
    assert inode.pages is not None
    inode.pages.assign_huge(0, HUGE_BASE)
    inode.pages.mark_unwritten(np.arange(CHUNK_PAGES, dtype=np.int64))
    inode.pages.note_fallocated(600)
    inode.pages.punch(100, 9100, 5)
    root = Inode(1, 0o040755, 0, 0, 0)
    root.nlink = 2
    root.parent_ino = 1
    assert root.entries is not None
    root.entries[b"f"] = 3
    settings = MountSettings(size_pages=0, max_inodes=0, huge=True, secret=False)
    return inode, tree_record.snapshot([tree_record.inode_columns([root, inode])], 4, settings)


def test_folios_round_trip_through_the_record() -> None:
    inode, snap = file_snapshot()
    assert inode.pages is not None
    rebuilt = tree_record.rebuild(snap.meta, snap.pfns, snap.orders, snap.indexes, "test")
    [restored] = rebuilt.inodes.folios.values()
    original = inode.pages.folios
    assert original is not None and isinstance(restored, Folios)
    assert restored.fallocend == original.fallocend == 600
    assert (restored.unwritten_indexes() == original.unwritten_indexes()).all()
    for got, want in zip(restored.large(), original.large(), strict=True):
        assert (got == want).all()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        (1, 1 << 60, "fallocend"),
        (2, np.array([[0, 1 << 50]], "<u8").tobytes(), "unwritten runs"),
        (2, np.array([[5, 1], [4, 1]], "<u8").tobytes(), "unwritten runs"),
        (2, b"\x00" * 15, "bad pairs"),
        (3, np.array([[1, 2]], "<u8").tobytes(), "bad large folios"),
        (3, np.array([[0, 9]], "<u8").tobytes(), "bad large folios"),
        (3, np.array([[512, 1]], "<u8").tobytes(), "does not hold"),
        (0, 1, "no such file"),
    ],
)
def test_a_bad_folios_record_is_a_corrupt_node(field: int, value: object, reason: str) -> None:
    _, snap = file_snapshot()
    document = msgpack.unpackb(snap.meta, raw=False, strict_map_key=False)
    document["folios"][0][field] = value
    meta = msgpack.packb(document, use_bin_type=True)
    with pytest.raises(CorruptNode, match=reason):
        tree_record.rebuild(meta, snap.pfns, snap.orders, snap.indexes, "test")
