"""Page streams, byte streams and tree records: round trips and refusal of corruption."""

import stat
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from kexec_sim.geometry import HUGE_ORDER, PAGE_SIZE
from kexec_sim.pages import PageRuns
from kexec_sim.ram import Ram
from pkramfs import byte_stream, page_chain, page_stream, tree_record
from pkramfs.errors import CorruptNode
from pkramfs.file_pages import FilePages
from pkramfs.inode import ROOT_INO, Inode
from pkramfs.inode_table import InodeTable
from pkramfs.quiet_inodes import QuietInodes

from .util import make_ram

NR_PAGES = 1 << 16


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Ram]:
    r = make_ram(tmp_path, NR_PAGES)
    yield r
    r.close()


def entries(n_small: int, n_huge: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse file: small pages at scattered indexes, then huge pages far beyond 2**32."""
    rng = np.random.default_rng(7)
    small_idx = np.sort(rng.choice(1 << 20, n_small, replace=False)).astype(np.int64)
    small_pfn = rng.choice(np.arange(1, 20_000), n_small, replace=False).astype(np.int64)
    huge_idx = (np.int64(5) << 40) + np.arange(n_huge, dtype=np.int64) * 512 * 7
    huge_pfn = 32768 + np.arange(n_huge, dtype=np.int64) * 512
    pfns = np.concatenate([small_pfn, huge_pfn])
    orders = np.concatenate([np.zeros(n_small, np.int64), np.full(n_huge, HUGE_ORDER, np.int64)])
    return pfns, orders, np.concatenate([small_idx, huge_idx])


def write_links(
    ram: Ram, pfns: np.ndarray, orders: np.ndarray, idx: np.ndarray, layout: str = "descending"
) -> np.ndarray:
    """Write a stream on a descending chain of link pages, or on consecutive ones (ascending:
    the usual layout, which reading checks at once)."""
    n = page_stream.link_pages_needed(idx)
    links = np.arange(60_000, 60_000 + n, dtype=np.int64)
    if layout == "descending":
        links = links[::-1].copy()
    page_stream.write_stream(ram, links, pfns, orders, idx)
    return links


def test_page_stream_round_trip_small_huge_and_far_indexes(ram: Ram) -> None:
    pfns, orders, idx = entries(3000, 40)
    links = write_links(ram, pfns, orders, idx)
    assert len(links) == 7  # 3000 small -> 6 pages, the huge ones (other high bits) -> 1
    got_links, got_pfns, got_orders, got_idx = page_stream.read_stream(
        ram, int(links[0]), len(links), len(pfns), "test"
    )
    assert (got_links == links).all()
    assert (got_pfns == pfns).all() and (got_orders == orders).all() and (got_idx == idx).all()
    expanded = PageRuns.of_blocks(got_pfns, np.left_shift(1, got_orders)).expand()
    assert len(expanded) == 3000 + 40 * 512
    assert (expanded[3000:3512] == np.arange(32768, 32768 + 512)).all()


@pytest.mark.parametrize("layout", ["descending", "ascending"])
@pytest.mark.parametrize(
    "damage, reason",
    [
        ("flip", "checksum mismatch"),
        ("cycle", "cycle"),
        ("magic", "is not a PKRMLNK1 page"),
        ("outside", "outside RAM"),
        ("count", "entries"),
        ("longer", "goes on past its 3 pages"),
        ("last-links-on", "goes on past its 4 pages"),
    ],
)
def test_page_stream_refuses_damage(ram: Ram, damage: str, reason: str, layout: str) -> None:
    pfns, orders, idx = entries(2000, 0)
    links = write_links(ram, pfns, orders, idx, layout)
    words = ram.pages.view(np.uint64)
    n_entries, n_pages = len(pfns), len(links)
    if damage == "flip":
        ram.pages[int(links[2]), 1000] ^= 0x10
    elif damage == "cycle":
        words[int(links[3]), 2] = links[1]
    elif damage == "magic":
        ram.pages[int(links[1]), 0] ^= 1
    elif damage == "outside":
        words[int(links[2]), 2] = NR_PAGES + 5
    elif damage == "longer":  # the node claims a page fewer than the chain has
        n_pages -= 1
    elif damage == "last-links-on":
        words[int(links[-1]), 2] = 7
    else:
        n_entries += 1
    with pytest.raises(CorruptNode, match=reason):
        page_stream.read_stream(ram, int(links[0]), n_pages, n_entries, "test")


def test_a_chain_is_read_beside_pages_out_of_the_direct_map(ram: Ram) -> None:
    """A chain not on consecutive pages from its first (descending) reads back even when the
    pages after its first are out of this process's direct map (a secret file's): they are
    not read to look for a consecutive chain."""
    pfns, orders, idx = entries(2000, 0)
    links = write_links(ram, pfns, orders, idx)
    ram.remove_from_direct_map(int(links[0]) + 1, len(links))
    try:
        got = page_stream.read_stream(ram, int(links[0]), len(links), len(pfns), "test")
    finally:
        ram.restore_direct_map(int(links[0]) + 1, len(links))
    assert (got[1] == pfns).all()


def test_page_stream_refuses_entries_outside_ram_and_misaligned_huge(ram: Ram) -> None:
    for pfns, orders, idx, reason in [
        (np.array([NR_PAGES]), np.array([HUGE_ORDER]), np.array([512]), "outside RAM"),
        (np.array([513]), np.array([HUGE_ORDER]), np.array([0]), "aligned"),
        (np.array([5]), np.array([3]), np.array([0]), "unknown order"),
    ]:
        links = write_links(
            ram, pfns.astype(np.int64), orders.astype(np.int64), idx.astype(np.int64)
        )
        with pytest.raises(CorruptNode, match=reason):
            page_stream.read_stream(ram, int(links[0]), 1, 1, "test")


def test_byte_stream_round_trip_and_damage(ram: Ram) -> None:
    data = np.random.default_rng(3).bytes(3 * byte_stream.BYTES_PER_PAGE + 17)
    pfns = np.array([100, 7, 4000, 55], dtype=np.int64)
    byte_stream.write_stream(ram, pfns, data)
    got_pfns, got = byte_stream.read_stream(ram, 100, 4, len(data), "meta")
    assert got == data and (got_pfns == pfns).all()
    with pytest.raises(CorruptNode, match="cannot hold"):
        byte_stream.read_stream(ram, 100, 4, len(data) + byte_stream.BYTES_PER_PAGE, "meta")
    ram.pages[4000, page_chain.CHAIN_HEADER.size + 5] ^= 0xFF
    with pytest.raises(CorruptNode, match="checksum mismatch in pfn 4000"):
        byte_stream.read_stream(ram, 100, 4, len(data), "meta")


def sample_inodes() -> dict[int, Inode]:
    root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 1)
    sub = Inode(3, stat.S_IFDIR | 0o700, 5, 6, 2)
    big = Inode(4, stat.S_IFREG | 0o644, 1000, 1000, 3)
    link = Inode(5, stat.S_IFLNK | 0o777, 0, 0, 4)
    fifo = Inode(6, stat.S_IFIFO | 0o600, 0, 0, 5)
    root.parent_ino, sub.parent_ino = ROOT_INO, ROOT_INO
    root.nlink, sub.nlink, big.nlink, link.nlink, fifo.nlink = 3, 2, 2, 1, 1
    root.entries = {b"sub": 3, b"big": 4, b"ln": 5}
    sub.entries = {b"hard": 4, b"fifo": 6}
    big.pages = FilePages()
    big.pages.assign(3, np.array([900, 901, 950], dtype=np.int64))
    big.pages.assign_huge(4, 1024)
    big.size_bytes = 5 * 512 * PAGE_SIZE
    big.xattrs = {b"user.k": b"v" * 100}
    link.target = b"../somewhere"
    link.size_bytes = len(link.target)
    big.atime_ns, big.mtime_ns, big.ctime_ns = 111, 222_333_444_555, 333
    return {i.ino: i for i in (root, sub, big, link, fifo)}


SETTINGS = tree_record.MountSettings(size_pages=1234, max_inodes=99, huge=True, secret=True)
FIELDS = (
    "mode", "uid", "gid", "nlink", "size_bytes", "atime_ns", "mtime_ns", "ctime_ns",
    "xattrs", "entries", "target", "parent_ino", "rdev",
)  # fmt: skip


def record(inodes: dict[int, Inode], next_ino: int = 7) -> tree_record.TreeSnapshot:
    """Record *inodes* as a preserve does."""
    part = tree_record.inode_columns(list(inodes.values()))
    return tree_record.snapshot([part], next_ino, SETTINGS)


def rebuild(snap: tree_record.TreeSnapshot, meta: bytes | None = None) -> tree_record.RebuiltTree:
    meta = snap.meta if meta is None else meta
    return tree_record.rebuild(meta, snap.pfns, snap.orders, snap.indexes, "t")


def test_tree_record_round_trip() -> None:
    inodes = sample_inodes()
    inodes[5].atime_ns = 32_503_680_000 * 10**9 + 7  # year 3000: past int64 nanoseconds
    inodes[6].mtime_ns = -(10**19) - 1  # before 1653
    snap = record(inodes)
    assert snap.nr_objects == 5 and len(snap.pfns) == 4  # 3 small + 1 huge entry
    rebuilt = rebuild(snap)
    assert rebuilt.mount == SETTINGS and rebuilt.next_ino == 7
    restored = QuietInodes.restored(rebuilt.inodes, rebuilt.pages)
    assert len(restored) == 5 and restored.data_pages() == 3 + 512
    for ino, old in inodes.items():
        new = restored.take(ino)
        for field in FIELDS:
            assert getattr(new, field) == getattr(old, field), (ino, field)
        if old.pages is not None:
            assert new.pages is not None and new.pages.huge_chunks() == old.pages.huge_chunks()
            assert (new.pages.lookup(0, 5 * 512) == old.pages.lookup(0, 5 * 512)).all()
    assert len(restored) == 0


def test_the_record_is_packed_as_msgpack_packs_it() -> None:
    """The metadata, packed a piece at a time (columns of each msgpack bin size, entries
    packed beforehand by a quiet directory), is the bytes msgpack.packb makes of its map."""
    for n_files in (3, 40, 9000):  # columns of bin 8, bin 16 and bin 32
        inodes = sample_inodes()
        root = inodes[ROOT_INO]
        assert root.entries is not None
        for ino in range(7, 7 + n_files):
            inodes[ino] = Inode(ino, stat.S_IFREG | 0o600, 0, 0, ino)
            inodes[ino].nlink = 1
            root.entries[f"f{ino}".encode()] = ino
        columns, pages = tree_record.inode_columns(list(inodes.values()))
        columns.entries[0] = tree_record.PackedEntries.of(columns.entries[0])
        snap = tree_record.snapshot([(columns, pages)], 7 + n_files, SETTINGS)
        document = msgpack.unpackb(snap.meta, raw=False, strict_map_key=False)
        assert msgpack.packb(document, use_bin_type=True) == snap.meta
        assert document["directories"][0] == [ROOT_INO, root.entries]


def test_restored_inodes_become_objects_one_at_a_time() -> None:
    snap = record(sample_inodes())
    rebuilt = rebuild(snap)
    table = InodeTable(QuietInodes.restored(rebuilt.inodes, rebuilt.pages))
    assert len(table) == 5 and dict.__len__(table) == 0 and 4 in table and 99 not in table
    assert table[4].size_bytes == 5 * 512 * PAGE_SIZE
    assert dict.__len__(table) == 1 and len(table) == 5 and list(table.in_use()) == [table[4]]
    assert table.get(99) is None and table.get(3) is not None
    again = tree_record.snapshot(
        [tree_record.inode_columns(list(table.in_use())), *table.quiet.parts()], 7, SETTINGS
    )
    assert again.meta == snap.meta and (again.pfns == snap.pfns).all()  # the same record
    assert sorted(table) == [1, 3, 4, 5, 6] and dict.__len__(table) == 5  # iterating takes all


def mutate(meta: bytes, change: str) -> bytes:
    doc = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    columns = {
        name: np.frombuffer(doc["columns"][name], dtype=wire).copy()
        for name, wire in tree_record.COLUMNS.items()
    }
    row = {int(ino): r for r, ino in enumerate(columns["ino"])}
    root, sub = doc["directories"]  # rows 0 (inode 1) and 1 (inode 3)
    if change == "loop":  # a directory inside itself
        sub[1][b"self"] = 3
    elif change == "nlink":
        columns["nlink"][row[4]] = 1
    elif change == "name":
        root[1][b"a/b"] = root[1].pop(b"ln")
    elif change == "dot":
        root[1][b".."] = root[1].pop(b"ln")
    elif change == "dangling":
        root[1][b"ghost"] = 99
    elif change == "slice":
        columns["entries"][row[4]] = 3
    elif change == "type":
        columns["mode"][row[6]] = 0o170644
    elif change == "order":
        for column in columns.values():
            column[[1, 2]] = column[[2, 1]]
    elif change == "short":
        columns["uid"] = columns["uid"][:-1]
    elif change == "nsec":
        columns["ctime_nsec"][0] = 10**9
    elif change == "island":  # the subdirectory leaves the root, named only in itself
        del root[1][b"sub"]
        columns["nlink"][0] -= 1
        sub[0], sub[1][b"self"] = 3, 3
        columns["nlink"][row[3]] += 1
    elif change == "parent":
        sub[0] = 4
    elif change == "pages-on-fifo":
        columns["entries"][row[6]], columns["entries"][row[4]] = 1, 3
    elif change == "format1":
        doc["format"] = 1
    elif change == "huge":
        doc["mount"]["huge"] = "sometimes"
    elif change == "size":
        doc["mount"]["size_pages"] = -1
    elif change == "inodes":
        doc["mount"]["max_inodes"] = 1 << 60
    elif change == "secret":
        doc["mount"]["secret"] = 1
    elif change == "settings":
        doc["mount"] = [1, 2]
    elif change == "long":  # a string past the unpacker's bound (where no check looks)
        doc["mount"]["note"] = "x" * 65
    elif change == "ext":  # an extension type: pkramfs writes none
        doc["mount"]["ext"] = msgpack.ExtType(1, b"x")
    doc["columns"] = {name: column.tobytes() for name, column in columns.items()}
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("loop", "link count|wrong parent"), ("nlink", "link count 1, 2 names"),
        ("name", "bad file name"), ("dot", "bad file name"), ("dangling", "missing inode 99"),
        ("slice", "belong to no file"), ("type", "unknown type"), ("order", "not ascending"),
        ("short", "differ in length"), ("nsec", "nanoseconds"), ("island", "unreachable"),
        ("parent", "wrong parent"), ("pages-on-fifo", "not a file has pages"),
        ("format1", "older pkramfs"), ("huge", "huge"), ("size", "size_pages"),
        ("inodes", "max_inodes"), ("secret", "secret"), ("settings", "mount settings"),
        ("long", "not msgpack"), ("ext", "not msgpack"),
    ],
)  # fmt: skip
def test_tree_record_refuses_an_impossible_tree(change: str, reason: str) -> None:
    snap = record(sample_inodes())
    rebuild(snap)  # the unchanged record is fine
    with pytest.raises(CorruptNode, match=reason):
        rebuild(snap, mutate(snap.meta, change))


def test_tree_record_refuses_a_name_twice() -> None:
    snap = record(sample_inodes())
    doc = msgpack.unpackb(snap.meta, raw=False, strict_map_key=False)
    packer = msgpack.Packer(use_bin_type=True)
    names = list(doc["directories"][1][1].items())  # the subdirectory: hard, fifo
    doc["directories"][1][1] = {}
    meta = bytearray(packer.pack(doc))
    empty_map = packer.pack({})
    twice = packer.pack_map_pairs([*names, names[0]])
    at = meta.rindex(empty_map)
    meta[at : at + len(empty_map)] = twice
    with pytest.raises(CorruptNode, match="a map has a key twice"):
        rebuild(snap, bytes(meta))


def test_tree_record_without_secret_setting_is_not_secret() -> None:
    """Nodes written before -o secret existed have no ``secret`` setting: not secret."""
    snap = record(sample_inodes())
    doc = msgpack.unpackb(snap.meta, raw=False, strict_map_key=False)
    del doc["mount"]["secret"]
    rebuilt = rebuild(snap, msgpack.packb(doc, use_bin_type=True))
    assert rebuilt.mount == tree_record.MountSettings(1234, 99, huge=True, secret=False)


def test_tree_record_refuses_garbage() -> None:
    with pytest.raises(CorruptNode, match=r"not msgpack|metadata"):
        tree_record.rebuild(
            b"\xc1\xc1garbage",
            np.empty(0, np.int64),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
            "t",
        )


def two_files() -> tree_record.TreeSnapshot:
    """The sample tree and a second file whose one page (index 0) lies below the first file's
    last entry: a file's entries start afresh after the previous file's."""
    inodes = sample_inodes()
    small = Inode(7, stat.S_IFREG | 0o600, 0, 0, 6)
    small.nlink, small.size_bytes = 1, 100
    small.pages = FilePages()
    small.pages.assign(0, np.array([77], dtype=np.int64))
    root_entries = inodes[ROOT_INO].entries
    assert root_entries is not None
    root_entries[b"small"] = 7
    inodes[7] = small
    return record(inodes, next_ino=8)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("repeat", "inode 4: pages overlap or are out of order"),
        ("descending", "inode 4: pages overlap or are out of order"),
        ("in-huge", "inode 4: pages overlap or are out of order"),
        ("past-end", "inode 4: a page lies past the end of file"),
        ("past-end-small", "inode 7: a page lies past the end of file"),
        ("second-file", "inode 7: pages overlap or are out of order"),
    ],
)
def test_tree_record_refuses_page_entries_out_of_place(change: str, reason: str) -> None:
    """Entries of the first file: pages 3, 4, 5 and a huge page at 2048 (the file ends at
    2560); of the second: page 0 (the file ends at 512, its huge-page bound)."""
    snap = two_files()
    assert snap.indexes.tolist() == [3, 4, 5, 2048, 0] and snap.orders[3] == HUGE_ORDER
    rebuild(snap)  # as written: fine
    pfns, orders, indexes = snap.pfns.copy(), snap.orders.copy(), snap.indexes.copy()
    if change == "repeat":
        indexes[1] = 3
    elif change == "descending":
        indexes[[0, 1]] = [4, 3]
    elif change == "in-huge":  # a small page inside the huge page before it
        pfns, orders, indexes = (
            pfns[[0, 1, 3, 2, 4]],
            orders[[0, 1, 3, 2, 4]],
            indexes[[0, 1, 3, 2, 4]],
        )
        indexes[3] = 2048 + 100
    elif change == "past-end":
        indexes[3] = 2560
    elif change == "past-end-small":
        indexes[4] = 512
    elif change == "second-file":  # one more entry for the second file, before its first
        pfns, orders, indexes = (
            np.append(a, v) for a, v in ((pfns, 78), (orders, 0), (indexes, 0))
        )
        doc = msgpack.unpackb(snap.meta, raw=False, strict_map_key=False)
        counts = np.frombuffer(doc["columns"]["entries"], dtype="<u8").copy()
        counts[-1] = 2
        doc["columns"]["entries"] = counts.tobytes()
        snap = tree_record.TreeSnapshot(
            msgpack.packb(doc, use_bin_type=True), pfns, orders, indexes, 6
        )
    with pytest.raises(CorruptNode, match=reason):
        tree_record.rebuild(snap.meta, pfns, orders, indexes, "t")
