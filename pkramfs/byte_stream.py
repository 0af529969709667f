"""Byte streams: a node's metadata bytes (msgpack) as a chain of checksummed data pages.

A byte page (``BYTE_MAGIC``) is a chain page (see page_chain) whose count is the number of
stream bytes it holds (``BYTES_PER_PAGE`` in every page but the last) and whose extra word is
the stream offset of its first byte; its data follows the 32-byte header.
"""

import numpy as np

from kexec_sim import PAGE_SIZE, PfnArray, Ram

from . import page_chain
from .errors import CorruptNode

BYTE_MAGIC = b"PKRMBYT1"
HEADER_BYTES = page_chain.CHAIN_HEADER.size
BYTES_PER_PAGE = PAGE_SIZE - HEADER_BYTES  # 4064


def pages_needed(n_bytes: int) -> int:
    """Return how many byte pages a stream of *n_bytes* takes."""
    return -(-n_bytes // BYTES_PER_PAGE)


def write_stream(ram: Ram, pfns: PfnArray, data: bytes) -> None:
    """Write *data* as a chain of byte pages on *pfns* (exactly ``pages_needed(len(data))``)."""
    n_pages = pages_needed(len(data))
    assert len(pfns) == n_pages, "wrong number of byte pages"
    if n_pages == 0:
        return
    words = page_chain.new_pages(ram, pfns, BYTE_MAGIC)
    offsets = np.arange(n_pages, dtype=np.uint64) * np.uint64(BYTES_PER_PAGE)
    words[:, 3] = offsets
    padded = np.zeros(n_pages * BYTES_PER_PAGE, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    words.view(np.uint8)[:, HEADER_BYTES:] = padded.reshape(n_pages, BYTES_PER_PAGE)
    counts = np.full(n_pages, BYTES_PER_PAGE, dtype=np.int64)
    counts[-1] = len(data) - (n_pages - 1) * BYTES_PER_PAGE
    page_chain.seal_and_store(ram, pfns, words, counts)


def read_stream(
    ram: Ram, first_pfn: int, n_pages: int, n_bytes: int, what: str
) -> tuple[PfnArray, memoryview]:
    """Read and validate a byte stream; return its pages and its bytes (a view of the checked
    copy: not copied again, a node's metadata being megabytes for a big tree).

    Raises CorruptNode for a bad chain or when the pages do not hold exactly *n_bytes*.
    """
    if n_pages != pages_needed(n_bytes):
        raise CorruptNode(f"{what}: {n_pages} pages cannot hold {n_bytes} bytes")
    pfns, headers, bodies = page_chain.read_chain(ram, first_pfn, n_pages, BYTE_MAGIC, what)
    if n_pages == 0:
        return pfns, memoryview(b"")
    counts = page_chain.counts_of(headers)
    expected = np.full(n_pages, BYTES_PER_PAGE, dtype=np.int64)
    expected[-1] = n_bytes - (n_pages - 1) * BYTES_PER_PAGE
    offsets = np.arange(n_pages, dtype=np.uint64) * np.uint64(BYTES_PER_PAGE)
    if (counts != expected).any() or (headers[:, 3] != offsets).any():
        raise CorruptNode(f"{what}: byte pages out of order or with wrong lengths")
    return pfns, bodies.view(np.uint8).reshape(-1)[:n_bytes].data
