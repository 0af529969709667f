"""The PKRAM super block: the one page whose pfn the next boot gets as ``pkram=<pfn>``.

It names the preserved-pages table (``kexec_sim.preserved_pages``), which is all the machine
needs at boot, and the head of the preserved node list, which it carries for pkramfs without
reading it. One page, little-endian (``SUPER_BLOCK``, 64 bytes, then zeros):

magic ``PKRAMSB1``, version, CRC32 of the page with the crc and node list fields zero, the
boot generation that wrote it, the RAM size in pages, the table's root pfn (0 until written at
kexec), the node list's first pfn (0 when empty), flags (0).

The node list head is outside the CRC because pkramfs changes it in place, with one aligned
8-byte store (``set_node_list_head``), to publish or unlink a node atomically: a crash leaves
either the old or the new head, and the page stays valid either way.
Everything read back is untrusted: a failed check raises CorruptHandover naming it.
"""

import struct
import zlib
from dataclasses import dataclass

from .errors import CorruptHandover, MachineError
from .geometry import PAGE_SIZE
from .ram import Ram

MAGIC = b"PKRAMSB1"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
SUPER_BLOCK = struct.Struct("<8sIIQQQQQ8x")  # magic version crc generation pages table nodes flags
_CRC_AT = 12
NODE_LIST_AT = 40
"""Offset of node_list_pfn: 8-byte aligned, excluded from the CRC."""
_NODE_LIST_WORD = NODE_LIST_AT // 8


@dataclass(frozen=True)
class SuperBlock:
    """What the super block says."""

    generation: int
    nr_ram_pages: int
    table_root_pfn: int
    node_list_pfn: int
    flags: int = 0


def _crc(page: bytes | bytearray) -> int:
    """CRC32 of a super block page with its crc and node list fields taken as zero."""
    zeroed = bytearray(page)
    zeroed[_CRC_AT : _CRC_AT + 4] = bytes(4)
    zeroed[NODE_LIST_AT : NODE_LIST_AT + 8] = bytes(8)
    return zlib.crc32(zeroed)


def write_super_block(ram: Ram, pfn: int, sb: SuperBlock) -> None:
    """Write *sb* into page *pfn* (the whole page: the rest is zeros)."""
    page = bytearray(PAGE_SIZE)
    fields = (sb.generation, sb.nr_ram_pages, sb.table_root_pfn, sb.node_list_pfn, sb.flags)
    SUPER_BLOCK.pack_into(page, 0, MAGIC, VERSION, 0, *fields)
    struct.pack_into("<I", page, _CRC_AT, _crc(page))
    ram.write_page(pfn, page)


def _check_pfn(ram: Ram, sb_pfn: int) -> None:
    if not 0 < sb_pfn < ram.nr_pages:
        raise MachineError(f"super block pfn {sb_pfn} is not a page of RAM (1..{ram.nr_pages - 1})")


def node_list_head(ram: Ram, sb_pfn: int) -> int:
    """Return the node list head stored in the super block at *sb_pfn* (raw, not validated).

    Raises MachineError when *sb_pfn* is not a page of RAM.
    """
    _check_pfn(ram, sb_pfn)
    return int(ram.pages[sb_pfn].view("<u8")[_NODE_LIST_WORD])


def set_node_list_head(ram: Ram, sb_pfn: int, head_pfn: int) -> None:
    """Store *head_pfn* as the node list head of the super block at *sb_pfn*.

    One aligned 8-byte store into RAM: readers see the old or the new head, never a mix, and
    the super block's CRC (which excludes the field) stays valid. Raises MachineError when a
    pfn is not a page of RAM (*head_pfn* may be 0, the empty list).
    """
    if not 0 <= head_pfn < ram.nr_pages:
        raise MachineError(f"node list head {head_pfn} is outside RAM (0..{ram.nr_pages - 1})")
    _check_pfn(ram, sb_pfn)
    ram.store_word(sb_pfn, _NODE_LIST_WORD, head_pfn)


def read_super_block(ram: Ram, pfn: int) -> SuperBlock:
    """Read and validate the super block at *pfn*; raise CorruptHandover if it is not one."""
    if not 0 < pfn < ram.nr_pages:
        raise CorruptHandover(f"pkram={pfn}: not a page of this machine's RAM")
    page = bytearray(ram.pages[pfn].tobytes())
    magic, version, crc, generation, nr_pages, table, nodes, flags = SUPER_BLOCK.unpack_from(page)
    if magic != MAGIC:
        raise CorruptHandover(f"pkram={pfn}: no super block there (magic {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        raise CorruptHandover(f"pkram={pfn}: super block version {version} is not supported")
    if _crc(page) != crc:
        raise CorruptHandover(f"pkram={pfn}: super block checksum mismatch")
    if nr_pages != ram.nr_pages:
        raise CorruptHandover(f"pkram={pfn}: written for {nr_pages} pages, RAM has {ram.nr_pages}")
    for name, value in (("table", table), ("node list", nodes)):
        if not 0 <= value < ram.nr_pages:
            raise CorruptHandover(f"pkram={pfn}: {name} pfn {value} is outside RAM")
    if flags != 0:
        raise CorruptHandover(f"pkram={pfn}: unknown flags {flags:#x}")
    return SuperBlock(generation, nr_pages, table, nodes, flags)
