"""The filesystem model: the inode table and every tmpfs operation on it, FUSE aside.

Every method is synchronous and completes its state change without yielding, so requests are
atomic with respect to each other (the FUSE layer awaits nothing in between). Failures raise
FsError with the errno kernel tmpfs gives; the FUSE layer only translates. Permission checks are
the kernel's (``default_permissions``); what the VFS cannot know (emptiness, name length, space)
is checked here.
"""

import errno
import os
import stat
import time
from dataclasses import dataclass

import numpy as np

from kexec_sim import PAGE_SIZE, PfnArray, Ram

from . import file_data, secret_pages, xattrs
from .errors import FsError
from .file_data import Buffer
from .file_space import allocate, punch
from .inode import FIRST_FREE_INO, MAX_FILE_BYTES, NAME_MAX, ROOT_INO, Inode
from .inode_table import InodeTable
from .page_pool import PagePool
from .quiet_inodes import QuietInodes

RELATIME_WINDOW_NS = 24 * 3600 * 10**9
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MAX_RW_COUNT = 0x7FFFF000  # the most one read, write or copy_file_range moves (INT_MAX & PAGE_MASK)
COPY_STEP = 1 << 20  # copy_file_range moves this much at a time through a buffer


@dataclass
class OpenFile:
    """An open file handle: the inode, whether it may write, and who opened it.

    O_APPEND needs nothing here: the kernel turns an appending write into one at EOF.
    """

    ino: int
    writable: bool
    opener_uid: int


@dataclass
class FsStats:
    """What statfs reports, in pages and inodes."""

    total_pages: int
    free_pages: int
    total_inodes: int
    free_inodes: int


class Tree:
    """The inode table of one mount and the operations on it."""

    def __init__(
        self,
        ram: Ram,
        pool: PagePool,
        *,
        root_mode: int,
        root_uid: int,
        root_gid: int,
        max_inodes: int,
        huge: bool,
    ) -> None:
        self.ram = ram
        self.pool = pool
        self.max_inodes = max_inodes  # 0: unlimited
        self.huge = huge
        self.secret = False  # the mount's ``secret`` option: every regular file is secret
        self.read_only = False
        self.inodes = InodeTable()
        self.removed: set[int] = set()  # files gone (no name, no handle) the kernel still knows
        self.xattr_bytes = 0  # names and values of every inode's xattrs
        self.handles: dict[int, OpenFile] = {}
        self.next_ino = FIRST_FREE_INO
        self._next_fh = 1
        root = Inode(ROOT_INO, stat.S_IFDIR | root_mode, root_uid, root_gid, time.time_ns())
        root.nlink = 2
        root.parent_ino = ROOT_INO
        root.lookups = 1  # the kernel holds the root forever
        self.inodes[ROOT_INO] = root

    # --- lookups --------------------------------------------------------------------------

    def get(self, ino: int) -> Inode:
        """Return inode *ino*; raise FsError(ENOENT) if there is none (stale kernel reference)."""
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"no inode {ino}") from None

    def directory(self, ino: int) -> Inode:
        """Return directory *ino*; raise ENOTDIR if it is something else."""
        inode = self.get(ino)
        if inode.entries is None:
            raise FsError(errno.ENOTDIR)
        return inode

    def child(self, parent_ino: int, name: bytes) -> Inode:
        """Return the inode *name* refers to in directory *parent_ino* (ENOENT if none)."""
        inode = self.find_child(parent_ino, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def find_child(self, parent_ino: int, name: bytes) -> Inode | None:
        """The inode *name* refers to in directory *parent_ino*, or None if it has no such
        name (ENOENT, ENOTDIR or ENAMETOOLONG if the directory or the name is wrong)."""
        parent = self.directory(parent_ino)
        _check_name(name)
        if name == b".":
            return parent
        if name == b"..":
            return self.get(parent.parent_ino)
        assert parent.entries is not None
        child_ino = parent.entries.get(name)
        return None if child_ino is None else self.inodes[child_ino]

    def lookup(self, parent_ino: int, name: bytes) -> Inode | None:
        """Like `find_child`, and count one more kernel reference to the inode found."""
        inode = self.find_child(parent_ino, name)
        if inode is not None:
            inode.lookups += 1
        return inode

    def forget(self, ino: int, count: int) -> None:
        """Drop *count* kernel references; a removed file's number goes with the last one."""
        if self.inodes.quiet.forget(ino, count):
            return  # a quiet inode is linked: it stays, and stays quiet
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(0, inode.lookups - count)
        self._forget_if_unreferenced(inode)

    def list_dir(self, ino: int) -> list[tuple[bytes, int]]:
        """Return a snapshot of a directory's entries (name, inode), '.' and '..' excluded."""
        directory = self.directory(ino)
        assert directory.entries is not None
        self._touch_atime(directory)
        return list(directory.entries.items())

    # --- creating ---------------------------------------------------------------------------

    def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Inode:
        """Create a regular file, fifo, socket or device node."""
        kind = stat.S_IFMT(mode)
        if kind == 0:
            mode |= stat.S_IFREG
        elif kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        inode = self._new_child(parent_ino, name, mode, uid, gid)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            inode.rdev = rdev
        return inode

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create a directory."""
        inode = self._new_child(parent_ino, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        return inode

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        """Create a symbolic link to *target*."""
        if len(target) >= PAGE_SIZE:
            raise FsError(errno.ENAMETOOLONG)
        inode = self._new_child(parent_ino, name, stat.S_IFLNK | 0o777, uid, gid)
        inode.target = target
        inode.size_bytes = len(target)
        return inode

    def link(self, ino: int, parent_ino: int, name: bytes) -> Inode:
        """Add a hard link *name* in *parent_ino* to inode *ino*."""
        self._check_writable()
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        parent = self._free_slot(parent_ino, name)
        assert parent.entries is not None
        parent.entries[name] = ino
        inode.nlink += 1
        now = time.time_ns()
        inode.ctime_ns = now
        parent.mtime_ns = parent.ctime_ns = now
        inode.lookups += 1
        return inode

    def _new_child(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        self._check_writable()
        parent = self._free_slot(parent_ino, name)
        if self.max_inodes and self.inodes_in_use() >= self.max_inodes:
            raise FsError(errno.ENOSPC, "nr_inodes limit reached")
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        inode = Inode(self.next_ino, mode, uid, gid, now)
        self.next_ino += 1
        inode.nlink = 2 if inode.is_dir else 1
        if inode.is_dir:
            inode.parent_ino = parent.ino
            parent.nlink += 1
        assert parent.entries is not None
        parent.entries[name] = inode.ino
        parent.mtime_ns = parent.ctime_ns = now
        self.inodes[inode.ino] = inode
        inode.lookups += 1
        return inode

    def _free_slot(self, parent_ino: int, name: bytes) -> Inode:
        """Return the parent directory after checking *name* can be created in it."""
        parent = self.directory(parent_ino)
        _check_name(name)
        if parent.nlink == 0:
            raise FsError(errno.ENOENT)  # the directory was removed
        assert parent.entries is not None
        if name in (b".", b"..") or name in parent.entries:
            raise FsError(errno.EEXIST)
        return parent

    # --- removing ---------------------------------------------------------------------------

    def unlink(self, parent_ino: int, name: bytes) -> None:
        """Remove the name of a non-directory."""
        self._check_writable()
        parent = self.directory(parent_ino)
        inode = self.child(parent_ino, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        assert parent.entries is not None
        del parent.entries[name]
        now = time.time_ns()
        parent.mtime_ns = parent.ctime_ns = now
        inode.ctime_ns = now
        inode.nlink -= 1
        self._free_if_removed(inode)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        """Remove an empty directory."""
        self._check_writable()
        parent = self.directory(parent_ino)
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        inode = self.child(parent_ino, name)
        if inode.entries is None:
            raise FsError(errno.ENOTDIR)
        if inode.entries:
            raise FsError(errno.ENOTEMPTY)
        assert parent.entries is not None
        del parent.entries[name]
        parent.nlink -= 1
        now = time.time_ns()
        parent.mtime_ns = parent.ctime_ns = now
        inode.ctime_ns = now
        inode.nlink = 0
        self._free_if_removed(inode)

    def _free_if_removed(self, inode: Inode) -> None:
        """Free a file that has just lost its last name or handle, at once, as tmpfs evicts it
        then: its pages (a secret file's mapped again first), its xattrs and its place under
        ``nr_inodes`` come back now; its number stays while the kernel holds lookups on it.
        Called whenever ``nlink`` or ``open_handles`` drops."""
        if inode.ino == ROOT_INO or not inode.is_removed() or inode.ino in self.removed:
            return
        self.removed.add(inode.ino)
        self._free_content(inode)
        self._forget_if_unreferenced(inode)

    def _forget_if_unreferenced(self, inode: Inode) -> None:
        """Drop a removed inode from the table once the kernel holds no lookup on it."""
        if inode.lookups == 0 and inode.ino in self.removed:
            self._free_content(inode)  # a request racing the removal may have added an xattr
            self.removed.discard(inode.ino)
            del self.inodes[inode.ino]

    def _free_content(self, inode: Inode) -> None:
        """Give back a removed file's pages and xattr space."""
        if inode.pages is not None and inode.pages.nr_pages:
            file_data.free_all(self.ram, inode.pages, self.pool, secret=self.is_secret(inode))
        self.xattr_bytes -= sum(len(k) + len(v) for k, v in inode.xattrs.items())
        inode.xattrs.clear()

    # --- renaming ---------------------------------------------------------------------------

    def rename(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int = 0,
    ) -> None:
        """Rename as rename(2)/renameat2(2) on tmpfs: overwrite, NOREPLACE or EXCHANGE."""
        self._check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        old_parent = self.directory(old_parent_ino)
        new_parent = self.directory(new_parent_ino)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise FsError(errno.EBUSY if old_name in (b".", b"..") else errno.EEXIST)
        moved = self.child(old_parent_ino, old_name)
        _check_name(new_name)
        assert old_parent.entries is not None and new_parent.entries is not None
        target_ino = new_parent.entries.get(new_name)
        target = None if target_ino is None else self.inodes[target_ino]
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            self._exchange(old_parent, old_name, moved, new_parent, new_name, target)
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if target is moved:
            return  # two names of one inode: rename does nothing
        if new_parent.nlink == 0:
            raise FsError(errno.ENOENT)
        if moved.is_dir:
            self._check_not_into_itself(moved, new_parent)
            if target is not None:
                if not target.is_dir:
                    raise FsError(errno.ENOTDIR)
                assert target.entries is not None
                if target.entries:
                    raise FsError(errno.ENOTEMPTY)
        elif target is not None and target.is_dir:
            raise FsError(errno.EISDIR)
        now = time.time_ns()
        if target is not None:
            if target.is_dir:
                target.nlink = 0
                new_parent.nlink -= 1
            else:
                target.nlink -= 1
            target.ctime_ns = now
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = moved.ino
        if moved.is_dir and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            moved.parent_ino = new_parent.ino
        moved.ctime_ns = now
        old_parent.mtime_ns = old_parent.ctime_ns = now
        new_parent.mtime_ns = new_parent.ctime_ns = now
        if target is not None:
            self._free_if_removed(target)

    def _exchange(
        self,
        old_parent: Inode,
        old_name: bytes,
        a: Inode,
        new_parent: Inode,
        new_name: bytes,
        b: Inode,
    ) -> None:
        if a is b:
            return
        if a.is_dir:
            self._check_not_into_itself(a, new_parent)
        if b.is_dir:
            self._check_not_into_itself(b, old_parent)
        assert old_parent.entries is not None and new_parent.entries is not None
        old_parent.entries[old_name] = b.ino
        new_parent.entries[new_name] = a.ino
        if old_parent is not new_parent and a.is_dir != b.is_dir:
            into_new, into_old = (1, -1) if a.is_dir else (-1, 1)
            new_parent.nlink += into_new
            old_parent.nlink += into_old
        if a.is_dir:
            a.parent_ino = new_parent.ino
        if b.is_dir:
            b.parent_ino = old_parent.ino
        now = time.time_ns()
        a.ctime_ns = b.ctime_ns = now
        old_parent.mtime_ns = old_parent.ctime_ns = now
        new_parent.mtime_ns = new_parent.ctime_ns = now

    def _check_not_into_itself(self, moved: Inode, new_parent: Inode) -> None:
        """EINVAL if *new_parent* is *moved* or one of its descendants."""
        ino = new_parent.ino
        while True:
            if ino == moved.ino:
                raise FsError(errno.EINVAL)
            if ino == ROOT_INO:
                return
            ino = self.inodes[ino].parent_ino

    # --- attributes -------------------------------------------------------------------------

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        from_handle: bool = False,
        caller_uid: int = 0,
    ) -> Inode:
        """Change attributes as chmod/chown/truncate/utimensat do on tmpfs.

        Times as shmem_setattr sets them: any request but a truncate stamps ctime, an empty
        one too (chown to -1, -1). A truncate stamps mtime and ctime when the size changes,
        when it comes through an open file (ftruncate: the request carries the handle,
        *from_handle*) or when the file holds pages (tmpfs truncates them again); truncate(2)
        of a file without pages to its own size changes nothing.

        Like the VFS, a chown of a non-directory drops set-uid (and set-gid with group-exec)
        and file capabilities; a truncate drops them unless the caller is root (CAP_FSETID).
        """
        self._check_writable()
        inode = self.get(ino)
        now = time.time_ns()
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if not inode.is_reg:
                raise FsError(errno.EINVAL)
            assert inode.pages is not None
            stamp = from_handle or size != inode.size_bytes or inode.pages.nr_pages > 0
            self._truncate(inode, size)
            if stamp:
                inode.mtime_ns = inode.ctime_ns = now
            self._kill_privileges(inode, caller_uid)
        else:
            inode.ctime_ns = now
        if mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        chown = False
        if uid is not None and uid != 0xFFFFFFFF:
            inode.uid = uid
            chown = True
        if gid is not None and gid != 0xFFFFFFFF:
            inode.gid = gid
            chown = True
        if chown and not inode.is_dir:
            self._kill_privileges(inode, caller_uid, chown=True)
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        if ctime_ns is not None:
            inode.ctime_ns = ctime_ns
        return inode

    def _truncate(self, inode: Inode, size: int) -> None:
        """Set a regular file's size (its times are the caller's): pages past the end are
        freed (those fallocate put there too, at the same size, as tmpfs), growing is sparse."""
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > MAX_FILE_BYTES:
            raise FsError(errno.EFBIG)
        assert inode.pages is not None
        file_data.truncate(
            self.ram,
            inode.pages,
            self.pool,
            inode.size_bytes,
            size,
            secret=self.is_secret(inode),
        )
        inode.size_bytes = size

    def _kill_privileges(self, inode: Inode, caller_uid: int, *, chown: bool = False) -> None:
        """Drop what a modified file must not keep, as the VFS's file_remove_privs does.

        File capabilities always go; set-uid, and set-gid when group-exec is set, go on a
        chown, or when the caller is not root (root stands for CAP_FSETID here).
        """
        capability = inode.xattrs.pop(xattrs.CAPABILITY, None)
        if capability is not None:
            self.xattr_bytes -= len(xattrs.CAPABILITY) + len(capability)
        if chown or caller_uid != 0:
            inode.mode &= ~stat.S_ISUID
            if inode.mode & stat.S_IXGRP:
                inode.mode &= ~stat.S_ISGID

    # --- open files and data ----------------------------------------------------------------

    def open(self, ino: int, flags: int, caller_uid: int = 0) -> int:
        """Open inode *ino* with open(2) *flags*; return a handle.

        O_TRUNC is applied here (the kernel leaves it to us: atomic O_TRUNC), stamping mtime and
        ctime even when the file was empty already, as tmpfs does.
        """
        inode = self.get(ino)
        if ino in self.removed:
            raise FsError(errno.ENOENT, "the file was removed")  # its path walk lost a race
        accmode = flags & os.O_ACCMODE
        writable = accmode in (os.O_WRONLY, os.O_RDWR)
        if writable or flags & os.O_TRUNC:
            self._check_writable()
            if inode.is_dir:
                raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC and inode.is_reg:
            self._truncate(inode, 0)
            self._kill_privileges(inode, caller_uid)
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = OpenFile(ino, writable, caller_uid)
        inode.open_handles += 1
        return fh

    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Inode]:
        """Create a regular file and open it (O_CREAT|O_EXCL is the kernel's to enforce)."""
        inode = self.mknod(parent_ino, name, stat.S_IFREG | (mode & 0o7777), 0, uid, gid)
        return self.open(inode.ino, flags & ~os.O_TRUNC, uid), inode

    def release(self, fh: int) -> None:
        """Close a handle; a file with no name left is freed with its last handle."""
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        inode = self.inodes.get(handle.ino)
        if inode is not None:
            inode.open_handles -= 1
            self._free_if_removed(inode)

    def handle(self, fh: int) -> OpenFile:
        """Return open handle *fh* (EBADF if unknown)."""
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def writers(self) -> int:
        """How many handles are open for writing."""
        return sum(1 for h in self.handles.values() if h.writable)

    def removed_in_use(self) -> int:
        """How many files and directories have lost their last name but are still in use:
        open, or held by the kernel (a process's working directory, say). The kernel refuses
        a tmpfs remount,ro then (EBUSY: its s_remove_count); pkramfs refuses for it, as its
        read-only flag is the mount's own, not the superblock's."""
        unlinked_open = {h.ino for h in self.handles.values() if self.inodes[h.ino].nlink == 0}
        return len(self.removed | unlinked_open)

    def read(self, fh: int, off: int, length: int) -> bytes | bytearray | memoryview:
        """Read from an open regular file."""
        inode = self.get(self.handle(fh).ino)
        if inode.pages is None:
            raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL)
        self._touch_atime(inode)
        return self._file_bytes(inode, off, length)

    def _file_bytes(self, inode: Inode, off: int, length: int) -> Buffer:
        """Up to *length* bytes of regular file *inode* at *off* (fewer at EOF)."""
        assert inode.pages is not None
        if self.is_secret(inode):
            return file_data.read_secret(self.ram, inode.pages, inode.size_bytes, off, length)
        return file_data.read(self.ram, inode.pages, inode.size_bytes, off, length)

    def seek_data_or_hole(self, fh: int, offset: int, whence: int) -> int:
        """``lseek(SEEK_DATA / SEEK_HOLE)`` on an open regular file, as tmpfs answers it: a
        page held and written is data (an unwritten one, fallocated, is a hole), the end of
        the file is a hole; ENXIO from the end on, or for SEEK_DATA with only holes left;
        EINVAL for another *whence*."""
        inode = self.get(self.handle(fh).ino)
        if inode.pages is None or whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        size = inode.size_bytes
        if not 0 <= offset < size:
            raise FsError(errno.ENXIO)
        page = offset // PAGE_SIZE
        if whence == os.SEEK_HOLE:
            return min(max(offset, inode.pages.next_hole(page) * PAGE_SIZE), size)
        found = inode.pages.next_data(page)
        if found is None or found * PAGE_SIZE >= size:
            raise FsError(errno.ENXIO)
        return max(offset, found * PAGE_SIZE)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open regular file, as tmpfs answers it: mode 0 allocates and
        extends the file, KEEP_SIZE only allocates, PUNCH_HOLE|KEEP_SIZE frees; any other
        mode is EOPNOTSUPP (tmpfs has no ZERO_RANGE, COLLAPSE, INSERT or UNSHARE). On success
        mtime and ctime are stamped and privileges dropped as by a write."""
        self._check_writable()
        handle = self.handle(fh)
        inode = self.get(handle.ino)
        if inode.pages is None:
            raise FsError(errno.EISDIR if inode.is_dir else errno.ENODEV)
        if mode not in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
            raise FsError(errno.EOPNOTSUPP)
        if not handle.writable:
            raise FsError(errno.EBADF)
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        end = offset + length
        if end > MAX_FILE_BYTES:
            raise FsError(errno.EFBIG)
        secret = self.is_secret(inode)
        if mode & FALLOC_FL_PUNCH_HOLE:
            punch(self.ram, inode.pages, self.pool, offset, end, inode.size_bytes, secret=secret)
        else:
            allocate(self.ram, inode.pages, self.pool, offset, end, huge=self.huge, secret=secret)
            if not mode & FALLOC_FL_KEEP_SIZE and end > inode.size_bytes:
                inode.size_bytes = end
        self._modified(inode, handle)

    def copy_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int) -> int:
        """copy_file_range(2) between open regular files, as tmpfs does it (the kernel's copy
        through the page cache): the bytes move inside the machine's RAM, the source's holes
        and unwritten pages arrive as written zeros, at most MAX_RW_COUNT bytes a call, short
        (not ENOSPC) when some were copied before the mount filled up."""
        source = self.get(self.handle(fh_in).ino)
        target = self.get(self.handle(fh_out).ino)
        if source.pages is None or target.pages is None:
            raise FsError(errno.EISDIR if source.is_dir or target.is_dir else errno.EINVAL)
        if off_in < 0 or off_out < 0:
            raise FsError(errno.EINVAL)
        length = max(0, min(length, MAX_RW_COUNT, source.size_bytes - off_in))
        if off_out >= MAX_FILE_BYTES:
            raise FsError(errno.EFBIG)
        length = min(length, MAX_FILE_BYTES - off_out)
        if source is target and off_out + length > off_in and off_out < off_in + length:
            raise FsError(errno.EINVAL)
        copied = 0
        while copied < length:
            step = min(COPY_STEP, length - copied)
            data = self._file_bytes(source, off_in + copied, step)
            try:
                self.write(fh_out, off_out + copied, data)
            except FsError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                copied = self._copy_until_full(fh_out, off_out + copied, data, copied)
                break
            copied += step
        if copied:  # after the writes, as tmpfs: a copy inside one file finds its mtime
            # stamped, and relatime then gives atime the same time (one syscall, one time)
            self._touch_atime(source, target.mtime_ns if source is target else None)
        return copied

    def _copy_until_full(self, fh_out: int, off_out: int, data: Buffer, copied: int) -> int:
        """Write *data* a page of the target at a time until the mount is full: the bytes
        copied in all (*copied* before), or ENOSPC if none."""
        view = memoryview(data)
        at = 0
        while at < len(view):
            piece = min(len(view) - at, PAGE_SIZE - (off_out + at) % PAGE_SIZE)
            try:
                self.write(fh_out, off_out + at, view[at : at + piece])
            except FsError:
                if copied + at:
                    return copied + at
                raise
            at += piece
        return copied + at

    def _modified(self, inode: Inode, handle: OpenFile) -> None:
        """Stamp mtime and ctime and drop privileges, as the VFS's file_modified does."""
        if inode.xattrs or inode.mode & (stat.S_ISUID | stat.S_ISGID):
            self._kill_privileges(inode, handle.opener_uid)
        inode.mtime_ns = inode.ctime_ns = time.time_ns()

    def write(self, fh: int, off: int, data: Buffer) -> int:
        """Write to an open regular file; return the bytes written (all of them)."""
        self._check_writable()
        handle = self.handle(fh)
        inode = self.get(handle.ino)
        if inode.pages is None or not handle.writable:
            raise FsError(errno.EBADF)
        end = off + len(data)
        if off < 0 or end > MAX_FILE_BYTES:
            raise FsError(errno.EFBIG)
        if self.is_secret(inode):
            file_data.write_secret(self.ram, inode.pages, self.pool, off, data, huge=self.huge)
        else:
            file_data.write(self.ram, inode.pages, self.pool, off, data, huge=self.huge)
        if end > inode.size_bytes:
            inode.size_bytes = end
        self._modified(inode, handle)
        return len(data)

    def is_secret(self, inode: Inode) -> bool:
        """Whether *inode* is a secret regular file: its pages are out of the direct map."""
        return inode.pages is not None and (
            self.secret or inode.xattrs.get(xattrs.SECRET) == xattrs.SECRET_VALUE
        )

    def hide_secret_pages(self) -> None:
        """Remove every secret file's pages from the direct map (after a restore)."""
        for inode in self.inodes.in_use():
            if inode.pages is not None and inode.pages.nr_pages and self.is_secret(inode):
                secret_pages.hide(self.ram, inode.pages.all_pfns())
        pfns = self.inodes.quiet.secret_pfns(every_file=self.secret)
        if pfns.size:
            secret_pages.hide(self.ram, pfns)

    def _touch_atime(self, inode: Inode, now: int | None = None) -> None:
        """Update atime (to *now*, by default the time) as relatime does: only if it is not
        newer than mtime/ctime or a day old."""
        if self.read_only:
            return
        now = time.time_ns() if now is None else now
        if (
            inode.atime_ns <= inode.mtime_ns
            or inode.atime_ns <= inode.ctime_ns
            or now - inode.atime_ns >= RELATIME_WINDOW_NS
        ):
            inode.atime_ns = now

    # --- extended attributes ----------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Return the value of xattr *name* (ENODATA if absent)."""
        inode = self.get(ino)
        xattrs.check_name(name)
        try:
            return inode.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        """Create or replace xattr *name*; the secret one only as `_make_secret` allows."""
        self._check_writable()
        inode = self.get(ino)
        xattrs.check_name(name)
        if name == xattrs.SECRET:
            self._make_secret(inode, value)
            return
        space = xattrs.space_bytes(self.max_inodes)
        self.xattr_bytes += xattrs.store(inode, name, value, self.xattr_bytes, space)

    def _make_secret(self, inode: Inode, value: bytes) -> None:
        """Set the secret xattr: only to "1", only on a regular file, never undone (EPERM)."""
        if value != xattrs.SECRET_VALUE:
            raise FsError(errno.EPERM, "user.pkramfs.secret can only be set to 1")
        if inode.pages is None:
            raise FsError(errno.EPERM, "only a regular file can be secret")
        if inode.xattrs.get(xattrs.SECRET) == value:
            return
        was_secret = self.is_secret(inode)
        space = xattrs.space_bytes(self.max_inodes)
        self.xattr_bytes += xattrs.store(inode, xattrs.SECRET, value, self.xattr_bytes, space)
        if not was_secret:
            secret_pages.hide(self.ram, inode.pages.all_pfns())

    def listxattr(self, ino: int) -> list[bytes]:
        """Return the names of an inode's xattrs."""
        return list(self.get(ino).xattrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove xattr *name* (ENODATA if absent); a secret file stays secret (EPERM)."""
        self._check_writable()
        inode = self.get(ino)
        xattrs.check_name(name)
        if name == xattrs.SECRET and inode.xattrs.get(name) == xattrs.SECRET_VALUE:
            raise FsError(errno.EPERM, "a secret file stays secret")
        self.xattr_bytes -= xattrs.remove(inode, name)

    # --- the whole mount --------------------------------------------------------------------

    def stats(self) -> FsStats:
        """Return statfs figures: pages against size=, inodes against nr_inodes=."""
        pages = self.pool.limit_pages
        inodes = self.max_inodes
        # As tmpfs: an unlimited size= or nr_inodes= reports 0 total and 0 free.
        return FsStats(
            pages,
            max(0, pages - self.pool.used_pages) if pages else 0,
            inodes,
            max(0, inodes - self.inodes_in_use()) if inodes else 0,
        )

    def inodes_in_use(self) -> int:
        """Inodes counted against ``nr_inodes``: not the removed ones the kernel still knows."""
        return len(self.inodes) - len(self.removed)

    def install(self, restored: QuietInodes, next_ino: int) -> None:
        """Replace this fresh, empty tree by the *restored* inodes (made objects as used)."""
        assert len(self.inodes) == 1, "install into a fresh tree only"
        self.inodes = InodeTable(restored)
        self.inodes[ROOT_INO].lookups = 1
        self.next_ino = next_ino
        self.xattr_bytes = restored.xattr_bytes() + sum(
            len(k) + len(v) for k, v in self.inodes[ROOT_INO].xattrs.items()
        )
        self.pool.used_pages += restored.data_pages()  # the root, an object now, has none

    def owned_pfns(self) -> PfnArray:
        """Every pfn the mount holds: its files' pages and the pool's idle ones."""
        parts = [i.pages.all_pfns() for i in self.inodes.in_use() if i.pages is not None]
        parts.append(self.inodes.quiet.pfns())
        parts.append(self.pool.idle_pages)
        return np.concatenate(parts)

    def _check_writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if b"/" in name or not name:
        raise FsError(errno.EINVAL)
