"""fsx in the style of xfstests' ltp/fsx: random operations on one file, checked as they go.

The same seeded sequence runs on a file in each directory given (say kernel tmpfs and pkramfs
with the same options): reads must return what a model of the file holds, every result or
errno must be the same in each directory, and every so often the files' size, st_blocks and
SEEK_DATA/SEEK_HOLE map must agree. Operations: write, read, truncate, fallocate (0,
KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE), posix_fallocate on a write-only descriptor,
copy_file_range inside the file, and the SEEK_DATA/SEEK_HOLE walk. No mmap: through FUSE a
page fault is a read, which on tmpfs would make a fallocated page written (SEEK would differ
for a reason no file system served by FUSE can see).

    python scripts/fsx.py --ops 100000 --seed 1 /mnt/tmpfs /mnt/pkramfs

Exit codes: 0 clean, 1 a difference (the last operations are printed), 2 bad invocation.
"""

import argparse
import ctypes
import errno
import functools
import os
import random
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_FILE = 8 << 20  # four 2 MiB chunks: huge pages are split, punched and refilled
MAX_IO = 256 << 10
MAX_FALLOC = 3 << 20
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
FALLOC_MODES = (0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE)
CHECK_EVERY = 50  # operations between comparisons of size, st_blocks and the SEEK map
HISTORY = 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Difference(Exception):
    """The directories, or a directory and the model, disagree."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) (Python has only posix_fallocate)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def seek_map(fd: int) -> list[tuple[int, int]]:
    """The (data start, hole start) pairs SEEK_DATA and SEEK_HOLE give, in order."""
    pairs: list[tuple[int, int]] = []
    offset = 0
    while True:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return pairs
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        pairs.append((data, hole))
        offset = hole


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


class Run:
    """One fsx run over a file in each of *dirs*."""

    def __init__(self, dirs: list[Path], seed: int) -> None:
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.paths = [d / f"fsx-{seed}" for d in dirs]
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for p in self.paths]
        self.history: deque[str] = deque(maxlen=HISTORY)

    def close(self) -> None:
        for fd, path in zip(self.fds, self.paths, strict=True):
            os.close(fd)
            path.unlink()

    def _offset(self, limit: int) -> int:
        """An offset below *limit*, often at or near a page or 2 MiB boundary."""
        kind = self.rng.random()
        if kind < 0.4:
            return self.rng.randrange(limit)
        unit = 4096 if kind < 0.7 else 2 << 20
        near = self.rng.randrange(limit // unit + 1) * unit + self.rng.choice((0, 0, 1, -1, 100))
        return min(max(near, 0), limit - 1)

    def _same(self, what: str, call: Callable[[int, Path], Any]) -> tuple[str, Any]:
        """Run *call* on each file (descriptor, path); every outcome must be the same."""
        self.history.append(what)
        outcomes = [
            _outcome(functools.partial(call, fd, path))
            for fd, path in zip(self.fds, self.paths, strict=True)
        ]
        if any(o != outcomes[0] for o in outcomes):
            raise Difference(f"{what}: {outcomes}")
        return outcomes[0]

    def step(self) -> None:
        op = self.rng.choices(
            ("write", "read", "truncate", "fallocate", "posix_fallocate", "copy", "seek"),
            weights=(30, 20, 8, 20, 4, 10, 8),
        )[0]
        getattr(self, op)()

    def write(self) -> None:
        off = self._offset(MAX_FILE)
        data = self.rng.randbytes(self.rng.randrange(1, min(MAX_IO, MAX_FILE - off) + 1))
        self._same(f"write {off:#x} +{len(data):#x}", lambda fd, _: os.pwrite(fd, data, off))
        self._store(off, data)

    def read(self) -> None:
        off = self._offset(MAX_FILE)
        length = self.rng.randrange(1, MAX_IO + 1)
        outcome = self._same(f"read {off:#x} +{length:#x}", lambda fd, _: os.pread(fd, length, off))
        expected = bytes(self.model[off : off + length])
        if outcome != ("ok", expected):
            raise Difference(f"read {off:#x} +{length:#x}: not what was written")

    def truncate(self) -> None:
        size = self._offset(MAX_FILE + 1)
        self._same(f"truncate {size:#x}", lambda fd, _: os.ftruncate(fd, size))
        self._resize(size)

    def fallocate(self) -> None:
        mode = self.rng.choice(FALLOC_MODES)
        off = self._offset(MAX_FILE)
        length = self.rng.randrange(1, min(MAX_FALLOC, MAX_FILE - off) + 1)
        what = f"fallocate mode {mode:#x} {off:#x} +{length:#x}"
        outcome = self._same(what, lambda fd, _: fallocate(fd, mode, off, length))
        if outcome[0] != "ok":
            return
        if mode & PUNCH_HOLE:
            end = min(off + length, len(self.model))
            if off < end:
                self.model[off:end] = bytes(end - off)
        elif not mode & KEEP_SIZE and off + length > len(self.model):
            self._resize(off + length)

    def posix_fallocate(self) -> None:
        off = self._offset(MAX_FILE)
        length = self.rng.randrange(1, min(MAX_FALLOC, MAX_FILE - off) + 1)

        def call(_: int, path: Path) -> None:
            write_only = os.open(path, os.O_WRONLY)
            try:
                os.posix_fallocate(write_only, off, length)
            finally:
                os.close(write_only)

        if self._same(f"posix_fallocate {off:#x} +{length:#x}", call)[0] == "ok":
            self._resize(max(len(self.model), off + length))

    def copy(self) -> None:
        off_in, off_out = self._offset(MAX_FILE), self._offset(MAX_FILE)
        length = self.rng.randrange(1, min(MAX_IO, MAX_FILE - off_out) + 1)
        what = f"copy_file_range {off_in:#x} -> {off_out:#x} +{length:#x}"
        outcome = self._same(
            what, lambda fd, _: os.copy_file_range(fd, fd, length, off_in, off_out)
        )
        if outcome[0] == "ok" and outcome[1]:
            self._store(off_out, bytes(self.model[off_in : off_in + outcome[1]]))

    def seek(self) -> None:
        outcome = self._same("seek map", lambda fd, _: seek_map(fd))
        if outcome[0] != "ok":
            return
        at = 0
        for data, hole in [*outcome[1], (len(self.model), len(self.model))]:
            if self.model.count(0, at, data) != data - at:  # the hole before this data
                raise Difference(f"seek map {outcome[1]}: data in the hole at {at:#x}")
            at = hole

    def check(self) -> None:
        """Same size (the model's too), st_blocks and SEEK map everywhere."""
        stats = self._same("stat", lambda fd, _: (os.fstat(fd).st_size, os.fstat(fd).st_blocks))
        if stats[1][0] != len(self.model):
            raise Difference(f"size {stats[1][0]}, the model {len(self.model)}")
        self.seek()

    def _store(self, off: int, data: bytes) -> None:
        if off + len(data) > len(self.model):
            self._resize(off + len(data))
        self.model[off : off + len(data)] = data

    def _resize(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10_000, help="operations (default 10000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("dirs", nargs="+", type=Path, help="directories to run in, side by side")
    args = parser.parse_args(argv)
    bad = [d for d in args.dirs if not d.is_dir()]
    if bad:
        print(f"fsx: not a directory: {bad[0]}", file=sys.stderr)
        return 2
    run = Run(args.dirs, args.seed)
    try:
        for done in range(1, args.ops + 1):
            run.step()
            if done % CHECK_EVERY == 0 or done == args.ops:
                run.check()
    except Difference as exc:
        print(f"fsx: seed {args.seed}, operation {done}: {exc}", file=sys.stderr)
        print("fsx: the last operations:", *run.history, sep="\n  ", file=sys.stderr)
        return 1
    finally:
        run.close()
    names = ", ".join(str(d) for d in args.dirs)
    print(f"fsx: {args.ops} operations, seed {args.seed}, clean on {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
