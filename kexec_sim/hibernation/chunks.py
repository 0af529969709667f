"""The data chunks of a hibernation image: compression codecs (lz4 block, zstd frame, none).

A chunk holds the pages of up to ``chunk_pages`` pfns with data, compressed, or raw when
compression does not pay (then its stored bytes are as many as its raw bytes).
"""

import threading
from collections.abc import Callable

import lz4.block
import zstandard

from kexec_sim.errors import CorruptImage

ZSTD_LEVEL = 1


def compressor(compression: str) -> Callable[[memoryview], bytes | memoryview]:
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


def decompress(
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
