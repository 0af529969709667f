"""Writing a hibernation image: a page set of RAM and its storage keys, in one file.

``write_image`` checks the request (``_check_request``); scans the pages, sorted, for the
all-zero ones, only flagged in the pfn list (``_scan``); writes a zeroed header page and the
pfn list; writes the chunks in order while worker threads make the next ones
(``_write_chunks``, ``_ChunkMaker``); and writes the header last, which makes the image
valid, so an interrupted write leaves none (``_writing``: a file is renamed into place, a
device's header page is zeroed first). ``invalidate`` marks an image used once resumed.
"""

import ctypes
import os
import stat
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import CorruptImage, ImageTooLarge, MachineError
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation.chunks import ChunkCodec, worker_count
from kexec_sim.hibernation.crypto import TAG_BYTES, ImageKey, new_cipher
from kexec_sim.hibernation.format import (
    CHUNK_HEADER,
    CHUNK_PAGES,
    COMPRESSIONS,
    FLAG_INCREMENTAL,
    ID_BYTES,
    MAX_CHUNK_PAGES,
    SIGNATURE,
    USED_SIGNATURE,
    ImageHeader,
    PfnList,
    encode_pfn_list,
    encryption_flags,
    pack_header,
    pfn_list_end,
)
from kexec_sim.jsonfile import fsync_dir
from kexec_sim.pages import PfnArray, as_pfn_array

_SCAN_PAGES = 8192  # pages gathered at a time to find the all-zero ones (32 MiB)
_WRITE_BATCH = 16  # finished chunks the writer may send in one writev

PageCopier = Callable[[PfnArray], npt.NDArray[np.uint8]]
"""Returns a copy of the pages of the pfns it is given, shaped (n, PAGE_SIZE)."""


@dataclass(frozen=True)
class ImageStats:
    """What ``write_image`` wrote and how long each phase took."""

    pages: int
    zero_pages: int
    data_bytes: int
    stored_bytes: int
    image_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    """Phases: "scan" (checks, zero pages), "write" (chunks), "sync" (fsyncs, header, rename)."""
    base_pages: int = 0
    encrypted: bool = False

    @property
    def ratio(self) -> float:
        """Stored bytes over raw data bytes (1.0 when nothing was stored)."""
        return self.stored_bytes / self.data_bytes if self.data_bytes else 1.0


def write_image(
    path: Path | str,
    ram_pages: npt.NDArray[np.uint8],
    pfns: npt.ArrayLike,
    keys: npt.ArrayLike,
    *,
    machine_id: bytes,
    nr_ram_pages: int,
    generation: int,
    epoch_ns: int,
    compression: str = "lz4",
    threads: int | None = None,
    chunk_pages: int = CHUNK_PAGES,
    base_image_id: bytes | None = None,
    in_base: npt.ArrayLike | None = None,
    key: ImageKey | None = None,
    max_bytes: int | None = None,
    super_block_pfn: int = 0,
    copy_pages: PageCopier | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImageStats:
    """Write the pages *pfns* of *ram_pages* (RAM as (nr_pages, 4096) uint8) and their *keys*.

    *pfns* may come in any order. All-zero pages are only flagged in the pfn list; the others
    are compressed (then encrypted, with a *key*) by *threads* workers (default: the core
    count) while finished chunks are written in order, at most 2 x *threads* chunks in
    flight. A *base_image_id* marks the image incremental; *in_base* (bool parallel to *pfns*,
    only with a base) flags the pages unchanged since the base: listed, no data here.
    A regular file is written under a temporary name (0600) and renamed; a block device is
    written in place, its header page zeroed (and synced) first and the header written last.
    *progress* gets (data pages written, data pages) after each chunk. *super_block_pfn*
    names the PKRAM super block among the pages (0: none), for resume's ``pkram=``.
    *copy_pages*, when given, reads pages instead of *ram_pages* (some pages may be out of
    the caller's direct map: ``Ram.copy_pages`` reaches them through temporary mappings).

    Raises ImageTooLarge, leaving no image, as soon as the image is sure to exceed
    *max_bytes*; MachineError for a bad request; OSError from the I/O.
    """
    t0 = time.perf_counter()
    path = Path(path)
    _check_request(
        ram_pages, nr_ram_pages=nr_ram_pages, compression=compression, chunk_pages=chunk_pages,
        machine_id=machine_id, base_image_id=base_image_id, in_base=in_base,
        generation=generation, epoch_ns=epoch_ns, super_block_pfn=super_block_pfn,
        max_bytes=max_bytes,
    )  # fmt: skip
    workers = worker_count(threads)
    page_set = _scan(ram_pages, pfns, keys, in_base, copy_pages)
    data_pfns = page_set.data_pfns
    nr_chunks = -(-data_pfns.size // chunk_pages)
    first_chunk = pfn_list_end(page_set.pfns.size, key is not None)
    limit = _SizeLimit(path, max_bytes, CHUNK_HEADER.size + 1 + (TAG_BYTES if key else 0))
    limit.check(first_chunk, nr_chunks)
    salt, nonce_prefix, aead = new_cipher(key)
    pfn_list = encode_pfn_list(page_set, aead, nonce_prefix)
    t_scan = time.perf_counter()
    chunks = _ChunkMaker(
        ram_pages, copy_pages, data_pfns, chunk_pages, ChunkCodec(compression, aead, nonce_prefix)
    )
    with _writing(path) as target:
        target.write_front(pfn_list, first_chunk)
        stored_bytes = _write_chunks(target, chunks, first_chunk, workers, limit, progress)
        t_data = time.perf_counter()
        header = ImageHeader(
            flags=(FLAG_INCREMENTAL if base_image_id is not None else 0) | encryption_flags(key),
            machine_id=machine_id, nr_ram_pages=nr_ram_pages, generation=generation,
            epoch_ns=epoch_ns, nr_pfns=page_set.pfns.size, nr_data_pages=data_pfns.size,
            compression=compression, chunk_pages=chunk_pages, nr_chunks=nr_chunks,
            pfn_list_offset=PAGE_SIZE, first_chunk_offset=first_chunk, image_id=os.urandom(16),
            base_image_id=base_image_id or bytes(ID_BYTES), stored_bytes=stored_bytes,
            pfn_list_crc=zlib.crc32(pfn_list), nonce_prefix=nonce_prefix, salt=salt,
            super_block_pfn=super_block_pfn,
        )  # fmt: skip
        target.commit(pack_header(header, aead))
    t_end = time.perf_counter()
    return ImageStats(
        pages=int(page_set.pfns.size),
        zero_pages=int(page_set.zero.sum()),
        data_bytes=int(data_pfns.size) * PAGE_SIZE,
        stored_bytes=stored_bytes,
        image_bytes=header.end_offset,
        seconds={"scan": t_scan - t0, "write": t_data - t_scan, "sync": t_end - t_data},
        base_pages=int(page_set.in_base.sum()),
        encrypted=key is not None,
    )


def _check_request(
    ram_pages: npt.NDArray[np.uint8],
    *,
    nr_ram_pages: int,
    compression: str,
    chunk_pages: int,
    machine_id: bytes,
    base_image_id: bytes | None,
    in_base: npt.ArrayLike | None,
    generation: int,
    epoch_ns: int,
    super_block_pfn: int,
    max_bytes: int | None,
) -> None:
    """MachineError unless ``write_image``'s arguments (but the page set) make an image."""
    if ram_pages.shape != (nr_ram_pages, PAGE_SIZE) or ram_pages.dtype != np.uint8:
        raise MachineError(f"RAM must be uint8 ({nr_ram_pages}, {PAGE_SIZE}), "
                           f"got {ram_pages.dtype} {ram_pages.shape}")  # fmt: skip
    if compression not in COMPRESSIONS:
        names = ", ".join(COMPRESSIONS)
        raise MachineError(f"unknown compression {compression!r} (one of {names})")
    if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
        raise MachineError(f"chunk_pages {chunk_pages} is not in 1..{MAX_CHUNK_PAGES}")
    for name, ident in (("machine_id", machine_id), ("base_image_id", base_image_id)):
        if ident is not None and len(ident) != ID_BYTES:
            raise MachineError(f"{name} must be {ID_BYTES} bytes, got {len(ident)}")
    if base_image_id is not None and not any(base_image_id):
        raise MachineError("base_image_id must not be all zeros (zeros mean: no base)")
    if in_base is not None and base_image_id is None:
        raise MachineError("in_base needs a base_image_id: only an incremental image has a base")
    for name, value in (("generation", generation), ("epoch_ns", epoch_ns)):
        if not 0 <= value < 1 << 64:
            raise MachineError(f"{name} {value} does not fit an unsigned 64-bit field")
    if not 0 <= super_block_pfn < nr_ram_pages:
        raise MachineError(f"super block pfn {super_block_pfn} is outside RAM")
    if max_bytes is not None and max_bytes < 0:
        raise MachineError(f"max_bytes must not be negative, got {max_bytes}")


def _scan(
    ram_pages: npt.NDArray[np.uint8],
    pfns: npt.ArrayLike,
    keys: npt.ArrayLike,
    in_base: npt.ArrayLike | None,
    copy_pages: PageCopier | None,
) -> PfnList:
    """The pfn list of the page set: *pfns* sorted, with their *keys* and *in_base* flags (all
    False when None) and which pages are all-zero (pages in the base are not read).
    MachineError on repeats, bad pfns, bad keys or bad flags."""
    ordered = as_pfn_array(pfns, ram_pages.shape[0])
    key_array = np.asarray(keys)
    if key_array.dtype != np.uint8 or key_array.shape != ordered.shape:
        raise MachineError(f"keys must be uint8 parallel to the pfns, got {key_array.dtype} "
                           f"of shape {key_array.shape} for {ordered.size} pfns")  # fmt: skip
    base = np.zeros(ordered.size, np.bool_) if in_base is None else np.asarray(in_base)
    if base.dtype != np.bool_ or base.shape != ordered.shape:
        raise MachineError(f"in_base must be bool parallel to the pfns, got {base.dtype} "
                           f"of shape {base.shape} for {ordered.size} pfns")  # fmt: skip
    order = np.argsort(ordered, kind="stable")
    ordered, key_array, base = ordered[order], key_array[order], base[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeats.size:
        raise MachineError(f"pfn {int(ordered[repeats[0]])} appears more than once")
    zero = np.zeros(ordered.size, np.bool_)
    zero[~base] = _zero_mask(ram_pages, ordered[~base], copy_pages)
    return PfnList(ordered, key_array, zero, base)


def _zero_mask(
    ram_pages: npt.NDArray[np.uint8], pfns: PfnArray, copy_pages: PageCopier | None
) -> npt.NDArray[np.bool_]:
    """Which pages of sorted *pfns* are all zeros (32 MiB at a time, vectorized)."""
    zero = np.empty(pfns.size, dtype=np.bool_)
    for start in range(0, pfns.size, _SCAN_PAGES):
        some = pfns[start : start + _SCAN_PAGES]
        low, high = int(some[0]), int(some[-1])
        consecutive = high - low == some.size - 1  # sorted: a run of RAM, scanned in place
        if copy_pages is not None:
            batch = copy_pages(some)
            zero[start : start + batch.shape[0]] = ~batch.view(np.uint64).any(axis=1)
            continue
        # a page whose first 8 bytes are not zero is not all-zero: only the others are read
        head = ram_pages[low : high + 1, :8] if consecutive else ram_pages[some, :8]
        maybe = np.flatnonzero(head.view(np.uint64)[:, 0] == 0)
        found = np.zeros(some.size, dtype=np.bool_)
        if maybe.size:
            rows = ram_pages[low + maybe] if consecutive else ram_pages[some[maybe]]
            found[maybe] = ~rows.view(np.uint64).any(axis=1)
        zero[start : start + some.size] = found
    return zero


@dataclass(frozen=True)
class _SizeLimit:
    """The size an image may not exceed (*max_bytes*, None: any), and how to tell early."""

    path: Path
    max_bytes: int | None
    smallest_record: int
    """The fewest bytes a chunk can take (its record header and one stored byte, a tag)."""

    def check(self, reached: int, chunks_left: int) -> None:
        """ImageTooLarge if *reached* bytes and *chunks_left* chunks must pass the limit."""
        least = reached + chunks_left * self.smallest_record
        if self.max_bytes is None or least <= self.max_bytes:
            return
        more = f" and {chunks_left} chunks to go" if chunks_left else ""
        raise ImageTooLarge(f"{self.path}: the image would exceed its limit of {self.max_bytes} "
                            f"bytes ({reached} bytes reached{more})")  # fmt: skip


@dataclass(frozen=True)
class _ChunkMaker:
    """Makes the chunks of an image from RAM: called with a chunk's number, in a worker."""

    ram_pages: npt.NDArray[np.uint8]
    copy_pages: PageCopier | None
    data_pfns: PfnArray
    """The pages with data, in chunk order."""
    chunk_pages: int
    codec: ChunkCodec

    @property
    def nr_chunks(self) -> int:
        return -(-self.data_pfns.size // self.chunk_pages)

    def __call__(self, index: int) -> tuple[memoryview, memoryview]:
        """The record header and stored bytes of chunk *index*."""
        first = index * self.chunk_pages
        chunk = self.data_pfns[first : first + self.chunk_pages]
        low, high = int(chunk[0]), int(chunk[-1])
        if self.copy_pages is not None:
            raw = self.copy_pages(chunk).reshape(-1).data
        elif high - low == chunk.size - 1:  # consecutive pfns: read RAM in place, no gather
            raw = self.ram_pages[low : high + 1].reshape(-1).data
        else:
            raw = self.ram_pages[chunk].reshape(-1).data
        return self.codec.encode(raw, index, first)


def _write_chunks(
    target: "_Target",
    chunks: _ChunkMaker,
    first_chunk: int,
    workers: int,
    limit: _SizeLimit,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write every chunk in order from *first_chunk* on, while *workers* threads make the next
    ones (at most 2 x *workers* in flight; those finished go out in one writev); return the
    stored bytes written. Raises ImageTooLarge as soon as the image must pass *limit*."""
    nr_chunks, nr_pages = chunks.nr_chunks, chunks.data_pfns.size
    stored_bytes = submitted = written = flushed = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque[Future[tuple[memoryview, memoryview]]] = deque()
        try:
            while written < nr_chunks:
                while submitted < nr_chunks and len(window) < 2 * workers:
                    window.append(pool.submit(chunks, submitted))
                    submitted += 1
                parts = list(window.popleft().result())
                while window and window[0].done() and len(parts) < 2 * _WRITE_BATCH:
                    parts.extend(window.popleft().result())  # finished: one bigger write
                stored_bytes += sum(part.nbytes for part in parts[1::2])
                written += len(parts) // 2
                reached = first_chunk + written * CHUNK_HEADER.size + stored_bytes
                limit.check(reached, nr_chunks - written)
                target.write(*parts)
                if reached - flushed >= _FLUSH_BYTES:  # the disk writes while we compress
                    target.start_writeback(flushed, reached - flushed)
                    flushed = reached
                if progress is not None:
                    progress(min(written * chunks.chunk_pages, nr_pages), nr_pages)
        finally:
            for future in window:
                future.cancel()  # leaving early: compress nothing that will not be written
    return stored_bytes


def open_image_target(path: Path) -> tuple[int, Path | None]:
    """Open the image's target for writing: (fd, temp path to rename, None for a device)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = 0
    if stat.S_ISBLK(mode):
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC), None
    if mode and not stat.S_ISREG(mode):
        raise MachineError(f"{path}: not a regular file or a block device")
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return os.open(temp, flags, 0o600), temp


class _Target:
    """The file or block device an image is being written to (open with ``_writing``).

    A regular file is written under a temporary name and renamed into place by ``commit``. A
    device is written in place: its header page is zeroed (and synced) before any chunk goes
    out, and again when the image turns out too large.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd, self.temp = open_image_target(path)

    def write_front(self, pfn_list: bytes, first_chunk: int) -> None:
        """Write a zeroed header page (no valid header until the end), *pfn_list* and its
        padding up to *first_chunk*; on a device, sync that before any chunk goes out."""
        padding = bytes(first_chunk - PAGE_SIZE - len(pfn_list))
        self.write(bytes(PAGE_SIZE), pfn_list, padding)
        if self.temp is None:
            os.fsync(self.fd)  # a device's old header is gone for good before any chunk goes out

    def write(self, *parts: bytes | memoryview) -> None:
        """Write *parts* back to back at the file offset, in one writev unless it comes up short."""
        done = os.writev(self.fd, parts)
        total = sum(memoryview(part).nbytes for part in parts)
        if done < total:  # a short write: finish it the simple way
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                rest = rest[os.write(self.fd, rest) :]

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """Start writing *nbytes* at *offset* back to the disk, not waiting (best effort)."""
        if _sync_file_range is not None:
            _sync_file_range(self.fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    def commit(self, header_page: bytes) -> None:
        """Make the image valid: sync the data, write *header_page*, sync, rename into place."""
        os.fsync(self.fd)  # the data is down before a header can make it valid
        os.pwrite(self.fd, header_page, 0)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.temp is not None:
            os.rename(self.temp, self.path)
            self.temp = None
            fsync_dir(self.path.parent)


@contextmanager
def _writing(path: Path) -> Iterator[_Target]:
    """The image's target, open for the block; left early, no image is left behind (the
    temporary file removed, a device's header page zeroed on ImageTooLarge)."""
    target = _Target(path)
    try:
        yield target
    except ImageTooLarge:
        if target.temp is None and target.fd >= 0:  # a device: make sure no header is left
            os.pwrite(target.fd, bytes(PAGE_SIZE), 0)
            os.fsync(target.fd)
        raise
    finally:
        if target.fd >= 0:
            os.close(target.fd)
        if target.temp is not None:
            target.temp.unlink(missing_ok=True)


_FLUSH_BYTES = 32 << 20
"""Bytes written between two starts of writeback (sync_file_range): the final fsync is short."""
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def invalidate(path: Path | str) -> None:
    """Overwrite the signature of the image at *path* with ``USED_SIGNATURE`` and fsync.

    Only the 8 signature bytes change. Raises CorruptImage unless *path* holds a valid
    signature (an already used image included).
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        signature = os.pread(fd, len(SIGNATURE), 0)
        if signature == USED_SIGNATURE:
            raise CorruptImage(f"{path}: image already used (a resume invalidated it)")
        if signature != SIGNATURE:
            raise CorruptImage(f"{path}: not a hibernation image (signature {signature!r})")
        os.pwrite(fd, USED_SIGNATURE, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
