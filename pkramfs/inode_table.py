"""The tree's inodes by number: Inode objects for those in use, columns for the quiet ones.

``InodeTable`` is a dict of the Inode objects in use that looks a missing number up among the
quiet inodes (quiet_inodes.py) and moves it in, so every change goes through an object.
`freeze` does the reverse for inodes that have been objects since before the last `age` and
are neither open nor unlinked (an unlinked inode the kernel still knows stays an object until
it forgets it): the prepare phase (prepare.py) calls both while the mount is idle, so that a
preserve finds most of a tree in columns already.
"""

import time
from collections import deque
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import Any

from .inode import ROOT_INO, Inode
from .quiet_inodes import QuietInodes

_SLACK = 4096  # numbers of inodes gone the recent list may keep before it drops them


class InodeTable(dict[int, Inode]):
    """The tree's inodes by number: a dict of the Inode objects in use that finds a missing
    number among the quiet inodes (``quiet``) and moves it in.

    Looking up, ``in``, ``get`` and ``len`` count the quiet inodes; iterating (``values``,
    ``items``, ``keys``) makes every one an object first (use ``in_use`` for the objects alone).
    """

    def __init__(self, quiet: QuietInodes | None = None) -> None:
        super().__init__()
        self.quiet = QuietInodes() if quiet is None else quiet
        self._recent: list[int] = []  # made objects since the last `age`
        self._settled: deque[int] = deque()  # objects since before it: `freeze` may take them

    def __setitem__(self, ino: int, inode: Inode) -> None:
        dict.__setitem__(self, ino, inode)
        self._recent.append(ino)
        if len(self._recent) > 2 * dict.__len__(self) + _SLACK:  # nobody ages this table
            self._recent = [i for i in dict.fromkeys(self._recent) if dict.__contains__(self, i)]

    def __missing__(self, ino: int) -> Inode:
        inode = self[ino] = self.quiet.take(ino)
        return inode

    def get(self, ino: int, default: Any = None) -> Any:
        try:
            return self[ino]
        except KeyError:
            return default

    def __contains__(self, ino: object) -> bool:
        return dict.__contains__(self, ino) or ino in self.quiet

    def __len__(self) -> int:
        return dict.__len__(self) + len(self.quiet)

    def in_use(self) -> ValuesView[Inode]:
        """The Inode objects (not the quiet inodes)."""
        return dict.values(self)

    def take_all(self) -> None:
        """Make every quiet inode an object."""
        for ino in self.quiet.inos():
            self[ino] = self.quiet.take(ino)

    def values(self) -> ValuesView[Inode]:  # type: ignore[override]
        self.take_all()
        return dict.values(self)

    def items(self) -> ItemsView[int, Inode]:  # type: ignore[override]
        self.take_all()
        return dict.items(self)

    def keys(self) -> KeysView[int]:  # type: ignore[override]
        self.take_all()
        return dict.keys(self)

    def __iter__(self) -> Iterator[int]:
        self.take_all()
        return dict.__iter__(self)

    # --- freezing -----------------------------------------------------------------------

    @property
    def settled(self) -> int:
        """How many inodes `freeze` has yet to look at."""
        return len(self._settled)

    def age(self) -> None:
        """Let `freeze` take the objects made before now (not those made after)."""
        self._settled.extend(self._recent)
        self._recent = []

    def freeze(self, limit: int, changed_since_ns: int | None = None) -> int:
        """Look at up to *limit* objects made before the last `age`: make those linked and
        not open quiet (the root stays an object); the open ones, and with *changed_since_ns*
        those changed since then (their ctime, up to now: a hot directory, a file being
        written), wait for the next `age`. Return how many were made quiet."""
        chosen: dict[int, Inode] = {}
        now_ns = time.time_ns()
        since_ns = now_ns if changed_since_ns is None else changed_since_ns
        for _ in range(min(limit, len(self._settled))):
            ino = self._settled.popleft()
            inode = dict.get(self, ino)
            if inode is None or ino == ROOT_INO or inode.nlink == 0:
                continue  # quiet already, gone, or unlinked for good
            if inode.open_handles or since_ns < inode.ctime_ns <= now_ns:
                self._recent.append(ino)
                continue
            chosen[ino] = inode
        self.quiet.add(list(chosen.values()))  # all of them or, raising, none
        for ino in chosen:
            dict.__delitem__(self, ino)
        self.quiet.merge()
        return len(chosen)
