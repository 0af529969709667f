"""Chains of checksummed metadata pages in RAM: the common frame of link and byte pages.

Every metadata page of a preserved node starts with the same 32-byte header (``CHAIN_HEADER``):
a magic naming the page kind, a CRC32 of the whole page with the crc field zero, a count (what
it means is the page kind's), the pfn of the next page of the chain (0 for the last) and one
kind-specific u64. Chains are written all at once from a (pages, 512) uint64 array and read
back with every page checked: magic, checksum, pfn in RAM, no page visited twice (a cycle),
no more pages than the node says (a runaway chain).
"""

import struct
import zlib

import numpy as np
import numpy.typing as npt

from kexec_sim import PAGE_SIZE, PfnArray, Ram

from .errors import CorruptNode

CHAIN_HEADER = struct.Struct("<8sIIQQ")  # magic crc count next extra
HEADER_WORDS = CHAIN_HEADER.size // 8
WORDS_PER_PAGE = PAGE_SIZE // 8
BODY_WORDS = WORDS_PER_PAGE - HEADER_WORDS
_CRC_MASK = np.uint64(0xFFFFFFFF)

Words = npt.NDArray[np.uint64]


def magic_word(magic: bytes) -> np.uint64:
    """Return an 8-byte magic as the little-endian u64 it is stored as."""
    return np.uint64(int.from_bytes(magic, "little"))


def new_pages(ram: Ram, pfns: PfnArray, magic: bytes) -> Words:
    """Return the chain's pages as (n, 512) words, headers set but for count and CRC.

    When *pfns* are consecutive (the usual case) the words are the RAM pages themselves, so
    nothing is built aside and copied; otherwise a buffer that `seal_and_store` copies in.
    The body of each page is not cleared: the caller fills all of it.
    """
    n = len(pfns)
    if n and int(pfns[-1]) - int(pfns[0]) == n - 1 and (np.diff(pfns) == 1).all():
        words: Words = ram.writable_run(int(pfns[0]), n).view(np.uint64)
    else:
        words = np.empty((n, WORDS_PER_PAGE), dtype=np.uint64)
    words[:, 0] = magic_word(magic)
    words[:, 1] = 0
    words[:, 2] = chain_next(pfns)
    words[:, 3] = 0
    return words


def chain_next(pfns: PfnArray) -> PfnArray:
    """Return the next-pfn of each page of a chain laid out on *pfns* (0 after the last)."""
    following = np.zeros(len(pfns), dtype=np.int64)
    following[:-1] = pfns[1:]
    return following


def seal_and_store(ram: Ram, pfns: PfnArray, words: Words, counts: npt.ArrayLike) -> None:
    """Set each page's count, compute its CRC and write the pages to RAM at *pfns* (unless
    *words* are those RAM pages already, see `new_pages`)."""
    words[:, 1] = np.asarray(counts, dtype=np.uint64) << np.uint64(32)
    as_bytes = words.view(np.uint8)
    crcs = np.fromiter((zlib.crc32(row) for row in as_bytes), dtype=np.uint64, count=len(words))
    words[:, 1] |= crcs
    if not np.shares_memory(words, ram.pages):  # else marked changed by `new_pages`
        ram.store_pages(pfns, as_bytes.reshape(len(pfns), PAGE_SIZE))


def read_chain(
    ram: Ram, first_pfn: int, n_pages: int, magic: bytes, what: str
) -> tuple[PfnArray, Words, Words]:
    """Walk a chain of exactly *n_pages* from *first_pfn*; return its pfns and a copy of each
    page's header words (pages, 4) and of its body (pages, 508), both contiguous and checked.

    Raises CorruptNode naming *what* and the reason for a pfn outside RAM, a page visited
    twice, a wrong magic or checksum, or a chain longer or shorter than *n_pages*.
    """
    if n_pages == 0:
        if first_pfn != 0:
            raise CorruptNode(f"{what}: starts at pfn {first_pfn} but has no pages")
        empty = np.empty(0, dtype=np.int64)
        return empty, np.empty((0, HEADER_WORDS), np.uint64), np.empty((0, BODY_WORDS), np.uint64)
    all_words = ram.pages.view(np.uint64)
    consecutive = _consecutive_chain(ram, first_pfn, n_pages)
    pfns = np.empty(n_pages, dtype=np.int64) if consecutive is None else consecutive
    pfn = first_pfn
    for position in range(0 if consecutive is None else n_pages, n_pages):
        if not 0 < pfn < ram.nr_pages:
            raise CorruptNode(f"{what}: page {position} at pfn {pfn} is outside RAM")
        pfns[position] = pfn
        pfn = int(all_words[pfn, 2])
    if consecutive is None and pfn != 0 and (pfns == pfn).any():
        raise CorruptNode(f"{what}: the chain links back to pfn {pfn} (a cycle)")
    if consecutive is None and pfn != 0:
        raise CorruptNode(f"{what}: the chain goes on past its {n_pages} pages (pfn {pfn})")
    ordered = np.sort(pfns)
    if (ordered[1:] == ordered[:-1]).any():
        raise CorruptNode(f"{what}: the chain visits a page twice (a cycle)")
    ram.keys.mark_referenced(pfns)
    # Copies either way (what is checked is what is used), the bodies apart from the headers:
    # a stream's bodies are then one contiguous array, read without another copy.
    if int(pfns[-1]) - int(pfns[0]) == n_pages - 1 and (np.diff(pfns) == 1).all():
        pages = all_words[int(pfns[0]) : int(pfns[0]) + n_pages]
        headers, bodies = pages[:, :HEADER_WORDS].copy(), pages[:, HEADER_WORDS:].copy()
    else:
        headers, bodies = all_words[pfns, :HEADER_WORDS], all_words[pfns, HEADER_WORDS:]
    bad_magic = np.flatnonzero(headers[:, 0] != magic_word(magic))
    if bad_magic.size:
        raise CorruptNode(f"{what}: pfn {int(pfns[bad_magic[0]])} is not a {magic.decode()} page")
    stored = (headers[:, 1] & _CRC_MASK).tolist()
    headers[:, 1] &= ~_CRC_MASK
    body_bytes = bodies.view(np.uint8)
    for position, header in enumerate(headers.view(np.uint8)):
        if zlib.crc32(body_bytes[position], zlib.crc32(header)) != stored[position]:
            raise CorruptNode(f"{what}: checksum mismatch in pfn {int(pfns[position])}")
    return pfns, headers, bodies


def _consecutive_chain(ram: Ram, first_pfn: int, n_pages: int) -> PfnArray | None:
    """The chain's pfns if it lies on the *n_pages* pages from *first_pfn* in order, each
    linking to the next and the last to none (how chains are written when the allocator can):
    their links checked at once, not a page at a time in Python. None when it does not, or
    when the range leaves RAM or this process's direct map (then not read: the walk page by
    page says what is wrong)."""
    end = first_pfn + n_pages
    if not 0 < first_pfn < end <= ram.nr_pages:
        return None
    pfns = np.arange(first_pfn, end, dtype=np.int64)
    if ram.unmapped_mask(pfns).any():  # only the range: not a pass over all of RAM
        return None
    links = ram.pages.view(np.uint64)[first_pfn:end, 2]
    if links[-1] != 0 or (links[:-1] != pfns[1:].view(np.uint64)).any():
        return None
    return pfns


def counts_of(headers: Words) -> npt.NDArray[np.int64]:
    """Return the count field of each page of a chain from its headers (`read_chain`)."""
    return (headers[:, 1] >> np.uint64(32)).astype(np.int64)
