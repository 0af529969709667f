"""The host's mount table as this process sees it (``/proc/self/mounts``): the one reader."""

import re
from typing import NamedTuple

PROC_MOUNTS = "/proc/self/mounts"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class MountEntry(NamedTuple):
    """One line of the mount table."""

    source: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]


def unescape_field(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of a mount table field."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(proc_mounts: str = PROC_MOUNTS) -> list[MountEntry]:
    """Every mount of *proc_mounts*, in mount order (the last of a mountpoint is on top)."""
    entries = []
    with open(proc_mounts, encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 4:
                entries.append(
                    MountEntry(
                        unescape_field(fields[0]),
                        unescape_field(fields[1]),
                        fields[2],
                        tuple(fields[3].split(",")),
                    )
                )
    return entries


def is_fuse(entry: MountEntry) -> bool:
    """Whether *entry* is a FUSE filesystem (``fuse`` or ``fuse.SUBTYPE``)."""
    return entry.fstype == "fuse" or entry.fstype.startswith("fuse.")
