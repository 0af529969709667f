"""The PKRAM super block: the one page whose pfn the next boot gets as ``pkram=<pfn>``.

It names the preserved-pages table (``kexec_sim.preserved_pages``), which is all the machine
needs at boot, and the head of the preserved node list, which it carries for pkramfs without
reading it. One page, little-endian (``SUPER_BLOCK``, 64 bytes, then zeros):

magic ``PKRAMSB1``, version, CRC32 of the page with the crc field zero, the boot generation
that wrote it, the RAM size in pages, the table's root pfn (0 until written at kexec), the
node list's first pfn (0 when empty), flags (0).
Everything read back is untrusted: a failed check raises CorruptHandover naming it.
"""

import struct
import zlib
from dataclasses import dataclass

from .errors import CorruptHandover
from .pages import PAGE_SIZE
from .ram import Ram

MAGIC = b"PKRAMSB1"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
SUPER_BLOCK = struct.Struct("<8sIIQQQQQ8x")  # magic version crc generation pages table nodes flags
_CRC_AT = 12


@dataclass(frozen=True)
class SuperBlock:
    """What the super block says."""

    generation: int
    nr_ram_pages: int
    table_root_pfn: int
    node_list_pfn: int
    flags: int = 0


def write_super_block(ram: Ram, pfn: int, sb: SuperBlock) -> None:
    """Write *sb* into page *pfn* (the whole page: the rest is zeros)."""
    page = bytearray(PAGE_SIZE)
    fields = (sb.generation, sb.nr_ram_pages, sb.table_root_pfn, sb.node_list_pfn, sb.flags)
    SUPER_BLOCK.pack_into(page, 0, MAGIC, VERSION, 0, *fields)
    struct.pack_into("<I", page, _CRC_AT, zlib.crc32(page))
    ram.buffer[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = page


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
    page[_CRC_AT : _CRC_AT + 4] = bytes(4)
    if zlib.crc32(page) != crc:
        raise CorruptHandover(f"pkram={pfn}: super block checksum mismatch")
    if nr_pages != ram.nr_pages:
        raise CorruptHandover(f"pkram={pfn}: written for {nr_pages} pages, RAM has {ram.nr_pages}")
    for name, value in (("table", table), ("node list", nodes)):
        if not 0 <= value < ram.nr_pages:
            raise CorruptHandover(f"pkram={pfn}: {name} pfn {value} is outside RAM")
    if flags != 0:
        raise CorruptHandover(f"pkram={pfn}: unknown flags {flags:#x}")
    return SuperBlock(generation, nr_pages, table, nodes, flags)
