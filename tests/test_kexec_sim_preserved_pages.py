"""The preserved-pages table: round trips and refusal of every kind of corruption."""

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kexec_sim.errors import CorruptHandover
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.pages import PfnArray
from kexec_sim.preserved_pages import (
    ENTRIES_PER_ROOT,
    PFNS_PER_LEAF,
    ROOT_HEADER,
    read_table,
    write_table,
)
from kexec_sim.ram import Ram

from .util import make_ram


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Ram]:
    r = make_ram(tmp_path, 4 * PFNS_PER_LEAF + 100)  # 5 leaves, the last partial
    yield r
    r.close()


class Allocator:
    """Hands out pages from the top of RAM down, like a simple kernel allocator."""

    def __init__(self, ram: Ram) -> None:
        self.next = ram.nr_pages - 1
        self.released: list[int] = []

    def allocate(self, n: int) -> PfnArray:
        pages = np.arange(self.next, self.next - n, -1, dtype=np.int64)
        self.next -= n
        return pages

    def release(self, pfns: PfnArray) -> None:
        self.released.extend(pfns.tolist())


def write(ram: Ram, pfns: PfnArray) -> tuple[int, PfnArray]:
    alloc = Allocator(ram)
    return write_table(ram, keep(ram, pfns), alloc.allocate, alloc.release)


def keep(ram: Ram, pfns: PfnArray) -> np.ndarray:
    """The bitmap write_table takes: a bool per page of RAM, True at *pfns*."""
    mask = np.zeros(ram.nr_pages, dtype=bool)
    mask[pfns] = True
    return mask


def test_round_trip_includes_the_table_itself(ram: Ram) -> None:
    rng = np.random.default_rng(1)
    pfns = np.unique(rng.integers(1, 3 * PFNS_PER_LEAF, 20_000))
    root, table = write(ram, pfns)
    got = read_table(ram, root)
    assert np.array_equal(got, np.union1d(pfns, table))
    assert len(table) == 1 + 4  # one root, leaves 0-2 for the data and 4 for the table


def test_empty_set_still_preserves_its_root(ram: Ram) -> None:
    root, table = write(ram, np.empty(0, dtype=np.int64))
    assert read_table(ram, root).tolist() == sorted(table.tolist())


def test_many_roots_chain(tmp_path: Path) -> None:
    nr_pages = (ENTRIES_PER_ROOT + 5) * PFNS_PER_LEAF  # a sparse 42 GiB: needs two roots
    ram = make_ram(tmp_path, nr_pages)
    try:
        pfns = np.array([5, PFNS_PER_LEAF * (ENTRIES_PER_ROOT + 2) + 7], dtype=np.int64)
        root, table = write(ram, pfns)
        assert np.array_equal(read_table(ram, root), np.union1d(pfns, table))
    finally:
        ram.close()
        os.unlink(tmp_path / "RAM")


def corrupt(ram: Ram, pfn: int, offset: int, data: bytes) -> None:
    ram.buffer[pfn * PAGE_SIZE + offset : pfn * PAGE_SIZE + offset + len(data)] = data


@pytest.mark.parametrize(
    ("where", "offset", "data", "reason"),
    [
        ("root", 0, b"NOTMAGIC", "magic"),
        ("root", 8, struct.pack("<I", 99), "version"),
        ("root", 40, b"\x01", "checksum"),
        ("leaf", 100, b"\xff", "checksum"),
    ],
)
def test_corruption_is_refused(ram: Ram, where: str, offset: int, data: bytes, reason: str) -> None:
    root, table = write(ram, np.array([10, 20, 30], dtype=np.int64))
    corrupt(ram, root if where == "root" else int(table[1]), offset, data)
    with pytest.raises(CorruptHandover, match=reason):
        read_table(ram, root)


def rewrite_root(ram: Ram, root: int, **fields: int) -> None:
    """Change header fields of a root page and fix its checksum (a consistent lie)."""
    import zlib

    page = bytearray(ram.pages[root].tobytes())
    names = ["magic", "version", "crc", "nr_ram_pages", "first", "count", "next", "total"]
    values = dict(zip(names, ROOT_HEADER.unpack_from(page), strict=True))
    values.update(fields, crc=0)
    ROOT_HEADER.pack_into(page, 0, *values.values())
    values["crc"] = zlib.crc32(page)
    ROOT_HEADER.pack_into(page, 0, *values.values())
    ram.buffer[root * PAGE_SIZE : (root + 1) * PAGE_SIZE] = bytes(page)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"next": 1}, "chain"),
        ({"total": 5}, "marked"),
        ({"nr_ram_pages": 1 << 20}, "RAM"),
        ({"count": 1}, "covers"),
    ],
)
def test_consistent_lies_are_refused(ram: Ram, fields: dict[str, int], reason: str) -> None:
    root, _ = write(ram, np.array([10, 20, 30], dtype=np.int64))
    rewrite_root(ram, root, **fields)
    with pytest.raises(CorruptHandover, match=reason):
        read_table(ram, root)


def test_bad_root_pfns_are_refused(ram: Ram) -> None:
    for pfn in (0, -3, ram.nr_pages, 12345):  # 12345 holds zeros: no magic
        with pytest.raises(CorruptHandover):
            read_table(ram, pfn)
