"""Progress of hibernate and resume: the callback they report through, and a terminal bar.

A ``Progress`` is called as ``progress(phase, done, total)``: pages (or, for "verify", images)
done of total in a phase ("write", "verify", "restore"). ``ProgressBar`` draws it.
"""

import time
from collections.abc import Callable
from typing import TextIO

from kexec_sim.geometry import PAGE_SIZE

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): pages done of total in a phase ("write", "verify", ...)."""

REDRAW_EVERY_S = 0.1
BAR_CELLS = 30


class ProgressBar:
    """Draws ``phase [#####.....] 45% 1234/5678 pages 812 MB/s ETA 3s`` on one line.

    Call it as ``bar(phase, done, total)``; a new phase starts a new line. ``close()`` ends
    the last line. Page counts of phases named in *counts_items* are items, not pages.
    """

    def __init__(self, stream: TextIO, counts_items: tuple[str, ...] = ()) -> None:
        self._stream = stream
        self._items = counts_items
        self._phase: str | None = None
        self._started = 0.0
        self._drawn = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != self._phase:
            self.close()
            self._phase, self._started = phase, now
        elif now - self._drawn < REDRAW_EVERY_S and done < total:
            return
        self._drawn = now
        self._stream.write("\r" + self._line(phase, done, total, now - self._started))
        self._stream.flush()

    def _line(self, phase: str, done: int, total: int, elapsed: float) -> str:
        fraction = done / total if total else 1.0
        filled = int(fraction * BAR_CELLS)
        bar = "#" * filled + "." * (BAR_CELLS - filled)
        text = f"{phase:<8} [{bar}] {fraction:4.0%}"
        if phase in self._items:
            return f"{text} {done}/{total}"
        rate = done * PAGE_SIZE / elapsed / 1e6 if elapsed > 0 else 0.0
        eta = (total - done) * elapsed / done if done else 0.0
        return f"{text} {done}/{total} pages {rate:7.1f} MB/s ETA {eta:4.0f}s"

    def close(self) -> None:
        """End the current line, if any."""
        if self._phase is not None:
            self._stream.write("\n")
            self._stream.flush()
            self._phase = None
