"""Extended attributes as tmpfs keeps them: the namespaces, the limits on names and values,
and the mount-wide space they may take (like tmpfs's ``ispace``)."""

import errno
import time

from .errors import FsError
from .inode import Inode

NAMESPACES = (b"user.", b"trusted.", b"security.")
NAME_MAX = 255
SIZE_MAX = 65536
SPACE_PER_INODE = 1024  # like tmpfs's ispace: the mount's xattr bytes <= nr_inodes * 1 KiB
SPACE_UNLIMITED = 1 << 30  # with nr_inodes=0, still a bound on the daemon's memory
CAPABILITY = b"security.capability"
SECRET = b"user.pkramfs.secret"  # value b"1": the file's pages leave the direct map
SECRET_VALUE = b"1"


def check_name(name: bytes) -> None:
    """FsError ERANGE for an empty or too long name, EOPNOTSUPP outside the namespaces."""
    if not name or len(name) > NAME_MAX:
        raise FsError(errno.ERANGE)
    if not name.startswith(NAMESPACES) or name in NAMESPACES:
        raise FsError(errno.EOPNOTSUPP)


def space_bytes(max_inodes: int) -> int:
    """The bytes of names and values a mount of *max_inodes* (0: unlimited) may hold."""
    return max_inodes * SPACE_PER_INODE if max_inodes else SPACE_UNLIMITED


def store(inode: Inode, name: bytes, value: bytes, used_bytes: int, space: int) -> int:
    """Set xattr *name* of *inode* to *value* (ctime too); return how many bytes the mount's
    xattrs grew. FsError E2BIG for a value over SIZE_MAX, ENOSPC past *space* (with
    *used_bytes* used), nothing changed."""
    if len(value) > SIZE_MAX:
        raise FsError(errno.E2BIG)
    old = inode.xattrs.get(name)
    growth = len(value) - len(old) if old is not None else len(name) + len(value)
    if used_bytes + growth > space:
        raise FsError(errno.ENOSPC)
    inode.xattrs[name] = value
    inode.ctime_ns = time.time_ns()
    return growth


def remove(inode: Inode, name: bytes) -> int:
    """Remove xattr *name* of *inode* (ctime too); return the bytes freed. ENODATA if absent."""
    value = inode.xattrs.pop(name, None)
    if value is None:
        raise FsError(errno.ENODATA)
    inode.ctime_ns = time.time_ns()
    return len(name) + len(value)
