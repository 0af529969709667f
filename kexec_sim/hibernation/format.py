"""The hibernation image format: header codec, constants, the pfn list (docs/FORMAT.md).

Layout (little-endian, byte by byte in docs/FORMAT.md): a header page (``IMAGE_HEADER`` then
zeros), the pfn list (one u64 per saved page, ascending: bits 0-47 pfn, bit 54 "data in the
base chain" (incremental images), bit 55 "all-zero page, no data", bits 56-63 the page's storage
key) padded with zeros to a page boundary, then the data chunks: ``CHUNK_HEADER`` followed by
the stored bytes of up to ``chunk_pages`` pages with data here, in pfn list order, compressed
(lz4 block, zstd frame) or raw when compression does not pay (kexec_sim.hibernation.chunks).

An encrypted image has its pfn list and every chunk's stored bytes encrypted with AES-256-GCM
(kexec_sim.hibernation.crypto), and its header authenticated by a tag in the header: a wrong
key or any changed byte is refused.

The writer writes the header last, so an interrupted write leaves no valid signature.
Everything read back is untrusted: a failed check raises CorruptImage naming it.
"""

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kexec_sim.errors import CorruptImage, ImageKeyError
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation.crypto import (
    AUTH_FAILED,
    HEADER_NONCE,
    NONCE_PREFIX_BYTES,
    PFN_LIST_NONCE,
    SALT_BYTES,
    TAG_BYTES,
    ImageKey,
    nonce,
)
from kexec_sim.pages import PfnArray

SIGNATURE = b"KSIMHIB1"
USED_SIGNATURE = b"KSIMUSED"
"""What ``invalidate`` writes over the signature once an image has been resumed."""
VERSION = 1
SUPPORTED_VERSIONS = (1,)
IMAGE_HEADER = struct.Struct("<8sIIQ16sQQQQQIIQQQ16s16sQI4s16s16sQ")
HEADER_CRC_AT = 12
HEADER_AEAD_AT = 156  # nonce_prefix, salt, header_tag: zeros unless encrypted
HEADER_TAG_AT = 176
HEADER_AEAD_END = 192
CHUNK_HEADER = struct.Struct("<IIIIQ")  # stored raw crc index first_page

FLAG_INCREMENTAL = 1 << 0
FLAG_ENCRYPTED = 1 << 1
"""Pfn list and chunks encrypted, everything authenticated (AES-256-GCM)."""
FLAG_PASSPHRASE = 1 << 2
"""With FLAG_ENCRYPTED: the key comes from a passphrase (scrypt), not a key file (HKDF)."""
KNOWN_FLAGS = FLAG_INCREMENTAL | FLAG_ENCRYPTED | FLAG_PASSPHRASE

COMPRESSIONS = {"none": 0, "lz4": 1, "zstd": 2}
CHUNK_PAGES = 128
"""Pages per chunk by default (512 KiB): 128 KiB chunks wrote ~35% slower (per-chunk costs)."""
MAX_CHUNK_PAGES = 1024  # 4 MiB: raw bytes fit a u32 with room to spare

PFN_BITS = 48
PFN_MASK = (1 << PFN_BITS) - 1
BASE_BIT = 54
ZERO_BIT = 55
KEY_SHIFT = 56
_RESERVED_BITS = ((1 << KEY_SHIFT) - 1) & ~PFN_MASK & ~(1 << ZERO_BIT) & ~(1 << BASE_BIT)

ID_BYTES = 16


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
        """Pfns of the pages whose data the chunks hold, in chunk order (computed on each
        call: a loop keeps it)."""
        return self.pfns[~(self.zero | self.in_base)]


def _header_crc(page: bytes | bytearray) -> int:
    zeroed = bytearray(page)
    zeroed[HEADER_CRC_AT : HEADER_CRC_AT + 4] = bytes(4)
    return zlib.crc32(zeroed)


def pack_header(h: ImageHeader, aead: AESGCM | None) -> bytes:
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
        tag = aead.encrypt(nonce(h.nonce_prefix, HEADER_NONCE), b"", bytes(page))
        page[HEADER_TAG_AT : HEADER_TAG_AT + TAG_BYTES] = tag
    struct.pack_into("<I", page, HEADER_CRC_AT, _header_crc(page))
    return bytes(page)


def pfn_list_end(nr_pfns: int, encrypted: bool = False) -> int:
    """Offset of the first chunk: the pfn list (and its tag) after the header page, padded."""
    size = PAGE_SIZE + 8 * nr_pfns + (TAG_BYTES if encrypted else 0)
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def parse_header(
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
    if any(page[IMAGE_HEADER.size :]) or (
        not encrypted and any(page[HEADER_AEAD_AT:HEADER_AEAD_END])
    ):
        raise CorruptImage(f"{where}: reserved header bytes are not zero")
    if flags & FLAG_PASSPHRASE and not encrypted:
        raise CorruptImage(f"{where}: passphrase flag on an image that is not encrypted")
    _check_key(flags, key, where)
    if key is not None:
        zeroed = bytearray(page)
        zeroed[HEADER_CRC_AT : HEADER_CRC_AT + 4] = bytes(4)
        zeroed[HEADER_TAG_AT : HEADER_TAG_AT + TAG_BYTES] = bytes(TAG_BYTES)
        try:
            AESGCM(key.derive(salt)).decrypt(nonce(nonce_prefix, HEADER_NONCE), tag, zeroed)
        except InvalidTag:
            raise ImageKeyError(f"{where}: {AUTH_FAILED}") from None
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
    if pfn_list_offset != PAGE_SIZE or first_chunk != pfn_list_end(nr_pfns, encrypted):
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
    if encryption_flags(key) != flags & (FLAG_ENCRYPTED | FLAG_PASSPHRASE):
        wanted = "a passphrase" if flags & FLAG_PASSPHRASE else "a key file"
        raise ImageKeyError(f"{where}: image is encrypted with {wanted}, not a {key.kind}")


def image_aead(header: ImageHeader, key: ImageKey | None, where: str) -> AESGCM | None:
    """The cipher of *header*'s image under *key* (None if not encrypted); ImageKeyError."""
    _check_key(header.flags, key, where)
    return None if key is None else AESGCM(key.derive(header.salt))


def encode_pfn_list(pfn_list: PfnList, aead: AESGCM | None, nonce_prefix: bytes) -> bytes:
    """The pfn list as written (without its padding): its entries, encrypted with *aead* and
    the image's *nonce_prefix* when *aead* is given."""
    entries = pfn_list.pfns.astype(np.uint64)
    entries |= pfn_list.keys.astype(np.uint64) << np.uint64(KEY_SHIFT)
    entries[pfn_list.zero] |= np.uint64(1 << ZERO_BIT)
    entries[pfn_list.in_base] |= np.uint64(1 << BASE_BIT)
    data = entries.astype("<u8").tobytes()
    if aead is None:
        return data
    return aead.encrypt(nonce(nonce_prefix, PFN_LIST_NONCE), data, None)


def parse_pfn_list(data: bytes, header: ImageHeader, where: str, aead: AESGCM | None) -> PfnList:
    """Validate the pfn list *data* (with its padding) of the image *header* describes, which
    *aead* decrypts if it is encrypted; CorruptImage with a one-line reason if it is bad."""
    size = header.pfn_list_bytes
    if zlib.crc32(data[:size]) != header.pfn_list_crc:
        raise CorruptImage(f"{where}: pfn list checksum mismatch")
    if any(data[size:]):
        raise CorruptImage(f"{where}: pfn list padding is not zero")
    if aead is not None:
        try:
            data = aead.decrypt(nonce(header.nonce_prefix, PFN_LIST_NONCE), data[:size], None)
        except InvalidTag:
            raise CorruptImage(f"{where}: pfn list {AUTH_FAILED}") from None
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


def encryption_flags(key: ImageKey | None) -> int:
    """The header flags an image encrypted with *key* carries (0 for None)."""
    if key is None:
        return 0
    return FLAG_ENCRYPTED | (FLAG_PASSPHRASE if key.kind == "passphrase" else 0)
