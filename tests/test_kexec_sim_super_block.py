"""The super block: round trip and refusal of bad pfns and corrupted bytes."""

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kexec_sim.errors import CorruptHandover, MachineError
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.ram import Ram
from kexec_sim.super_block import (
    NODE_LIST_AT,
    SuperBlock,
    node_list_head,
    read_super_block,
    set_node_list_head,
    write_super_block,
)

from .util import make_ram

NR_PAGES = 4096


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Ram]:
    r = make_ram(tmp_path, NR_PAGES)
    yield r
    r.close()


def test_round_trip(ram: Ram) -> None:
    sb = SuperBlock(generation=3, nr_ram_pages=NR_PAGES, table_root_pfn=77, node_list_pfn=99)
    write_super_block(ram, 500, sb)
    assert read_super_block(ram, 500) == sb


@pytest.mark.parametrize("pfn", [0, -1, NR_PAGES, 123])
def test_not_a_super_block(ram: Ram, pfn: int) -> None:
    with pytest.raises(CorruptHandover, match="pkram="):
        read_super_block(ram, pfn)


@pytest.mark.parametrize(
    ("offset", "data", "reason"),
    [
        (0, b"X", "magic"),
        (8, struct.pack("<I", 7), "version"),
        (16, b"\x09", "checksum"),
        (100, b"\x01", "checksum"),
    ],
)
def test_corruption_is_refused(ram: Ram, offset: int, data: bytes, reason: str) -> None:
    write_super_block(ram, 500, SuperBlock(1, NR_PAGES, 0, 0))
    at = 500 * PAGE_SIZE + offset
    ram.buffer[at : at + len(data)] = data
    with pytest.raises(CorruptHandover, match=reason):
        read_super_block(ram, 500)


def test_wrong_machine_and_wild_pfns_are_refused(ram: Ram) -> None:
    write_super_block(ram, 500, SuperBlock(1, NR_PAGES * 2, 0, 0))
    with pytest.raises(CorruptHandover, match="pages"):
        read_super_block(ram, 500)
    write_super_block(ram, 500, SuperBlock(1, NR_PAGES, NR_PAGES + 5, 0))
    with pytest.raises(CorruptHandover, match="outside"):
        read_super_block(ram, 500)


def test_the_node_list_head_is_outside_the_crc(ram: Ram) -> None:
    write_super_block(ram, 500, SuperBlock(2, NR_PAGES, 77, 0))
    assert node_list_head(ram, 500) == 0
    set_node_list_head(ram, 500, 1234)
    assert node_list_head(ram, 500) == 1234
    assert ram.pages[500][NODE_LIST_AT : NODE_LIST_AT + 8].tobytes() == struct.pack("<Q", 1234)
    assert read_super_block(ram, 500) == SuperBlock(2, NR_PAGES, 77, 1234)  # CRC still good
    set_node_list_head(ram, 500, 0)
    assert read_super_block(ram, 500).node_list_pfn == 0


def test_node_list_head_checks_its_pfns(ram: Ram) -> None:
    write_super_block(ram, 500, SuperBlock(2, NR_PAGES, 77, 0))
    for sb_pfn, head in ((0, 1), (NR_PAGES, 1), (500, NR_PAGES), (500, -1)):
        with pytest.raises(MachineError, match="RAM"):
            set_node_list_head(ram, sb_pfn, head)
    assert read_super_block(ram, 500).node_list_pfn == 0
    ram.buffer[500 * PAGE_SIZE + NODE_LIST_AT : 500 * PAGE_SIZE + NODE_LIST_AT + 8] = struct.pack(
        "<Q", NR_PAGES + 9
    )
    assert node_list_head(ram, 500) == NR_PAGES + 9  # raw: no validation
    with pytest.raises(CorruptHandover, match="node list pfn"):
        read_super_block(ram, 500)
