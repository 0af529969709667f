"""An inode of the tree: its attributes, and its content by type (pages, entries or target)."""

import stat

from kexec_sim import PAGE_SIZE

from .file_pages import FilePages

BOGO_DIRENT_SIZE = 20  # tmpfs reports a directory's size as 20 bytes per entry (plus 2 for . ..)
ROOT_INO = 1
FIRST_FREE_INO = 3  # 2 is the hidden control file's
NAME_MAX = 255
MAX_FILE_BYTES = (1 << 63) - 1  # MAX_LFS_FILESIZE on 64-bit


class Inode:
    """One file, directory, symlink, fifo, socket or device node.

    ``entries`` (directories) maps a name to a child inode number; ``pages`` (regular files)
    holds the data; ``target`` (symlinks) the link text. ``open_handles`` counts open files and
    ``lookups`` the kernel's references. With no name and no open handle left the file is
    gone, as tmpfs evicts it: its content is freed at once; only the lookups keep the number
    (and this object) until the kernel forgets it.
    """

    __slots__ = (
        "atime_ns",
        "ctime_ns",
        "entries",
        "gid",
        "ino",
        "lookups",
        "mode",
        "mtime_ns",
        "nlink",
        "open_handles",
        "pages",
        "parent_ino",
        "rdev",
        "size_bytes",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now_ns: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 0
        self.rdev = 0
        self.size_bytes = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now_ns
        self.xattrs: dict[bytes, bytes] = {}
        self.lookups = 0
        self.open_handles = 0
        self.entries: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.pages: FilePages | None = FilePages() if stat.S_ISREG(mode) else None
        self.target: bytes | None = None
        self.parent_ino = 0  # directories only: the inode of '..'

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """Whether this is a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def blocks_512(self) -> int:
        """st_blocks: 512-byte units of the pages this inode owns."""
        return 0 if self.pages is None else self.pages.nr_pages * (PAGE_SIZE // 512)

    @property
    def reported_size(self) -> int:
        """st_size as tmpfs reports it (directories count 20 bytes per entry)."""
        if self.entries is not None:
            return BOGO_DIRENT_SIZE * (len(self.entries) + 2)
        return self.size_bytes

    def is_removed(self) -> bool:
        """Whether no name and no open handle is left: the file is gone but for its number."""
        return self.nlink == 0 and self.open_handles == 0
