"""The FUSE operations: a thin translation from pyfuse3 requests to the Tree and back.

This is the only place that turns pkramfs errors into errnos (``FUSEError``): every handler
runs behind one guard (`guard_handlers`), where an FsError becomes its errno and any other
exception is logged with its traceback and answered EIO. pyfuse3 itself catches only
FUSEError; anything else would end its main loop, and the daemon with the tree. Handlers await
nothing between reading and changing state, so each request is atomic with respect to others.

For tests, ``PKRAMFS_HANDLER_FAULT=HANDLER:SKIP:COUNT`` (read once, at start-up) makes the
handler named raise `InjectedFault` in COUNT calls after the first SKIP; with ``:unguarded``
appended it raises outside the guard, into pyfuse3's loop.
"""

import errno
import functools
import inspect
import logging
import os
import stat
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgpack
import pyfuse3

from kexec_sim import HUGE_PAGES, PAGE_SIZE, MachineBusy, MachineError, OutOfMemory

from . import control, xattrs
from .errors import FsError, MountError, NodeError, PkramfsError
from .filesystem import PkramFilesystem
from .inode import NAME_MAX, Inode

log = logging.getLogger(__name__)

ATTR_TIMEOUT_S = 1.0
HUGE_BYTES = HUGE_PAGES * PAGE_SIZE
ENTRY_TIMEOUT_S = 1.0
_NO_ENTRY = pyfuse3.EntryAttributes()  # st_ino 0: "no such name", cached by the kernel
_NO_ENTRY.entry_timeout = ENTRY_TIMEOUT_S
HANDLER_FAULT_ENV = "PKRAMFS_HANDLER_FAULT"
# Handlers whose reply carries no error: forget has no reply, the kernel ignores release's.
_NO_ERROR_REPLY = frozenset(["forget", "release", "releasedir"])
Handler = Callable[..., Awaitable[Any]]
C = TypeVar("C", bound=type[pyfuse3.Operations])


class InjectedFault(Exception):
    """What ``PKRAMFS_HANDLER_FAULT`` makes a handler raise (tests of the guard)."""


def _guarded(name: str, handler: Handler) -> Handler:
    """*handler* behind the guard: counted in its Operations' ``requests``; FUSEError
    passes, FsError becomes its errno, anything else is logged with its traceback and
    answered EIO (or, from a handler whose reply carries no error, logged and swallowed)."""
    if name in _NO_ERROR_REPLY:

        @functools.wraps(handler)
        async def without_error_reply(*args: Any) -> None:
            args[0].requests[name] += 1
            try:
                await handler(*args)
            except Exception:
                log.exception("%s failed (its reply carries no error)", name)

        return without_error_reply

    @functools.wraps(handler)
    async def guarded(*args: Any) -> Any:
        args[0].requests[name] += 1
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed: answered EIO", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


def guard_handlers(cls: C) -> C:
    """Put every request handler *cls* defines (each override of a pyfuse3.Operations
    coroutine) behind `_guarded`."""
    for name, attr in list(vars(cls).items()):
        if inspect.iscoroutinefunction(getattr(pyfuse3.Operations, name, None)):
            if not inspect.iscoroutinefunction(attr):
                raise TypeError(f"handler {name} must be a coroutine function")
            setattr(cls, name, _guarded(name, attr))
    return cls


def _inject_fault(operations: "Operations", spec: str) -> None:
    """Make one handler of *operations* fail as ``PKRAMFS_HANDLER_FAULT=spec`` says (a
    malformed *spec* raises ValueError: the daemon stops before mounting)."""
    unguarded = spec.endswith(":unguarded")
    name, *numbers = spec.removesuffix(":unguarded").split(":")
    guarded = getattr(type(operations), name, None)
    if not hasattr(guarded, "__wrapped__") or len(numbers) != 2:
        raise ValueError(f"{HANDLER_FAULT_ENV}={spec!r}: not HANDLER:SKIP:COUNT[:unguarded]")
    skip, count = int(numbers[0]), int(numbers[1])
    handler: Handler = guarded.__wrapped__.__get__(operations)  # type: ignore[union-attr]
    calls = 0

    async def faulty(_: "Operations", *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if skip < calls <= skip + count:
            raise InjectedFault(f"{HANDLER_FAULT_ENV}={spec}: call {calls} of {name}")
        return await handler(*args)

    method = faulty if unguarded else _guarded(name, faulty)
    setattr(operations, name, types.MethodType(method, operations))
    log.warning("%s=%s: %s will fail", HANDLER_FAULT_ENV, spec, name)


@guard_handlers
class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over one PkramFilesystem.

    ``flush``, ``fsync`` and ``fsyncdir`` are left to pyfuse3's default ENOSYS on purpose: the
    data is in RAM the moment a write returns, and after one ENOSYS the kernel stops sending
    those requests for the rest of the mount (one daemon round trip less on every close).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: PkramFilesystem) -> None:
        super().__init__()
        self.fs = fs
        self.tree = fs.tree
        self._dir_snapshots: dict[int, list[tuple[bytes, int]]] = {}
        self._next_dir_fh = 1
        self._last_control_error = b""
        # Requests by handler (and getxattr's of security.capability apart), shown by
        # `pkramfs-ctl status`: what an operation costs in round trips.
        self.requests: Counter[str] = Counter(read=0, write=0, capability_query=0)
        fault = os.environ.get(HANDLER_FAULT_ENV)
        if fault:
            _inject_fault(self, fault)

    # --- attributes -----------------------------------------------------------------------

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        entry.entry_timeout = ENTRY_TIMEOUT_S
        entry.attr_timeout = ATTR_TIMEOUT_S
        entry.st_mode = inode.mode
        entry.st_nlink = inode.nlink
        entry.st_uid = inode.uid
        entry.st_gid = inode.gid
        entry.st_rdev = inode.rdev
        entry.st_size = inode.reported_size
        # tmpfs with huge=always tells a regular file's readers 2 MiB (cp makes holes and
        # reads in blocks of that much): PMD_SIZE from shmem_getattr.
        entry.st_blksize = HUGE_BYTES if self.tree.huge and inode.is_reg else PAGE_SIZE
        entry.st_blocks = inode.blocks_512
        entry.st_atime_ns = inode.atime_ns
        entry.st_mtime_ns = inode.mtime_ns
        entry.st_ctime_ns = inode.ctime_ns
        return entry

    def _control_attrs(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = control.CONTROL_INO
        entry.st_mode = stat.S_IFREG | 0o600
        entry.st_nlink = 1
        entry.st_uid = entry.st_gid = 0
        entry.st_blksize = PAGE_SIZE
        now = self.fs.started_ns
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = now
        entry.entry_timeout = entry.attr_timeout = 0
        return entry

    # --- namespace --------------------------------------------------------------------------
    # A name a directory lacks is answered with a negative entry (inode 0) the kernel keeps
    # for ENTRY_TIMEOUT_S: asking again costs no request. Every name comes and goes through
    # the kernel (the daemon makes none by itself), so the kernel's cache cannot go stale.

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == control.CONTROL_NAME:
            return self._control_attrs()
        inode = self.tree.lookup(parent_inode, name)
        return self._attrs(inode) if inode is not None else _NO_ENTRY

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            if ino != control.CONTROL_INO:
                self.tree.forget(ino, count)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == control.CONTROL_INO:
            return self._control_attrs()
        return self._attrs(self.tree.get(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == control.CONTROL_INO:
            raise pyfuse3.FUSEError(errno.EPERM)
        result = self.tree.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            from_handle=fh is not None,  # FATTR_FH: ftruncate (open's O_TRUNC never comes here)
            caller_uid=ctx.uid,
        )
        return self._attrs(result)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = self.tree.get(inode).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self.tree.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
        return self._attrs(inode)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self.tree.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self.tree.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return self._attrs(inode)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if inode == control.CONTROL_INO:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(self.tree.link(inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_control_name(parent_inode, name)
        self.tree.unlink(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_control_name(parent_inode, name)
        self.tree.rmdir(parent_inode, name)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._refuse_control_name(parent_inode_old, name_old)
        self._refuse_control_name(parent_inode_new, name_new)
        self.tree.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    def _refuse_control_name(self, parent_inode: int, name: bytes) -> None:
        if parent_inode == pyfuse3.ROOT_INODE and name == control.CONTROL_NAME:
            raise pyfuse3.FUSEError(errno.EPERM)

    # --- files ------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == control.CONTROL_INO:
            raise pyfuse3.FUSEError(errno.EPERM)
        fh = self.tree.open(inode, flags, ctx.uid)
        return self._file_info(fh, flags)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._refuse_control_name(parent_inode, name)
        fh, inode = self.tree.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return self._file_info(fh, flags), self._attrs(inode)

    def _file_info(self, fh: int, flags: int) -> pyfuse3.FileInfo:
        # Write-only handles bypass the page cache: the kernel then does not ask for
        # security.capability before every write (file_remove_privs runs only on the cached
        # write path), and a write-only descriptor cannot be mmap'ed anyway. What the kernel
        # skips, Tree.write does: dropping set-id bits and file capabilities. The kernel
        # invalidates cached pages of the range a direct write covers, so readers stay
        # coherent.
        write_only = flags & os.O_ACCMODE == os.O_WRONLY
        return pyfuse3.FileInfo(fh=fh, direct_io=write_only, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 takes any buffer (it replies from the buffer protocol): a memoryview of RAM
        # goes to the kernel without a copy in Python.
        return self.tree.read(fh, off, size)  # type: ignore[return-value]

    async def lseek(
        self, inode: int, fh: int, off: int, whence: int, ctx: pyfuse3.RequestContext
    ) -> int:
        # Only SEEK_DATA and SEEK_HOLE come here: the kernel answers the others itself.
        return self.tree.seek_data_or_hole(fh, off, whence)

    async def fallocate(
        self, inode: int, fh: int, mode: int, off: int, length: int, ctx: pyfuse3.RequestContext
    ) -> None:
        # EOPNOTSUPP for the modes tmpfs lacks, never ENOSYS: that would turn fallocate off
        # for the whole mount (the kernel's no_fallocate).
        self.tree.fallocate(fh, mode, off, length)

    async def copy_file_range(
        self,
        inode_in: int,
        fh_in: int,
        off_in: int,
        inode_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> int:
        if flags:
            raise FsError(errno.EINVAL)
        source = self.tree.get(inode_in)
        atime_ns = source.atime_ns
        copied = self.tree.copy_range(fh_in, off_in, fh_out, off_out, length)
        if source.atime_ns != atime_ns:
            # The kernel refreshes the target's attributes after a copy, not the source's:
            # without this, stat would show the old atime for ATTR_TIMEOUT_S (tmpfs: at once).
            # Safe inside the request: an attributes-only notice takes no inode lock.
            pyfuse3.invalidate_inode(inode_in, attr_only=True)
        return copied

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.tree.write(fh, off, buf)

    async def release(self, fh: int) -> None:
        self.tree.release(fh)

    # --- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entries = self.tree.list_dir(inode)
        directory = self.tree.get(inode)
        snapshot = [(b".", inode), (b"..", directory.parent_ino), *entries]
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_snapshots[fh] = snapshot
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        snapshot = self._dir_snapshots.get(fh)
        if snapshot is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(snapshot)):
            name, ino = snapshot[index]
            inode = self.tree.inodes.get(ino)
            if inode is None or inode.nlink == 0:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), index + 1):
                return
            if index >= 2:  # '.' and '..' do not count as lookups
                inode.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._dir_snapshots.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        figures = self.tree.stats()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = PAGE_SIZE
        data.f_blocks = figures.total_pages
        data.f_bfree = data.f_bavail = figures.free_pages
        data.f_files = figures.total_inodes
        data.f_ffree = data.f_favail = figures.free_inodes
        data.f_namemax = NAME_MAX
        return data

    # --- extended attributes (and the control file's commands) ------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == control.CONTROL_INO:
            return self._control_query(name)
        if name == xattrs.CAPABILITY:
            self.requests["capability_query"] += 1
        return self.tree.getxattr(inode, name)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if inode == control.CONTROL_INO:
            self._control_command(name, value, ctx)
            return
        self.tree.setxattr(inode, name, value)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == control.CONTROL_INO:
            return []
        return self.tree.listxattr(inode)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode == control.CONTROL_INO:
            raise pyfuse3.FUSEError(errno.EPERM)
        self.tree.removexattr(inode, name)

    def _control_query(self, name: bytes) -> bytes:
        try:
            if name == control.STATUS_XATTR:
                status = {**self.fs.status(), "requests": dict(self.requests)}
                packed: bytes = msgpack.packb(status, use_bin_type=True)
                return packed
            if name == control.ERROR_XATTR:
                return self._last_control_error
            if name == control.CLAIMS_XATTR:
                return self.fs.dump_claims().encode()
        except (OSError, MachineError) as exc:  # the machine directory, not the tree, failed
            log.error("control query %r failed: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def _control_command(self, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid != 0:
            raise pyfuse3.FUSEError(errno.EPERM)
        if name != control.COMMAND_XATTR:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self._last_control_error = b"internal error (see the daemon's log)"
        try:
            request = control.decode_request(value)
            self._run_command(request)
        except (PkramfsError, MachineError, OSError) as exc:
            self._last_control_error = str(exc).encode()
            raise pyfuse3.FUSEError(_command_errno(exc)) from None
        self._last_control_error = b""

    def _run_command(self, request: dict[str, Any]) -> None:
        cmd = request["cmd"]
        if cmd == "remount":
            options = request.get("options")
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise MountError("remount needs a list of option strings")
            self.fs.remount(options)
        else:
            raise MountError(f"unknown command {cmd!r}")


def _command_errno(exc: Exception) -> int:
    """The errno a failed control command answers: an FsError's or OSError's own; EBUSY while
    the machine's power state changes; EEXIST when a preserve finds its name taken, ENOMEM
    when RAM has no page for a node; else EINVAL."""
    if isinstance(exc, FsError | OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, MachineBusy):
        return errno.EBUSY
    if isinstance(exc, NodeError):
        return errno.EEXIST
    if isinstance(exc, OutOfMemory):
        return errno.ENOMEM
    return errno.EINVAL
