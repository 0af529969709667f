"""Differential test: one random sequence of operations on kernel tmpfs and on pkramfs.

The operations are those of files and directories, fallocate in every mode, posix_fallocate on
a write-only descriptor, SEEK_DATA/SEEK_HOLE and copy_file_range. Every result or errno must
match, and so must which of mtime and ctime each
operation changed on the paths it names; afterwards the two trees must be identical: listings,
file contents, symlink targets, xattrs and stat (type, mode, size, st_blocks, nlink, uid,
gid).
"""

import ctypes
import errno
import os
import random
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .conftest import Mounts
from .util import fallocate, kernel_tmpfs_in

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
RENAME_FLAGS = (0, 1, 2)  # plain, RENAME_NOREPLACE, RENAME_EXCHANGE

# Few names, shallow: operations keep meeting the same files, so state builds up.
names = st.sampled_from(["a", "b"])
paths = st.lists(names, min_size=1, max_size=2).map("/".join)
OFFSETS = [0, 1, 100, 4095, 4096, 4097, 8191, 3 * 4096 + 7, 100_000, (1 << 21) - 3, 1 << 40]
offsets = st.sampled_from(OFFSETS)
lengths = st.sampled_from([0, 1, 10, 4096, 5000, 12_289, 70_000])
modes = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o777, 0o1777, 0o2755, 0o4755])
sizes = st.sampled_from([0, 1, 4095, 4096, 5000, 1 << 20, 1 << 45])
# 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE(|KEEP_SIZE), PUNCH_HOLE alone, COLLAPSE_RANGE
FALLOCATE_MODES = [0, 1, 3, 0x10, 0x11, 2, 0x08]
xattr_names = st.sampled_from(["user.a", "user.b", "trusted.t", "security.s", "os2.bad"])

operations = st.one_of(
    st.tuples(st.just("create"), paths, modes),
    st.tuples(
        st.just("write"),
        paths,
        offsets,
        lengths,
        st.integers(0, 9),
        st.sampled_from(["", "append", "trunc"]),
    ),
    st.tuples(st.just("read"), paths, offsets, lengths),
    st.tuples(st.just("truncate"), paths, sizes),
    st.tuples(st.just("ftruncate"), paths, sizes),
    st.tuples(st.just("mkdir"), paths, modes),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("rename"), paths, paths, st.sampled_from(RENAME_FLAGS)),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", "/nowhere", "c/a"]), paths),
    st.tuples(st.just("readlink"), paths),
    st.tuples(st.just("mkfifo"), paths),
    st.tuples(st.just("chmod"), paths, modes),
    st.tuples(
        st.just("chown"), paths, st.sampled_from([0, 1000, -1]), st.sampled_from([0, 100, -1])
    ),
    st.tuples(st.just("utime"), paths, st.integers(0, 2**40), st.integers(0, 2**40)),
    st.tuples(
        st.just("setxattr"),
        paths,
        xattr_names,
        st.binary(max_size=20),
        st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    ),
    st.tuples(st.just("getxattr"), paths, xattr_names),
    st.tuples(st.just("listxattr"), paths),
    st.tuples(st.just("removexattr"), paths, xattr_names),
    st.tuples(st.just("listdir"), paths),
    st.tuples(st.just("stat"), paths),
    st.tuples(
        st.just("fallocate"),
        paths,
        st.sampled_from(FALLOCATE_MODES),
        offsets,
        st.sampled_from([0, 1, 4096, 5000, 70_000, 3 << 20, 1 << 30]),
    ),
    st.tuples(st.just("posix_fallocate"), paths, offsets, lengths),
    st.tuples(st.just("seek"), paths, offsets, st.sampled_from([os.SEEK_DATA, os.SEEK_HOLE])),
    st.tuples(st.just("copy"), paths, paths, offsets, offsets, lengths),
)


def _stat_tuple(s: os.stat_result) -> tuple[int, ...]:
    kind, mode = stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode)
    return (kind, mode, s.st_size, s.st_blocks, s.st_nlink, s.st_uid, s.st_gid)


def apply(root: Path, op: tuple[Any, ...]) -> tuple[str, Any]:
    """Apply *op* under *root*; return ("ok", result) or ("err", errno name)."""
    kind, *args = op
    try:
        return ("ok", _apply(root, kind, args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


def _apply(root: Path, kind: str, args: list[Any]) -> Any:
    p = str(root / args[0]) if kind != "symlink" else str(root / args[1])
    if kind == "create":
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, args[1]))
    elif kind == "write":
        _, off, length, seed, how = args
        # O_NONBLOCK: opening a fifo must not wait for a peer (it has no effect on files).
        flags = os.O_WRONLY | os.O_NONBLOCK
        flags |= {"": 0, "append": os.O_APPEND, "trunc": os.O_TRUNC}[how]
        data = random.Random(seed).randbytes(length)
        fd = os.open(p, flags)
        try:
            return os.write(fd, data) if how == "append" else os.pwrite(fd, data, off)
        finally:
            os.close(fd)
    elif kind == "read":
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.pread(fd, args[2], args[1])
        finally:
            os.close(fd)
    elif kind == "truncate":
        os.truncate(p, args[1])
    elif kind == "ftruncate":
        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, args[1])
        finally:
            os.close(fd)
    elif kind == "mkdir":
        os.mkdir(p, args[1])
    elif kind == "rmdir":
        os.rmdir(p)
    elif kind == "unlink":
        os.unlink(p)
    elif kind == "rename":
        if (
            _libc.renameat2(_AT_FDCWD, p.encode(), _AT_FDCWD, str(root / args[1]).encode(), args[2])
            != 0
        ):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    elif kind == "link":
        os.link(p, str(root / args[1]), follow_symlinks=False)
    elif kind == "symlink":
        os.symlink(args[0], p)
    elif kind == "readlink":
        return os.readlink(p)
    elif kind == "mkfifo":
        os.mkfifo(p, 0o640)
    elif kind == "chmod":
        os.chmod(p, args[1], follow_symlinks=False) if not os.path.islink(p) else None
    elif kind == "chown":
        os.chown(p, args[1], args[2], follow_symlinks=False)
    elif kind == "utime":
        os.utime(p, ns=(args[1], args[2]), follow_symlinks=False)
        s = os.lstat(p)
        return (s.st_atime_ns, s.st_mtime_ns)
    elif kind == "setxattr":
        os.setxattr(p, args[1], args[2], args[3], follow_symlinks=False)
    elif kind == "getxattr":
        return os.getxattr(p, args[1], follow_symlinks=False)
    elif kind == "listxattr":
        return sorted(os.listxattr(p, follow_symlinks=False))
    elif kind == "removexattr":
        os.removexattr(p, args[1], follow_symlinks=False)
    elif kind == "listdir":
        return sorted(os.listdir(p))
    elif kind == "stat":
        return _stat_tuple(os.lstat(p))
    elif kind == "fallocate":
        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        try:
            fallocate(fd, args[1], args[2], args[3])
        finally:
            os.close(fd)
    elif kind == "posix_fallocate":  # on O_WRONLY: glibc's fallback could not read the file
        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.posix_fallocate(fd, args[1], args[2])
        finally:
            os.close(fd)
    elif kind == "seek":
        if os.path.isdir(p):
            # Not compared: the FUSE kernel answers a directory's lseek itself (0 for
            # SEEK_DATA, where tmpfs says EINVAL), no request comes (README, differences).
            return "directory"
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.lseek(fd, args[1], args[2])
        finally:
            os.close(fd)
    elif kind == "copy":
        source = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            target = os.open(str(root / args[1]), os.O_WRONLY | os.O_NONBLOCK)
            try:
                return os.copy_file_range(source, target, args[4], args[2], args[3])
            finally:
                os.close(target)
        finally:
            os.close(source)
    else:
        raise AssertionError(kind)
    return None


def _named_paths(root: Path, op: tuple[Any, ...]) -> list[str]:
    """The paths *op* names."""
    kind, *args = op
    if kind == "symlink":
        return [str(root / args[1])]
    if kind in ("rename", "link", "copy"):
        return [str(root / args[0]), str(root / args[1])]
    return [str(root / args[0])]


def _times(paths: list[str]) -> list[tuple[int, int, int] | None]:
    """(inode, mtime, ctime) of each path, None where there is nothing."""
    result: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            s = os.lstat(path)
        except OSError:
            result.append(None)
        else:
            result.append((s.st_ino, s.st_mtime_ns, s.st_ctime_ns))
    return result


def apply_and_watch_times(root: Path, op: tuple[Any, ...]) -> tuple[tuple[str, Any], list[Any]]:
    """`apply`, and for each path *op* names whether its mtime and ctime changed (or it came,
    went or now names another inode).

    Kernel tmpfs has multigrain times: an inode's own update after a stat is always visible,
    so no sleep is needed. Directories stamped from a child's ctime (create, unlink) are left
    out: there tmpfs may reuse the value they had (the operations-level tests cover them).
    """
    paths = _named_paths(root, op)
    before = _times(paths)
    result = apply(root, op)
    changes: list[Any] = []
    for old, new in zip(before, _times(paths), strict=True):
        if old is None or new is None:
            changes.append(("came" if new else "went") if old != new else "absent")
        elif old[0] != new[0]:
            changes.append("another inode")
        else:
            changes.append((old[1] != new[1], old[2] != new[2]))
    return result, changes


WINDOW = 256 * 1024


def _sample_contents(path: str, size: int) -> list[bytes]:
    """The whole file when small; else windows around every offset the operations use
    (a sparse file of a terabyte cannot be read whole)."""
    with open(path, "rb") as f:
        if size <= 4 * WINDOW:
            return [f.read()]
        starts = sorted({0, size - WINDOW, *(max(0, o - 8) for o in OFFSETS if o < size)})
        samples = []
        for start in starts:
            f.seek(start)
            samples.append(f.read(WINDOW))
        return samples


def snapshot(root: Path) -> dict[str, Any]:
    """Everything comparable about the tree under *root*."""
    tree: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, root)
            s = os.lstat(full)
            entry: dict[str, Any] = {"stat": _stat_tuple(s)}
            if stat.S_ISREG(s.st_mode):
                entry["data"] = _sample_contents(full, s.st_size)
            elif stat.S_ISLNK(s.st_mode):
                entry["target"] = os.readlink(full)
            if not stat.S_ISLNK(s.st_mode):
                entry["xattrs"] = {n: os.getxattr(full, n) for n in sorted(os.listxattr(full))}
            tree[rel] = entry
    return tree


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(operations, min_size=1, max_size=30))
@example(  # always covered: a terabyte-sparse file, O_APPEND and O_TRUNC on it
    ops=[
        ("create", "a", 0o644),
        ("write", "a", 1 << 40, 5000, 1, ""),
        ("write", "a", 0, 10, 2, "append"),
        ("read", "a", (1 << 40) - 8, 70_000),
        ("truncate", "a", 1 << 45),
        ("stat", "a"),
        ("write", "a", 4095, 12_289, 3, "trunc"),
    ]
)
@example(  # always covered: truncates to the same size, chown to -1, -1 (issue #9.5)
    ops=[
        ("create", "a", 0o644),
        ("truncate", "a", 0),
        ("ftruncate", "a", 0),
        ("write", "a", 0, 5000, 1, ""),
        ("truncate", "a", 5000),
        ("ftruncate", "a", 5000),
        ("truncate", "a", 1 << 20),
        ("truncate", "a", 0),
        ("truncate", "a", 0),
        ("chown", "a", -1, -1),
        ("chown", "a", 1000, -1),
        ("chown", "a", -1, -1),
    ]
)
@example(  # always covered: every fallocate mode, SEEK over what they leave, copies (#12)
    ops=[
        ("create", "a", 0o644),
        ("write", "a", 100, 70_000, 1, ""),
        ("fallocate", "a", 1, 4097, 3 << 20),
        ("seek", "a", 0, os.SEEK_HOLE),
        ("seek", "a", 70_000, os.SEEK_DATA),
        ("fallocate", "a", 3, 4095, 5000),
        ("fallocate", "a", 0, (1 << 21) - 3, 70_000),
        ("seek", "a", 4096, os.SEEK_DATA),
        ("seek", "a", (1 << 21) - 3, os.SEEK_DATA),
        ("fallocate", "a", 0x10, 0, 4096),
        ("fallocate", "a", 2, 0, 4096),
        ("fallocate", "a", 0, 1 << 40, 1 << 30),
        ("posix_fallocate", "a", 100, 12_289),
        ("create", "b", 0o644),
        ("copy", "a", "b", 1, 4095, 70_000),
        ("copy", "a", "a", 0, 100, 5000),
        ("copy", "a", "a", 0, 100_000, 5000),
        ("truncate", "a", 5000),
        ("truncate", "a", 5000),
        ("stat", "a"),
    ]
)
def test_same_results_as_kernel_tmpfs(
    ops: list[tuple[Any, ...]], shared_pair: tuple[Path, Path]
) -> None:
    tmpfs_base, pkram_base = shared_pair
    case = uuid.uuid4().hex[:8]
    ref, ours = tmpfs_base / case, pkram_base / case
    ref.mkdir()
    ours.mkdir()
    try:
        for op in ops:
            expected, expected_times = apply_and_watch_times(ref, op)
            got, got_times = apply_and_watch_times(ours, op)
            assert got == expected, f"{op}: tmpfs gave {expected}, pkramfs gave {got}"
            assert got_times == expected_times, (
                f"{op}: (mtime, ctime) changed: tmpfs {expected_times}, pkramfs {got_times}"
            )
        assert snapshot(ours) == snapshot(ref)
    finally:
        shutil.rmtree(ref)
        shutil.rmtree(ours)


@pytest.fixture(params=["size=256M", "size=64M,huge=always"])
def shared_pair(
    request: pytest.FixtureRequest, mounts: Mounts, work_root: Path
) -> Iterator[tuple[Path, Path]]:
    """A kernel tmpfs and a pkramfs with the same options, both empty, for one hypothesis run."""
    options: str = request.param
    with kernel_tmpfs_in(work_root, options) as tmpfs:
        yield tmpfs, mounts.mount(options)
