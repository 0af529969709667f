"""Reading a hibernation image back: its front checked first, then its chunks in one pass.

``open_image`` checks an image's front, writing nothing: the header (that it is this
machine's), the pfn list and the image's length. Then one pass reads the chunk region once,
with large reads into a few reusable buffers, while workers check every chunk (record,
checksum, decryption, decompressed length) through the one decoder,
kexec_sim.hibernation.chunks.ChunkCodec: ``Image.read_into`` puts each good chunk's pages
into RAM as it goes (resume), saving what they overwrite so that the caller can put it back if
a chunk further on is refused (kexec_sim.hibernation.undo); ``Image.check`` (and
``check_image``) only checks. ``read_header`` and ``read_pfn_list`` read just the front of an
image (a base image, the image just written).

Everything read back is untrusted: a failed check raises CorruptImage naming it.
"""

import contextlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import CorruptImage, ForeignImage, MachineError
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation.chunks import (
    Buffer,
    ChunkCodec,
    ChunkRecord,
    expect_record,
    worker_count,
)
from kexec_sim.hibernation.crypto import TAG_BYTES, ImageKey
from kexec_sim.hibernation.format import (
    CHUNK_HEADER,
    ImageHeader,
    PfnList,
    image_aead,
    parse_header,
    parse_pfn_list,
)
from kexec_sim.hibernation.report import reason
from kexec_sim.hibernation.undo import RamUndo
from kexec_sim.ram import Ram

READ_BYTES = 4 << 20
"""Bytes per read of the chunk region (a whole chunk, if one is larger): large reads, as dd's."""
SPARE_BUFFERS = 2
"""Buffers beyond one per worker: the reader fills these while the workers check the others."""

SHORT_RUN_PAGES = 4
"""Runs shorter than this on average: a chunk's pages are stored with one copy through RAM's
mapping (a page fault each), not a pwrite per run (a system call each, and Python around it)."""

Place = Callable[[int, Buffer], int]
"""place(chunk index, its raw pages): put them where they go (in a worker); pages placed."""
Done = Callable[[int], None]
"""done(pages): called in file order as each read's chunks are through (pages placed so far)."""


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
class Image:
    """An image whose front ``open_image`` found good: header, pfn list and length. Its
    chunks are checked as a pass reads them (``check``, ``read_into``)."""

    path: Path
    header: ImageHeader
    pfn_list: PfnList
    key: ImageKey | None = field(default=None, repr=False)
    """The key its front was checked with (an encrypted image's chunks are read with it)."""
    file_id: tuple[int, int] = (0, 0)
    """The (device, inode) its front was read from: a pass reads that file or none."""

    def check(self, *, threads: int | None = None) -> None:
        """Read and check every chunk, writing nothing (by *threads* workers, default the
        core count); CorruptImage naming the first bad chunk in file order."""
        self._pass(None, threads, None)

    def read_into(
        self,
        ram: Ram,
        take: npt.NDArray[np.bool_],
        *,
        undo: RamUndo,
        threads: int | None = None,
        done: Done | None = None,
    ) -> int:
        """Read every chunk once, check it, and store its pages whose pfn *take* flags (a
        bool per page of *ram*) into *ram*; return how many pages were stored.

        Each chunk's pages are stored as soon as it passed its checks (by runs through the
        RAM file, Ram.store_run; scattered ones through the mapping), after *undo* saved what
        they overwrite: on CorruptImage (the first bad chunk in file order) or any other error,
        pages of earlier chunks are already stored and the caller puts them back with
        ``undo.put_back()``. *done* is told the pages stored so far, in file order.
        """
        data_pfns = self.pfn_list.data_pfns
        index = np.flatnonzero(take[data_pfns])  # data pages to store, by their place here
        pfns = data_pfns[index]
        chunk_pages = self.header.chunk_pages
        # Runs of pages consecutive both here and in RAM, never across a chunk's end.
        breaks = (np.diff(pfns) != 1) | (np.diff(index) != 1) | (index[1:] % chunk_pages == 0)
        firsts = np.flatnonzero(np.concatenate(([index.size > 0], breaks)))
        lengths = np.diff(np.concatenate((firsts, [index.size]))).tolist()
        run_at, run_pfn = (index[firsts] % chunk_pages).tolist(), pfns[firsts].tolist()
        chunks = np.arange(self.header.nr_chunks + 1)
        page_bounds = np.searchsorted(index // chunk_pages, chunks).tolist()
        run_bounds = np.searchsorted(index[firsts] // chunk_pages, chunks).tolist()

        def place(chunk: int, raw: Buffer) -> int:
            low: int = page_bounds[chunk]
            high: int = page_bounds[chunk + 1]
            if low == high:
                return 0
            rows = np.frombuffer(raw, np.uint8).reshape(-1, PAGE_SIZE)
            at = index[low:high] - chunk * chunk_pages
            undo.save(pfns[low:high], rows, at)
            first_run, end_run = run_bounds[chunk], run_bounds[chunk + 1]
            if (end_run - first_run) * SHORT_RUN_PAGES > high - low:  # scattered pages
                ram.store_pages(pfns[low:high], rows[at])
                return high - low
            view = memoryview(raw)
            for run in range(first_run, end_run):
                at, pfn, n = run_at[run], run_pfn[run], lengths[run]
                ram.store_run(pfn, view[at * PAGE_SIZE : (at + n) * PAGE_SIZE])
            return high - low

        return self._pass(place, threads, done)

    def _pass(self, place: Place | None, threads: int | None, done: Done | None) -> int:
        where = str(self.path)
        codec = ChunkCodec.of(self.header, image_aead(self.header, self.key, where))
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _file_id(fd) != self.file_id:
                raise CorruptImage(f"{where}: another file since its header was checked")
            return _ChunkPass(fd, self, codec, worker_count(threads), place, done).run()
        finally:
            os.close(fd)


def open_image(
    path: Path | str,
    *,
    machine_id: bytes,
    nr_ram_pages: int,
    key: ImageKey | None = None,
    allow_used: bool = False,
) -> Image:
    """Check the front of the image at *path*, writing nothing: its header, that it was written
    for this machine (ForeignImage otherwise), its pfn list and its length; an encrypted
    image's header and pfn list are authenticated with *key*. Raises CorruptImage naming the
    first problem (ImageKeyError for a missing or wrong key). A used image (``KSIMUSED``) is
    refused unless *allow_used*: then it is checked as written.

    Its chunks are checked as they are read: ``Image.check``, ``Image.read_into``.
    """
    where = str(path)
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
        _check_length(f.fileno(), header, where)
        file_id = _file_id(f.fileno())
    return Image(Path(path), header, pfn_list, key, file_id)


def check_image(
    path: Path | str,
    *,
    machine_id: bytes,
    nr_ram_pages: int,
    threads: int | None = None,
    key: ImageKey | None = None,
    allow_used: bool = False,
) -> Image:
    """Check all of the image at *path*, writing nothing, reading each byte once:
    ``open_image``, then ``Image.check`` (by *threads* workers, default the core count)."""
    image = open_image(path, machine_id=machine_id, nr_ram_pages=nr_ram_pages, key=key,
                       allow_used=allow_used)  # fmt: skip
    image.check(threads=threads)
    return image


_Batch = list[tuple[ChunkRecord, int, int]]
"""The whole chunks one buffer holds: (record, where its stored bytes start, chunk index)."""


class _ChunkPass:
    """One pass over the chunks of the image open at *fd*, each read once, in file order.

    This thread reads the chunk region with large reads, each into a free buffer of a few
    (from the first chunk not yet read, so a chunk the last read cut is read again whole),
    checks each record's fields as it comes and hands the buffer's whole chunks to a worker,
    which decodes each (ChunkCodec.decode) and places its pages (*place*, if given). A buffer
    is free again once its worker is through. The first bad chunk in file order raises, once
    no worker runs any more.

    The reads are buffered, and the page cache they fill is dropped right behind them: the
    image is read once, and its pages, freed at once, are the warm memory the next pages of
    RAM are allocated from (on this kind of VM, memory the host has not touched lately costs
    the first touch of each page more than everything else resume does; O_DIRECT reads,
    leaving the RAM pages all fresh, made a resume half as fast).
    """

    def __init__(
        self,
        fd: int,
        image: Image,
        codec: ChunkCodec,
        workers: int,
        place: Place | None,
        done: Done | None,
    ) -> None:
        self.fd = fd
        self.header = image.header
        self.where = str(image.path)
        self.codec = codec
        self.place = place
        self.done = done
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        largest = CHUNK_HEADER.size + self.header.chunk_pages * PAGE_SIZE + TAG_BYTES
        region = self.header.end_offset - self.header.first_chunk_offset
        size = min(region, max(READ_BYTES, largest))
        self.free = [np.empty(size, np.uint8).data for _ in range(workers + SPARE_BUFFERS)]
        self.in_flight: deque[tuple[memoryview, Future[int] | int]] = deque()
        self.stop = threading.Event()
        self.placed = 0

    def run(self) -> int:
        """Check (and place) every chunk; return the pages placed."""
        header = self.header
        at, end = header.first_chunk_offset, header.end_offset
        with contextlib.suppress(OSError):  # a larger readahead
            os.posix_fadvise(self.fd, at, end - at, os.POSIX_FADV_SEQUENTIAL)
        index = stored_total = 0
        try:
            while index < header.nr_chunks:
                buf = self.free.pop() if self.free else self._settle_oldest()
                got = self._read(buf, at, end)
                batch: _Batch = []
                off = 0
                while index < header.nr_chunks and off + CHUNK_HEADER.size <= got:
                    record = ChunkRecord.unpack(buf[off : off + CHUNK_HEADER.size])
                    chunk_end = off + CHUNK_HEADER.size + record.stored_bytes
                    try:
                        self._expect(record, index, stored_total)
                    except CorruptImage:
                        self._submit(buf, batch)
                        self._settle_all()  # a chunk before this one may be bad: it comes first
                        raise
                    if chunk_end > got:
                        break
                    batch.append((record, off + CHUNK_HEADER.size, index))
                    stored_total += record.stored_bytes
                    index += 1
                    off = chunk_end
                if not batch:  # not even one whole chunk left: the image ends too soon
                    self._settle_all()
                    raise self._truncated(index, at + got)
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self.fd, at, off, os.POSIX_FADV_DONTNEED)
                at += off
                self._submit(buf, batch)
            self._settle_all()
        except BaseException:
            self.stop.set()  # workers skip the chunks they have not begun
            raise
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        if stored_total != header.stored_bytes:
            raise CorruptImage(f"{self.where}: chunks hold {stored_total} bytes, header says "
                               f"{header.stored_bytes}")  # fmt: skip
        return self.placed

    def _truncated(self, index: int, read_to: int) -> CorruptImage:
        """The error for an image that ends at *read_to*, before its chunk *index* is whole."""
        first, end = self.header.first_chunk_offset, self.header.end_offset
        return CorruptImage(f"{self.where} chunk {index}: image truncated ({read_to - first} of "
                            f"{end - first} chunk bytes)")  # fmt: skip

    def _expect(self, record: ChunkRecord, index: int, stored_total: int) -> None:
        where = f"{self.where} chunk {index}"
        expect_record(record, index, self.header, where)
        if stored_total + record.stored_bytes > self.header.stored_bytes:
            raise CorruptImage(f"{where}: more stored bytes than the header says")

    def _read(self, buf: memoryview, at: int, end: int) -> int:
        """Fill *buf* from file offset *at* (up to *end*); the bytes read (fewer: the file or
        device ended). MachineError naming the image if a read fails."""
        want = min(buf.nbytes, end - at)
        got = 0
        while got < want:
            try:
                n = os.preadv(self.fd, [buf[got:want]], at + got)
            except OSError as exc:
                raise MachineError(f"{self.where}: {reason(exc)}") from None
            if n == 0:
                break
            got += n
        return got

    def _submit(self, buf: memoryview, batch: _Batch) -> None:
        """Hand *batch* (chunks in *buf*) to a worker, or decode it here without workers;
        *buf* is free again once it is through."""
        if self.pool is None:
            self.in_flight.append((buf, self._decode(buf, batch)))
        else:
            self.in_flight.append((buf, self.pool.submit(self._decode, buf, batch)))

    def _decode(self, buf: memoryview, batch: _Batch) -> int:
        """Check each chunk of *batch* in order and place its pages; the pages placed."""
        placed = 0
        for record, at, index in batch:
            if self.stop.is_set():
                break
            stored = buf[at : at + record.stored_bytes]
            raw = self.codec.decode(record, stored, f"{self.where} chunk {index}")
            if self.place is not None:
                placed += self.place(index, raw)
        return placed

    def _settle_oldest(self) -> memoryview:
        """Wait for the oldest batch handed out; raise its error, else return its buffer."""
        buf, pending = self.in_flight.popleft()
        self.placed += pending.result() if isinstance(pending, Future) else pending
        if self.done is not None:
            self.done(self.placed)
        return buf

    def _settle_all(self) -> None:
        """Wait for every batch handed out, in order; raise the first error."""
        while self.in_flight:
            self.free.append(self._settle_oldest())


def _file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _check_length(fd: int, header: ImageHeader, where: str) -> None:
    """CorruptImage unless the regular file at *fd* is as long as *header* says (a device's
    size is not the image's: reading it finds a truncated image)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size != header.end_offset:
        what = "truncated" if st.st_size < header.end_offset else "followed by trailing bytes"
        raise CorruptImage(f"{where}: image {what} ({st.st_size} bytes, header says "
                           f"{header.end_offset})")  # fmt: skip
