"""A file's pages allocated or freed without writing them: fallocate(2) on the page index.

``allocate`` gives pages to the holes of a range as a write would (file_data.take_holes),
zeroed and marked unwritten, as tmpfs leaves fallocated folios not uptodate; all or nothing
on ENOSPC, as tmpfs undoes a fallocate that fails. ``punch`` frees the whole pages of a range
at once, splitting the folios it cuts as Linux does (see folios), and zeroes the range's
bytes in the pages at its edges.
"""

import errno

from kexec_sim import PAGE_SHIFT, PAGE_SIZE, Ram

from . import secret_pages
from .errors import FsError
from .file_data import take_holes, zero_bytes, zero_pages
from .file_pages import HOLE, FilePages
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
    new_indexes = take_holes(pages, pool, first, count, huge=huge)
    pages.mark_written(first, count)  # unwritten pages held before: written now
    new_pfns = pages.pfns_at(new_indexes)
    zero_pages(ram, new_pfns)
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
