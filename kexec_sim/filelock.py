"""A cross-process exclusive lock on a file (flock), re-entrant within one process."""

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FileLock:
    """``flock(LOCK_EX)`` on *path*; nested ``held()`` in one process only counts.

    Threads of the process exclude each other with a re-entrant mutex. Two FileLock objects on
    the same file in one process are two independent holders (nesting them deadlocks), and a
    forked child must not use its parent's FileLock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._mutex = threading.RLock()
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the body of the ``with`` block."""
        with self._mutex:
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def depth(self) -> int:
        """How deeply the lock is held by this process (meaningful inside ``held()``)."""
        return self._depth

    def close(self) -> None:
        """Close the lock file (releasing the lock if held)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
