"""Reading a hibernation image back: check all of it, then put its pages into RAM.

Resume checks every image of its chain whole before it writes a page: ``check_image`` reads
the header (that it is this machine's), the pfn list and every chunk (record, checksum,
decryption, decompressed length) and the image's length, writing nothing and keeping only
where each chunk lies. Then ``CheckedImage.read_into`` reads the chunks again (from the page
cache the check just filled) into RAM, checking each one again on the way, since the file may
have changed in between. Both take every chunk through the one decoder,
kexec_sim.hibernation.chunks.ChunkCodec. ``read_header`` and ``read_pfn_list`` read just the
front of an image (a base image, the image just written).

Everything read back is untrusted: a failed check raises CorruptImage naming it.
"""

import contextlib
import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import CorruptImage, ForeignImage
from kexec_sim.hibernation.chunks import ChunkCodec, ChunkRecord, expect_record, worker_count
from kexec_sim.hibernation.crypto import TAG_BYTES, ImageKey
from kexec_sim.hibernation.format import (
    CHUNK_HEADER,
    ImageHeader,
    PfnList,
    image_aead,
    parse_header,
    parse_pfn_list,
)
from kexec_sim.pages import PAGE_SIZE, PfnArray, runs_in_order

READ_STEP_BYTES = 4 << 20
"""Bytes per read while checking the chunks: large reads, as dd's."""
WINDOW_BYTES = 16 << 20
"""Each of the two buffers the check reads the chunks into, in turn (at least 2 chunks)."""
DECODE_GROUP = 8
"""Chunks a worker checks per task: one chunk is too little work to hand to a thread."""


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
        return parse_header(f.read(PAGE_SIZE), str(path), key, allow_used)


def read_pfn_list(path: Path | str, header: ImageHeader, *, key: ImageKey | None = None) -> PfnList:
    """Read and validate the pfn list of the image *header* came from; CorruptImage if bad.

    An encrypted image's list is decrypted and authenticated with *key*.
    """
    where = str(path)
    aead = image_aead(header, key, where)
    with open(path, "rb") as f:
        data = _pfn_list_bytes(f, header, where)
    return parse_pfn_list(data, header, where, aead)


def _pfn_list_bytes(f: BinaryIO, header: ImageHeader, where: str) -> bytes:
    """The pfn list of the image open as *f*, with its padding; CorruptImage if it is cut short."""
    size = header.first_chunk_offset - header.pfn_list_offset
    f.seek(header.pfn_list_offset)
    data = f.read(size)
    if len(data) != size:
        raise CorruptImage(f"{where} pfn list: image truncated ({len(data)} of {size} bytes)")
    return data


@dataclass(frozen=True)
class CheckedImage:
    """An image ``check_image`` found good: its header, its pfn list and where each chunk lies."""

    path: Path
    header: ImageHeader
    pfn_list: PfnList
    offsets: npt.NDArray[np.int64]
    """The file offset of each chunk's record, in chunk order."""
    key: ImageKey | None = field(default=None, repr=False)
    """The key it was checked with (an encrypted image's chunks are read with it)."""

    def read_into(
        self,
        pages: npt.NDArray[np.uint8],
        take: npt.NDArray[np.bool_],
        *,
        threads: int | None = None,
    ) -> int:
        """Put the data pages of this image whose pfn *take* flags into *pages*.

        *pages* is RAM shaped (nr_pages, 4096); *take* a bool per page of it. The chunks are
        read again at the offsets the check found, by *threads* workers (default: the core
        count), and each is checked again: a chunk stored raw and not encrypted, whose pages
        are all taken, is read straight into *pages* (a ``preadv`` over its runs of pfns) and
        its checksum computed there; the others are read and decoded, then copied. Returns the
        number of pages written. Raises CorruptImage naming the chunk ("changed since it was
        checked") if the file changed meanwhile, some pages already written.
        """
        where = str(self.path)
        codec = ChunkCodec.of(self.header, image_aead(self.header, self.key, where))
        data_pfns = self.pfn_list.data_pfns
        starts = range(0, self.header.nr_chunks, DECODE_GROUP)
        workers = worker_count(threads)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:

            def group(first: int) -> int:
                last = min(first + DECODE_GROUP, self.header.nr_chunks)
                return sum(
                    self._read_chunk(fd, codec, data_pfns, index, pages, take)
                    for index in range(first, last)
                )

            if workers == 1:
                return sum(group(first) for first in starts)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return sum(pool.map(group, starts))
        finally:
            os.close(fd)

    def _read_chunk(
        self,
        fd: int,
        codec: ChunkCodec,
        data_pfns: PfnArray,
        index: int,
        pages: npt.NDArray[np.uint8],
        take: npt.NDArray[np.bool_],
    ) -> int:
        """Read chunk *index* again, check it and put the pages *take* flags into *pages*
        (*data_pfns*: the pfn list's pages with data, in chunk order)."""
        where = f"{self.path} chunk {index}: changed since it was checked"
        at = int(self.offsets[index])
        head = os.pread(fd, CHUNK_HEADER.size, at)
        if len(head) != CHUNK_HEADER.size:
            raise CorruptImage(f"{where}: truncated")
        record = ChunkRecord.unpack(head)
        expect_record(record, index, self.header, where)
        first = record.first_page
        pfns = data_pfns[first : first + record.raw_bytes // PAGE_SIZE]
        mine = take[pfns]
        data_at = at + CHUNK_HEADER.size
        if codec.stores_raw(record) and mine.all():  # straight into RAM
            views = [pages[low : low + n].reshape(-1).data for low, n in _runs(pfns)]
            if os.preadv(fd, views, data_at) != record.raw_bytes:
                raise CorruptImage(f"{where}: truncated")
            codec.check_crc(record, views, where)
            return int(pfns.size)
        stored = os.pread(fd, record.stored_bytes, data_at)
        if len(stored) != record.stored_bytes:
            raise CorruptImage(f"{where}: truncated")
        raw = np.frombuffer(codec.decode(record, stored, where), np.uint8).reshape(-1, PAGE_SIZE)
        if mine.all():
            start = 0
            for low, n in _runs(pfns):
                pages[low : low + n] = raw[start : start + n]
                start += n
        elif mine.any():
            pages[pfns[mine]] = raw[mine]
        return int(np.count_nonzero(mine))


def _runs(pfns: PfnArray) -> list[tuple[int, int]]:
    """(first pfn, count) of each run of consecutive pfns of *pfns*, in order."""
    starts, lengths = runs_in_order(pfns)
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


def check_image(
    path: Path | str,
    *,
    machine_id: bytes,
    nr_ram_pages: int,
    threads: int | None = None,
    key: ImageKey | None = None,
    allow_used: bool = False,
) -> CheckedImage:
    """Check all of the image at *path*, writing nothing, reading each byte once.

    Checks the header, that it was written for this machine (ForeignImage otherwise), the
    pfn list, every chunk's record, checksum and decompressed length (by *threads* workers,
    default the core count), and the image's length; an encrypted image's header, pfn list and
    chunks are all authenticated with *key*. Raises CorruptImage naming the first problem in
    file order (ImageKeyError for a missing or wrong key). A used image (``KSIMUSED``) is
    refused unless *allow_used*: then it is checked as written.

    This is resume's first step for each image of its chain; the second, once all are good,
    is ``read_into`` of what this returns (the decoded data is not kept: reading the image
    again from the page cache costs less than staging it in fresh memory).
    """
    where = str(path)
    workers = worker_count(threads)
    with open(path, "rb") as f:
        header = parse_header(f.read(PAGE_SIZE), where, key, allow_used)
        if header.machine_id != machine_id:
            raise ForeignImage(f"{where}: written for machine {header.machine_id.hex()}, "
                               f"this is {machine_id.hex()}")  # fmt: skip
        if header.nr_ram_pages != nr_ram_pages:
            raise ForeignImage(f"{where}: written for {header.nr_ram_pages} pages of RAM, "
                               f"this machine has {nr_ram_pages}")  # fmt: skip
        aead = image_aead(header, key, where)
        pfn_list = parse_pfn_list(_pfn_list_bytes(f, header, where), header, where, aead)
        offsets = _ChunkScan(f.fileno(), header, where, ChunkCodec.of(header, aead), workers).run()
    return CheckedImage(Path(path), header, pfn_list, offsets, key)


_Group = list[tuple[ChunkRecord, memoryview, str]]
"""Chunks for one worker to check: (record, stored bytes, what to call it) each."""


class _ChunkScan:
    """One pass over the chunks of the image open at *fd*, checking each, in file order.

    This thread reads the chunk region with large reads into two buffers used in turn and
    checks each record's fields as it comes; the workers check the chunks already read
    (``ChunkCodec.decode``), by groups of ``DECODE_GROUP``. Before a buffer is filled again,
    every group reading it is waited for. The first bad chunk in file order raises.
    """

    def __init__(
        self, fd: int, header: ImageHeader, where: str, codec: ChunkCodec, workers: int
    ) -> None:
        self.fd = fd
        self.header = header
        self.where = where
        self.codec = codec
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        region = header.end_offset - header.first_chunk_offset
        largest = CHUNK_HEADER.size + header.chunk_pages * PAGE_SIZE + TAG_BYTES
        size = min(region, max(WINDOW_BYTES, 2 * largest))
        self.buffers = [np.empty(size, np.uint8).data for _ in range(2)]
        self.in_flight: deque[tuple[int, Future[CorruptImage | None] | CorruptImage | None]]
        self.in_flight = deque()  # (buffer, a group's first error) in file order
        self.which = 0  # the buffer being filled
        self.buf_at = header.first_chunk_offset  # the file offset of its first byte
        self.filled = 0  # bytes of it read
        self.off = 0  # where the next record starts in it
        self.file_at = header.first_chunk_offset  # the next byte to read
        self.index = 0  # the next chunk
        self.stored_total = 0
        self.offsets = np.zeros(header.nr_chunks, np.int64)

    def run(self) -> npt.NDArray[np.int64]:
        """Check every chunk; return the file offset of each chunk's record."""
        header = self.header
        _check_length(self.fd, header, self.where)
        with contextlib.suppress(OSError):  # a larger readahead
            os.posix_fadvise(self.fd, header.first_chunk_offset,
                             header.end_offset - header.first_chunk_offset,
                             os.POSIX_FADV_SEQUENTIAL)  # fmt: skip
        try:
            while self.index < header.nr_chunks:
                buf = self.buffers[self.which]
                if self.filled == len(buf) or self.file_at == header.end_offset:
                    self._next_buffer()
                if not self._read():
                    break
                self._submit(self._records())
            self._settle(None)
        finally:
            if self.pool is not None:
                for _, pending in self.in_flight:
                    if isinstance(pending, Future):
                        pending.cancel()
                self.pool.shutdown(wait=True)
        if self.index < header.nr_chunks:
            got = self.file_at - header.first_chunk_offset
            region = header.end_offset - header.first_chunk_offset
            raise CorruptImage(f"{self.where} chunk {self.index}: image truncated ({got} of "
                               f"{region} chunk bytes)")  # fmt: skip
        if self.stored_total != header.stored_bytes:
            raise CorruptImage(f"{self.where}: chunks hold {self.stored_total} bytes, header "
                               f"says {header.stored_bytes}")  # fmt: skip
        return self.offsets

    def _next_buffer(self) -> None:
        """Go on in the other buffer (once nothing reads it), the unfinished record moved there."""
        rest = self.buffers[self.which][self.off : self.filled]
        self.which = 1 - self.which
        self._settle(self.which)
        self.buffers[self.which][: len(rest)] = rest
        self.buf_at += self.off
        self.filled, self.off = len(rest), 0

    def _read(self) -> bool:
        """Read on into the buffer; False at the end of the image (or of the device)."""
        buf = self.buffers[self.which]
        step = min(READ_STEP_BYTES, len(buf) - self.filled, self.header.end_offset - self.file_at)
        got = os.preadv(self.fd, [buf[self.filled : self.filled + step]], self.file_at)
        self.filled += got
        self.file_at += got
        return got > 0

    def _records(self) -> _Group:
        """The whole chunks the buffer now holds, their records checked, in order."""
        header, buf = self.header, self.buffers[self.which]
        chunks: _Group = []
        while self.index < header.nr_chunks and self.off + CHUNK_HEADER.size <= self.filled:
            where = f"{self.where} chunk {self.index}"
            record = ChunkRecord.unpack(buf[self.off : self.off + CHUNK_HEADER.size])
            try:
                expect_record(record, self.index, header, where)
                if self.stored_total + record.stored_bytes > header.stored_bytes:
                    raise CorruptImage(f"{where}: more stored bytes than the header says")
            except CorruptImage:
                self._submit(chunks)
                self._settle(None)  # a chunk before this one may be bad: it comes first
                raise
            end = self.off + CHUNK_HEADER.size + record.stored_bytes
            if end > self.filled:
                break
            chunks.append((record, buf[self.off + CHUNK_HEADER.size : end], where))
            self.offsets[self.index] = self.buf_at + self.off
            self.stored_total += record.stored_bytes
            self.index += 1
            self.off = end
        return chunks

    def _submit(self, chunks: _Group) -> None:
        """Hand *chunks* (all in the current buffer) to the workers, by groups."""
        for start in range(0, len(chunks), DECODE_GROUP):
            group = chunks[start : start + DECODE_GROUP]
            pending = (
                self.pool.submit(self._check, group) if self.pool is not None
                else self._check(group)
            )  # fmt: skip
            self.in_flight.append((self.which, pending))

    def _check(self, group: _Group) -> CorruptImage | None:
        """Check the chunks of *group* in order (in a worker); the first one's error."""
        try:
            for record, stored, where in group:
                self.codec.decode(record, stored, where)
        except CorruptImage as e:
            return e
        return None

    def _settle(self, only: int | None) -> None:
        """Wait for the groups handed out (only those reading buffer *only*, if given), in
        order; raise the first error."""
        while self.in_flight and (only is None or self.in_flight[0][0] == only):
            _, pending = self.in_flight.popleft()
            error = pending.result() if isinstance(pending, Future) else pending
            if error is not None:
                raise error


def _check_length(fd: int, header: ImageHeader, where: str) -> None:
    """CorruptImage unless the regular file at *fd* is as long as *header* says (a device's
    size is not the image's: reading it finds a truncated image)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size != header.end_offset:
        what = "truncated" if st.st_size < header.end_offset else "followed by trailing bytes"
        raise CorruptImage(f"{where}: image {what} ({st.st_size} bytes, header says "
                           f"{header.end_offset})")  # fmt: skip
