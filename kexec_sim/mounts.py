"""The host's mount table as this process sees it: ``/proc/self/mounts`` and, for what only it
says (the device, the superblock's own options), ``/proc/self/mountinfo``. The one reader."""

import re
from typing import NamedTuple

PROC_MOUNTS = "/proc/self/mounts"
PROC_MOUNTINFO = "/proc/self/mountinfo"
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


class MountInfo(NamedTuple):
    """One line of mountinfo: what a mount table line does not say."""

    device: str
    """``major:minor`` of the filesystem (a FUSE connection's bdi name)."""
    mountpoint: str
    mount_options: tuple[str, ...]
    """The mount's own flags (``ro`` or ``rw`` first)."""
    super_options: tuple[str, ...]
    """The superblock's (``ro`` or ``rw`` first): a bind remount leaves them."""


def read_mountinfo(proc_mountinfo: str = PROC_MOUNTINFO) -> list[MountInfo]:
    """Every mount of *proc_mountinfo*, in mount order (the last of a mountpoint is on top)."""
    entries = []
    with open(proc_mountinfo, encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 5 and "-" in fields[6:] and fields.index("-") + 3 < len(fields):
                super_options = fields[fields.index("-") + 3]
                entries.append(
                    MountInfo(
                        fields[2],
                        unescape_field(fields[4]),
                        tuple(fields[5].split(",")),
                        tuple(super_options.split(",")),
                    )
                )
    return entries


def is_fuse(entry: MountEntry) -> bool:
    """Whether *entry* is a FUSE filesystem (``fuse`` or ``fuse.SUBTYPE``)."""
    return entry.fstype == "fuse" or entry.fstype.startswith("fuse.")
