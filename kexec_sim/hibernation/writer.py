"""Writing a hibernation image: a page set of RAM and its storage keys, in one file.

``write_image`` scans the pages (all-zero ones are only flagged in the pfn list), compresses
(and encrypts) the others in worker threads while finished chunks go out in order, and writes
the header last, so an interrupted write leaves no valid signature. ``invalidate`` marks an
image used once a resume took it.
"""

import ctypes
import os
import stat
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kexec_sim.errors import CorruptImage, ImageTooLarge, MachineError
from kexec_sim.hibernation.chunks import ChunkCodec
from kexec_sim.hibernation.crypto import (
    NONCE_PREFIX_BYTES,
    PFN_LIST_NONCE,
    SALT_BYTES,
    TAG_BYTES,
    ImageKey,
    nonce,
)
from kexec_sim.hibernation.format import (
    BASE_BIT,
    CHUNK_HEADER,
    CHUNK_PAGES,
    COMPRESSIONS,
    FLAG_INCREMENTAL,
    ID_BYTES,
    KEY_SHIFT,
    MAX_CHUNK_PAGES,
    SIGNATURE,
    USED_SIGNATURE,
    ZERO_BIT,
    ImageHeader,
    encryption_flags,
    pack_header,
    pfn_list_end,
)
from kexec_sim.jsonfile import fsync_dir
from kexec_sim.pages import PAGE_SIZE, PfnArray, as_pfn_array

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


def _sorted_page_set(
    ram_pages: npt.NDArray[np.uint8],
    pfns: npt.ArrayLike,
    keys: npt.ArrayLike,
    in_base: npt.ArrayLike | None,
) -> tuple[PfnArray, npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """*pfns* sorted with their *keys* and *in_base* flags (all False when None);
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
    return ordered, key_array, base


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
    workers = threads if threads is not None else os.cpu_count() or 1
    if workers < 1:
        raise MachineError(f"threads must be at least 1, got {workers}")
    ordered, key_array, base = _sorted_page_set(ram_pages, pfns, keys, in_base)
    zero = np.zeros(ordered.size, np.bool_)
    zero[~base] = _zero_mask(
        ram_pages, ordered[~base], copy_pages
    )  # pages in the base are not read
    entries = ordered.astype(np.uint64) | (key_array.astype(np.uint64) << np.uint64(KEY_SHIFT))
    entries[zero] |= np.uint64(1 << ZERO_BIT)
    entries[base] |= np.uint64(1 << BASE_BIT)
    pfn_list: bytes = entries.astype("<u8").tobytes()
    data_pfns = ordered[~(zero | base)]
    nr_chunks = -(-data_pfns.size // chunk_pages)
    first_chunk = pfn_list_end(ordered.size, key is not None)
    tag_bytes = TAG_BYTES if key is not None else 0
    smallest_record = CHUNK_HEADER.size + 1 + tag_bytes

    def too_large(reached: int, chunks_left: int) -> ImageTooLarge | None:
        """The error to raise if *reached* bytes and *chunks_left* chunks must pass max_bytes."""
        if max_bytes is None or reached + chunks_left * smallest_record <= max_bytes:
            return None
        more = f" and {chunks_left} chunks to go" if chunks_left else ""
        return ImageTooLarge(f"{path}: the image would exceed its limit of {max_bytes} bytes "
                             f"({reached} bytes reached{more})")  # fmt: skip

    error = too_large(first_chunk, nr_chunks)
    if error is not None:
        raise error
    flags = FLAG_INCREMENTAL if base_image_id is not None else 0
    aead = None
    salt, nonce_prefix = bytes(SALT_BYTES), bytes(NONCE_PREFIX_BYTES)
    if key is not None:
        flags |= encryption_flags(key)
        salt, nonce_prefix = os.urandom(SALT_BYTES), os.urandom(NONCE_PREFIX_BYTES)
        aead = AESGCM(key.derive(salt))
        pfn_list = aead.encrypt(nonce(nonce_prefix, PFN_LIST_NONCE), pfn_list, None)
    t_scan = time.perf_counter()

    codec = ChunkCodec(compression, aead, nonce_prefix)

    def make_chunk(index: int) -> tuple[memoryview, memoryview]:
        """The record header and stored bytes of chunk *index* (run in a worker thread)."""
        first = index * chunk_pages
        chunk = data_pfns[first : first + chunk_pages]
        low, high = int(chunk[0]), int(chunk[-1])
        if copy_pages is not None:
            raw = copy_pages(chunk).reshape(-1).data
        elif high - low == chunk.size - 1:  # consecutive pfns: read RAM in place, no gather
            raw = ram_pages[low : high + 1].reshape(-1).data
        else:
            raw = ram_pages[chunk].reshape(-1).data
        return codec.encode(raw, index, first)

    fd, temp = open_image_target(path)
    stored_bytes = 0
    try:
        padding = bytes(first_chunk - PAGE_SIZE - len(pfn_list))
        _write_all(fd, bytes(PAGE_SIZE), pfn_list, padding)  # no valid header until the end
        if temp is None:
            os.fsync(fd)  # a device's old header is gone for good before any chunk goes out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            window: deque[Future[tuple[memoryview, memoryview]]] = deque()
            submitted = 0
            written = 0
            flushed = 0
            try:
                while written < nr_chunks:
                    while submitted < nr_chunks and len(window) < 2 * workers:
                        window.append(pool.submit(make_chunk, submitted))
                        submitted += 1
                    parts = list(window.popleft().result())
                    while window and window[0].done() and len(parts) < 2 * _WRITE_BATCH:
                        parts.extend(window.popleft().result())  # finished: one bigger write
                    stored_bytes += sum(part.nbytes for part in parts[1::2])
                    written += len(parts) // 2
                    reached = first_chunk + written * CHUNK_HEADER.size + stored_bytes
                    error = too_large(reached, nr_chunks - written)
                    if error is not None:
                        raise error
                    _write_all(fd, *parts)
                    if reached - flushed >= _FLUSH_BYTES:  # the disk writes while we compress
                        _start_writeback(fd, flushed, reached - flushed)
                        flushed = reached
                    if progress is not None:
                        progress(min(written * chunk_pages, data_pfns.size), data_pfns.size)
            finally:
                for future in window:
                    future.cancel()  # leaving early: compress nothing that will not be written
        t_data = time.perf_counter()
        header = ImageHeader(
            flags=flags, machine_id=machine_id, nr_ram_pages=nr_ram_pages, generation=generation,
            epoch_ns=epoch_ns, nr_pfns=ordered.size, nr_data_pages=data_pfns.size,
            compression=compression, chunk_pages=chunk_pages, nr_chunks=nr_chunks,
            pfn_list_offset=PAGE_SIZE, first_chunk_offset=first_chunk, image_id=os.urandom(16),
            base_image_id=base_image_id or bytes(ID_BYTES), stored_bytes=stored_bytes,
            pfn_list_crc=zlib.crc32(pfn_list), nonce_prefix=nonce_prefix, salt=salt,
            super_block_pfn=super_block_pfn,
        )  # fmt: skip
        os.fsync(fd)  # the data is down before a header can make it valid
        os.pwrite(fd, pack_header(header, aead), 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if temp is not None:
            os.rename(temp, path)
            temp = None
            fsync_dir(path.parent)
    except ImageTooLarge:
        if temp is None and fd >= 0:  # a device: make sure no header is left
            os.pwrite(fd, bytes(PAGE_SIZE), 0)
            os.fsync(fd)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        if temp is not None:
            temp.unlink(missing_ok=True)
    t_end = time.perf_counter()
    return ImageStats(
        pages=int(ordered.size),
        zero_pages=int(zero.sum()),
        data_bytes=int(data_pfns.size) * PAGE_SIZE,
        stored_bytes=stored_bytes,
        image_bytes=header.end_offset,
        seconds={"scan": t_scan - t0, "write": t_data - t_scan, "sync": t_end - t_data},
        base_pages=int(base.sum()),
        encrypted=key is not None,
    )


_FLUSH_BYTES = 32 << 20
"""Bytes written between two starts of writeback (sync_file_range): the final fsync is short."""
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing *nbytes* at *offset* back to the disk, not waiting (best effort)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, *parts: bytes | memoryview) -> None:
    """Write *parts* back to back at the file offset, in one writev unless it comes up short."""
    done = os.writev(fd, parts)
    total = sum(memoryview(part).nbytes for part in parts)
    if done < total:  # a short write: finish it the simple way
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


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
