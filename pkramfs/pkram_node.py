"""PKRAM nodes: one page per preserved mount, linked in a list headed in the super block.

A node page (``NODE_HEADER``, then zeros) names the mount (``pkram=NAME``) and points at its
metadata byte stream (byte_stream) and its page stream (page_stream). Two words are updated in
place by single aligned 8-byte stores and are therefore outside the CRC: ``next`` (the list
link) and ``state``. A node is written whole, then linked into the list as SAVING, its pages are
handed to PRESERVED, and only then does its state become COMPLETE: a process that dies on the way
leaves a SAVING node, which the next lock holder settles (see node_store). TAKEN marks a node
whose pages a restore, cancel or discard is taking; only COMPLETE nodes restore.
"""

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from kexec_sim import PAGE_SIZE, Ram, node_list_head, set_node_list_head

from .errors import CorruptNode
from .options import PKRAM_NAME_RE
from .page_chain import magic_word

NODE_MAGIC = b"PKRMNOD1"
NODE_VERSION = 1
NODE_HEADER = struct.Struct("<8sIIQ8sQQQQQQQQQQQ64s")
_CRC_AT = 12
_NAME_AT = NODE_HEADER.size - 64
NEXT_WORD = 2  # u64 index of ``next`` in the page
STATE_WORD = 3  # u64 index of ``state``
SAVING = b"saving\0\0"
COMPLETE = b"complete"
TAKEN = b"taken\0\0\0"
STATES = (SAVING, COMPLETE, TAKEN)


@dataclass(frozen=True)
class NodeHeader:
    """What a node page says (``next`` and ``state`` aside)."""

    name: str
    generation: int
    saved_ns: int
    meta_pfn: int
    meta_bytes: int
    meta_pages: int
    links_pfn: int
    link_pages: int
    nr_entries: int
    data_pages: int
    nr_objects: int
    flags: int = 0


def write_node(ram: Ram, pfn: int, header: NodeHeader) -> None:
    """Write the node page at *pfn*: state SAVING, not linked (next 0)."""
    page = bytearray(PAGE_SIZE)
    NODE_HEADER.pack_into(
        page,
        0,
        NODE_MAGIC,
        NODE_VERSION,
        0,
        0,
        bytes(8),
        header.generation,
        header.saved_ns,
        header.meta_pfn,
        header.meta_bytes,
        header.meta_pages,
        header.links_pfn,
        header.link_pages,
        header.nr_entries,
        header.data_pages,
        header.nr_objects,
        header.flags,
        header.name.encode(),
    )
    struct.pack_into("<I", page, _CRC_AT, zlib.crc32(page))
    page[STATE_WORD * 8 : STATE_WORD * 8 + 8] = SAVING
    ram.write_page(pfn, page)


def read_node(ram: Ram, pfn: int) -> NodeHeader:
    """Read and validate the node page at *pfn*; raise CorruptNode naming what is wrong."""
    if not 0 < pfn < ram.nr_pages:
        raise CorruptNode(f"node pfn {pfn} is outside RAM")
    page = bytearray(ram.pages[pfn].tobytes())
    fields = NODE_HEADER.unpack_from(page)
    magic, version, crc = fields[:3]
    if magic != NODE_MAGIC:
        raise CorruptNode(f"pfn {pfn} is not a node (magic {magic!r})")
    if version != NODE_VERSION:
        raise CorruptNode(f"node at pfn {pfn}: version {version} is not supported")
    page[_CRC_AT : _CRC_AT + 4] = bytes(4)
    page[NEXT_WORD * 8 : STATE_WORD * 8 + 8] = bytes(16)
    if zlib.crc32(page) != crc:
        raise CorruptNode(f"node at pfn {pfn}: checksum mismatch")
    raw_name = fields[-1].rstrip(b"\0")
    name = raw_name.decode("ascii", errors="replace")
    if not PKRAM_NAME_RE.fullmatch(name):
        raise CorruptNode(f"node at pfn {pfn}: bad name {raw_name!r}")
    header = NodeHeader(name, *fields[5:-1])
    for what, first, count in (
        ("metadata", header.meta_pfn, header.meta_pages),
        ("link", header.links_pfn, header.link_pages),
    ):
        if count > ram.nr_pages or not (0 < first < ram.nr_pages or (first == 0 == count)):
            raise CorruptNode(f"node {name!r}: {what} stream at pfn {first} is outside RAM")
    if header.data_pages > ram.nr_pages or header.nr_entries > header.data_pages:
        raise CorruptNode(f"node {name!r}: says {header.data_pages} data pages, RAM is smaller")
    if header.flags:
        raise CorruptNode(f"node {name!r}: unknown flags {header.flags:#x}")
    return header


def _words(ram: Ram) -> np.ndarray:
    return ram.pages.view(np.uint64)


def node_next(ram: Ram, pfn: int) -> int:
    """Return the raw ``next`` link of the node page at *pfn* (untrusted)."""
    return int(_words(ram)[pfn, NEXT_WORD])


def node_state(ram: Ram, pfn: int) -> bytes:
    """Return the raw ``state`` word of the node page at *pfn*."""
    return bytes(ram.pages[pfn, STATE_WORD * 8 : STATE_WORD * 8 + 8])


def set_node_state(ram: Ram, pfn: int, state: bytes) -> None:
    """Change a node's state with one aligned 8-byte store."""
    ram.store_word(pfn, STATE_WORD, int(magic_word(state)))


def _set_next(ram: Ram, pfn: int, next_pfn: int) -> None:
    ram.store_word(pfn, NEXT_WORD, next_pfn)


@dataclass(frozen=True)
class ListedNode:
    """A node found in the list: where it is, what precedes it, and its header or why not."""

    pfn: int
    prev_pfn: int  # 0: the list head in the super block
    state: bytes
    header: NodeHeader | None
    error: str | None
    raw_name: str  # the name field as found, unverified (for naming a damaged node)


def walk_list(ram: Ram, sb_pfn: int) -> tuple[list[ListedNode], str | None]:
    """Return the nodes in the list of super block *sb_pfn*, and why the walk stopped early.

    A node with a bad header is listed with its error; the walk stops at one whose magic is
    wrong (its link cannot be trusted), at a pfn outside RAM and at a cycle.
    """
    found: list[ListedNode] = []
    seen: set[int] = set()
    prev, pfn = 0, node_list_head(ram, sb_pfn)
    while pfn:
        if not 0 < pfn < ram.nr_pages:
            return found, f"node list: link to pfn {pfn} outside RAM"
        if pfn in seen:
            return found, f"node list: cycle at pfn {pfn}"
        seen.add(pfn)
        if bytes(ram.pages[pfn, :8]) != NODE_MAGIC:
            return found, f"node list: pfn {pfn} is not a node page"
        try:
            header: NodeHeader | None = read_node(ram, pfn)
            error = None
        except CorruptNode as exc:
            header, error = None, str(exc)
        state = node_state(ram, pfn)
        if error is None and state not in STATES:
            error = f"node at pfn {pfn}: unknown state {state!r}"
        raw = bytes(ram.pages[pfn, _NAME_AT : _NAME_AT + 64]).split(b"\0", 1)[0]
        raw_name = raw.decode("ascii", errors="replace")
        found.append(ListedNode(pfn, prev, state, header, error, raw_name))
        prev, pfn = pfn, node_next(ram, pfn)
    return found, None


def link_first(ram: Ram, sb_pfn: int, pfn: int) -> None:
    """Put node *pfn* at the head of the list (its ``next`` first, then the head: one store)."""
    _set_next(ram, pfn, node_list_head(ram, sb_pfn))
    set_node_list_head(ram, sb_pfn, pfn)


def unlink(ram: Ram, sb_pfn: int, node: ListedNode) -> None:
    """Remove *node* from the list with one store into its predecessor (or the head)."""
    following = node_next(ram, node.pfn)
    if node.prev_pfn == 0:
        set_node_list_head(ram, sb_pfn, following)
    else:
        _set_next(ram, node.prev_pfn, following)
