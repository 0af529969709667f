"""The hibernation image container: a page set of RAM, its keys and its data, in one file.

Layout (little-endian, byte by byte in docs/FORMAT.md): a header page (``IMAGE_HEADER`` then
zeros), the pfn list (one u64 per saved page, ascending: bits 0-47 pfn, bit 55 "all-zero page,
no data", bits 56-63 the page's storage key) padded with zeros to a page boundary, then the data
chunks: ``CHUNK_HEADER`` followed by the stored bytes of up to ``chunk_pages`` non-zero pages,
in pfn list order, compressed (lz4 block, zstd frame) or raw when compression does not pay.

The writer writes the header last, so an interrupted write leaves no valid signature.
Everything read back is untrusted: a failed check raises CorruptImage naming it.
"""

import os
import stat
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import lz4.block
import numpy as np
import numpy.typing as npt
import zstandard

from .errors import CorruptImage, ForeignImage, MachineError
from .jsonfile import fsync_dir
from .pages import PAGE_SIZE, PfnArray, as_pfn_array

SIGNATURE = b"KSIMHIB1"
USED_SIGNATURE = b"KSIMUSED"
"""What ``invalidate`` writes over the signature once an image has been resumed."""
VERSION = 1
SUPPORTED_VERSIONS = (1,)
IMAGE_HEADER = struct.Struct("<8sIIQ16sQQQQQIIQQQ16s16sQI4x32x")
_CRC_AT = 12
CHUNK_HEADER = struct.Struct("<IIIIQ")  # stored raw crc index first_page

FLAG_INCREMENTAL = 1 << 0
FLAG_ENCRYPTED = 1 << 1
"""Reserved: set by a future encrypted format; version 1 readers refuse it."""
KNOWN_FLAGS = FLAG_INCREMENTAL | FLAG_ENCRYPTED

COMPRESSIONS = {"none": 0, "lz4": 1, "zstd": 2}
ZSTD_LEVEL = 1
CHUNK_PAGES = 32
MAX_CHUNK_PAGES = 1024  # 4 MiB: raw bytes fit a u32 with room to spare

PFN_BITS = 48
PFN_MASK = (1 << PFN_BITS) - 1
ZERO_BIT = 55
KEY_SHIFT = 56
_RESERVED_BITS = ((1 << KEY_SHIFT) - 1) & ~PFN_MASK & ~(1 << ZERO_BIT)

_ID_BYTES = 16
_SCAN_PAGES = 8192  # pages gathered at a time to find the all-zero ones (32 MiB)
_WRITE_BATCH = 16  # finished chunks the writer may send in one writev
_DECODE_GROUP = 8  # chunks a reader's worker checks and decompresses per task

Decoded = tuple[PfnArray, npt.NDArray[np.uint8]]
"""A chunk read back: its pfns and their pages shaped (n, 4096)."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header page says (validated)."""

    flags: int
    machine_id: bytes
    nr_ram_pages: int
    generation: int
    epoch_ns: int
    nr_pfns: int
    nr_data_pages: int
    compression: str
    chunk_pages: int
    nr_chunks: int
    pfn_list_offset: int
    first_chunk_offset: int
    image_id: bytes
    base_image_id: bytes
    stored_bytes: int
    pfn_list_crc: int

    @property
    def incremental(self) -> bool:
        """Whether the image holds only pages changed since its base image."""
        return bool(self.flags & FLAG_INCREMENTAL)

    @property
    def end_offset(self) -> int:
        """Byte offset just past the last chunk: the image's length."""
        return self.first_chunk_offset + self.nr_chunks * CHUNK_HEADER.size + self.stored_bytes


@dataclass(frozen=True)
class PfnList:
    """The saved pages in ascending pfn order, their keys and which are all-zero."""

    pfns: PfnArray
    keys: npt.NDArray[np.uint8]
    zero: npt.NDArray[np.bool_]

    @property
    def zero_pfns(self) -> PfnArray:
        """Pfns of the all-zero pages (no data stored: resume zeroes them)."""
        return self.pfns[self.zero]

    @property
    def data_pfns(self) -> PfnArray:
        """Pfns of the pages whose data the chunks hold, in chunk order."""
        return self.pfns[~self.zero]


@dataclass(frozen=True)
class ImageStats:
    """What ``write_image`` wrote and how long each phase took."""

    pages: int
    zero_pages: int
    data_bytes: int
    stored_bytes: int
    image_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Stored bytes over raw data bytes (1.0 when nothing was stored)."""
        return self.stored_bytes / self.data_bytes if self.data_bytes else 1.0


def _header_crc(page: bytes | bytearray) -> int:
    zeroed = bytearray(page)
    zeroed[_CRC_AT : _CRC_AT + 4] = bytes(4)
    return zlib.crc32(zeroed)


def _pack_header(h: ImageHeader) -> bytes:
    """The header page of *h*, crc filled in."""
    page = bytearray(PAGE_SIZE)
    IMAGE_HEADER.pack_into(
        page, 0, SIGNATURE, VERSION, 0, h.flags, h.machine_id, h.nr_ram_pages, h.generation,
        h.epoch_ns, h.nr_pfns, h.nr_data_pages, COMPRESSIONS[h.compression], h.chunk_pages,
        h.nr_chunks, h.pfn_list_offset, h.first_chunk_offset, h.image_id, h.base_image_id,
        h.stored_bytes, h.pfn_list_crc,
    )  # fmt: skip
    struct.pack_into("<I", page, _CRC_AT, _header_crc(page))
    return bytes(page)


def _pfn_list_end(nr_pfns: int) -> int:
    """Offset of the first chunk: the pfn list after the header page, padded to a page."""
    size = PAGE_SIZE + 8 * nr_pfns
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def _compressor(compression: str) -> Callable[[memoryview], bytes | memoryview]:
    """A function compressing one chunk; safe to call from several threads at once."""
    if compression == "lz4":
        return lambda raw: bytes(lz4.block.compress(raw, store_size=False))
    if compression == "zstd":
        local = threading.local()  # a ZstdCompressor must not be shared between threads

        def compress(raw: memoryview) -> bytes:
            if not hasattr(local, "zc"):
                local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            return bytes(local.zc.compress(raw))

        return compress
    return lambda raw: raw


def _decompress(compression: str, stored: bytes, raw_bytes: int, where: str) -> bytes:
    """The raw bytes of a chunk; CorruptImage if they do not decompress to *raw_bytes*."""
    if len(stored) == raw_bytes:
        return stored  # stored raw: compression did not pay
    try:
        if compression == "lz4":
            raw = lz4.block.decompress(stored, uncompressed_size=raw_bytes)
        elif compression == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_bytes)
        else:
            raise CorruptImage(f"{where}: {len(stored)} bytes stored for {raw_bytes} uncompressed")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise CorruptImage(f"{where}: does not decompress ({e})") from None
    if len(raw) != raw_bytes:
        raise CorruptImage(f"{where}: decompressed to {len(raw)} bytes, expected {raw_bytes}")
    return bytes(raw)


def _sorted_page_set(
    ram_pages: npt.NDArray[np.uint8], pfns: npt.ArrayLike, keys: npt.ArrayLike
) -> tuple[PfnArray, npt.NDArray[np.uint8]]:
    """*pfns* sorted with their *keys*; MachineError on repeats, bad pfns or bad keys."""
    ordered = as_pfn_array(pfns, ram_pages.shape[0])
    key_array = np.asarray(keys)
    if key_array.dtype != np.uint8 or key_array.shape != ordered.shape:
        raise MachineError(f"keys must be uint8 parallel to the pfns, got {key_array.dtype} "
                           f"of shape {key_array.shape} for {ordered.size} pfns")  # fmt: skip
    order = np.argsort(ordered, kind="stable")
    ordered, key_array = ordered[order], key_array[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeats.size:
        raise MachineError(f"pfn {int(ordered[repeats[0]])} appears more than once")
    return ordered, key_array


def _zero_mask(ram_pages: npt.NDArray[np.uint8], pfns: PfnArray) -> npt.NDArray[np.bool_]:
    """Which pages of sorted *pfns* are all zeros (32 MiB at a time, vectorized)."""
    zero = np.empty(pfns.size, dtype=np.bool_)
    for start in range(0, pfns.size, _SCAN_PAGES):
        some = pfns[start : start + _SCAN_PAGES]
        low, high = int(some[0]), int(some[-1])
        consecutive = high - low == some.size - 1  # sorted: a run of RAM, scanned in place
        batch = ram_pages[low : high + 1] if consecutive else ram_pages[some]
        zero[start : start + batch.shape[0]] = ~batch.view(np.uint64).any(axis=1)
    return zero


def _open_for_image(path: Path) -> tuple[int, Path | None]:
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
    progress: Callable[[int, int], None] | None = None,
) -> ImageStats:
    """Write the pages *pfns* of *ram_pages* (RAM as (nr_pages, 4096) uint8) and their *keys*.

    *pfns* may come in any order. All-zero pages are only flagged in the pfn list; the others
    are compressed by *threads* workers (default: the core count) while finished chunks are
    written in order, at most 2 x *threads* chunks in flight. A regular file is written under
    a temporary name (0600) and renamed; a block device is written in place, header last.
    *progress* gets (data pages written, data pages) after each chunk. A *base_image_id* marks
    the image incremental. Raises MachineError for a bad request, OSError from the I/O.
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
        if ident is not None and len(ident) != _ID_BYTES:
            raise MachineError(f"{name} must be {_ID_BYTES} bytes, got {len(ident)}")
    if base_image_id is not None and not any(base_image_id):
        raise MachineError("base_image_id must not be all zeros (zeros mean: no base)")
    for name, value in (("generation", generation), ("epoch_ns", epoch_ns)):
        if not 0 <= value < 1 << 64:
            raise MachineError(f"{name} {value} does not fit an unsigned 64-bit field")
    workers = threads if threads is not None else os.cpu_count() or 1
    if workers < 1:
        raise MachineError(f"threads must be at least 1, got {workers}")
    ordered, key_array = _sorted_page_set(ram_pages, pfns, keys)
    zero = _zero_mask(ram_pages, ordered)
    entries = ordered.astype(np.uint64) | (key_array.astype(np.uint64) << np.uint64(KEY_SHIFT))
    entries[zero] |= np.uint64(1 << ZERO_BIT)
    pfn_list = entries.astype("<u8").tobytes()
    data_pfns = ordered[~zero]
    nr_chunks = -(-data_pfns.size // chunk_pages)
    first_chunk = _pfn_list_end(ordered.size)
    t_scan = time.perf_counter()

    compress = _compressor(compression)

    def make_chunk(index: int) -> tuple[memoryview, memoryview]:
        """The record header and stored bytes of chunk *index* (run in a worker thread)."""
        first = index * chunk_pages
        chunk = data_pfns[first : first + chunk_pages]
        low, high = int(chunk[0]), int(chunk[-1])
        if high - low == chunk.size - 1:  # consecutive pfns: read RAM in place, no gather
            raw = ram_pages[low : high + 1].reshape(-1).data
        else:
            raw = ram_pages[chunk].reshape(-1).data
        stored = memoryview(compress(raw))
        if stored.nbytes >= raw.nbytes:
            stored = raw
        header = CHUNK_HEADER.pack(stored.nbytes, raw.nbytes, 0, index, first)
        crc = zlib.crc32(stored, zlib.crc32(header))
        record = CHUNK_HEADER.pack(stored.nbytes, raw.nbytes, crc, index, first)
        return memoryview(record), stored

    fd, temp = _open_for_image(path)
    stored_bytes = 0
    try:
        padding = bytes(first_chunk - PAGE_SIZE - len(pfn_list))
        _write_all(fd, bytes(PAGE_SIZE), pfn_list, padding)  # no valid header until the end
        with ThreadPoolExecutor(max_workers=workers) as pool:
            window: deque[Future[tuple[memoryview, memoryview]]] = deque()
            submitted = 0
            written = 0
            while written < nr_chunks:
                while submitted < nr_chunks and len(window) < 2 * workers:
                    window.append(pool.submit(make_chunk, submitted))
                    submitted += 1
                parts = list(window.popleft().result())
                while window and window[0].done() and len(parts) < 2 * _WRITE_BATCH:
                    parts.extend(window.popleft().result())  # finished ones: one bigger write
                stored_bytes += sum(part.nbytes for part in parts[1::2])
                _write_all(fd, *parts)
                written += len(parts) // 2
                if progress is not None:
                    progress(min(written * chunk_pages, data_pfns.size), data_pfns.size)
        t_data = time.perf_counter()
        header = ImageHeader(
            flags=FLAG_INCREMENTAL if base_image_id is not None else 0,
            machine_id=machine_id, nr_ram_pages=nr_ram_pages, generation=generation,
            epoch_ns=epoch_ns, nr_pfns=ordered.size, nr_data_pages=data_pfns.size,
            compression=compression, chunk_pages=chunk_pages, nr_chunks=nr_chunks,
            pfn_list_offset=PAGE_SIZE, first_chunk_offset=first_chunk, image_id=os.urandom(16),
            base_image_id=base_image_id or bytes(_ID_BYTES), stored_bytes=stored_bytes,
            pfn_list_crc=zlib.crc32(pfn_list),
        )  # fmt: skip
        os.fsync(fd)  # the data is down before a header can make it valid
        os.pwrite(fd, _pack_header(header), 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if temp is not None:
            os.rename(temp, path)
            temp = None
            fsync_dir(path.parent)
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
        seconds={"scan": t_scan - t0, "data": t_data - t_scan, "sync": t_end - t_data},
    )


def _write_all(fd: int, *parts: bytes | memoryview) -> None:
    """Write *parts* back to back at the file offset, in one writev unless it comes up short."""
    done = os.writev(fd, parts)
    total = sum(memoryview(part).nbytes for part in parts)
    if done < total:  # a short write: finish it the simple way
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _parse_header(page: bytes, where: str) -> ImageHeader:
    """Validate a header page; CorruptImage with a one-line reason if it is not a good one."""
    if len(page) < PAGE_SIZE:
        raise CorruptImage(f"{where}: truncated header ({len(page)} of {PAGE_SIZE} bytes)")
    (signature, version, crc, flags, machine_id, nr_ram_pages, generation, epoch_ns, nr_pfns,
     nr_data, compression_id, chunk_pages, nr_chunks, pfn_list_offset, first_chunk,
     image_id, base_id, stored_bytes, pfn_list_crc) = IMAGE_HEADER.unpack_from(page)  # fmt: skip
    if signature == USED_SIGNATURE:
        raise CorruptImage(f"{where}: image already used (a resume invalidated it)")
    if signature != SIGNATURE:
        raise CorruptImage(f"{where}: not a hibernation image (signature {signature!r})")
    if version not in SUPPORTED_VERSIONS:
        raise CorruptImage(f"{where}: image version {version} is not supported")
    if _header_crc(page) != crc:
        raise CorruptImage(f"{where}: header checksum mismatch")
    if any(page[IMAGE_HEADER.size - 36 : IMAGE_HEADER.size]) or any(page[IMAGE_HEADER.size :]):
        raise CorruptImage(f"{where}: reserved header bytes are not zero")
    if flags & ~KNOWN_FLAGS:
        raise CorruptImage(f"{where}: unknown flags {flags:#x}")
    if flags & FLAG_ENCRYPTED:
        raise CorruptImage(f"{where}: encrypted images are not supported by this version")
    if bool(flags & FLAG_INCREMENTAL) != any(base_id):
        raise CorruptImage(f"{where}: base image id does not agree with the incremental flag")
    names = {v: k for k, v in COMPRESSIONS.items()}
    if compression_id not in names:
        raise CorruptImage(f"{where}: unknown compression id {compression_id}")
    if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
        raise CorruptImage(f"{where}: chunk of {chunk_pages} pages is not in 1..{MAX_CHUNK_PAGES}")
    if not nr_data <= nr_pfns <= min(nr_ram_pages, PFN_MASK + 1):
        raise CorruptImage(f"{where}: {nr_pfns} pfns, {nr_data} with data, {nr_ram_pages} in RAM")
    if nr_chunks != -(-nr_data // chunk_pages):
        raise CorruptImage(f"{where}: {nr_chunks} chunks cannot hold {nr_data} pages")
    if pfn_list_offset != PAGE_SIZE or first_chunk != _pfn_list_end(nr_pfns):
        raise CorruptImage(f"{where}: pfn list or chunks at the wrong offset")
    if stored_bytes > nr_data * PAGE_SIZE or stored_bytes < nr_chunks:
        raise CorruptImage(f"{where}: {stored_bytes} stored bytes for {nr_data} pages")
    return ImageHeader(
        flags, machine_id, nr_ram_pages, generation, epoch_ns, nr_pfns, nr_data,
        names[compression_id], chunk_pages, nr_chunks, pfn_list_offset, first_chunk, image_id,
        base_id, stored_bytes, pfn_list_crc,
    )  # fmt: skip


def read_header(path: Path | str) -> ImageHeader:
    """Read and validate the header page of the image at *path*; CorruptImage if it is bad."""
    with open(path, "rb") as f:
        return _parse_header(f.read(PAGE_SIZE), str(path))


def _read_exact(f: BinaryIO, size: int, where: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise CorruptImage(f"{where}: image truncated ({len(data)} of {size} bytes)")
    return data


def read_pfn_list(path: Path | str, header: ImageHeader) -> PfnList:
    """Read and validate the pfn list of the image *header* came from; CorruptImage if bad."""
    with open(path, "rb") as f:
        f.seek(header.pfn_list_offset)
        return _parse_pfn_list(f, header, str(path))


def _parse_pfn_list(f: BinaryIO, header: ImageHeader, where: str) -> PfnList:
    size = 8 * header.nr_pfns
    data = _read_exact(f, header.first_chunk_offset - header.pfn_list_offset, f"{where} pfn list")
    if zlib.crc32(data[:size]) != header.pfn_list_crc:
        raise CorruptImage(f"{where}: pfn list checksum mismatch")
    if any(data[size:]):
        raise CorruptImage(f"{where}: pfn list padding is not zero")
    entries = np.frombuffer(data, dtype="<u8", count=header.nr_pfns).astype(np.uint64)
    pfns = (entries & np.uint64(PFN_MASK)).astype(np.int64)
    if np.any(entries & np.uint64(_RESERVED_BITS)):
        raise CorruptImage(f"{where}: pfn list has reserved bits set")
    if pfns.size and int(pfns[-1]) >= header.nr_ram_pages:
        raise CorruptImage(f"{where}: pfn {int(pfns[-1])} is outside RAM")
    if np.any(pfns[1:] <= pfns[:-1]):
        raise CorruptImage(f"{where}: pfn list is not strictly ascending")
    zero = (entries >> np.uint64(ZERO_BIT) & np.uint64(1)).astype(np.bool_)
    if header.nr_pfns - int(zero.sum()) != header.nr_data_pages:
        raise CorruptImage(f"{where}: pfn list flags {int((~zero).sum())} data pages, "
                           f"header says {header.nr_data_pages}")  # fmt: skip
    keys = (entries >> np.uint64(KEY_SHIFT)).astype(np.uint8)
    return PfnList(pfns, keys, zero)


def _image_size(f: BinaryIO) -> int | None:
    """Bytes in a regular file; None for a device (its size is not the image's)."""
    st = os.fstat(f.fileno())
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _records(f: BinaryIO, header: ImageHeader, where: str) -> Iterator[tuple[bytes, bytes]]:
    """Read each chunk's record header and stored bytes, checking its fields and the length."""
    size = _image_size(f)
    if size is not None and size != header.end_offset:
        what = "truncated" if size < header.end_offset else "followed by trailing bytes"
        raise CorruptImage(f"{where}: image {what} ({size} bytes, header says {header.end_offset})")
    f.seek(header.first_chunk_offset)
    stored_total = 0
    for index in range(header.nr_chunks):
        at = f"{where} chunk {index}"
        record = _read_exact(f, CHUNK_HEADER.size, at)
        stored_bytes, raw_bytes, _, got_index, first = CHUNK_HEADER.unpack(record)
        nr_pages = min(header.chunk_pages, header.nr_data_pages - index * header.chunk_pages)
        if got_index != index or first != index * header.chunk_pages:
            raise CorruptImage(f"{at}: record says chunk {got_index} from page {first}")
        if raw_bytes != nr_pages * PAGE_SIZE or not 0 < stored_bytes <= raw_bytes:
            raise CorruptImage(f"{at}: {stored_bytes} bytes stored for {raw_bytes}")
        stored_total += stored_bytes
        if stored_total > header.stored_bytes:
            raise CorruptImage(f"{at}: more stored bytes than the header says")
        yield record, _read_exact(f, stored_bytes, at)
    if stored_total != header.stored_bytes:
        raise CorruptImage(f"{where}: chunks hold {stored_total} bytes, header says "
                           f"{header.stored_bytes}")  # fmt: skip


def _chunks(
    f: BinaryIO, header: ImageHeader, data_pfns: PfnArray, where: str, threads: int | None
) -> Iterator[tuple[PfnArray, npt.NDArray[np.uint8]]]:
    """Validate and yield (pfns, pages) of each chunk in order; *threads* decode them.

    The file is read in this thread; checksums and decompression run in the workers, by
    groups of ``_DECODE_GROUP`` chunks (one chunk is too little work to hand to a thread), at
    most 2 x *threads* groups ahead. A bad chunk raises when its turn comes.
    """
    workers = threads if threads is not None else os.cpu_count() or 1
    if workers < 1:
        raise MachineError(f"threads must be at least 1, got {workers}")

    def decode(record: bytes, stored: bytes) -> Decoded:
        stored_bytes, raw_bytes, crc, index, first = CHUNK_HEADER.unpack(record)
        at = f"{where} chunk {index}"
        zeroed = CHUNK_HEADER.pack(stored_bytes, raw_bytes, 0, index, first)
        if zlib.crc32(stored, zlib.crc32(zeroed)) != crc:
            raise CorruptImage(f"{at}: checksum mismatch")
        raw = _decompress(header.compression, stored, raw_bytes, at)
        pages = np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        return data_pfns[first : first + pages.shape[0]], pages

    if workers == 1:
        for record, stored in _records(f, header, where):
            yield decode(record, stored)
        return

    def decode_group(group: list[tuple[bytes, bytes]]) -> tuple[list[Decoded], CorruptImage | None]:
        """The group's good chunks up to its first bad one, and that one's error."""
        done: list[Decoded] = []
        try:
            for record, stored in group:
                done.append(decode(record, stored))
        except CorruptImage as e:
            return done, e
        return done, None

    def results(future: Future[tuple[list[Decoded], CorruptImage | None]]) -> Iterator[Decoded]:
        done, error = future.result()
        yield from done
        if error is not None:
            raise error

    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque[Future[tuple[list[Decoded], CorruptImage | None]]] = deque()
        group: list[tuple[bytes, bytes]] = []
        for record_and_stored in _records(f, header, where):
            group.append(record_and_stored)
            if len(group) == _DECODE_GROUP:
                window.append(pool.submit(decode_group, group))
                group = []
            if len(window) >= 2 * workers:
                yield from results(window.popleft())
        window.append(pool.submit(decode_group, group))
        while window:
            yield from results(window.popleft())


def iter_chunks(
    path: Path | str, header: ImageHeader, pfn_list: PfnList, *, threads: int | None = None
) -> Iterator[tuple[PfnArray, npt.NDArray[np.uint8]]]:
    """Yield (pfns, pages shaped (n, 4096)) of each data chunk, each checked before it is yielded.

    *header* and *pfn_list* are what ``read_header`` and ``read_pfn_list`` returned for
    *path*. *threads* workers (default: the core count) check and decompress chunks while
    the file is read. A bad chunk raises CorruptImage naming it, after the good ones before it
    were yielded: call ``verify_image`` first to change nothing unless all of it is good.
    """
    with open(path, "rb") as f:
        yield from _chunks(f, header, pfn_list.data_pfns, str(path), threads)


def verify_image(
    path: Path | str, *, machine_id: bytes, nr_ram_pages: int, threads: int | None = None
) -> ImageHeader:
    """Check all of the image at *path*, writing nothing; return its header.

    Checks the header, that it was written for this machine (ForeignImage otherwise), the
    pfn list, every chunk's checksum and decompressed length (by *threads* workers, default
    the core count), and the image's length.
    Raises CorruptImage naming the first problem.
    """
    where = str(path)
    with open(path, "rb") as f:
        header = _parse_header(f.read(PAGE_SIZE), where)
        if header.machine_id != machine_id:
            raise ForeignImage(f"{where}: written for machine {header.machine_id.hex()}, "
                               f"this is {machine_id.hex()}")  # fmt: skip
        if header.nr_ram_pages != nr_ram_pages:
            raise ForeignImage(f"{where}: written for {header.nr_ram_pages} pages of RAM, "
                               f"this machine has {nr_ram_pages}")  # fmt: skip
        pfn_list = _parse_pfn_list(f, header, where)
        for _ in _chunks(f, header, pfn_list.data_pfns, where, threads):
            pass
    return header


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
