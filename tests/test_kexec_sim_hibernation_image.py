"""The hibernation image (kexec_sim.hibernation): round trips; every kind of bad image refused."""

import os
import stat
import struct
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from kexec_sim.errors import (
    CorruptImage,
    ForeignImage,
    ImageKeyError,
    ImageTooLarge,
    MachineError,
)
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation import format as image_format
from kexec_sim.hibernation import reader, writer
from kexec_sim.hibernation.crypto import ImageKey
from kexec_sim.hibernation.format import CHUNK_HEADER, ImageHeader
from kexec_sim.hibernation.reader import Image
from kexec_sim.hibernation.undo import RamUndo
from kexec_sim.hibernation.writer import ImageStats
from kexec_sim.ram import Ram

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
    stats = writer.write_image(
        path, ram, pfns, keys, machine_id=MACHINE, nr_ram_pages=NR_PAGES, generation=3,
        epoch_ns=1_700_000_000_000_000_000, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return path, stats


def check(path: Path, **kwargs: object) -> Image:
    """``check_image`` of the image at *path*, for this test's machine."""
    return reader.check_image(path, machine_id=MACHINE, nr_ram_pages=NR_PAGES, **kwargs)  # type: ignore[arg-type]


def open_front(path: Path, **kwargs: object) -> Image:
    """``open_image`` of the image at *path*, for this test's machine."""
    return reader.open_image(path, machine_id=MACHINE, nr_ram_pages=NR_PAGES, **kwargs)  # type: ignore[arg-type]


def fresh_ram(directory: Path, byte: int = 0xAA) -> Ram:
    """A RAM (with its storage keys) of NR_PAGES pages of *byte* in a new *directory*."""
    directory.mkdir()
    path = directory / "RAM"
    with open(path, "wb") as f:
        f.truncate(NR_PAGES * PAGE_SIZE)
    ram = Ram(path, NR_PAGES)
    if byte:
        ram.pages[:] = byte
    return ram


def restore(
    path: Path, threads: int, key: ImageKey | None = None
) -> tuple[ImageHeader, npt.NDArray[np.uint8], image_format.PfnList]:
    """What resume does: check the front, then read every chunk once, checking it and putting
    its pages into a fresh RAM (of 0xAA; the zero pages zeroed)."""
    image = open_front(path, key=key)
    header, pfn_list = image.header, image.pfn_list
    again = reader.read_pfn_list(path, header, key=key)
    for name in ("pfns", "keys", "zero", "in_base"):
        assert np.array_equal(getattr(again, name), getattr(pfn_list, name))
    with tempfile.TemporaryDirectory() as scratch, fresh_ram(Path(scratch) / "fresh") as ram:
        ram.pages[pfn_list.zero_pfns] = 0
        everything = np.ones(NR_PAGES, np.bool_)
        stored = image.read_into(ram, everything, undo=RamUndo(ram), threads=threads)
        assert stored == header.nr_data_pages
        return header, ram.pages.copy(), pfn_list


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
    stats = writer.write_image(
        path, ram, pfns, np.zeros(pfns.size, np.uint8), machine_id=MACHINE,
        nr_ram_pages=NR_PAGES, generation=1, epoch_ns=0, compression="none",
    )  # fmt: skip
    assert stats.zero_pages == 300 and stats.stored_bytes == 0
    header = verify(path)
    assert header.nr_chunks == 0 and path.stat().st_size == 2 * PAGE_SIZE


def test_incremental_and_empty_images(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    base = os.urandom(16)
    path = tmp_path / "inc.img"
    writer.write_image(
        path, ram, np.empty(0, np.int64), np.empty(0, np.uint8), machine_id=MACHINE,
        nr_ram_pages=NR_PAGES, generation=1, epoch_ns=0, base_image_id=base,
    )  # fmt: skip
    header = verify(path)
    assert header.incremental and header.base_image_id == base and header.nr_pfns == 0


def test_write_rejects_bad_page_sets(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    path = tmp_path / "bad.img"
    common = {"machine_id": MACHINE, "nr_ram_pages": NR_PAGES, "generation": 1, "epoch_ns": 0}
    with pytest.raises(MachineError, match="pfn 5 appears more than once"):
        writer.write_image(path, ram, [9, 5, 5], np.zeros(3, np.uint8), **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="outside the machine's RAM"):
        writer.write_image(path, ram, [1, NR_PAGES], np.zeros(2, np.uint8), **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="keys must be uint8"):
        writer.write_image(path, ram, [1, 2], np.zeros(3, np.uint8), **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="unknown compression"):
        writer.write_image(path, ram, [1], np.zeros(1, np.uint8), compression="xz", **common)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="epoch_ns -1 does not fit"):
        writer.write_image(path, ram, [1], np.zeros(1, np.uint8), **{**common, "epoch_ns": -1})  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="base_image_id must not be all zeros"):
        z = bytes(16)
        writer.write_image(path, ram, [1], np.zeros(1, np.uint8), base_image_id=z, **common)  # type: ignore[arg-type]
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
    return check(path).header


def test_truncated_image_refused(image: Path) -> None:
    size = image.stat().st_size
    os.truncate(image, size - 1)
    with pytest.raises(CorruptImage, match="truncated"):
        verify(image)
    os.truncate(image, 100)
    with pytest.raises(CorruptImage, match="truncated header"):
        reader.read_header(image)


def test_trailing_garbage_refused(image: Path) -> None:
    with open(image, "ab") as f:
        f.write(b"x")
    with pytest.raises(CorruptImage, match="trailing"):
        verify(image)


def test_flipped_chunk_byte_refused_naming_the_chunk(image: Path) -> None:
    """Found by a check, and by read_into after the good chunk 0 is stored: what it stored
    is then put back exactly, keys too."""
    checked = check(image)
    header = checked.header
    with open(image, "rb") as f:
        f.seek(header.first_chunk_offset)
        stored = CHUNK_HEADER.unpack(f.read(CHUNK_HEADER.size))[0]
    second = header.first_chunk_offset + CHUNK_HEADER.size + stored
    flip(image, second + CHUNK_HEADER.size + 100)
    for threads in (1, 3):
        with pytest.raises(CorruptImage, match="chunk 1: checksum mismatch"):
            check(image, threads=threads)
    ram = make_ram(image.parent)
    first = checked.pfn_list.data_pfns[: header.chunk_pages]
    with fresh_ram(image.parent / "fresh") as fresh:
        fresh.pages[::3] = 0  # some pages of one byte repeated, some holes, some data
        fresh.punch_range(100, 50)
        fresh.pages[8, 9] = 1  # in chunk 0, neither a hole nor one byte repeated
        fresh.keys.array[::5] = 0x42
        before, keys = fresh.pages.copy(), fresh.keys.array.copy()
        for threads in (1, 3):
            undo = RamUndo(fresh)
            with pytest.raises(CorruptImage, match="chunk 1: checksum mismatch"):
                open_front(image).read_into(fresh, np.ones(NR_PAGES, np.bool_), undo=undo,
                                            threads=threads)  # fmt: skip
            assert np.array_equal(fresh.pages[first], ram[first])  # chunk 0 was stored
            undo.put_back()
            assert np.array_equal(fresh.pages, before)
            assert np.array_equal(fresh.keys.array, keys)


@pytest.mark.parametrize("offset", [0, 9, 20, 50, 200, 4095])
def test_flipped_header_byte_refused(image: Path, offset: int) -> None:
    flip(image, offset)
    with pytest.raises(CorruptImage):
        reader.read_header(image)


def test_flipped_pfn_list_byte_refused(image: Path) -> None:
    flip(image, PAGE_SIZE + 8 * 17 + 7)  # a key byte
    with pytest.raises(CorruptImage, match="pfn list checksum"):
        verify(image)


def test_other_machine_refused(image: Path) -> None:
    with pytest.raises(ForeignImage, match="written for machine"):
        reader.check_image(image, machine_id=bytes(16), nr_ram_pages=NR_PAGES)
    with pytest.raises(ForeignImage, match="written for 4096 pages"):
        reader.check_image(image, machine_id=MACHINE, nr_ram_pages=NR_PAGES * 2)


def test_invalidate(image: Path) -> None:
    before = image.read_bytes()
    writer.invalidate(image)
    after = image.read_bytes()
    assert after[8:] == before[8:] and after[:8] == image_format.USED_SIGNATURE
    with pytest.raises(CorruptImage, match="already used"):
        reader.read_header(image)
    with pytest.raises(CorruptImage, match="already used"):
        verify(image)
    with pytest.raises(CorruptImage, match="already used"):
        writer.invalidate(image)
    # As the base of an incremental image a used image is still read, checked as written.
    assert reader.read_header(image, allow_used=True).image_id
    assert verify_used(image).nr_pfns
    flip(image, 60)  # and a used image is still checked whole
    with pytest.raises(CorruptImage, match="checksum"):
        reader.read_header(image, allow_used=True)


def verify_used(path: Path) -> ImageHeader:
    return check(path, allow_used=True).header


def test_the_super_block_pfn_round_trips_and_is_checked(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    path, _ = write(tmp_path, ram, super_block_pfn=17)
    assert reader.read_header(path).super_block_pfn == 17
    with pytest.raises(MachineError, match="outside RAM"):
        write(tmp_path, ram, super_block_pfn=NR_PAGES)


def test_overwrites_an_existing_image_and_refuses_a_directory(tmp_path: Path, image: Path) -> None:
    old = reader.read_header(image)
    path, _ = write(tmp_path, make_ram(tmp_path), compression="zstd")
    assert path == image and reader.read_header(image).image_id != old.image_id
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
    writer.write_image(
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
    writer.write_image(
        path, ram, pfns, keys, machine_id=MACHINE, nr_ram_pages=NR_PAGES, generation=1,
        epoch_ns=0, compression="zstd", threads=2, chunk_pages=16,
    )  # fmt: skip
    checked = check(path)
    header, pfn_list = checked.header, reader.read_pfn_list(path, checked.header)
    got = {int(p): k for p, k in zip(pfn_list.pfns, pfn_list.keys, strict=True)}
    assert got == {int(p): k for p, k in zip(pfns, keys, strict=True)}
    with fresh_ram(tmp_path / "fresh") as target:
        restored = checked.read_into(target, np.ones(NR_PAGES, np.bool_), undo=RamUndo(target))
        fresh = target.pages.copy()
    data = pfn_list.data_pfns
    assert np.array_equal(fresh[data], ram[data])
    untouched = np.ones(NR_PAGES, np.bool_)
    untouched[data] = False
    assert (fresh[untouched] == 0xAA).all()
    assert restored == header.nr_data_pages == pfns.size - 10  # 2500-2509 are zero
    assert np.array_equal(pfn_list.zero_pfns, np.arange(2500, 2510))


def key_of(kind: str, tmp_path: Path, secret: str = "correct horse") -> ImageKey:
    """A key file's key (the file under *tmp_path*) or a passphrase's."""
    if kind == "passphrase":
        return ImageKey.from_passphrase(secret)
    key_file = tmp_path / f"{secret}.key"
    key_file.write_bytes(secret.encode() * 4)
    return ImageKey.from_key_file(key_file)


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("kind", ["key file", "passphrase"])
def test_encrypted_round_trip(tmp_path: Path, compression: str, kind: str) -> None:
    ram = make_ram(tmp_path)
    key = key_of(kind, tmp_path)
    path, stats = write(tmp_path, ram, compression=compression, threads=2, chunk_pages=7, key=key)
    header, fresh, pfn_list = restore(path, 2, key_of(kind, tmp_path))  # a new key object
    pfns, keys = page_set()
    saved = np.sort(pfns)
    assert np.array_equal(fresh[saved], ram[saved]) and np.all(fresh[1::2] == 0xAA)
    assert np.array_equal(pfn_list.keys, keys[np.argsort(pfns)])
    assert header.encrypted and stats.encrypted and header.compression == compression
    assert header.flags & image_format.FLAG_PASSPHRASE == (
        image_format.FLAG_PASSPHRASE if kind == "passphrase" else 0
    )
    assert stats.image_bytes == path.stat().st_size == header.end_offset
    assert stats.stored_bytes == header.stored_bytes
    if compression == "none":
        assert stats.stored_bytes == stats.data_bytes + 16 * header.nr_chunks
    else:
        assert stats.stored_bytes < 0.7 * stats.data_bytes  # compressed before encrypted
    data = path.read_bytes()  # nothing of RAM or of the pfn list in clear
    assert ram[1000].tobytes()[:64] not in data and ram[0].tobytes()[:64] not in data
    assert np.sort(pfns).astype("<u8").tobytes()[:64] not in data
    assert set(stats.seconds) == {"scan", "write", "sync"}


def test_encrypted_images_differ_and_need_the_right_key(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    key = key_of("key file", tmp_path)
    path, _ = write(tmp_path, ram, key=key)
    header = reader.read_header(path, key=key)
    assert len(header.salt) == 16 and any(header.salt) and len(header.nonce_prefix) == 4
    with pytest.raises(ImageKeyError, match=r"hib.img: image is encrypted: give --key-file or a"):
        reader.read_header(path)
    with pytest.raises(ImageKeyError, match="image is encrypted: give"):
        verify(path)
    with pytest.raises(ImageKeyError, match="image is encrypted: give"):
        reader.read_pfn_list(path, header)
    checked = check(path, key=key)
    fresh = fresh_ram(tmp_path / "fresh", 0)
    everything = np.ones(NR_PAGES, np.bool_)
    with pytest.raises(ImageKeyError, match="image is encrypted: give"):  # the chunks need it
        replace(checked, key=None).read_into(fresh, everything, undo=RamUndo(fresh))
    wrong = key_of("key file", tmp_path, "another secret")
    with pytest.raises(CorruptImage, match=r"chunk 0: .*authentication failed: wrong key"):
        replace(checked, key=wrong).read_into(fresh, everything, undo=RamUndo(fresh), threads=1)
    assert not fresh.pages.any()
    fresh.close()
    with pytest.raises(ImageKeyError, match="authentication failed: wrong key or tampered image"):
        check(path, key=wrong)
    with pytest.raises(ImageKeyError, match="authentication failed: wrong key or tampered image"):
        reader.read_header(path, key=wrong)
    with pytest.raises(CorruptImage, match="pfn list authentication failed"):
        reader.read_pfn_list(path, header, key=wrong)  # a header from another key
    with pytest.raises(ImageKeyError, match="encrypted with a key file, not a passphrase"):
        reader.read_header(path, key=ImageKey.from_passphrase("correct horse"))
    (tmp_path / "sub").mkdir()
    plain, _ = write(tmp_path / "sub", ram)
    with pytest.raises(ImageKeyError, match=r"hib.img: image is not encrypted$"):
        check(plain, key=key)


def test_bad_keys_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 15)
    with pytest.raises(MachineError, match="at least 16 bytes"):
        ImageKey.from_key_file(short)
    with pytest.raises(MachineError, match="passphrase is empty"):
        ImageKey.from_passphrase("")
    with pytest.raises(OSError):
        ImageKey.from_key_file(tmp_path / "missing.key")
    key = ImageKey.from_passphrase("secret")
    assert "secret" not in repr(key) and len(key.derive(bytes(16))) == 32
    assert key.derive(bytes(16)) != key.derive(b"\1" * 16)


@pytest.fixture
def encrypted(tmp_path: Path) -> tuple[Path, ImageKey]:
    key = key_of("key file", tmp_path)
    path, _ = write(tmp_path, make_ram(tmp_path), compression="lz4", threads=2, key=key)
    return path, key


def chunk_offsets(path: Path, header: ImageHeader) -> list[int]:
    """Where each chunk record starts."""
    offsets = []
    with open(path, "rb") as f:
        at = header.first_chunk_offset
        for _ in range(header.nr_chunks):
            offsets.append(at)
            f.seek(at)
            at += CHUNK_HEADER.size + CHUNK_HEADER.unpack(f.read(CHUNK_HEADER.size))[0]
    return offsets


@pytest.mark.parametrize(
    "where",
    ["header", "header tag", "salt", "pfn list", "pfn list tag", "chunk header", "chunk data",
     "last byte"],
)  # fmt: skip
@pytest.mark.parametrize("threads", [1, 3])
def test_flipped_byte_of_an_encrypted_image_refused(
    encrypted: tuple[Path, ImageKey], where: str, threads: int
) -> None:
    path, key = encrypted
    header = reader.read_header(path, key=key)
    chunks = chunk_offsets(path, header)
    offset = {
        "header": 50,
        "header tag": image_format.HEADER_TAG_AT + 3,
        "salt": 165,
        "pfn list": PAGE_SIZE + 8 * 17 + 7,
        "pfn list tag": PAGE_SIZE + 8 * header.nr_pfns + 15,
        "chunk header": chunks[3] + 12,
        "chunk data": chunks[5] + CHUNK_HEADER.size + 100,
        "last byte": header.end_offset - 1,
    }[where]
    flip(path, offset)
    with pytest.raises(CorruptImage) as info:
        check(path, key=key, threads=threads)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def fix_crcs(path: Path) -> None:
    """Recompute every CRC of the image at *path*: as a tamperer would."""
    data = bytearray(path.read_bytes())
    header = image_format.IMAGE_HEADER.unpack_from(data)
    nr_pfns, first_chunk, nr_chunks = header[8], header[14], header[12]
    encrypted = header[3] & image_format.FLAG_ENCRYPTED
    pfn_bytes = 8 * nr_pfns + (16 if encrypted else 0)
    struct.pack_into("<I", data, 152, zlib.crc32(data[PAGE_SIZE : PAGE_SIZE + pfn_bytes]))
    at = first_chunk
    for _ in range(nr_chunks):
        stored, raw, _, index, first = CHUNK_HEADER.unpack_from(data, at)
        zeroed = CHUNK_HEADER.pack(stored, raw, 0, index, first)
        body = bytes(data[at + CHUNK_HEADER.size : at + CHUNK_HEADER.size + stored])
        CHUNK_HEADER.pack_into(data, at, stored, raw, zlib.crc32(body, zlib.crc32(zeroed)), index,
                               first)  # fmt: skip
        at += CHUNK_HEADER.size + stored
    struct.pack_into("<I", data, 12, 0)
    struct.pack_into("<I", data, 12, zlib.crc32(data[:PAGE_SIZE]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["generation", "pfn list", "chunk index", "chunk data"])
def test_tampering_with_the_crcs_fixed_fails_authentication(
    encrypted: tuple[Path, ImageKey], where: str
) -> None:
    path, key = encrypted
    header = reader.read_header(path, key=key)
    chunks = chunk_offsets(path, header)
    data = bytearray(path.read_bytes())
    if where == "chunk index":  # swap chunks 1 and 2 whole, their record numbers fixed up
        one, two, three = chunks[1], chunks[2], chunks[3]
        first, second = bytearray(data[one:two]), bytearray(data[two:three])
        numbers = struct.unpack_from("<IQ", first, 12), struct.unpack_from("<IQ", second, 12)
        struct.pack_into("<IQ", first, 12, *numbers[1])
        struct.pack_into("<IQ", second, 12, *numbers[0])
        data[one:three] = second + first
    else:
        offset = {"generation": 48, "pfn list": PAGE_SIZE + 8 * 5 + 7,
                  "chunk data": chunks[4] + CHUNK_HEADER.size + 9}[where]  # fmt: skip
        data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    fix_crcs(path)
    error = ImageKeyError if where in ("generation", "pfn list") else CorruptImage
    with pytest.raises(error, match="authentication failed: wrong key or tampered image"):
        check(path, key=key)


def test_stripping_the_encryption_is_noticed_by_a_reader_with_the_key(
    encrypted: tuple[Path, ImageKey],
) -> None:
    path, key = encrypted
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 16, 0)  # flags: not encrypted
    path.write_bytes(bytes(data))
    fix_crcs(path)
    with pytest.raises(CorruptImage):
        reader.read_header(path, key=key)


@pytest.mark.parametrize("where", ["chunk data", "last byte"])
def test_flipped_data_byte_of_a_plain_image_refused(image: Path, where: str) -> None:
    header = verify(image)
    chunks = chunk_offsets(image, header)
    offset = chunks[2] + CHUNK_HEADER.size + 5 if where == "chunk data" else header.end_offset - 1
    flip(image, offset)
    with pytest.raises(CorruptImage, match=r"chunk \d+: checksum mismatch"):
        verify(image)


@pytest.mark.parametrize("key", [None, "passphrase"])
def test_incremental_entries_in_the_base_round_trip(tmp_path: Path, key: str | None) -> None:
    ram = make_ram(tmp_path)
    image_key = None if key is None else key_of(key, tmp_path)
    pfns, keys = page_set()
    in_base = (pfns % 3 == 0) | ((pfns >= 2600) & (pfns < 2700))  # zero pages in the base too
    base_id = os.urandom(16)
    path = tmp_path / "inc.img"
    stats = writer.write_image(
        path, ram, pfns, keys, machine_id=MACHINE, nr_ram_pages=NR_PAGES, generation=2,
        epoch_ns=0, base_image_id=base_id, in_base=in_base, key=image_key, chunk_pages=5,
    )  # fmt: skip
    header, fresh, pfn_list = restore(path, 2, image_key)
    order = np.argsort(pfns)
    saved, base_sorted = pfns[order], in_base[order]
    assert header.incremental and header.base_image_id == base_id
    assert np.array_equal(pfn_list.pfns, saved) and np.array_equal(pfn_list.keys, keys[order])
    assert np.array_equal(pfn_list.in_base, base_sorted)
    assert np.array_equal(pfn_list.base_pfns, saved[base_sorted])
    assert not np.any(pfn_list.zero & pfn_list.in_base)
    not_base = saved[~base_sorted]
    expected_zero = not_base[~ram[not_base].any(axis=1)]
    assert np.array_equal(pfn_list.zero_pfns, expected_zero)
    data = not_base[ram[not_base].any(axis=1)]
    assert np.array_equal(pfn_list.data_pfns, data) and header.nr_data_pages == data.size
    assert np.array_equal(fresh[data], ram[data])
    assert np.all(fresh[saved[base_sorted]] == 0xAA)  # no data here for pages in the base
    assert stats.base_pages == int(in_base.sum()) and stats.zero_pages == expected_zero.size
    assert stats.data_bytes == data.size * PAGE_SIZE


def test_in_base_refused_without_a_base_or_badly_shaped(tmp_path: Path) -> None:
    ram = make_ram(tmp_path)
    path = tmp_path / "bad.img"
    common = {"machine_id": MACHINE, "nr_ram_pages": NR_PAGES, "generation": 1, "epoch_ns": 0}
    flags = np.array([True, False])
    with pytest.raises(MachineError, match="in_base needs a base_image_id"):
        writer.write_image(path, ram, [1, 2], np.zeros(2, np.uint8), in_base=flags, **common)  # type: ignore[arg-type]
    for bad in (np.array([1, 0]), np.array([True])):
        with pytest.raises(MachineError, match="in_base must be bool parallel to the pfns"):
            writer.write_image(
                path, ram, [1, 2], np.zeros(2, np.uint8), base_image_id=b"b" * 16, in_base=bad,
                **common,  # type: ignore[arg-type]
            )  # fmt: skip
    assert not path.exists()


def set_entry_bits(path: Path, entry: int, bits: int) -> None:
    """OR *bits* into pfn list entry *entry* of a plain image, its CRCs fixed up."""
    data = bytearray(path.read_bytes())
    at = PAGE_SIZE + 8 * entry
    struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] | bits)
    path.write_bytes(bytes(data))
    fix_crcs(path)


def test_entry_bits_validated(tmp_path: Path, image: Path) -> None:
    header = verify(image)
    zero_at = int(np.flatnonzero(reader.read_pfn_list(image, header).zero)[0])
    set_entry_bits(image, zero_at, 1 << image_format.BASE_BIT)
    with pytest.raises(CorruptImage, match="pages in a base image, image not incremental"):
        verify(image)
    ram = make_ram(tmp_path)
    pfns = np.arange(2490, 2510, dtype=np.int64)  # 2490-2499 data, 2500-2509 zero
    inc = tmp_path / "inc.img"
    writer.write_image(
        inc, ram, pfns, np.zeros(pfns.size, np.uint8), machine_id=MACHINE, nr_ram_pages=NR_PAGES,
        generation=1, epoch_ns=0, base_image_id=b"b" * 16, in_base=pfns % 2 == 0,
    )  # fmt: skip
    original = inc.read_bytes()
    set_entry_bits(inc, 13, 1 << image_format.BASE_BIT)  # 2503: zero (not in the base), now both
    with pytest.raises(CorruptImage, match="pfn 2503 is flagged both all-zero and in the base"):
        verify(inc)
    inc.write_bytes(original)
    set_entry_bits(inc, 1, 1 << image_format.BASE_BIT)  # 2491: one data page fewer
    with pytest.raises(CorruptImage, match="pfn list flags 4 data pages, header says 5"):
        verify(inc)
    for bit in range(image_format.PFN_BITS, image_format.BASE_BIT):
        inc.write_bytes(original)
        set_entry_bits(inc, 3, 1 << bit)
        with pytest.raises(CorruptImage, match="reserved bits"):
            verify(inc)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in ("RAM",) and p.is_file())


@pytest.mark.parametrize("key", [False, True])
def test_size_limit(tmp_path: Path, key: bool) -> None:
    ram = make_ram(tmp_path)
    image_key = key_of("key file", tmp_path) if key else None
    keys = [p.name for p in tmp_path.iterdir()]
    path, stats = write(tmp_path, ram, compression="lz4", key=image_key)
    size = stats.image_bytes
    path.unlink()
    for limit in (100, size // 2, size - 1):  # refused up front, midway, at the last chunk
        with pytest.raises(ImageTooLarge, match=rf"limit of {limit} bytes \(\d+ bytes reached"):
            write(tmp_path, ram, compression="lz4", key=image_key, max_bytes=limit, threads=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keys)  # no image, no temp
    write(tmp_path, ram, compression="lz4", key=image_key, max_bytes=size + 4096)
    restore(path, 2, image_key)
    path.unlink()
    noted: list[int] = []
    with pytest.raises(ImageTooLarge, match=r"\(\d+ bytes reached and \d+ chunks to go\)"):
        write(
            tmp_path, ram, compression="none", max_bytes=size // 3,
            progress=lambda done, total: noted.append(done),
        )  # fmt: skip
    assert noted == [] or max(noted) * PAGE_SIZE < size // 3  # stopped before the limit
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keys)


def test_device_header_zeroed_first_and_on_overflow(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block device is written in place: simulated with the image file opened as one."""
    monkeypatch.setattr(
        writer, "open_image_target", lambda path: (os.open(path, os.O_WRONLY), None)
    )
    first_pages: list[bytes] = []

    def look(done: int, total: int) -> None:
        first_pages.append(image.read_bytes()[:PAGE_SIZE])

    ram = make_ram(image.parent)
    write(image.parent, ram, progress=look, chunk_pages=8, threads=2)
    assert first_pages and all(page == bytes(PAGE_SIZE) for page in first_pages)
    verify(image)
    size = image.stat().st_size
    with pytest.raises(ImageTooLarge):
        write(image.parent, ram, compression="none", max_bytes=size // 2)
    assert image.read_bytes()[:PAGE_SIZE] == bytes(PAGE_SIZE)
    with pytest.raises(CorruptImage, match="not a hibernation image"):
        verify(image)


@pytest.mark.parametrize("compression", ["none", "lz4"])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_reads_and_read_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str, threads: int
) -> None:
    """Reads smaller than the image (a few chunks each, the chunk a read cut read again whole)
    find every chunk; read_into stores exactly the flagged pages; a chunk changed since is
    refused by the next pass, once the chunks before it are stored, which put_back undoes."""
    monkeypatch.setattr(reader, "READ_BYTES", 20_000)
    ram = make_ram(tmp_path)
    path, _ = write(tmp_path, ram, compression=compression, chunk_pages=4)
    checked = check(path, threads=threads)
    data_pfns = checked.pfn_list.data_pfns
    offsets = chunk_offsets(path, checked.header)
    assert len(offsets) == checked.header.nr_chunks > 1
    assert path.stat().st_size > 20 * 20_000  # many reads
    take = np.zeros(NR_PAGES, np.bool_)
    take[data_pfns[::3]] = True
    with fresh_ram(tmp_path / "fresh") as fresh:
        written = checked.read_into(fresh, take, undo=RamUndo(fresh), threads=threads)
        assert written == data_pfns[::3].size
        assert np.array_equal(fresh.pages[take], ram[take])
        assert (fresh.pages[~take] == 0xAA).all()
        take[:] = True
        checked.read_into(fresh, take, undo=RamUndo(fresh), threads=threads)
        assert np.array_equal(fresh.pages[data_pfns], ram[data_pfns])
        with open(path, "r+b") as f:
            f.seek(offsets[-1] + CHUNK_HEADER.size)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
        last = checked.header.nr_chunks - 1
        fresh.pages[data_pfns] = 0x55
        undo = RamUndo(fresh)
        with pytest.raises(CorruptImage, match=f"chunk {last}: checksum mismatch"):
            checked.read_into(fresh, take, undo=undo, threads=threads)
        assert np.array_equal(fresh.pages[data_pfns[:-4]], ram[data_pfns[:-4]])
        undo.put_back()
        assert (fresh.pages[data_pfns] == 0x55).all()
    with pytest.raises(CorruptImage, match=f"chunk {last}: checksum mismatch"):
        check(path, threads=threads)


def test_read_into_taking_nothing_still_checks_every_chunk(image: Path) -> None:
    """An image of a chain none of whose pages are left (later images hold them all) is read
    and checked all the same: nothing stored, and a bad chunk refused."""
    header = verify(image)
    with fresh_ram(image.parent / "fresh") as fresh:
        nothing = np.zeros(NR_PAGES, np.bool_)
        assert open_front(image).read_into(fresh, nothing, undo=RamUndo(fresh)) == 0
        assert (fresh.pages == 0xAA).all()
        flip(image, header.end_offset - 1)
        with pytest.raises(CorruptImage, match=r"chunk \d+: checksum mismatch"):
            open_front(image).read_into(fresh, nothing, undo=RamUndo(fresh))
        assert (fresh.pages == 0xAA).all()


def test_an_image_replaced_after_its_front_was_checked_is_refused(image: Path) -> None:
    """The pass reads the file whose header and pfn list were checked, or none: another one
    renamed over the path meanwhile (here even a copy of the same pages) is refused."""
    front = open_front(image)
    (image.parent / "sub").mkdir()
    other, _ = write(image.parent / "sub", make_ram(image.parent / "sub"), compression="lz4")
    os.replace(other, image)
    with fresh_ram(image.parent / "fresh") as fresh:
        everything = np.ones(NR_PAGES, np.bool_)
        with pytest.raises(CorruptImage, match="another file since its header was checked"):
            front.read_into(fresh, everything, undo=RamUndo(fresh))
        assert (fresh.pages == 0xAA).all()


def test_ram_holding_the_image_already_is_not_copied_and_still_put_back(image: Path) -> None:
    """RAM an interrupted resume left holding the image's data: the pages about to get the
    same bytes need no copy kept (only those that differ do), and a refused read still
    leaves RAM exactly as it was."""
    front = open_front(image)
    data = front.pfn_list.data_pfns
    everything = np.ones(NR_PAGES, np.bool_)
    with fresh_ram(image.parent / "fresh") as fresh:
        front.read_into(fresh, everything, undo=RamUndo(fresh))
        fresh.pages[data[3], 100] ^= 0xFF  # one page differs from the image (not one byte)
        undo = RamUndo(fresh)
        assert front.read_into(fresh, everything, undo=undo) == data.size
        assert undo.copied_pages == 1
        flip(image, front.header.end_offset - 1)
        fresh.pages[data[3], 100] ^= 0xFF
        fresh.pages[data[-1], 7] ^= 0xFF  # the last chunk's page, which will not be stored
        before = fresh.pages.copy()
        undo = RamUndo(fresh)
        with pytest.raises(CorruptImage, match=r"chunk \d+: checksum mismatch"):
            front.read_into(fresh, everything, undo=undo)
        undo.put_back()
        assert np.array_equal(fresh.pages, before)
