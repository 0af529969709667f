"""The hibernation image container: round trips, and every kind of bad image refused."""

import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from kexec_sim import image_file
from kexec_sim.errors import CorruptImage, ForeignImage, MachineError
from kexec_sim.image_file import CHUNK_HEADER, ImageHeader, ImageStats
from kexec_sim.pages import PAGE_SIZE

NR_PAGES = 4096
MACHINE = bytes(range(16))


def make_ram(tmp_path: Path) -> npt.NDArray[np.uint8]:
    """A RAM of NR_PAGES pages: random, text-like and all-zero pages mixed."""
    ram = np.memmap(tmp_path / "RAM", dtype=np.uint8, mode="w+", shape=(NR_PAGES, PAGE_SIZE))
    rng = np.random.default_rng(4)
    ram[0:1000] = rng.integers(0, 256, size=(1000, PAGE_SIZE), dtype=np.uint8)
    words = np.frombuffer(b"the quick brown fox jumps over a lazy dog; ", dtype=np.uint8)
    text = np.resize(words, 1500 * PAGE_SIZE).reshape(1500, PAGE_SIZE)
    ram[1000:2500] = text
    ram[1000:2500, ::97] = rng.integers(97, 123, size=(1500, (PAGE_SIZE + 96) // 97))
    ram[3000] = 7  # pages 2500-2999 and 3001- stay zero, but for a few lone bytes:
    ram[3500, 4095] = 1
    return ram


def page_set() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Every other pfn of RAM, in a shuffled order, with distinct-ish keys."""
    rng = np.random.default_rng(5)
    pfns = np.arange(0, NR_PAGES, 2, dtype=np.int64)
    rng.shuffle(pfns)
    keys = (pfns * 37 % 256).astype(np.uint8)
    return pfns, keys


def write(tmp_path: Path, ram: npt.NDArray[np.uint8], **kwargs: object) -> tuple[Path, ImageStats]:
    pfns, keys = page_set()
    path = tmp_path / "hib.img"
    stats = image_file.write_image(
        path, ram, pfns, keys, machine_id=MACHINE, nr_ram_pages=NR_PAGES, generation=3,
        epoch_ns=1_700_000_000_000_000_000, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return path, stats


def restore(
    path: Path, threads: int
) -> tuple[ImageHeader, npt.NDArray[np.uint8], image_file.PfnList]:
    """What resume would do: verify, then put every page into a fresh RAM."""
    header = image_file.verify_image(
        path, machine_id=MACHINE, nr_ram_pages=NR_PAGES, threads=threads
    )
    pfn_list = image_file.read_pfn_list(path, header)
    fresh = np.full((NR_PAGES, PAGE_SIZE), 0xAA, dtype=np.uint8)
    fresh[pfn_list.zero_pfns] = 0
    for pfns, pages in image_file.iter_chunks(path, header, pfn_list, threads=threads):
        fresh[pfns] = pages
    return header, fresh, pfn_list


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("threads", [1, 3])
def test_round_trip(tmp_path: Path, compression: str, threads: int) -> None:
    ram = make_ram(tmp_path)
    seen: list[tuple[int, int]] = []
    path, stats = write(
        tmp_path, ram, compression=compression, threads=threads, chunk_pages=7,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    header, fresh, pfn_list = restore(path, threads)
    pfns, keys = page_set()
    saved = np.sort(pfns)
    assert np.array_equal(fresh[saved], ram[saved])
    assert np.all(fresh[1::2] == 0xAA)  # nothing else written
    assert np.array_equal(pfn_list.pfns, saved)
    assert np.array_equal(pfn_list.keys, keys[np.argsort(pfns)])
    expected_zero = saved[~ram[saved].any(axis=1)]
    assert np.array_equal(pfn_list.zero_pfns, expected_zero)
    assert header.compression == compression and header.generation == 3
    assert not header.incremental and header.base_image_id == bytes(16)
    assert stats.pages == saved.size and stats.zero_pages == expected_zero.size
    assert stats.data_bytes == (saved.size - expected_zero.size) * PAGE_SIZE
    assert stats.image_bytes == path.stat().st_size == header.end_offset
    assert seen[-1] == (header.nr_data_pages, header.nr_data_pages)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    if compression == "none":
        assert stats.stored_bytes == stats.data_bytes
    else:
        assert stats.stored_bytes < 0.7 * stats.data_bytes
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_zero_pages_store_no_data(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    path = tmp_path / "zeros.img"
    pfns = np.arange(2600, 2900, dtype=np.int64)
    stats = image_file.write_image(
        path, ram, pfns, np.zeros(pfns.size, np.uint8), machine_id=MACHINE,
        nr_ram_pages=NR_PAGES, generation=1, epoch_ns=0, compression="none",
    )  # fmt: skip
    assert stats.zero_pages == 300 and stats.stored_bytes == 0
    header = image_file.verify_image(path, machine_id=MACHINE, nr_ram_pages=NR_PAGES)
    assert header.nr_chunks == 0 and path.stat().st_size == 2 * PAGE_SIZE


def test_incremental_and_empty_images(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    base = os.urandom(16)
    path = tmp_path / "inc.img"
    image_file.write_image(
        path, ram, np.empty(0, np.int64), np.empty(0, np.uint8), machine_id=MACHINE,
        nr_ram_pages=NR_PAGES, generation=1, epoch_ns=0, base_image_id=base,
    )  # fmt: skip
    header = image_file.verify_image(path, machine_id=MACHINE, nr_ram_pages=NR_PAGES)
    assert header.incremental and header.base_image_id == base and header.nr_pfns == 0


def test_write_rejects_bad_page_sets(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    path = tmp_path / "bad.img"
    common = {"machine_id": MACHINE, "nr_ram_pages": NR_PAGES, "generation": 1, "epoch_ns": 0}
    with pytest.raises(MachineError, match="pfn 5 appears more than once"):
        image_file.write_image(path, ram, [9, 5, 5], np.zeros(3, np.uint8), **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="outside the machine's RAM"):
        image_file.write_image(path, ram, [1, NR_PAGES], np.zeros(2, np.uint8), **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="keys must be uint8"):
        image_file.write_image(path, ram, [1, 2], np.zeros(3, np.uint8), **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="unknown compression"):
        image_file.write_image(path, ram, [1], np.zeros(1, np.uint8), compression="xz", **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="epoch_ns -1 does not fit"):
        image_file.write_image(path, ram, [1], np.zeros(1, np.uint8), **{**common, "epoch_ns": -1})  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="base_image_id must not be all zeros"):
        z = bytes(16)
        image_file.write_image(path, ram, [1], np.zeros(1, np.uint8), base_image_id=z, **common)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path, _ = write(tmp_path, make_ram(tmp_path), compression="lz4", threads=2)
    return path


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def verify(path: Path) -> ImageHeader:
    return image_file.verify_image(path, machine_id=MACHINE, nr_ram_pages=NR_PAGES)


def test_truncated_image_refused(image: Path) -> None:
    size = image.stat().st_size
    os.truncate(image, size - 1)
    with pytest.raises(CorruptImage, match="truncated"):
        verify(image)
    os.truncate(image, 100)
    with pytest.raises(CorruptImage, match="truncated header"):
        image_file.read_header(image)


def test_trailing_garbage_refused(image: Path) -> None:
    with open(image, "ab") as f:
        f.write(b"x")
    with pytest.raises(CorruptImage, match="trailing"):
        verify(image)


def test_flipped_chunk_byte_refused_naming_the_chunk(image: Path) -> None:
    header = verify(image)
    with open(image, "rb") as f:
        f.seek(header.first_chunk_offset)
        stored = CHUNK_HEADER.unpack(f.read(CHUNK_HEADER.size))[0]
    second = header.first_chunk_offset + CHUNK_HEADER.size + stored
    flip(image, second + CHUNK_HEADER.size + 100)
    with pytest.raises(CorruptImage, match="chunk 1: checksum mismatch"):
        verify(image)
    pfn_list = image_file.read_pfn_list(image, header)
    for threads in (1, 3):  # the good chunk 0 first, then the error
        chunks = image_file.iter_chunks(image, header, pfn_list, threads=threads)
        assert next(chunks)[0].size == header.chunk_pages
        with pytest.raises(CorruptImage, match="chunk 1: checksum mismatch"):
            next(chunks)


@pytest.mark.parametrize("offset", [0, 9, 20, 50, 200, 4095])
def test_flipped_header_byte_refused(image: Path, offset: int) -> None:
    flip(image, offset)
    with pytest.raises(CorruptImage):
        image_file.read_header(image)


def test_flipped_pfn_list_byte_refused(image: Path) -> None:
    flip(image, PAGE_SIZE + 8 * 17 + 7)  # a key byte
    with pytest.raises(CorruptImage, match="pfn list checksum"):
        verify(image)


def test_other_machine_refused(image: Path) -> None:
    with pytest.raises(ForeignImage, match="written for machine"):
        image_file.verify_image(image, machine_id=bytes(16), nr_ram_pages=NR_PAGES)
    with pytest.raises(ForeignImage, match="written for 4096 pages"):
        image_file.verify_image(image, machine_id=MACHINE, nr_ram_pages=NR_PAGES * 2)


def test_invalidate(image: Path) -> None:
    before = image.read_bytes()
    image_file.invalidate(image)
    after = image.read_bytes()
    assert after[8:] == before[8:] and after[:8] == image_file.USED_SIGNATURE
    with pytest.raises(CorruptImage, match="already used"):
        image_file.read_header(image)
    with pytest.raises(CorruptImage, match="already used"):
        verify(image)
    with pytest.raises(CorruptImage, match="already used"):
        image_file.invalidate(image)


def test_overwrites_an_existing_image_and_refuses_a_directory(tmp_path: Path, image: Path) -> None:
    old = image_file.read_header(image)
    path, _ = write(tmp_path, make_ram(tmp_path), compression="zstd")
    assert path == image and image_file.read_header(image).image_id != old.image_id
    sub = tmp_path / "sub"
    (sub / "hib.img").mkdir(parents=True)
    with pytest.raises(MachineError, match="not a regular file"):
        write(sub, make_ram(sub))


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_chunk_with_a_good_checksum_that_does_not_decompress_refused(
    tmp_path: Path, compression: str
) -> None:
    ram = make_ram(tmp_path)
    path = tmp_path / "text.img"
    pfns = np.arange(1000, 1064, dtype=np.int64)  # text-like: every chunk compressed
    image_file.write_image(
        path, ram, pfns, np.zeros(pfns.size, np.uint8), machine_id=MACHINE,
        nr_ram_pages=NR_PAGES, generation=1, epoch_ns=0, compression=compression,
    )  # fmt: skip
    header = verify(path)
    data = bytearray(path.read_bytes())
    at = header.first_chunk_offset
    stored, raw, _, index, first = CHUNK_HEADER.unpack_from(data, at)
    body = at + CHUNK_HEADER.size
    if compression == "none":  # claim fewer stored bytes than raw: nothing to decompress with
        stored -= 1
        del data[body + stored]
        header_page = bytearray(data[:PAGE_SIZE])
        struct.pack_into("<Q", header_page, 144, header.stored_bytes - 1)
        struct.pack_into("<I", header_page, 12, 0)
        struct.pack_into("<I", header_page, 12, zlib.crc32(header_page))
        data[:PAGE_SIZE] = header_page
    else:
        data[body : body + 8] = b"\xff" * 8
    zeroed = CHUNK_HEADER.pack(stored, raw, 0, index, first)
    crc = zlib.crc32(bytes(data[body : body + stored]), zlib.crc32(zeroed))
    CHUNK_HEADER.pack_into(data, at, stored, raw, crc, index, first)
    path.write_bytes(bytes(data))
    reason = "bytes stored for" if compression == "none" else "(not decompress|decompressed to)"
    with pytest.raises(CorruptImage, match=rf"chunk 0: .*{reason}"):
        verify(path)


def test_interrupted_write_leaves_the_old_image_and_no_temp_file(image: Path) -> None:
    before = image.read_bytes()

    def stop(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(image.parent, make_ram(image.parent), chunk_pages=8, progress=stop)
    assert image.read_bytes() == before
    assert [p.name for p in image.parent.iterdir() if p.name.startswith(".")] == []


def test_round_trip_of_runs_and_scattered_pages(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    path = tmp_path / "runs.img"
    pfns = np.concatenate((np.arange(900, 1100), [3000, 5, 3500, 77], np.arange(2490, 2510)))
    keys = np.arange(pfns.size, dtype=np.uint8)
    image_file.write_image(
        path, ram, pfns, keys, machine_id=MACHINE, nr_ram_pages=NR_PAGES, generation=1,
        epoch_ns=0, compression="zstd", threads=2, chunk_pages=16,
    )  # fmt: skip
    header = verify(path)
    pfn_list = image_file.read_pfn_list(path, header)
    got = {int(p): k for p, k in zip(pfn_list.pfns, pfn_list.keys, strict=True)}
    assert got == {int(p): k for p, k in zip(pfns, keys, strict=True)}
    restored = 0
    for chunk_pfns, pages in image_file.iter_chunks(path, header, pfn_list):
        assert np.array_equal(pages, ram[chunk_pfns])
        restored += chunk_pfns.size
    assert restored == header.nr_data_pages == pfns.size - 10  # 2500-2509 are zero
    assert np.array_equal(pfn_list.zero_pfns, np.arange(2500, 2510))
