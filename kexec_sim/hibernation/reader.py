"""Reading a hibernation image back: its header, its pfn list, and every chunk, checked.

Everything read back is untrusted: a failed check raises CorruptImage naming it.
"""

import contextlib
import os
import stat
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kexec_sim.errors import CorruptImage, ForeignImage, MachineError
from kexec_sim.hibernation.chunks import decompress
from kexec_sim.hibernation.crypto import AUTH_FAILED, TAG_BYTES, ImageKey, nonce
from kexec_sim.hibernation.format import (
    CHUNK_HEADER,
    ImageHeader,
    PfnList,
    image_aead,
    parse_header,
    parse_pfn_list,
)
from kexec_sim.pages import PAGE_SIZE, PfnArray

_DECODE_GROUP = 8  # chunks a reader's worker checks and decompresses per task

Decoded = tuple[PfnArray, npt.NDArray[np.uint8]]
"""A chunk read back: its pfns and their pages shaped (n, 4096)."""


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
    aead = image_aead(header, key, where)
    with open(path, "rb") as f:
        f.seek(header.pfn_list_offset)
        return _read_pfn_list(f, header, where, aead)


def _read_pfn_list(f: BinaryIO, header: ImageHeader, where: str, aead: AESGCM | None) -> PfnList:
    data = _read_exact(f, header.first_chunk_offset - header.pfn_list_offset, f"{where} pfn list")
    return parse_pfn_list(data, header, where, aead)


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
                stored = aead.decrypt(nonce(header.nonce_prefix, index), stored, zeroed)
            except InvalidTag:
                raise CorruptImage(f"{at}: {AUTH_FAILED}") from None
        raw = decompress(header.compression, stored, raw_bytes, at)
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
                data = aead.decrypt(nonce(header.nonce_prefix, index), stored, zeroed)
            except InvalidTag:
                raise CorruptImage(f"{at}: {AUTH_FAILED}") from None
        pfns = data_pfns[first : first + raw_bytes // PAGE_SIZE]
        if aead is None and stored_bytes == raw_bytes:  # raw: the read buffer holds the pages
            return pfns, np.frombuffer(stored, np.uint8).reshape(-1, PAGE_SIZE)
        raw = decompress(compression, data, raw_bytes, at)
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
    aead = image_aead(header, key, str(path))
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
        header = parse_header(f.read(PAGE_SIZE), where, key, allow_used)
        if header.machine_id != machine_id:
            raise ForeignImage(f"{where}: written for machine {header.machine_id.hex()}, "
                               f"this is {machine_id.hex()}")  # fmt: skip
        if header.nr_ram_pages != nr_ram_pages:
            raise ForeignImage(f"{where}: written for {header.nr_ram_pages} pages of RAM, "
                               f"this machine has {nr_ram_pages}")  # fmt: skip
        aead = image_aead(header, key, where)
        pfn_list = _read_pfn_list(f, header, where, aead)
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
    aead = image_aead(header, key, where)
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
                data = aead.decrypt(nonce(header.nonce_prefix, index), stored, zeroed)
            except InvalidTag:
                raise CorruptImage(at) from None
        raw = np.frombuffer(decompress(header.compression, data, raw_bytes, at), np.uint8)
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
