"""docs/FORMAT.md must say what the code writes: offsets and sizes of every documented field."""

import re
import struct
from pathlib import Path

from kexec_sim import preserved_pages, super_block
from kexec_sim.hibernation import chunks, crypto
from kexec_sim.hibernation import format as image_format
from pkramfs import byte_stream, page_chain, page_stream, pkram_node

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([0-9 x]+)\s*\|\s*(\w+)")


def table_after(heading: str) -> list[tuple[int, int, str]]:
    """The (offset, size, field) rows of the first table after *heading*."""
    lines = DOC.read_text().splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        match = ROW.match(line)
        if match:
            size = 1
            for factor in match.group(2).split("x"):
                size *= int(factor)
            rows.append((int(match.group(1)), size, match.group(3)))
    return rows


def struct_fields(layout: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of every field of a little-endian struct, padding included."""
    fields = []
    offset = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", layout.format.lstrip("<")):
        n = int(count or 1)
        size = n if code in "sx" else struct.calcsize("<" + code) * n
        fields.append((offset, size))
        offset += size
    return fields


def test_root_header_matches_the_doc() -> None:
    rows = table_after("### Root page header (`ROOT_HEADER`, 64 bytes)")
    assert [(o, s) for o, s, _ in rows] == struct_fields(preserved_pages.ROOT_HEADER)
    assert preserved_pages.ROOT_HEADER.size == 64
    assert rows[0][2] == "magic" and preserved_pages.MAGIC.decode() in DOC.read_text()


def test_root_body_matches_the_doc() -> None:
    rows = table_after("### Root page body")
    n = preserved_pages.ENTRIES_PER_ROOT
    size = preserved_pages.ROOT_HEADER.size
    assert rows == [(size, 8 * n, "leaf"), (size + 8 * n, 4 * n, "CRC32")]
    assert size + 12 * n <= 4096
    assert f"`ENTRIES_PER_ROOT` = {n}" in DOC.read_text()


def test_super_block_matches_the_doc() -> None:
    rows = table_after("### Super block (`SUPER_BLOCK`, 64 bytes)")
    assert [(o, s) for o, s, _ in rows] == struct_fields(super_block.SUPER_BLOCK)
    assert super_block.SUPER_BLOCK.size == 64
    assert super_block.MAGIC.decode() in DOC.read_text()


def test_node_page_matches_the_doc() -> None:
    rows = table_after("### Node page (`NODE_HEADER`, 184 bytes, then zeros)")
    assert [(o, s) for o, s, _ in rows] == struct_fields(pkram_node.NODE_HEADER)
    assert pkram_node.NODE_HEADER.size == 184
    by_name = {name: offset for offset, _, name in rows}
    assert by_name["next"] == 8 * pkram_node.NEXT_WORD
    assert by_name["state"] == 8 * pkram_node.STATE_WORD
    for state in pkram_node.STATES:
        assert state.rstrip(b"\0").decode() in DOC.read_text()


def test_chain_header_and_bodies_match_the_doc() -> None:
    rows = table_after("### Chain page header (`CHAIN_HEADER`, 32 bytes)")
    assert [(o, s) for o, s, _ in rows] == struct_fields(page_chain.CHAIN_HEADER)
    text = DOC.read_text()
    for magic in (page_stream.LINK_MAGIC, byte_stream.BYTE_MAGIC, pkram_node.NODE_MAGIC):
        assert magic.decode() in text
    link = table_after("### Link page body (`pkramfs/page_stream.py`)")
    assert link == [(32, 8 * page_stream.ENTRIES_PER_LINK, "entry")]
    assert f"bits {page_stream.PFN_SHIFT}-63 pfn" in text
    assert f"bits {page_stream.INDEX_SHIFT}-{page_stream.PFN_SHIFT - 1} file page index" in text
    body = table_after("### Byte page body (`pkramfs/byte_stream.py`)")
    assert body == [(byte_stream.HEADER_BYTES, byte_stream.BYTES_PER_PAGE, "data")]


def test_hibernation_image_matches_the_doc() -> None:
    rows = table_after("### Image header (`IMAGE_HEADER`, 200 bytes, then zeros)")
    assert [(o, s) for o, s, _ in rows] == struct_fields(image_format.IMAGE_HEADER)
    assert image_format.IMAGE_HEADER.size == 200
    by_name = {name: offset for offset, _, name in rows}
    assert by_name["crc"] == image_format.HEADER_CRC_AT
    chunk = table_after("### Chunk (`CHUNK_HEADER`, 24 bytes, then the stored bytes)")
    assert [(o, s) for o, s, _ in chunk] == struct_fields(image_format.CHUNK_HEADER)
    assert image_format.CHUNK_HEADER.size == 24
    text = DOC.read_text()
    for signature in (image_format.SIGNATURE, image_format.USED_SIGNATURE):
        assert f"`{signature.decode()}`" in text
    pfn_bits = (
        f"Bits 0-{image_format.PFN_BITS - 1} pfn; bit {image_format.BASE_BIT} data in the base"
    )
    assert pfn_bits in text
    assert f"bit {image_format.ZERO_BIT} all-zero page" in text
    assert f"bits {image_format.PFN_BITS}-{image_format.BASE_BIT - 1} are zero" in text
    assert f"bits {image_format.KEY_SHIFT}-63 the page's" in text
    for name, number in image_format.COMPRESSIONS.items():
        assert f"{number} {name}" in text
    assert f"zstd (frame, level {chunks.ZSTD_LEVEL})" in text
    assert f"1..{image_format.MAX_CHUNK_PAGES} (default {image_format.CHUNK_PAGES}" in text
    assert by_name["nonce_prefix"] == image_format.HEADER_AEAD_AT
    assert by_name["header_tag"] == image_format.HEADER_TAG_AT
    flags = (
        image_format.FLAG_INCREMENTAL,
        image_format.FLAG_ENCRYPTED,
        image_format.FLAG_PASSPHRASE,
    )
    assert sum(flags) == image_format.KNOWN_FLAGS
    names = ("incremental", "encrypted", "key from a passphrase")
    for bit, (flag, name) in enumerate(zip(flags, names, strict=True)):
        assert flag == 1 << bit and f"bit {bit} {name}" in text


def test_hibernation_image_encryption_matches_the_doc() -> None:
    text = DOC.read_text()
    assert crypto.PFN_LIST_NONCE == 2**64 - 1 and "| pfn list | 2^64 - 1 |" in text
    assert crypto.HEADER_NONCE == 2**64 - 2 and "| header | 2^64 - 2 |" in text
    assert (crypto.SCRYPT_N, crypto.SCRYPT_R, crypto.SCRYPT_P) == (2**15, 8, 1)
    assert "scrypt (n = 2^15, r = 8, p = 1" in text
    assert f"`{crypto.HKDF_INFO.decode()}`" in text
    assert f"at least {crypto.KEY_FILE_MIN_BYTES})" in text
    sizes = (crypto.TAG_BYTES, crypto.SALT_BYTES, crypto.NONCE_PREFIX_BYTES)
    assert sizes == (16, 16, 4) and "4-byte `nonce_prefix`" in text
