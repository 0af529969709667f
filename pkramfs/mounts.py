"""Finding the running pkramfs mounts of this host from /proc/mounts."""

import re
from dataclasses import dataclass

FSTYPE = "fuse.pkramfs"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/mounts that is a pkramfs mount."""

    source: str
    mountpoint: str
    options: tuple[str, ...]


def unescape_field(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of a /proc/mounts field."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def pkramfs_mounts(proc_mounts: str = "/proc/mounts") -> list[MountEntry]:
    """Return every pkramfs mount listed in *proc_mounts*, in mount order."""
    entries = []
    with open(proc_mounts, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == FSTYPE:
                entries.append(
                    MountEntry(
                        unescape_field(fields[0]),
                        unescape_field(fields[1]),
                        tuple(fields[3].split(",")),
                    )
                )
    return entries
