"""The data path: copying bytes between FUSE buffers and a file's pages in the machine's RAM.

Bytes move with memoryview slices, one copy per run of consecutive pfns; when a request spans
many scattered pages the middle pages move with one numpy fancy-index copy. Holes read as zeros.
Invariant kept by every function here: bytes of a file's last page beyond EOF are zero, so
extending a file (truncate up, write past EOF) never exposes stale RAM. Storage keys: a read
sets REFERENCED on the pages it touches, every store sets CHANGED (one numpy call a request).
A store makes the unwritten pages it reaches written (see file_pages).
"""

import numpy as np

from kexec_sim import PAGE_SHIFT, PAGE_SIZE, PfnArray, Ram, run_positions

from . import secret_pages
from .errors import FsError
from .file_pages import CHUNK_MASK, CHUNK_SHIFT, HOLE, FilePages
from .page_pool import PagePool

_MAX_LOOPED_RUNS = 8  # above this many runs, the middle pages are copied with one numpy copy
_SMALL_PAGES = 16  # requests up to this many pages use Python ints: numpy calls cost more
_PAGE_MASK = PAGE_SIZE - 1
_ZERO_PAGE = bytes(PAGE_SIZE)
Buffer = bytes | bytearray | memoryview


def _small_runs(pfns: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive present pfns in a short list (holes excluded)."""
    runs = []
    start = 0
    for i in range(1, len(pfns) + 1):
        if i == len(pfns) or pfns[i] == HOLE or pfns[i] != pfns[i - 1] + 1:
            if pfns[start] != HOLE:
                runs.append((start, i))
            start = i
    return runs


def _runs(pfns: PfnArray) -> tuple[np.ndarray, np.ndarray]:
    """Return (starts, ends) of the runs of consecutive present pfns (holes excluded)."""
    at, lengths = run_positions(pfns)
    keep = pfns[at] != HOLE
    return at[keep], (at + lengths)[keep]


def read(
    ram: Ram, pages: FilePages, size_bytes: int, off: int, length: int
) -> bytes | bytearray | memoryview:
    """Return up to *length* bytes at *off* (fewer at EOF); a single run is returned zero-copy."""
    if off >= size_bytes or length <= 0:
        return b""
    length = min(length, size_bytes - off)
    first = off >> PAGE_SHIFT
    count = ((off + length - 1) >> PAGE_SHIFT) - first + 1
    in_off = off & _PAGE_MASK
    if count <= _SMALL_PAGES:
        return _read_small(ram, pages.lookup_list(first, count), in_off, length)
    pfns = pages.lookup(first, count)
    ram.keys.mark_referenced(pfns[pfns != HOLE])
    starts, ends = _runs(pfns)
    if len(starts) == 1 and starts[0] == 0 and ends[0] == count:
        base = int(pfns[0]) * PAGE_SIZE + in_off
        return ram.buffer[base : base + length]
    out = bytearray(length)
    if len(starts):
        _copy_runs(ram, pfns, starts, ends, in_off, memoryview(out), to_ram=False)
    return out


def write(
    ram: Ram, pages: FilePages, pool: PagePool, off: int, data: Buffer, *, huge: bool
) -> None:
    """Store *data* at *off*, allocating pages for holes.

    All or nothing: on ENOSPC no page is taken and nothing is written.
    """
    length = len(data)
    if length == 0:
        return
    first = off >> PAGE_SHIFT
    count = ((off + length - 1) >> PAGE_SHIFT) - first + 1
    if count <= _SMALL_PAGES and not huge:
        _write_small(ram, pages, pool, first, count, off & _PAGE_MASK, memoryview(data))
    else:
        pfns = pages.lookup(first, count)
        if (pfns == HOLE).any():
            pfns = _fill_holes(ram, pages, pool, first, pfns, off, off + length, huge=huge)
        starts, ends = _runs(pfns)
        _copy_runs(ram, pfns, starts, ends, off & _PAGE_MASK, memoryview(data), to_ram=True)
        ram.keys.mark_changed(pfns)
    pages.mark_written(first, count)


def _read_small(
    ram: Ram, pfns: list[int], in_off: int, length: int
) -> bytes | bytearray | memoryview:
    runs = _small_runs(pfns)
    if HOLE in pfns:
        ram.keys.mark_referenced([pfn for pfn in pfns if pfn != HOLE])
    else:
        ram.keys.mark_referenced(pfns)
    if len(runs) == 1 and runs[0] == (0, len(pfns)):
        base = pfns[0] * PAGE_SIZE + in_off
        return ram.buffer[base : base + length]
    out = bytearray(length)
    buf = memoryview(out)
    for start, end in runs:
        _copy_span(ram, pfns[start], start, end, in_off, buf, to_ram=False)
    return out


def _write_small(
    ram: Ram,
    pages: FilePages,
    pool: PagePool,
    first: int,
    count: int,
    in_off: int,
    data: memoryview,
) -> None:
    pfns = pages.lookup_list(first, count)
    if HOLE in pfns:
        holes = [i for i, pfn in enumerate(pfns) if pfn == HOLE]
        for i, pfn in zip(holes, pool.take(len(holes)).tolist(), strict=True):
            pfns[i] = pfn
            pages.set_page(first + i, pfn)
            if i in (0, count - 1):  # edge pages may be partly written: the rest reads zero
                zero_bytes(ram, pfn * PAGE_SIZE, PAGE_SIZE, mark=False)  # marked with the write
    for start, end in _small_runs(pfns):
        _copy_span(ram, pfns[start], start, end, in_off, data, to_ram=True)
    ram.keys.mark_changed(pfns)


def truncate(
    ram: Ram, pages: FilePages, pool: PagePool, old_size: int, new_size: int, *, secret: bool
) -> None:
    """Cut the pages at *new_size* (zeroing the new last page's tail); growing costs nothing.

    A *secret* file's dropped pages get their direct mapping back before the pool has them.
    """
    if new_size > old_size:
        return
    keep_pages = (new_size + PAGE_SIZE - 1) >> PAGE_SHIFT
    dropped = pages.truncate(new_size)
    if secret:
        secret_pages.unhide(ram, dropped)
    pool.give_back(dropped)
    tail = new_size & _PAGE_MASK
    if tail:
        pfn = int(pages.lookup(keep_pages - 1, 1)[0])
        if pfn == HOLE:
            return
        if secret:
            secret_pages.zero(ram, pfn, tail, PAGE_SIZE - tail)
        else:
            zero_bytes(ram, pfn * PAGE_SIZE + tail, PAGE_SIZE - tail)


def free_all(ram: Ram, pages: FilePages, pool: PagePool, *, secret: bool) -> None:
    """Give every page of a file back to the pool (the file is gone)."""
    dropped = pages.truncate(0)
    if secret:
        secret_pages.unhide(ram, dropped)
    pool.give_back(dropped)


def read_secret(ram: Ram, pages: FilePages, size_bytes: int, off: int, length: int) -> bytes:
    """`read` for a secret file: its pages are reached through temporary mappings."""
    if off >= size_bytes or length <= 0:
        return b""
    length = min(length, size_bytes - off)
    first = off >> PAGE_SHIFT
    count = ((off + length - 1) >> PAGE_SHIFT) - first + 1
    pfns = pages.lookup(first, count)
    present = pfns != HOLE
    window = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
    if present.any():
        window[present] = secret_pages.gather(ram, pfns[present])
    in_off = off & _PAGE_MASK
    return window.reshape(-1)[in_off : in_off + length].tobytes()


def write_secret(
    ram: Ram, pages: FilePages, pool: PagePool, off: int, data: Buffer, *, huge: bool
) -> None:
    """`write` for a secret file: new pages (whole huge pages too) leave the direct map, and
    the bytes go through temporary mappings. All or nothing on ENOSPC, as `write`."""
    length = len(data)
    if length == 0:
        return
    first = off >> PAGE_SHIFT
    count = ((off + length - 1) >> PAGE_SHIFT) - first + 1
    pfns = pages.lookup(first, count)
    if (pfns == HOLE).any():
        chunks_lo = first & ~CHUNK_MASK  # whole chunks: a new huge page is hidden whole
        chunks_n = ((first + count - 1) | CHUNK_MASK) + 1 - chunks_lo
        before = pages.lookup(chunks_lo, chunks_n)
        pfns = _fill_holes(ram, pages, pool, first, pfns, off, off + length, huge=huge)
        after = pages.lookup(chunks_lo, chunks_n)
        secret_pages.hide(ram, after[(before == HOLE) & (after != HOLE)])
    in_off = off & _PAGE_MASK
    window = np.empty((count, PAGE_SIZE), dtype=np.uint8)
    if in_off:  # partly written edge pages keep the rest of their bytes
        window[0] = secret_pages.gather(ram, pfns[:1])[0]
    if (in_off + length) & _PAGE_MASK and (count > 1 or not in_off):
        window[-1] = secret_pages.gather(ram, pfns[-1:])[0]
    window.reshape(-1)[in_off : in_off + length] = np.frombuffer(data, dtype=np.uint8)
    secret_pages.scatter(ram, pfns, window)
    pages.mark_written(first, count)


def _fill_holes(
    ram: Ram,
    pages: FilePages,
    pool: PagePool,
    first: int,
    pfns: PfnArray,
    start_byte: int,
    end_byte: int,
    *,
    huge: bool,
) -> PfnArray:
    """Allocate pages for the holes of a write (see `take_holes`) and zero what the write
    will not cover; return the pfns of the write's pages."""
    new = take_holes(pages, pool, first, len(pfns), huge=huge)
    covered = (new >= -(-start_byte >> PAGE_SHIFT)) & (new < end_byte >> PAGE_SHIFT)
    zero_pages(ram, pages.pfns_at(new[~covered]))
    return pages.lookup(first, len(pfns))


def take_holes(pages: FilePages, pool: PagePool, first: int, count: int, *, huge: bool) -> PfnArray:
    """Give the holes of pages [first, first + count) pages from the pool and return the
    indexes of every page newly held, ascending. All or nothing: FsError(ENOSPC), taking
    none, if the mount has too few.

    With *huge* (huge=always) it allocates as tmpfs does: a huge page to each empty chunk
    while the pool has an aligned 2 MiB run free, elsewhere each hole with the largest
    aligned block of holes around it (recorded as a large folio), or only the holes if
    ``size=`` leaves no room for the blocks (tmpfs falls back to small pages then)."""
    new_huge: list[int] = []
    indexes: PfnArray | None = None
    blocks: list[tuple[int, int]] = []
    if huge:
        for chunk_no in range(first >> CHUNK_SHIFT, ((first + count - 1) >> CHUNK_SHIFT) + 1):
            if pages.chunk_is_empty(chunk_no):
                base = pool.take_huge()
                if base is None:
                    break  # no aligned free run: blocks of small pages from here on
                pages.assign_huge(chunk_no, base)
                new_huge.append(chunk_no)
        indexes, blocks = pages.plan_folios(first, count)
        if blocks and not pool.fits(len(indexes)):
            indexes, blocks = None, []
    if indexes is None:
        indexes = np.flatnonzero(pages.lookup(first, count) == HOLE) + first
    try:
        new = pool.take(len(indexes))
    except FsError:  # ENOSPC: nothing taken, huge pages included
        for chunk_no in new_huge:
            pool.give_back(pages.remove_huge(chunk_no))
        raise
    pages.assign_at(indexes, new)
    pages.record_blocks(blocks)
    if not new_huge:
        return indexes
    whole = [np.arange(c << CHUNK_SHIFT, (c + 1) << CHUNK_SHIFT) for c in new_huge]
    return np.sort(np.concatenate([indexes, *whole]))


def zero_pages(ram: Ram, pfns: PfnArray, *, mark: bool = True) -> None:
    """Zero the pages *pfns* (a slice per run of consecutive pfns, or one fancy-index store
    when scattered); mark them changed unless *mark* is False (the caller's store will)."""
    if not len(pfns):
        return
    at, lengths = run_positions(pfns)
    if len(at) * 4 > len(pfns):
        ram.pages[pfns] = 0
    else:
        for start, length in zip(pfns[at].tolist(), lengths.tolist(), strict=True):
            ram.pages[start : start + length] = 0
    if mark:
        ram.keys.mark_changed(pfns)


def zero_bytes(ram: Ram, ram_byte: int, length: int, *, mark: bool = True) -> None:
    """Zero *length* bytes of RAM (a page or less by slice, more through numpy).

    Marks the pages changed unless *mark* is False (the caller marks them with its store).
    """
    if length <= 0:
        return
    if length <= PAGE_SIZE:
        ram.buffer[ram_byte : ram_byte + length] = _ZERO_PAGE[:length]
    else:
        ram.pages.reshape(-1)[ram_byte : ram_byte + length] = 0
    if mark:
        first = ram_byte >> PAGE_SHIFT
        ram.keys.mark_changed_range(first, ((ram_byte + length - 1) >> PAGE_SHIFT) - first + 1)


def _copy_runs(
    ram: Ram,
    pfns: PfnArray,
    starts: np.ndarray,
    ends: np.ndarray,
    in_off: int,
    buf: memoryview,
    *,
    to_ram: bool,
) -> None:
    """Copy between *buf* (the request, starting *in_off* into page 0) and the runs' pages."""
    count = len(pfns)
    if len(starts) > _MAX_LOOPED_RUNS and count > 2:
        # Many scattered pages: the two edge pages by slice, the full middle pages at once.
        _copy_span(ram, int(pfns[0]), 0, 1, in_off, buf, to_ram)
        _copy_span(ram, int(pfns[-1]), count - 1, count, in_off, buf, to_ram)
        mid = pfns[1 : count - 1]
        lo = PAGE_SIZE - in_off
        flat = np.frombuffer(buf, dtype=np.uint8)[lo : lo + len(mid) * PAGE_SIZE]
        window = flat.reshape(len(mid), PAGE_SIZE)
        present = mid != HOLE
        if to_ram:
            ram.pages[mid[present]] = window[present]
        else:
            window[present] = ram.pages[mid[present]]
        return
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        _copy_span(ram, int(pfns[start]), start, end, in_off, buf, to_ram)


def _copy_span(
    ram: Ram, pfn: int, start: int, end: int, in_off: int, buf: memoryview, to_ram: bool
) -> None:
    """Copy pages [start, end) of the request, consecutive in RAM from *pfn* (or a hole).

    *buf* holds the request's bytes, which begin *in_off* bytes into its page 0.
    """
    if pfn == HOLE:
        return
    buf_lo = max(0, start * PAGE_SIZE - in_off)
    buf_hi = min(len(buf), end * PAGE_SIZE - in_off)
    if buf_hi <= buf_lo:
        return
    ram_lo = pfn * PAGE_SIZE + (in_off if start == 0 else 0)
    ram_hi = ram_lo + buf_hi - buf_lo
    if to_ram:
        ram.buffer[ram_lo:ram_hi] = buf[buf_lo:buf_hi]
    else:
        buf[buf_lo:buf_hi] = ram.buffer[ram_lo:ram_hi]


def copy_pages(ram: Ram, old: PfnArray, new: PfnArray, secret: bool) -> None:
    """Copy the pages *old* to *new* (relocation); a secret file's through temporary mappings,
    after which *new* leave the direct map and *old* come back to it."""
    if not secret:
        ram.store_pages(new, ram.pages[old])
        ram.keys.mark_referenced(old)
        return
    secret_pages.scatter(ram, new, secret_pages.gather(ram, old))
    secret_pages.hide(ram, new)
    secret_pages.unhide(ram, old)
