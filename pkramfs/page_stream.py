"""Page streams: which pfns hold a node's file pages, as chained link pages of 64-bit entries.

A link page (``LINK_MAGIC``) is a chain page (kexec-free RAM, see page_chain) whose count is its
number of entries (1..508) and whose extra word is a base file index, a multiple of 2**32. Each
entry is one u64::

    bits 36..63  pfn (28 bits: RAM up to 1 TiB)
    bits  4..35  file page index minus the page's base index (32 bits)
    bits  0..3   order: the entry covers 2**order pages (0: 4 KiB, 9: one 2 MiB huge page)

so a huge page is one entry and a 1 GiB file of small pages 262,144 entries in 517 pages.
A node has one stream for all its files, in file order; each file (object) names the slice of
entries that is its own, so a tree of small files costs 8 bytes per file, not a page.
"""

import numpy as np
import numpy.typing as npt

from kexec_sim import HUGE_ORDER, PfnArray, Ram

from . import page_chain
from .errors import CorruptNode
from .file_pages import small_orders

LINK_MAGIC = b"PKRMLNK1"
ENTRIES_PER_LINK = page_chain.WORDS_PER_PAGE - page_chain.HEADER_WORDS  # 508
PFN_SHIFT = 36
INDEX_SHIFT = 4
INDEX_BITS = 32
ORDER_MASK = 0xF
MAX_PFN = 1 << (64 - PFN_SHIFT)

Int64s = npt.NDArray[np.int64]
Words = page_chain.Words


def _layout(indexes: Int64s) -> tuple[Int64s, Int64s]:
    """Return where each link page starts in the entries and its base index.

    A page holds up to ENTRIES_PER_LINK entries whose indexes share their high 32 bits.
    """
    n = len(indexes)
    if int(indexes.max()) >> INDEX_BITS == 0:  # the usual case: files under 16 TiB
        starts = np.arange(0, n, ENTRIES_PER_LINK, dtype=np.int64)
        return starts, np.zeros(len(starts), dtype=np.int64)
    high = indexes >> INDEX_BITS
    breaks = np.flatnonzero(high[1:] != high[:-1]) + 1
    if breaks.size == 0:  # the usual case: every index below 2**32 (files under 16 TiB)
        starts = np.arange(0, n, ENTRIES_PER_LINK, dtype=np.int64)
    else:
        run_starts = np.concatenate([[0], breaks])
        run_ends = np.concatenate([breaks, [n]])
        starts = np.concatenate(
            [
                np.arange(s, e, ENTRIES_PER_LINK, dtype=np.int64)
                for s, e in zip(run_starts, run_ends, strict=True)
            ]
        )
    return starts, high[starts] << INDEX_BITS


def link_pages_needed(indexes: Int64s) -> int:
    """Return how many link pages a stream of entries with *indexes* takes."""
    return 0 if len(indexes) == 0 else len(_layout(indexes)[0])


def write_stream(
    ram: Ram, link_pfns: PfnArray, pfns: Int64s, orders: Int64s, indexes: Int64s
) -> None:
    """Write the entries (pfn, order, file index) as a chain of link pages on *link_pfns*.

    *link_pfns* must be exactly ``link_pages_needed(indexes)`` pages.
    """
    if len(pfns) == 0:
        return
    starts, bases = _layout(indexes)
    assert len(starts) == len(link_pfns), "wrong number of link pages"
    counts = np.diff(np.concatenate([starts, [len(pfns)]]))
    words = page_chain.new_pages(ram, link_pfns, LINK_MAGIC)
    words[:, 3] = bases.astype(np.uint64)
    body = words[:, page_chain.HEADER_WORDS :]
    if bases.any() or (counts[:-1] != ENTRIES_PER_LINK).any():
        page_of_entry = np.repeat(np.arange(len(starts)), counts)
        slot = np.arange(len(pfns)) - np.repeat(starts, counts)
        offsets = indexes - bases[page_of_entry]
        body[:] = 0
        n = len(pfns)
        packed = _encode(pfns, orders, offsets, np.empty(n, np.uint64), np.empty(n, np.uint64))
        body[page_of_entry, slot] = packed
    else:  # every page full but the last, all bases 0: the entries fill the bodies in order
        _encode_in_rows(body, pfns, orders, indexes)
    page_chain.seal_and_store(ram, link_pfns, words, counts)


_ROWS_AT_ONCE = 64
"""Link pages `_encode_in_rows` packs at a time, in one buffer (254 KiB) reused by each."""


def _encode_in_rows(body: Words, pfns: Int64s, orders: Int64s, indexes: Int64s) -> None:
    """Pack the entries into the link pages' bodies *body* (pages, 508) row after row, zeros
    after the last: straight into the pages, with no stream-long temporary (fresh memory is
    slow to touch here: ~0.5 ms per MiB on the machine this was measured on)."""
    n = len(pfns)
    full_rows = n // ENTRIES_PER_LINK
    with_orders = bool(orders.any())
    scratch = np.empty((min(full_rows, _ROWS_AT_ONCE), ENTRIES_PER_LINK), dtype=np.uint64)
    for lo in range(0, full_rows, _ROWS_AT_ONCE):
        hi = min(full_rows, lo + _ROWS_AT_ONCE)
        at = slice(lo * ENTRIES_PER_LINK, hi * ENTRIES_PER_LINK)
        shape = (hi - lo, ENTRIES_PER_LINK)
        _encode(
            pfns[at].reshape(shape),
            orders[at].reshape(shape) if with_orders else None,
            indexes[at].reshape(shape),
            body[lo:hi],
            scratch[: hi - lo],
        )
    rest = n - full_rows * ENTRIES_PER_LINK
    if rest:
        at = slice(n - rest, n)
        orders_at = orders[at] if with_orders else None
        out = body[full_rows, :rest]
        _encode(pfns[at], orders_at, indexes[at], out, np.empty(rest, dtype=np.uint64))
        body[full_rows, rest:] = 0


def _encode(
    pfns: Int64s,
    orders: Int64s | None,
    offsets: Int64s,
    out: npt.NDArray[np.uint64],
    scratch: npt.NDArray[np.uint64],
) -> npt.NDArray[np.uint64]:
    """Pack entries into *out* (of their shape; orders None: all 0), shifting the offsets in
    *scratch* (of the same shape)."""
    # All three are non-negative int64: reinterpret them as uint64 rather than convert.
    np.left_shift(pfns.view(np.uint64), np.uint64(PFN_SHIFT), out=out)
    np.left_shift(offsets.view(np.uint64), np.uint64(INDEX_SHIFT), out=scratch)
    np.bitwise_or(out, scratch, out=out)
    if orders is not None:
        np.bitwise_or(out, orders.view(np.uint64), out=out)
    return out


def read_stream(
    ram: Ram, first_pfn: int, n_pages: int, n_entries: int, what: str
) -> tuple[PfnArray, Int64s, Int64s, Int64s]:
    """Read and validate a stream; return (link pfns, entry pfns, orders, file indexes).

    Raises CorruptNode for a bad chain, a wrong entry count, a pfn outside RAM, an unknown
    order, or a huge entry whose pfn or index is not 512-aligned.
    """
    link_pfns, headers, body = page_chain.read_chain(ram, first_pfn, n_pages, LINK_MAGIC, what)
    empty = np.empty(0, dtype=np.int64)
    if n_pages == 0:
        if n_entries:
            raise CorruptNode(f"{what}: {n_entries} entries but no link pages")
        return link_pfns, empty, empty, empty
    counts = page_chain.counts_of(headers)
    if ((counts < 1) | (counts > ENTRIES_PER_LINK)).any() or int(counts.sum()) != n_entries:
        raise CorruptNode(
            f"{what}: link pages hold {int(counts.sum())} entries, node says {n_entries}"
        )
    bases = headers[:, 3]
    if (bases & np.uint64((1 << INDEX_BITS) - 1)).any():
        raise CorruptNode(f"{what}: a link page's base index is not a multiple of 2**32")
    if bases.any() or (counts[:-1] != ENTRIES_PER_LINK).any():
        entries = body[np.arange(ENTRIES_PER_LINK) < counts[:, None]]
        page_bases: npt.NDArray[np.uint64] | None = np.repeat(bases, counts)
    else:  # full pages, base 0 (the usual case): the first n words of the bodies, in order
        entries = body.reshape(-1)[:n_entries]  # the bodies are a copy: decoded in place
        page_bases = None
    # Shifted right, every field fits in 63 bits: view the results as int64, no copies.
    pfns = (entries >> np.uint64(PFN_SHIFT)).view(np.int64)
    has_huge = bool(int(np.bitwise_or.reduce(entries)) & ORDER_MASK)
    if has_huge:
        orders = (entries & np.uint64(ORDER_MASK)).view(np.int64)
    else:  # no huge entry (one pass over the entries told): no array either
        orders = small_orders(n_entries)
    offsets = np.right_shift(entries, np.uint64(INDEX_SHIFT), out=entries)  # entries: done
    offsets &= np.uint64((1 << INDEX_BITS) - 1)
    if page_bases is not None:
        offsets += page_bases
    indexes = offsets.view(np.int64)
    if int(pfns.min()) <= 0:
        raise CorruptNode(f"{what}: an entry points outside RAM")
    if has_huge:  # huge entries: order 9, 2 MiB aligned, inside RAM
        huge = orders != 0
        if (orders[huge] != HUGE_ORDER).any():
            raise CorruptNode(f"{what}: an entry has an unknown order")
        if ((pfns[huge] | indexes[huge]) & ((1 << HUGE_ORDER) - 1)).any():
            raise CorruptNode(f"{what}: a huge entry is not 2 MiB aligned")
        if int(pfns[huge].max()) + (1 << HUGE_ORDER) > ram.nr_pages:
            raise CorruptNode(f"{what}: an entry points outside RAM")
    if int(pfns.max()) >= ram.nr_pages:
        raise CorruptNode(f"{what}: an entry points outside RAM")
    return link_pfns, pfns, orders, indexes
