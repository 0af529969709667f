"""The transfer journal: makes ``PageOwnership.transfer`` all-or-nothing across a crash.

Before a transfer touches the ownership map it writes ``boot/transfer-journal`` (to a
temporary file, then renamed into place, so the journal is either absent or whole); it removes
the journal once the map is updated. The next holder of the lock finds a journal left by a
process killed in between and replays it: every listed pfn owned by ``from`` or already by
``to`` is given to ``to`` (idempotent). The model is a crashed process, not a crashed host:
like the map itself, the journal is not fsynced.

Layout (little-endian): ``JOURNAL_HEADER`` (32 bytes: magic ``KSIMTXJ2``, from owner i32,
to owner i32, run count u64, CRC32 of the body u32, 4 zero bytes), then the pfns as runs of
consecutive pfns: (first pfn i64, length i64) pairs, so a transfer of millions of mostly
consecutive pages writes a few bytes.
"""

import os
import struct
import zlib
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kexec_sim.errors import CorruptMachine
from kexec_sim.pages import PfnArray, expand_runs, runs_in_order

JOURNAL_FILE = "transfer-journal"
MAGIC = b"KSIMTXJ2"
JOURNAL_HEADER = struct.Struct("<8siiQI4x")


@dataclass(frozen=True)
class Journal:
    """A transfer that was started: *pfns* go from *from_owner* to *to_owner*."""

    pfns: PfnArray
    from_owner: int
    to_owner: int


def write_journal(boot_dir: Path, pfns: PfnArray, from_owner: int, to_owner: int) -> None:
    """Record the transfer of *pfns* in *boot_dir*, atomically (temporary file + rename)."""
    starts, lengths = runs_in_order(np.asarray(pfns, dtype=np.int64))
    write_journal_runs(boot_dir, starts, lengths, from_owner, to_owner)


def write_journal_runs(
    boot_dir: Path, starts: PfnArray, lengths: PfnArray, from_owner: int, to_owner: int
) -> None:
    """Like `write_journal`, for pages given as runs (first pfn, length)."""
    body = np.stack([starts, lengths], axis=1).astype("<i8").tobytes()
    header = JOURNAL_HEADER.pack(MAGIC, from_owner, to_owner, len(starts), zlib.crc32(body))
    tmp = boot_dir / f".{JOURNAL_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, header)
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.rename(tmp, boot_dir / JOURNAL_FILE)


def read_journal(boot_dir: Path, nr_pages: int) -> Journal | None:
    """Return the journal left in *boot_dir*, or None when there is none.

    Raises CorruptMachine when it fails validation (it was written whole, so it was tampered).
    """
    path = boot_dir / JOURNAL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < JOURNAL_HEADER.size:
        raise CorruptMachine(f"{path}: truncated ({len(data)} bytes)")
    magic, from_owner, to_owner, count, crc = JOURNAL_HEADER.unpack_from(data)
    body = data[JOURNAL_HEADER.size :]
    if magic != MAGIC:
        raise CorruptMachine(f"{path}: bad magic {magic!r}")
    if len(body) != 16 * count or zlib.crc32(body) != crc:
        raise CorruptMachine(f"{path}: {count} runs announced, body does not match")
    runs = np.frombuffer(body, dtype="<i8").astype(np.int64).reshape(count, 2)
    if (runs[:, 1] < 1).any() or (runs[:, 0] < 0).any() or (runs.sum(axis=1) > nr_pages).any():
        raise CorruptMachine(f"{path}: a run is outside the machine's RAM")
    pfns = expand_runs(runs[:, 0], runs[:, 1])
    if pfns.size and (int(pfns.min()) < 0 or int(pfns.max()) >= nr_pages):
        raise CorruptMachine(f"{path}: a pfn is outside the machine's RAM")
    return Journal(pfns, from_owner, to_owner)


def remove_journal(boot_dir: Path) -> None:
    """Remove the journal of *boot_dir* (the transfer it records is complete)."""
    with suppress(FileNotFoundError):
        os.unlink(boot_dir / JOURNAL_FILE)
