"""The preserved-pages table: the set of pfns a kexec must keep, written inside RAM.

This is the handover ABI's page table (PKRAM's "preserved pages" bitmap): the next boot walks it
from one pfn and reserves every page it marks before anything else allocates. It is a two-level
structure, all little-endian, every page 4 KiB:

* root pages, chained by ``next_root_pfn``: a 64-byte header (``ROOT_HEADER``), then
  ``ENTRIES_PER_ROOT`` leaf pfns (u64, 0 = a leaf with no page marked) and as many CRC32s of
  those leaves; root *r* covers leaves ``first_leaf .. first_leaf + nr_entries - 1``;
* leaf pages: a bitmap of ``PFNS_PER_LEAF`` pfns, bit *b* of byte *k* of leaf *i* standing for
  pfn ``i * PFNS_PER_LEAF + 8 * k + b``.

The table's own pages are marked in it, so the set read back is exactly what must be reserved.
Everything read back is untrusted: magic, version, CRCs, sizes, pfn bounds and the root chain are
checked, and any failure raises CorruptHandover. pfn 0 is never a table page (firmware memory).
"""

import struct
import zlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from .errors import CorruptHandover, MachineError
from .geometry import PAGE_SIZE
from .pages import PfnArray
from .ram import Ram

MAGIC = b"PKRMPPT1"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
ROOT_HEADER = struct.Struct("<8sIIQIIQQ16x")  # magic version crc nr_ram_pages first nr next total
ENTRIES_PER_ROOT = (PAGE_SIZE - ROOT_HEADER.size) // 12  # a u64 pfn and a u32 CRC per leaf
PFNS_PER_LEAF = PAGE_SIZE * 8
NO_LEAF = 0

Allocate = Callable[[int], PfnArray]
Release = Callable[[PfnArray], None]


def _nr_leaves(nr_ram_pages: int) -> int:
    return -(-nr_ram_pages // PFNS_PER_LEAF)


def _nr_roots(nr_ram_pages: int) -> int:
    return max(1, -(-_nr_leaves(nr_ram_pages) // ENTRIES_PER_ROOT))


def write_table(
    ram: Ram, keep: npt.NDArray[np.bool_], allocate: Allocate, release: Release
) -> tuple[int, PfnArray]:
    """Write the table marking the pages *keep* selects (a bool per page of RAM) and its own
    pages; return (first root pfn, table pfns).

    *allocate(n)* returns n pages for the table (never pfn 0) and *release* takes back the
    ones that turned out not to be needed. Raises MachineError when *keep* is not a bool per
    page of RAM. Cost: linear in RAM pages (the bitmap is *keep*, packed), no list of pfns.
    """
    nr_ram_pages = ram.nr_pages
    if keep.dtype != np.bool_ or keep.shape != (nr_ram_pages,):
        raise MachineError(f"the pages to preserve must be a bool per page of RAM ({nr_ram_pages})")
    nr_leaves = _nr_leaves(nr_ram_pages)
    nr_roots = _nr_roots(nr_ram_pages)
    marked = np.zeros(nr_leaves * PFNS_PER_LEAF, dtype=bool)
    marked[:nr_ram_pages] = keep
    used = np.asarray(marked.reshape(nr_leaves, PFNS_PER_LEAF).any(axis=1), dtype=bool)
    table = allocate(nr_roots + int(used.sum()))
    while True:  # the table's own pages may fall in leaves nothing else uses: grow until stable
        if (table <= 0).any() or (table >= nr_ram_pages).any():
            raise MachineError("the preserved-pages table needs pages of RAM other than pfn 0")
        used[table // PFNS_PER_LEAF] = True
        needed = nr_roots + int(used.sum())
        if needed <= len(table):
            break
        table = np.concatenate([table, allocate(needed - len(table))])
    leaves = np.flatnonzero(used)
    roots, leaf_pages = table[:nr_roots], table[nr_roots:needed]
    release(table[needed:])
    table = table[:needed]
    marked[table] = True
    bitmaps = np.packbits(
        marked.reshape(nr_leaves, PFNS_PER_LEAF)[leaves], axis=1, bitorder="little"
    )
    ram.store_pages(leaf_pages, bitmaps)
    leaf_pfn = np.full(nr_roots * ENTRIES_PER_ROOT, NO_LEAF, dtype="<u8")
    leaf_crc = np.zeros(nr_roots * ENTRIES_PER_ROOT, dtype="<u4")
    leaf_pfn[leaves] = leaf_pages
    leaf_crc[leaves] = [zlib.crc32(page.tobytes()) for page in bitmaps]
    total = int(np.count_nonzero(marked))
    for r, root in enumerate(roots.tolist()):
        first = r * ENTRIES_PER_ROOT
        count = max(0, min(ENTRIES_PER_ROOT, nr_leaves - first))
        next_root = int(roots[r + 1]) if r + 1 < nr_roots else 0
        _write_root(
            ram,
            root,
            nr_ram_pages,
            first,
            count,
            next_root,
            total,
            leaf_pfn[first : first + ENTRIES_PER_ROOT],
            leaf_crc[first : first + ENTRIES_PER_ROOT],
        )
    return int(roots[0]), table


def _write_root(
    ram: Ram,
    pfn: int,
    nr_ram_pages: int,
    first: int,
    count: int,
    next_root: int,
    total: int,
    leaf_pfns: np.ndarray,
    leaf_crcs: np.ndarray,
) -> None:
    page = bytearray(PAGE_SIZE)
    entries_at = ROOT_HEADER.size
    page[entries_at : entries_at + 8 * ENTRIES_PER_ROOT] = leaf_pfns.tobytes()
    crcs_at = entries_at + 8 * ENTRIES_PER_ROOT
    page[crcs_at : crcs_at + 4 * ENTRIES_PER_ROOT] = leaf_crcs.tobytes()
    header = (MAGIC, VERSION, 0, nr_ram_pages, first, count, next_root, total)
    ROOT_HEADER.pack_into(page, 0, *header)
    crc = zlib.crc32(page)
    ROOT_HEADER.pack_into(page, 0, *header[:2], crc, *header[3:])
    ram.write_page(pfn, page)


def read_table(ram: Ram, root_pfn: int) -> PfnArray:
    """Walk the table from *root_pfn*; return every marked pfn, sorted.

    Raises CorruptHandover, naming what is wrong, when anything fails validation.
    """
    return np.flatnonzero(walk_table(ram, root_pfn)[0])


def walk_table(ram: Ram, root_pfn: int) -> tuple[npt.NDArray[np.bool_], PfnArray]:
    """Walk the table from *root_pfn*; return (whether each page of RAM is marked, a bool per
    pfn, the table's own pages).

    The table's pages are among the marked ones. Raises CorruptHandover, naming what is
    wrong, when anything fails validation. Cost: the leaves are unpacked once into the bitmap
    of RAM (no list of the marked pfns is made).
    """
    nr_ram_pages = ram.nr_pages
    nr_leaves = _nr_leaves(nr_ram_pages)
    table: list[int] = []
    leaves = np.zeros((nr_leaves, PAGE_SIZE), dtype=np.uint8)  # every leaf's bitmap, packed
    claimed_total = -1
    pfn = root_pfn
    for r in range(_nr_roots(nr_ram_pages)):
        if not 0 < pfn < nr_ram_pages:
            raise CorruptHandover(f"root page {r}: pfn {pfn} is not a page of RAM")
        if pfn in table:
            raise CorruptHandover(f"root page {r}: pfn {pfn} repeats (a cycle)")
        table.append(pfn)
        page = ram.pages[pfn].tobytes()
        magic, version, crc, ram_pages, first, count, next_root, total = ROOT_HEADER.unpack_from(
            page
        )
        if magic != MAGIC:
            raise CorruptHandover(f"root page {r} at pfn {pfn}: bad magic {magic!r}")
        if version not in SUPPORTED_VERSIONS:
            raise CorruptHandover(f"root page {r}: unsupported version {version}")
        zeroed = bytearray(page)
        zeroed[12:16] = bytes(4)
        if zlib.crc32(zeroed) != crc:
            raise CorruptHandover(f"root page {r} at pfn {pfn}: checksum mismatch")
        if ram_pages != nr_ram_pages:
            raise CorruptHandover(f"written for {ram_pages} pages of RAM, this has {nr_ram_pages}")
        expected = max(0, min(ENTRIES_PER_ROOT, nr_leaves - r * ENTRIES_PER_ROOT))
        if first != r * ENTRIES_PER_ROOT or count != expected:
            raise CorruptHandover(f"root page {r}: covers leaves {first}+{count}, not as expected")
        if r > 0 and total != claimed_total:
            raise CorruptHandover(f"root page {r}: page count {total} disagrees with root 0")
        claimed_total = total
        _read_leaves(ram, page, r, leaves[first : first + count], table)
        last = r == _nr_roots(nr_ram_pages) - 1
        if last != (next_root == 0):
            raise CorruptHandover(f"root page {r}: the chain of root pages has the wrong length")
        pfn = next_root
    if len(set(table)) != len(table):
        raise CorruptHandover("a page of the table is used twice")
    bits = np.unpackbits(leaves.reshape(-1), bitorder="little").view(np.bool_)
    if bits[nr_ram_pages:].any():
        raise CorruptHandover("a marked pfn is outside RAM")
    marked = bits[:nr_ram_pages]
    nr_marked = int(np.count_nonzero(marked))
    if nr_marked != claimed_total:
        raise CorruptHandover(f"{nr_marked} pages marked, the table says {claimed_total}")
    own = np.asarray(table, dtype=np.int64)
    if not marked[own].all():
        raise CorruptHandover("a page of the table is not marked preserved itself")
    return marked, own


def _read_leaves(
    ram: Ram, root: bytes, r: int, leaves: npt.NDArray[np.uint8], table: list[int]
) -> None:
    """Copy the leaves root *r* names (checked) into *leaves*, its rows of the bitmap."""
    first = r * ENTRIES_PER_ROOT
    count = len(leaves)
    entries_at = ROOT_HEADER.size
    pfns = np.frombuffer(root, dtype="<u8", count=ENTRIES_PER_ROOT, offset=entries_at)
    crcs = np.frombuffer(
        root, dtype="<u4", count=ENTRIES_PER_ROOT, offset=entries_at + 8 * ENTRIES_PER_ROOT
    )
    if (pfns[count:] != NO_LEAF).any():
        raise CorruptHandover(f"root page {r}: leaf entries past the end of RAM")
    present = np.flatnonzero(pfns[:count] != NO_LEAF)
    leaf_pfns = pfns[present].astype(np.int64)
    if len(leaf_pfns) and int(leaf_pfns.max()) >= ram.nr_pages:
        raise CorruptHandover(f"root page {r}: a leaf pfn is outside RAM")
    bitmaps = ram.pages[leaf_pfns]  # a copy: what is checked is what is used
    for i, (page, crc) in enumerate(zip(bitmaps, crcs[present].tolist(), strict=True)):
        if zlib.crc32(page) != crc:
            raise CorruptHandover(f"leaf {first + int(present[i])}: checksum mismatch")
    table.extend(leaf_pfns.tolist())
    leaves[present] = bitmaps
