"""The hibernation image container: a page set of RAM, its keys and its data, in one file.

Layout (little-endian, byte by byte in docs/FORMAT.md): a header page (``IMAGE_HEADER`` then
zeros), the pfn list (one u64 per saved page, ascending: bits 0-47 pfn, bit 54 "data in the
base chain" (incremental images), bit 55 "all-zero page, no data", bits 56-63 the page's storage
key) padded with zeros to a page boundary, then the data chunks: ``CHUNK_HEADER`` followed by
the stored bytes of up to ``chunk_pages`` pages with data here, in pfn list order, compressed
(lz4 block, zstd frame) or raw when compression does not pay.

An encrypted image (``ImageKey``) has its pfn list and every chunk's stored bytes encrypted
with AES-256-GCM under a key derived for that image (a random salt in the header), and its
header authenticated by a tag in the header: a wrong key or any changed byte is refused.

The writer writes the header last, so an interrupted write leaves no valid signature.
Everything read back is untrusted: a failed check raises CorruptImage naming it.
"""

import contextlib
import ctypes
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
from typing import BinaryIO, Literal

import lz4.block
import numpy as np
import numpy.typing as npt
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kexec_sim.errors import CorruptImage, ForeignImage, ImageKeyError, ImageTooLarge, MachineError
from kexec_sim.jsonfile import fsync_dir
from kexec_sim.pages import PAGE_SIZE, PfnArray, as_pfn_array

SIGNATURE = b"KSIMHIB1"
USED_SIGNATURE = b"KSIMUSED"
"""What ``invalidate`` writes over the signature once an image has been resumed."""
VERSION = 1
SUPPORTED_VERSIONS = (1,)
IMAGE_HEADER = struct.Struct("<8sIIQ16sQQQQQIIQQQ16s16sQI4s16s16sQ")
_CRC_AT = 12
_AEAD_AT = 156  # nonce_prefix, salt, header_tag: zeros unless encrypted
_TAG_AT = 176
_AEAD_END = 192
CHUNK_HEADER = struct.Struct("<IIIIQ")  # stored raw crc index first_page

FLAG_INCREMENTAL = 1 << 0
FLAG_ENCRYPTED = 1 << 1
"""Pfn list and chunks encrypted, everything authenticated (AES-256-GCM)."""
FLAG_PASSPHRASE = 1 << 2
"""With FLAG_ENCRYPTED: the key comes from a passphrase (scrypt), not a key file (HKDF)."""
KNOWN_FLAGS = FLAG_INCREMENTAL | FLAG_ENCRYPTED | FLAG_PASSPHRASE

TAG_BYTES = 16  # AES-GCM tag
SALT_BYTES = 16
NONCE_PREFIX_BYTES = 4  # + an 8-byte index: the 12-byte GCM nonce
PFN_LIST_NONCE = (1 << 64) - 1
HEADER_NONCE = (1 << 64) - 2
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
KEY_FILE_MIN_BYTES = 16
HKDF_INFO = b"kexec-sim hibernation image key"

COMPRESSIONS = {"none": 0, "lz4": 1, "zstd": 2}
ZSTD_LEVEL = 1
CHUNK_PAGES = 128
"""Pages per chunk by default (512 KiB): 128 KiB chunks wrote ~35% slower (per-chunk costs)."""
MAX_CHUNK_PAGES = 1024  # 4 MiB: raw bytes fit a u32 with room to spare

PFN_BITS = 48
PFN_MASK = (1 << PFN_BITS) - 1
BASE_BIT = 54
ZERO_BIT = 55
KEY_SHIFT = 56
_RESERVED_BITS = ((1 << KEY_SHIFT) - 1) & ~PFN_MASK & ~(1 << ZERO_BIT) & ~(1 << BASE_BIT)

_ID_BYTES = 16
_SCAN_PAGES = 8192  # pages gathered at a time to find the all-zero ones (32 MiB)
_WRITE_BATCH = 16  # finished chunks the writer may send in one writev
_DECODE_GROUP = 8  # chunks a reader's worker checks and decompresses per task

PageCopier = Callable[[PfnArray], npt.NDArray[np.uint8]]
"""Returns a copy of the pages of the pfns it is given, shaped (n, PAGE_SIZE)."""
Decoded = tuple[PfnArray, npt.NDArray[np.uint8]]
"""A chunk read back: its pfns and their pages shaped (n, 4096)."""

_AUTH_FAILED = "authentication failed: wrong key or tampered image"


@dataclass(frozen=True)
class ImageKey:
    """The secret an encrypted image is written and read with: a key file or a passphrase.

    Each image has its own AES-256 key, derived from this secret and the image's random salt
    (``derive``): HKDF-SHA256 for a key file, scrypt (n=2^15, r=8, p=1) for a passphrase.
    """

    kind: Literal["key file", "passphrase"]
    secret: bytes = field(repr=False)
    _derived: dict[bytes, bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def from_key_file(cls, path: Path | str) -> "ImageKey":
        """The key held by the file at *path* (all of its bytes, at least 16); OSError."""
        secret = Path(path).read_bytes()
        if len(secret) < KEY_FILE_MIN_BYTES:
            raise MachineError(f"{path}: a key file needs at least {KEY_FILE_MIN_BYTES} bytes, "
                               f"this one has {len(secret)}")  # fmt: skip
        return cls("key file", secret)

    @classmethod
    def from_passphrase(cls, text: str) -> "ImageKey":
        """The key of passphrase *text* (not empty)."""
        if not text:
            raise MachineError("the passphrase is empty")
        return cls("passphrase", text.encode())

    @property
    def flags(self) -> int:
        """The header flags an image encrypted with this key carries."""
        return FLAG_ENCRYPTED | (FLAG_PASSPHRASE if self.kind == "passphrase" else 0)

    def derive(self, salt: bytes) -> bytes:
        """The 32-byte AES key of the image whose salt is *salt* (remembered once derived)."""
        key = self._derived.get(salt)
        if key is None:
            if self.kind == "passphrase":
                kdf: Scrypt | HKDF = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R,
                                            p=SCRYPT_P)  # fmt: skip
            else:
                kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO)
            key = kdf.derive(self.secret)
            self._derived[salt] = key
        return key


def _nonce(prefix: bytes, index: int) -> bytes:
    """The GCM nonce of item *index* (chunk number, or PFN_LIST_NONCE / HEADER_NONCE)."""
    return prefix + index.to_bytes(8, "little")


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
    nonce_prefix: bytes = bytes(NONCE_PREFIX_BYTES)
    salt: bytes = bytes(SALT_BYTES)
    super_block_pfn: int = 0
    """The PKRAM super block among the pages (resume boots with ``pkram=`` it); 0: none."""

    @property
    def incremental(self) -> bool:
        """Whether the image holds only pages changed since its base image."""
        return bool(self.flags & FLAG_INCREMENTAL)

    @property
    def encrypted(self) -> bool:
        """Whether the pfn list and the chunks are encrypted (reading needs the key)."""
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def pfn_list_bytes(self) -> int:
        """Bytes the pfn list takes before its padding (a GCM tag more when encrypted)."""
        return 8 * self.nr_pfns + (TAG_BYTES if self.encrypted else 0)

    @property
    def end_offset(self) -> int:
        """Byte offset just past the last chunk: the image's length."""
        return self.first_chunk_offset + self.nr_chunks * CHUNK_HEADER.size + self.stored_bytes


@dataclass(frozen=True)
class PfnList:
    """The saved pages in ascending pfn order, their keys, which are all-zero and which have
    their data in the base chain (incremental images; all False when not given)."""

    pfns: PfnArray
    keys: npt.NDArray[np.uint8]
    zero: npt.NDArray[np.bool_]
    in_base: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, np.bool_))

    def __post_init__(self) -> None:
        if self.in_base.size == 0 and self.pfns.size:
            object.__setattr__(self, "in_base", np.zeros(self.pfns.size, np.bool_))

    @property
    def zero_pfns(self) -> PfnArray:
        """Pfns of the all-zero pages (no data stored: resume zeroes them)."""
        return self.pfns[self.zero]

    @property
    def base_pfns(self) -> PfnArray:
        """Pfns of the pages unchanged since the base image (their data is in the base chain)."""
        return self.pfns[self.in_base]

    @property
    def data_pfns(self) -> PfnArray:
        """Pfns of the pages whose data the chunks hold, in chunk order."""
        return self.pfns[~(self.zero | self.in_base)]


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


def _header_crc(page: bytes | bytearray) -> int:
    zeroed = bytearray(page)
    zeroed[_CRC_AT : _CRC_AT + 4] = bytes(4)
    return zlib.crc32(zeroed)


def _pack_header(h: ImageHeader, aead: AESGCM | None) -> bytes:
    """The header page of *h*, its tag (when *aead* is given) and crc filled in."""
    page = bytearray(PAGE_SIZE)
    IMAGE_HEADER.pack_into(
        page, 0, SIGNATURE, VERSION, 0, h.flags, h.machine_id, h.nr_ram_pages, h.generation,
        h.epoch_ns, h.nr_pfns, h.nr_data_pages, COMPRESSIONS[h.compression], h.chunk_pages,
        h.nr_chunks, h.pfn_list_offset, h.first_chunk_offset, h.image_id, h.base_image_id,
        h.stored_bytes, h.pfn_list_crc, h.nonce_prefix, h.salt, bytes(TAG_BYTES),
        h.super_block_pfn,
    )  # fmt: skip
    if aead is not None:  # over the page with crc and tag zero
        tag = aead.encrypt(_nonce(h.nonce_prefix, HEADER_NONCE), b"", bytes(page))
        page[_TAG_AT : _TAG_AT + TAG_BYTES] = tag
    struct.pack_into("<I", page, _CRC_AT, _header_crc(page))
    return bytes(page)


def _pfn_list_end(nr_pfns: int, encrypted: bool = False) -> int:
    """Offset of the first chunk: the pfn list (and its tag) after the header page, padded."""
    size = PAGE_SIZE + 8 * nr_pfns + (TAG_BYTES if encrypted else 0)
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


def _decompress(
    compression: str, stored: bytes | memoryview, raw_bytes: int, where: str
) -> bytes | memoryview:
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
        if ident is not None and len(ident) != _ID_BYTES:
            raise MachineError(f"{name} must be {_ID_BYTES} bytes, got {len(ident)}")
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
    first_chunk = _pfn_list_end(ordered.size, key is not None)
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
        flags |= key.flags
        salt, nonce_prefix = os.urandom(SALT_BYTES), os.urandom(NONCE_PREFIX_BYTES)
        aead = AESGCM(key.derive(salt))
        pfn_list = aead.encrypt(_nonce(nonce_prefix, PFN_LIST_NONCE), pfn_list, None)
    t_scan = time.perf_counter()

    compress = _compressor(compression)

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
        stored = memoryview(compress(raw))
        if stored.nbytes >= raw.nbytes:
            stored = raw
        if aead is not None:  # authenticates the record header too (its crc field zero)
            aad = CHUNK_HEADER.pack(stored.nbytes + TAG_BYTES, raw.nbytes, 0, index, first)
            stored = memoryview(aead.encrypt(_nonce(nonce_prefix, index), stored, aad))
        header = CHUNK_HEADER.pack(stored.nbytes, raw.nbytes, 0, index, first)
        crc = zlib.crc32(stored, zlib.crc32(header))
        record = CHUNK_HEADER.pack(stored.nbytes, raw.nbytes, crc, index, first)
        return memoryview(record), stored

    fd, temp = _open_for_image(path)
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
            base_image_id=base_image_id or bytes(_ID_BYTES), stored_bytes=stored_bytes,
            pfn_list_crc=zlib.crc32(pfn_list), nonce_prefix=nonce_prefix, salt=salt,
            super_block_pfn=super_block_pfn,
        )  # fmt: skip
        os.fsync(fd)  # the data is down before a header can make it valid
        os.pwrite(fd, _pack_header(header, aead), 0)
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


def _parse_header(
    page: bytes, where: str, key: ImageKey | None, allow_used: bool = False
) -> ImageHeader:
    """Validate a header page; CorruptImage with a one-line reason if it is not a good one.

    An encrypted header is authenticated with *key* before any field is trusted; ImageKeyError
    when *key* is missing, wrong or not needed.
    """
    if len(page) < PAGE_SIZE:
        raise CorruptImage(f"{where}: truncated header ({len(page)} of {PAGE_SIZE} bytes)")
    (signature, version, crc, flags, machine_id, nr_ram_pages, generation, epoch_ns, nr_pfns,
     nr_data, compression_id, chunk_pages, nr_chunks, pfn_list_offset, first_chunk,
     image_id, base_id, stored_bytes, pfn_list_crc, nonce_prefix, salt,
     tag, super_block_pfn) = IMAGE_HEADER.unpack_from(page)  # fmt: skip
    if signature == USED_SIGNATURE and allow_used:  # checked as written, before invalidate
        page = SIGNATURE + page[len(SIGNATURE) :]
        signature = SIGNATURE
    if signature == USED_SIGNATURE:
        raise CorruptImage(f"{where}: image already used (a resume invalidated it)")
    if signature != SIGNATURE:
        raise CorruptImage(f"{where}: not a hibernation image (signature {signature!r})")
    if version not in SUPPORTED_VERSIONS:
        raise CorruptImage(f"{where}: image version {version} is not supported")
    if _header_crc(page) != crc:
        raise CorruptImage(f"{where}: header checksum mismatch")
    if flags & ~KNOWN_FLAGS:
        raise CorruptImage(f"{where}: unknown flags {flags:#x}")
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if any(page[IMAGE_HEADER.size :]) or (not encrypted and any(page[_AEAD_AT:_AEAD_END])):
        raise CorruptImage(f"{where}: reserved header bytes are not zero")
    if flags & FLAG_PASSPHRASE and not encrypted:
        raise CorruptImage(f"{where}: passphrase flag on an image that is not encrypted")
    _check_key(flags, key, where)
    if key is not None:
        zeroed = bytearray(page)
        zeroed[_CRC_AT : _CRC_AT + 4] = bytes(4)
        zeroed[_TAG_AT : _TAG_AT + TAG_BYTES] = bytes(TAG_BYTES)
        try:
            AESGCM(key.derive(salt)).decrypt(_nonce(nonce_prefix, HEADER_NONCE), tag, zeroed)
        except InvalidTag:
            raise ImageKeyError(f"{where}: {_AUTH_FAILED}") from None
    if bool(flags & FLAG_INCREMENTAL) != any(base_id):
        raise CorruptImage(f"{where}: base image id does not agree with the incremental flag")
    names = {v: k for k, v in COMPRESSIONS.items()}
    if compression_id not in names:
        raise CorruptImage(f"{where}: unknown compression id {compression_id}")
    if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
        raise CorruptImage(f"{where}: chunk of {chunk_pages} pages is not in 1..{MAX_CHUNK_PAGES}")
    if super_block_pfn >= nr_ram_pages:
        raise CorruptImage(f"{where}: super block pfn {super_block_pfn} is outside RAM")
    if not nr_data <= nr_pfns <= min(nr_ram_pages, PFN_MASK + 1):
        raise CorruptImage(f"{where}: {nr_pfns} pfns, {nr_data} with data, {nr_ram_pages} in RAM")
    if nr_chunks != -(-nr_data // chunk_pages):
        raise CorruptImage(f"{where}: {nr_chunks} chunks cannot hold {nr_data} pages")
    if pfn_list_offset != PAGE_SIZE or first_chunk != _pfn_list_end(nr_pfns, encrypted):
        raise CorruptImage(f"{where}: pfn list or chunks at the wrong offset")
    tags = TAG_BYTES * nr_chunks if encrypted else 0
    if stored_bytes > nr_data * PAGE_SIZE + tags or stored_bytes < nr_chunks + tags:
        raise CorruptImage(f"{where}: {stored_bytes} stored bytes for {nr_data} pages")
    return ImageHeader(
        flags, machine_id, nr_ram_pages, generation, epoch_ns, nr_pfns, nr_data,
        names[compression_id], chunk_pages, nr_chunks, pfn_list_offset, first_chunk, image_id,
        base_id, stored_bytes, pfn_list_crc, nonce_prefix, salt, super_block_pfn,
    )  # fmt: skip


def _check_key(flags: int, key: ImageKey | None, where: str) -> None:
    """ImageKeyError unless *key* is given exactly when *flags* say encrypted, of that kind."""
    if not flags & FLAG_ENCRYPTED:
        if key is not None:
            raise ImageKeyError(f"{where}: image is not encrypted")
        return
    if key is None:
        raise ImageKeyError(f"{where}: image is encrypted: give --key-file or a passphrase")
    if key.flags != flags & (FLAG_ENCRYPTED | FLAG_PASSPHRASE):
        wanted = "a passphrase" if flags & FLAG_PASSPHRASE else "a key file"
        raise ImageKeyError(f"{where}: image is encrypted with {wanted}, not a {key.kind}")


def _aead(header: ImageHeader, key: ImageKey | None, where: str) -> AESGCM | None:
    """The cipher of *header*'s image under *key* (None if not encrypted); ImageKeyError."""
    _check_key(header.flags, key, where)
    return None if key is None else AESGCM(key.derive(header.salt))


def read_header(
    path: Path | str, *, key: ImageKey | None = None, allow_used: bool = False
) -> ImageHeader:
    """Read and validate the header page of the image at *path*; CorruptImage if it is bad.

    An encrypted image needs its *key* (ImageKeyError without it, with a wrong one, or with
    one for an image that is not encrypted); its header is authenticated before it is parsed.
    A used image (``KSIMUSED``) is refused unless *allow_used* (the base of an
    incremental image was used by the resume that came before it).
    """
    with open(path, "rb") as f:
        return _parse_header(f.read(PAGE_SIZE), str(path), key, allow_used)


def _read_exact(f: BinaryIO, size: int, where: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise CorruptImage(f"{where}: image truncated ({len(data)} of {size} bytes)")
    return data


def read_pfn_list(path: Path | str, header: ImageHeader, *, key: ImageKey | None = None) -> PfnList:
    """Read and validate the pfn list of the image *header* came from; CorruptImage if bad.

    An encrypted image's list is decrypted and authenticated with *key*.
    """
    where = str(path)
    aead = _aead(header, key, where)
    with open(path, "rb") as f:
        f.seek(header.pfn_list_offset)
        return _parse_pfn_list(f, header, where, aead)


def _parse_pfn_list(f: BinaryIO, header: ImageHeader, where: str, aead: AESGCM | None) -> PfnList:
    size = header.pfn_list_bytes
    data = _read_exact(f, header.first_chunk_offset - header.pfn_list_offset, f"{where} pfn list")
    if zlib.crc32(data[:size]) != header.pfn_list_crc:
        raise CorruptImage(f"{where}: pfn list checksum mismatch")
    if any(data[size:]):
        raise CorruptImage(f"{where}: pfn list padding is not zero")
    if aead is not None:
        try:
            data = aead.decrypt(_nonce(header.nonce_prefix, PFN_LIST_NONCE), data[:size], None)
        except InvalidTag:
            raise CorruptImage(f"{where}: pfn list {_AUTH_FAILED}") from None
    entries = np.frombuffer(data, dtype="<u8", count=header.nr_pfns).astype(np.uint64)
    pfns = (entries & np.uint64(PFN_MASK)).astype(np.int64)
    if np.any(entries & np.uint64(_RESERVED_BITS)):
        raise CorruptImage(f"{where}: pfn list has reserved bits set")
    if pfns.size and int(pfns[-1]) >= header.nr_ram_pages:
        raise CorruptImage(f"{where}: pfn {int(pfns[-1])} is outside RAM")
    if np.any(pfns[1:] <= pfns[:-1]):
        raise CorruptImage(f"{where}: pfn list is not strictly ascending")
    zero = (entries >> np.uint64(ZERO_BIT) & np.uint64(1)).astype(np.bool_)
    in_base = (entries >> np.uint64(BASE_BIT) & np.uint64(1)).astype(np.bool_)
    if in_base.any() and not header.incremental:
        raise CorruptImage(f"{where}: pfn list has pages in a base image, image not incremental")
    both = np.flatnonzero(zero & in_base)
    if both.size:
        raise CorruptImage(f"{where}: pfn {int(pfns[both[0]])} is flagged both all-zero and "
                           "in the base image")  # fmt: skip
    with_data = header.nr_pfns - int(zero.sum()) - int(in_base.sum())
    if with_data != header.nr_data_pages:
        raise CorruptImage(f"{where}: pfn list flags {with_data} data pages, "
                           f"header says {header.nr_data_pages}")  # fmt: skip
    keys = (entries >> np.uint64(KEY_SHIFT)).astype(np.uint8)
    return PfnList(pfns, keys, zero, in_base)


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
        tag = TAG_BYTES if header.encrypted else 0
        if raw_bytes != nr_pages * PAGE_SIZE or not tag < stored_bytes <= raw_bytes + tag:
            raise CorruptImage(f"{at}: {stored_bytes} bytes stored for {raw_bytes}")
        stored_total += stored_bytes
        if stored_total > header.stored_bytes:
            raise CorruptImage(f"{at}: more stored bytes than the header says")
        yield record, _read_exact(f, stored_bytes, at)
    if stored_total != header.stored_bytes:
        raise CorruptImage(f"{where}: chunks hold {stored_total} bytes, header says "
                           f"{header.stored_bytes}")  # fmt: skip


def _chunks(
    f: BinaryIO,
    header: ImageHeader,
    data_pfns: PfnArray,
    where: str,
    threads: int | None,
    aead: AESGCM | None,
) -> Iterator[tuple[PfnArray, npt.NDArray[np.uint8]]]:
    """Validate and yield (pfns, pages) of each chunk in order; *threads* decode them.

    The file is read in this thread; checksums, decryption (with *aead*, authenticating the
    record header too) and decompression run in the workers, by
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
        if aead is not None:
            try:
                stored = aead.decrypt(_nonce(header.nonce_prefix, index), stored, zeroed)
            except InvalidTag:
                raise CorruptImage(f"{at}: {_AUTH_FAILED}") from None
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


_Task = list[tuple[memoryview, memoryview, int, int]]
"""Chunks for one worker: (record header, stored bytes, index, first page) each."""
_Result = tuple[list[Decoded], CorruptImage | None]
"""A group's good chunks up to its first bad one, and that one's error."""


def _fd_image_size(fd: int) -> int | None:
    """Bytes in a regular file; None for a device (its size is not the image's)."""
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


_READ_STEP = 4 << 20  # bytes per read when loading: large reads, as dd's
_WINDOW = 16 << 20  # the two buffers of a load that keeps nothing (verify_image)


def _load_chunks(
    fd: int,
    header: ImageHeader,
    data_pfns: PfnArray,
    where: str,
    threads: int | None,
    aead: AESGCM | None,
    keep: bool,
) -> tuple[list[Decoded], npt.NDArray[np.int64]]:
    """Read the chunks of the image open at *fd* once, checking each; their (pfns, pages) if *keep*.

    The file is read in this thread with large reads into one buffer the size of the chunks
    (*keep*) or into two windows used in turn, while *threads* workers check the chunks already
    read (by groups of ``_DECODE_GROUP``): checksums, decryption (with *aead*, authenticating
    the record header too) and decompression. A chunk stored raw and not encrypted is kept as
    a view of the read buffer (no copy); the others are decoded into one staging array the
    size of the data pages. Raises CorruptImage for the first bad chunk in file order.
    """
    workers = threads if threads is not None else os.cpu_count() or 1
    if workers < 1:
        raise MachineError(f"threads must be at least 1, got {workers}")
    size = _fd_image_size(fd)
    if size is not None and size != header.end_offset:
        what = "truncated" if size < header.end_offset else "followed by trailing bytes"
        raise CorruptImage(f"{where}: image {what} ({size} bytes, header says {header.end_offset})")
    region = header.end_offset - header.first_chunk_offset
    largest = CHUNK_HEADER.size + header.chunk_pages * PAGE_SIZE + TAG_BYTES
    buffers = [np.empty(region, np.uint8)] if keep else [
        np.empty(min(region, max(_WINDOW, 2 * largest)), np.uint8) for _ in range(2)
    ]  # fmt: skip
    staging: list[npt.NDArray[np.uint8]] = []
    tag = TAG_BYTES if header.encrypted else 0
    compression = header.compression

    def decode(record: memoryview, stored: memoryview, index: int, first: int) -> Decoded:
        stored_bytes, raw_bytes, crc, _, _ = CHUNK_HEADER.unpack(record)
        at = f"{where} chunk {index}"
        zeroed = CHUNK_HEADER.pack(stored_bytes, raw_bytes, 0, index, first)
        if zlib.crc32(stored, zlib.crc32(zeroed)) != crc:
            raise CorruptImage(f"{at}: checksum mismatch")
        data: bytes | memoryview = stored
        if aead is not None:
            try:
                data = aead.decrypt(_nonce(header.nonce_prefix, index), stored, zeroed)
            except InvalidTag:
                raise CorruptImage(f"{at}: {_AUTH_FAILED}") from None
        pfns = data_pfns[first : first + raw_bytes // PAGE_SIZE]
        if aead is None and stored_bytes == raw_bytes:  # raw: the read buffer holds the pages
            return pfns, np.frombuffer(stored, np.uint8).reshape(-1, PAGE_SIZE)
        raw = _decompress(compression, data, raw_bytes, at)
        pages = np.frombuffer(raw, np.uint8).reshape(-1, PAGE_SIZE)
        if not keep:
            return pfns, pages
        target = staging[0][first : first + pages.shape[0]]
        target[...] = pages  # staged: the decoder's output memory is reused, warm
        return pfns, target

    def decode_group(group: _Task) -> _Result:
        """The group's good chunks up to its first bad one, and that one's error."""
        done: list[Decoded] = []
        try:
            for args in group:
                done.append(decode(*args))
        except CorruptImage as e:
            return done, e
        return done, None

    kept: list[Decoded] = []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    in_flight: deque[tuple[int, Future[_Result] | _Result]] = deque()  # (buffer, result)

    def settle(only: int | None) -> None:
        """Collect the groups in order (only those reading buffer *only*, if given): wait for
        them, keep their chunks, raise the first error."""
        while in_flight and (only is None or in_flight[0][0] == only):
            _, pending = in_flight.popleft()
            done, error = pending.result() if isinstance(pending, Future) else pending
            if keep:
                kept.extend(done)
            if error is not None:
                raise error

    def submit(which: int, group: _Task) -> None:
        if group:
            task: Future[_Result] | _Result = (
                pool.submit(decode_group, group) if pool is not None else decode_group(group)
            )
            in_flight.append((which, task))

    try:
        with contextlib.suppress(OSError):  # a larger readahead
            os.posix_fadvise(fd, header.first_chunk_offset, region, os.POSIX_FADV_SEQUENTIAL)
        index = 0
        stored_total = 0
        offsets = np.zeros(header.nr_chunks, np.int64)
        file_at = header.first_chunk_offset  # next byte to read
        buf_at = file_at  # the file offset of the buffer's first byte
        which = 0
        buf = buffers[0].data
        filled = 0  # bytes of buf read
        off = 0  # start of the next record in buf
        while index < header.nr_chunks:
            if filled == len(buf) or file_at == header.end_offset:  # buf used up: the next one
                if keep:  # one buffer holds everything: a record is missing
                    break
                which = 1 - which
                settle(which)  # nothing still reads the buffer reused
                rest = buf[off:filled]
                buf = buffers[which].data
                buf[: len(rest)] = rest
                buf_at += off
                filled, off = len(rest), 0
            step = min(_READ_STEP, len(buf) - filled, header.end_offset - file_at)
            got = os.preadv(fd, [buf[filled : filled + step]], file_at) if step else 0
            if got == 0:
                break
            filled += got
            file_at += got
            group: _Task = []
            while index < header.nr_chunks and off + CHUNK_HEADER.size <= filled:
                where_chunk = f"{where} chunk {index}"
                record = buf[off : off + CHUNK_HEADER.size]
                stored_bytes, raw_bytes, _, got_index, first = CHUNK_HEADER.unpack(record)
                nr_pages = min(
                    header.chunk_pages, header.nr_data_pages - index * header.chunk_pages
                )
                if got_index != index or first != index * header.chunk_pages:
                    settle(None)
                    raise CorruptImage(f"{where_chunk}: record says chunk {got_index} from page "
                                       f"{first}")  # fmt: skip
                if raw_bytes != nr_pages * PAGE_SIZE or not tag < stored_bytes <= raw_bytes + tag:
                    settle(None)
                    raise CorruptImage(
                        f"{where_chunk}: {stored_bytes} bytes stored for {raw_bytes}"
                    )
                if stored_total + stored_bytes > header.stored_bytes:
                    settle(None)
                    raise CorruptImage(f"{where_chunk}: more stored bytes than the header says")
                end = off + CHUNK_HEADER.size + stored_bytes
                if end > filled:
                    break
                if keep and not staging and (aead is not None or stored_bytes != raw_bytes):
                    staging.append(np.empty((header.nr_data_pages, PAGE_SIZE), np.uint8))
                group.append((record, buf[off + CHUNK_HEADER.size : end], index, first))
                offsets[index] = buf_at + off
                if len(group) == _DECODE_GROUP:
                    submit(which, group)
                    group = []
                stored_total += stored_bytes
                index += 1
                off = end
            submit(which, group)
        settle(None)
        if index < header.nr_chunks:
            got_bytes = file_at - header.first_chunk_offset
            raise CorruptImage(f"{where} chunk {index}: image truncated ({got_bytes} of "
                               f"{region} chunk bytes)")  # fmt: skip
        if stored_total != header.stored_bytes:
            raise CorruptImage(f"{where}: chunks hold {stored_total} bytes, header says "
                               f"{header.stored_bytes}")  # fmt: skip
    finally:
        if pool is not None:
            for _, pending in in_flight:
                if isinstance(pending, Future):
                    pending.cancel()
            pool.shutdown(wait=True)
    return kept, offsets


def iter_chunks(
    path: Path | str,
    header: ImageHeader,
    pfn_list: PfnList,
    *,
    threads: int | None = None,
    key: ImageKey | None = None,
) -> Iterator[tuple[PfnArray, npt.NDArray[np.uint8]]]:
    """Yield (pfns, pages shaped (n, 4096)) of each data chunk, each checked before it is yielded.

    *header* and *pfn_list* are what ``read_header`` and ``read_pfn_list`` returned for
    *path*. *threads* workers (default: the core count) check and decompress chunks while
    the file is read. A bad chunk raises CorruptImage naming it, after the good ones before it
    were yielded: call ``verify_image`` first to change nothing unless all of it is good.
    An encrypted image's chunks are decrypted and authenticated with *key*.
    """
    aead = _aead(header, key, str(path))
    with open(path, "rb") as f:
        yield from _chunks(f, header, pfn_list.data_pfns, str(path), threads, aead)


def verify_image(
    path: Path | str,
    *,
    machine_id: bytes,
    nr_ram_pages: int,
    threads: int | None = None,
    key: ImageKey | None = None,
    allow_used: bool = False,
) -> ImageHeader:
    """Check all of the image at *path*, writing nothing; return its header.

    Checks the header, that it was written for this machine (ForeignImage otherwise), the
    pfn list, every chunk's checksum and decompressed length (by *threads* workers, default
    the core count), and the image's length; an encrypted image's header, pfn list and
    chunks are all authenticated with *key*.
    Raises CorruptImage naming the first problem (ImageKeyError for a missing or wrong key).
    A used image (``KSIMUSED``) is refused unless *allow_used*: then it is checked as written.
    """
    return load_image(
        path,
        machine_id=machine_id,
        nr_ram_pages=nr_ram_pages,
        threads=threads,
        key=key,
        allow_used=allow_used,
        keep=False,
    ).header


@dataclass(frozen=True)
class CheckedImage:
    """An image checked whole: its header, pfn list and (if kept) every chunk decoded."""

    header: ImageHeader
    pfn_list: PfnList
    chunks: list[Decoded]
    """(pfns, pages) of each chunk in order; empty unless loaded with keep=True."""
    offsets: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    """The file offset of each chunk's record (``read_into`` reads them again there)."""


def load_image(
    path: Path | str,
    *,
    machine_id: bytes,
    nr_ram_pages: int,
    threads: int | None = None,
    key: ImageKey | None = None,
    allow_used: bool = False,
    keep: bool = True,
) -> CheckedImage:
    """``verify_image``, reading the file once and keeping the decoded chunks when *keep*.

    Resume uses it to check a whole image and have its data, read and decoded once, before
    it writes any page (the decoded data takes as much memory as the image's data pages).
    """
    where = str(path)
    with open(path, "rb") as f:
        header = _parse_header(f.read(PAGE_SIZE), where, key, allow_used)
        if header.machine_id != machine_id:
            raise ForeignImage(f"{where}: written for machine {header.machine_id.hex()}, "
                               f"this is {machine_id.hex()}")  # fmt: skip
        if header.nr_ram_pages != nr_ram_pages:
            raise ForeignImage(f"{where}: written for {header.nr_ram_pages} pages of RAM, "
                               f"this machine has {nr_ram_pages}")  # fmt: skip
        aead = _aead(header, key, where)
        pfn_list = _parse_pfn_list(f, header, where, aead)
        kept, offsets = _load_chunks(
            f.fileno(), header, pfn_list.data_pfns, where, threads, aead, keep
        )
    return CheckedImage(header, pfn_list, kept, offsets)


def _runs(pfns: PfnArray) -> list[tuple[int, int]]:
    """(first pfn, count) of each run of consecutive pfns in ascending *pfns*."""
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pfns.size]))
    return list(zip(pfns[starts].tolist(), (ends - starts).tolist(), strict=True))


def read_into(
    path: Path | str,
    checked: "CheckedImage",
    pages: npt.NDArray[np.uint8],
    take: npt.NDArray[np.bool_],
    *,
    threads: int | None = None,
    key: ImageKey | None = None,
) -> int:
    """Put the data pages of the image *checked* (``load_image``) says is good into *pages*.

    Only the pages whose pfn *take* (bool per page of *pages*) flags are written. The file is
    read again (from the page cache after ``load_image``) by *threads* workers, chunk by chunk
    at the offsets ``load_image`` found: a chunk stored raw and not encrypted is read straight
    into *pages* (a ``preadv`` over its runs of pfns) and its checksum computed there, the others
    are read, checked and decoded, then copied. Every chunk is checked again: CorruptImage
    (naming it, "changed since it was checked") if the file changed meanwhile, some pages
    already written. Returns the number of pages written.
    """
    header, data_pfns, offsets = checked.header, checked.pfn_list.data_pfns, checked.offsets
    where = str(path)
    aead = _aead(header, key, where)
    workers = threads if threads is not None else os.cpu_count() or 1
    if workers < 1:
        raise MachineError(f"threads must be at least 1, got {workers}")
    if offsets.size != header.nr_chunks:
        raise MachineError(f"{where}: load the image (keeping its offsets) before reading it")

    def one(index: int) -> int:
        at = f"{where} chunk {index}: changed since it was checked"
        record = os.pread(fd, CHUNK_HEADER.size, int(offsets[index]))
        if len(record) != CHUNK_HEADER.size:
            raise CorruptImage(f"{at} (truncated)")
        stored_bytes, raw_bytes, crc, got_index, first = CHUNK_HEADER.unpack(record)
        pfns = data_pfns[first : first + raw_bytes // PAGE_SIZE]
        if (
            got_index != index
            or first != index * header.chunk_pages
            or pfns.size * PAGE_SIZE != raw_bytes
        ):
            raise CorruptImage(at)
        zeroed = CHUNK_HEADER.pack(stored_bytes, raw_bytes, 0, index, first)
        mine = take[pfns]
        data_at = int(offsets[index]) + CHUNK_HEADER.size
        if aead is None and stored_bytes == raw_bytes and mine.all():  # straight into RAM
            views = [pages[low : low + n].reshape(-1).data for low, n in _runs(pfns)]
            if os.preadv(fd, views, data_at) != raw_bytes:
                raise CorruptImage(f"{at} (truncated)")
            value = zlib.crc32(zeroed)
            for view in views:
                value = zlib.crc32(view, value)
            if value != crc:
                raise CorruptImage(at)
            return int(pfns.size)
        stored = os.pread(fd, stored_bytes, data_at)
        if len(stored) != stored_bytes or zlib.crc32(stored, zlib.crc32(zeroed)) != crc:
            raise CorruptImage(at)
        data: bytes = stored
        if aead is not None:
            try:
                data = aead.decrypt(_nonce(header.nonce_prefix, index), stored, zeroed)
            except InvalidTag:
                raise CorruptImage(at) from None
        raw = np.frombuffer(_decompress(header.compression, data, raw_bytes, at), np.uint8)
        raw = raw.reshape(-1, PAGE_SIZE)
        if mine.all():
            for (low, n), start in zip(_runs(pfns), _run_starts(pfns), strict=True):
                pages[low : low + n] = raw[start : start + n]
        elif mine.any():
            pages[pfns[mine]] = raw[mine]
        return int(np.count_nonzero(mine))

    def group(first_index: int) -> int:
        last = min(first_index + _DECODE_GROUP, header.nr_chunks)
        return sum(one(index) for index in range(first_index, last))

    starts = range(0, header.nr_chunks, _DECODE_GROUP)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if workers == 1:
            return sum(group(s) for s in starts)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return sum(pool.map(group, starts))
    finally:
        os.close(fd)


def _run_starts(pfns: PfnArray) -> list[int]:
    """The index in *pfns* where each run of ``_runs`` starts."""
    return [0, *(np.flatnonzero(np.diff(pfns) != 1) + 1).tolist()]


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
