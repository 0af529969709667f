"""The data chunks of a hibernation image: how one chunk is stored, and checked when read back.

A chunk is a record header (``CHUNK_HEADER``: stored bytes, raw bytes, crc, index, first
page) followed by its stored bytes: the pages of up to ``chunk_pages`` pfns with data,
compressed (lz4 block, zstd frame) or raw when compression does not pay (then it stores as
many bytes as it has raw), then, in an encrypted image, encrypted with AES-256-GCM (the nonce
indexed by the chunk's number, the record header authenticated too). The crc covers the
record header (its crc field zero) and the stored bytes.

``ChunkCodec.encode`` makes a chunk for the writer; ``ChunkCodec.decode`` is the one decoder
every reader path uses (checksum, decryption, decompression and length), and ``check_crc``
its checksum alone, for the bytes of a raw chunk read straight into RAM.
"""

import os
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lz4.block
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kexec_sim.errors import CorruptImage, MachineError
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation.crypto import AUTH_FAILED, TAG_BYTES, nonce
from kexec_sim.hibernation.format import CHUNK_HEADER, ImageHeader

ZSTD_LEVEL = 1

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class ChunkRecord:
    """A chunk's record header (``CHUNK_HEADER``), as read (untrusted) or written (not frozen:
    one is made per chunk, and a frozen dataclass costs more to make)."""

    stored_bytes: int
    raw_bytes: int
    crc: int
    index: int
    first_page: int
    """Index in the image's data pages (the pfn list's pages with data here) of its first."""

    @classmethod
    def unpack(cls, data: Buffer) -> "ChunkRecord":
        """The record header at the start of *data* (``CHUNK_HEADER.size`` bytes)."""
        return cls(*CHUNK_HEADER.unpack(data))

    def pack(self, crc: int | None = None) -> bytes:
        """The record header's bytes (with *crc* in place of its own, if given)."""
        return CHUNK_HEADER.pack(self.stored_bytes, self.raw_bytes,
                                 self.crc if crc is None else crc, self.index,
                                 self.first_page)  # fmt: skip

    def zeroed(self) -> bytes:
        """The record header with its crc zero: what the crc and the AEAD tag cover."""
        return self.pack(crc=0)


def expect_record(record: ChunkRecord, index: int, header: ImageHeader, where: str) -> None:
    """CorruptImage ("*where*: ...") unless *record* can be chunk *index* of the image
    *header* describes: its number, its first page, its raw size and a stored size it can have."""
    if record.index != index or record.first_page != index * header.chunk_pages:
        raise CorruptImage(f"{where}: record says chunk {record.index} from page "
                           f"{record.first_page}")  # fmt: skip
    nr_pages = min(header.chunk_pages, header.nr_data_pages - index * header.chunk_pages)
    tag = TAG_BYTES if header.encrypted else 0
    stored, raw = record.stored_bytes, record.raw_bytes
    if raw != nr_pages * PAGE_SIZE or not tag < stored <= raw + tag:
        raise CorruptImage(f"{where}: {stored} bytes stored for {raw}")


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


def _decompress(compression: str, stored: Buffer, raw_bytes: int, where: str) -> Buffer:
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


class ChunkCodec:
    """How the chunks of one image are stored: its compression and, if it is encrypted, its
    cipher (*aead*, the image's derived key) and nonce prefix. Safe to share between threads."""

    def __init__(self, compression: str, aead: AESGCM | None, nonce_prefix: bytes) -> None:
        self.compression = compression
        self.aead = aead
        self.nonce_prefix = nonce_prefix
        self._compress = _compressor(compression)

    @classmethod
    def of(cls, header: ImageHeader, aead: AESGCM | None) -> "ChunkCodec":
        """The codec of the image *header* describes (*aead*: its cipher, None if plain)."""
        return cls(header.compression, aead, header.nonce_prefix)

    def encode(self, raw: memoryview, index: int, first_page: int) -> tuple[memoryview, memoryview]:
        """Chunk *index* holding the pages *raw* (from data page *first_page* on): its record
        header and its stored bytes (*raw* itself when compression does not pay, unencrypted)."""
        stored = memoryview(self._compress(raw))
        if stored.nbytes >= raw.nbytes:
            stored = raw
        if self.aead is not None:  # authenticates the record header too (its crc field zero)
            aad = ChunkRecord(stored.nbytes + TAG_BYTES, raw.nbytes, 0, index, first_page)
            sealed = self.aead.encrypt(nonce(self.nonce_prefix, index), stored, aad.zeroed())
            stored = memoryview(sealed)
        record = ChunkRecord(stored.nbytes, raw.nbytes, 0, index, first_page)
        crc = zlib.crc32(stored, zlib.crc32(record.zeroed()))
        return memoryview(record.pack(crc=crc)), stored

    def stores_raw(self, record: ChunkRecord) -> bool:
        """Whether the stored bytes of *record*'s chunk are its pages as they are."""
        return self.aead is None and record.stored_bytes == record.raw_bytes

    def check_crc(self, record: ChunkRecord, stored: Iterable[Buffer], where: str) -> None:
        """CorruptImage ("*where*: checksum mismatch") unless *stored* (the chunk's stored
        bytes, in parts) has the checksum *record* says."""
        value = zlib.crc32(record.zeroed())
        for part in stored:
            value = zlib.crc32(part, value)
        if value != record.crc:
            raise CorruptImage(f"{where}: checksum mismatch")

    def decode(self, record: ChunkRecord, stored: Buffer, where: str) -> Buffer:
        """The raw pages (``record.raw_bytes``) of the chunk *record* heads, whose stored bytes
        are *stored*: checksum, decryption and authentication, decompression, length.

        Raises CorruptImage naming *where* and the first check that failed. A chunk stored raw
        and not encrypted comes back as *stored* itself (no copy).
        """
        self.check_crc(record, (stored,), where)
        data = stored
        if self.aead is not None:
            try:
                data = self.aead.decrypt(nonce(self.nonce_prefix, record.index), stored,
                                         record.zeroed())  # fmt: skip
            except InvalidTag:
                raise CorruptImage(f"{where}: {AUTH_FAILED}") from None
        return _decompress(self.compression, data, record.raw_bytes, where)


def worker_count(threads: int | None) -> int:
    """How many threads code chunks: *threads*, default the core count; MachineError below 1."""
    workers = threads if threads is not None else os.cpu_count() or 1
    if workers < 1:
        raise MachineError(f"threads must be at least 1, got {workers}")
    return workers
