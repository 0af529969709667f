"""The keys of encrypted hibernation images: the secret, one derived AES key per image, nonces.

An encrypted image (docs/FORMAT.md, "Encryption") has its pfn list and every chunk's stored
bytes encrypted with AES-256-GCM, and its header authenticated by a tag in the header, under a
key derived from the secret (``ImageKey``) and the image's random salt. Each item has its own
12-byte nonce: the image's random 4-byte prefix, then the item's 8-byte index (a chunk's
number, ``PFN_LIST_NONCE`` or ``HEADER_NONCE``).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kexec_sim.errors import InvalidRequest, MachineError
from kexec_sim.hibernation.report import reason

TAG_BYTES = 16  # AES-GCM tag
SALT_BYTES = 16
NONCE_PREFIX_BYTES = 4  # + an 8-byte index: the 12-byte GCM nonce
PFN_LIST_NONCE = (1 << 64) - 1
HEADER_NONCE = (1 << 64) - 2
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
KEY_FILE_MIN_BYTES = 16
HKDF_INFO = b"kexec-sim hibernation image key"

AUTH_FAILED = "authentication failed: wrong key or tampered image"


@dataclass(frozen=True)
class ImageKey:
    """The secret an encrypted image is written and read with: a key file or a passphrase.

    Each image has its own AES-256 key, derived from this secret and the image's random salt
    (``derive``): HKDF-SHA256 for a key file, scrypt (n=2^15, r=8, p=1) for a passphrase.
    """

    kind: Literal["key file", "passphrase"]
    secret: bytes = field(repr=False)
    _derived: dict[bytes, bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def from_key_file(cls, path: Path | str) -> "ImageKey":
        """The key held by the file at *path* (all of its bytes, at least 16); OSError."""
        secret = Path(path).read_bytes()
        if len(secret) < KEY_FILE_MIN_BYTES:
            raise MachineError(f"{path}: a key file needs at least {KEY_FILE_MIN_BYTES} bytes, "
                               f"this one has {len(secret)}")  # fmt: skip
        return cls("key file", secret)

    @classmethod
    def from_passphrase(cls, text: str) -> "ImageKey":
        """The key of passphrase *text* (not empty)."""
        if not text:
            raise MachineError("the passphrase is empty")
        return cls("passphrase", text.encode())

    def derive(self, salt: bytes) -> bytes:
        """The 32-byte AES key of the image whose salt is *salt* (remembered once derived)."""
        key = self._derived.get(salt)
        if key is None:
            if self.kind == "passphrase":
                kdf: Scrypt | HKDF = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R,
                                            p=SCRYPT_P)  # fmt: skip
            else:
                kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO)
            key = kdf.derive(self.secret)
            self._derived[salt] = key
        return key


def new_cipher(key: ImageKey | None) -> tuple[bytes, bytes, AESGCM | None]:
    """A new image's salt, nonce prefix and cipher under *key*: a random salt and prefix and
    the key derived for them; zeros and None without a key (the image is not encrypted)."""
    if key is None:
        return bytes(SALT_BYTES), bytes(NONCE_PREFIX_BYTES), None
    salt = os.urandom(SALT_BYTES)
    return salt, os.urandom(NONCE_PREFIX_BYTES), AESGCM(key.derive(salt))


def nonce(prefix: bytes, index: int) -> bytes:
    """The GCM nonce of item *index* (chunk number, or PFN_LIST_NONCE / HEADER_NONCE)."""
    return prefix + index.to_bytes(8, "little")


def image_key(key_file: Path | None, passphrase: str | None) -> ImageKey | None:
    """The image key from a key file or a passphrase (None for neither); InvalidRequest for both,
    MachineError for an unreadable or too short key file or an empty passphrase."""
    if key_file is not None and passphrase is not None:
        raise InvalidRequest("give a key file or a passphrase, not both")
    if key_file is not None:
        try:
            return ImageKey.from_key_file(key_file)
        except OSError as exc:
            raise MachineError(f"key file {key_file}: {reason(exc)}") from None
    if passphrase is not None:
        return ImageKey.from_passphrase(passphrase)
    return None
