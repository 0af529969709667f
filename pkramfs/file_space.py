"""A file's pages allocated or freed without writing them: fallocate(2) on the page index.

``allocate`` gives pages to the holes of a range (a huge page to each empty 2 MiB chunk it
touches when the mount has huge=always), zeroed and marked unwritten, as tmpfs leaves
fallocated folios not uptodate; all or nothing on ENOSPC, as tmpfs undoes a fallocate that
fails. ``punch`` frees the whole pages of a range at once, splitting a huge page the range
covers in part as Linux does, and zeroes the range's bytes in the pages at its edges.
"""

import errno

import numpy as np

from kexec_sim import PAGE_SHIFT, PAGE_SIZE, PfnArray, Ram, run_positions

from . import secret_pages
from .errors import FsError
from .file_data import zero_bytes
from .file_pages import CHUNK_SHIFT, HOLE, FilePages
from .page_pool import PagePool


def allocate(
    ram: Ram,
    pages: FilePages,
    pool: PagePool,
    start_byte: int,
    end_byte: int,
    *,
    huge: bool,
    secret: bool,
) -> None:
    """Give every page of bytes [start_byte, end_byte) one; FsError(ENOSPC), changing
    nothing, if the mount or the machine has too few free.

    Pages held already keep their data; unwritten ones among them become written (tmpfs
    clears a fallocated folio met again). A secret file's new pages leave the direct map."""
    first = start_byte >> PAGE_SHIFT
    end = (end_byte + PAGE_SIZE - 1) >> PAGE_SHIFT
    count = end - first
    if count > ram.nr_pages or (pool.limit_pages and count > pool.limit_pages):
        raise FsError(errno.ENOSPC, "more pages than the mount may ever hold")  # as tmpfs
    new_huge: list[int] = []
    if huge:
        for chunk_no in range(first >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1):
            if pages.chunk_is_empty(chunk_no):
                base = pool.take_huge()
                if base is None:
                    break  # no aligned free run: small pages from here on
                new_huge.append(chunk_no)
                pages.assign_huge(chunk_no, base)
    pfns = pages.lookup(first, count)
    holes = np.flatnonzero(pfns == HOLE)
    try:
        new = pool.take(len(holes))
    except FsError:
        for chunk_no in new_huge:
            pool.give_back(pages.remove_huge(chunk_no))
        raise
    fresh = np.full(count, HOLE, dtype=np.int64)
    fresh[holes] = new
    pages.assign(first, fresh)
    pages.mark_written(first, count)  # those held before (new huge pages have no marks yet)
    huge_indexes = [np.arange(c << CHUNK_SHIFT, (c + 1) << CHUNK_SHIFT) for c in new_huge]
    new_indexes = np.sort(np.concatenate([holes + first, *huge_indexes]))
    span_lo = int(new_indexes[0]) if len(new_indexes) else 0
    span = pages.lookup(span_lo, int(new_indexes[-1]) + 1 - span_lo if len(new_indexes) else 0)
    new_pfns = span[new_indexes - span_lo]
    _zero_pages(ram, new_pfns)
    if secret:
        secret_pages.hide(ram, new_pfns)
    pages.mark_unwritten(new_indexes)
    pages.note_fallocated(end)


def punch(
    ram: Ram,
    pages: FilePages,
    pool: PagePool,
    start_byte: int,
    end_byte: int,
    size_bytes: int,
    *,
    secret: bool,
) -> None:
    """Free the whole pages of bytes [start_byte, end_byte) and zero the range's bytes in
    the pages at its edges, as tmpfs punches a hole (of a file of *size_bytes*)."""
    dropped = pages.punch(start_byte, end_byte, (size_bytes + PAGE_SIZE - 1) >> PAGE_SHIFT)
    if secret:
        secret_pages.unhide(ram, dropped)
    pool.give_back(dropped)
    for page in sorted({start_byte >> PAGE_SHIFT, (end_byte - 1) >> PAGE_SHIFT}):
        lo = max(start_byte, page << PAGE_SHIFT)
        hi = min(end_byte, (page + 1) << PAGE_SHIFT)
        pfn = pages.lookup_list(page, 1)[0]
        if pfn == HOLE:
            continue  # a hole, or a whole page of the range: freed
        if secret:
            secret_pages.zero(ram, pfn, lo & (PAGE_SIZE - 1), hi - lo)
        else:
            zero_bytes(ram, pfn * PAGE_SIZE + (lo & (PAGE_SIZE - 1)), hi - lo)


def _zero_pages(ram: Ram, pfns: PfnArray) -> None:
    """Zero the pages *pfns* (a slice per run of consecutive pfns) and mark them changed."""
    if not len(pfns):
        return
    at, lengths = run_positions(pfns)
    if len(at) * 4 > len(pfns):  # scattered: one fancy-index store
        ram.pages[pfns] = 0
    else:
        for start, length in zip(pfns[at].tolist(), lengths.tolist(), strict=True):
            ram.pages[start : start + length] = 0
    ram.keys.mark_changed(pfns)
