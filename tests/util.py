"""Helpers the test modules share: commands (this checkout's ``kexec-sim``, ``pkramfs-ctl``
and mount(8) helpers), request contexts for calling handlers directly, bare RAM files, trees
and their comparison (file contents by md5, metadata by snapshot)."""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyfuse3

from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.machine import Machine
from kexec_sim.ram import Ram

REPO = Path(__file__).resolve().parent.parent
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
BIN = Path(sys.executable).parent  # this checkout's commands (the virtualenv's bin)
COMMAND_TIMEOUT_S = 120.0
SMALL_RAM_BYTES = 64 << 20  # the small_machine fixture's RAM

Snapshot = dict[str, tuple[object, ...]]


def run(
    *cmd: str,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run *cmd* (in *cwd*), capturing its output as text; never raises for an exit code."""
    return subprocess.run(
        list(cmd), capture_output=True, text=True, check=False, timeout=timeout, env=env, cwd=cwd
    )


def path_env() -> dict[str, str]:
    """The environment with this checkout's commands first on PATH (for mount(8) helpers)."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


@contextlib.contextmanager
def kernel_tmpfs_in(root: Path, options: str) -> Iterator[Path]:
    """A kernel tmpfs mounted with ``-o OPTIONS`` on a new directory of *root*, to compare
    with; lazily unmounted afterwards."""
    path = root / f"tmpfs-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    result = run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
    assert result.returncode == 0, result.stderr
    try:
        yield path
    finally:
        run("umount", "-l", str(path), timeout=30)


def kexec_sim(
    machine: Machine, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "kexec-sim"), "--machine", str(machine.path), *args, env=env)


def ctl(machine: Machine, *args: str) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "pkramfs-ctl"), *args, "--machine", str(machine.path))


def ctl_status(mnt: Path) -> dict[str, Any]:
    """``pkramfs-ctl status MNT --json``, which must succeed."""
    result = run(str(BIN / "pkramfs-ctl"), "status", str(mnt), "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def preserve(mnt: Path) -> None:
    result = run("mount", "-o", "remount,preserve,ro", str(mnt))
    assert result.returncode == 0, result.stderr


# `kexec-sim load` arguments that put the next kernel at 2-6 MiB, over the first usable pages,
# where a fresh mount's first file lands: preserving it then relocates those pages.
OVER_FIRST_PAGES = ("--addr", hex(2 << 20), "--image-size", "4M")


def write_over_first_pages(mnt: Path) -> bytes:
    """Write a 6 MiB file ``f`` on the fresh mount *mnt*: its pages are the first usable ones
    (from 1 MiB, after the super block), under the kernel `OVER_FIRST_PAGES` loads. Return it."""
    data = os.urandom(6 << 20)
    (mnt / "f").write_bytes(data)
    return data


def load_next_kernel(machine: Machine, extra: tuple[str, ...] = ()) -> None:
    """Load the next kernel with pkram= this boot's super block (and *extra* arguments)."""
    sb = (machine.path / "sys/kernel/pkram").read_text().strip()
    loaded = kexec_sim(machine, "load", "--append", f"pkram={sb}", *extra)
    assert loaded.returncode == 0, loaded.stderr


def kexec(machine: Machine, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Load the next kernel with pkram= this boot's super block and exec it."""
    load_next_kernel(machine, extra)
    result = kexec_sim(machine, "exec")
    assert result.returncode == 0, result.stderr
    return result


def make_ram(directory: Path, nr_pages: int) -> Ram:
    """A bare RAM file of *nr_pages* in *directory*, mapped (for tests of the RAM formats)."""
    path = directory / "RAM"
    with open(path, "wb") as f:
        f.truncate(nr_pages * PAGE_SIZE)
    return Ram(path, nr_pages)


@dataclass(frozen=True)
class Caller:
    """Who sent a FUSE request: a stand-in for pyfuse3's RequestContext, whose fields (a cdef
    class's) cannot be set from Python. The handlers only read these four."""

    uid: int
    gid: int
    pid: int
    umask: int = 0o022


ROOT = pyfuse3.RequestContext()  # pyfuse3's own, as made from Python: uid, gid, pid, umask 0


def caller(uid: int, gid: int | None = None) -> pyfuse3.RequestContext:
    """The request context of user *uid* (group *gid*, by default the same) in this process."""
    return cast(pyfuse3.RequestContext, Caller(uid, uid if gid is None else gid, os.getpid()))


def md5(path: Path) -> str:
    """The md5 of the file at *path*, as md5sum prints it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def snapshot(root: Path) -> Snapshot:
    """Every name below *root*: inode, type, mode, owners, size, links, rdev, times, xattrs,
    symlink target. Read before any content (reading changes atime)."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = os.lstat(path)
            xattrs = (
                {
                    x: os.getxattr(path, x, follow_symlinks=False)
                    for x in sorted(os.listxattr(path, follow_symlinks=False))
                }
                if not stat.S_ISLNK(st.st_mode)
                else {}
            )
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            result[str(path.relative_to(root))] = (
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink,
                st.st_rdev,
                st.st_atime_ns,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_blocks,
                xattrs,
                target,
            )
    return result


def sampled_md5(path: Path) -> str:
    """md5 of a file, or for one over 64 MiB (sparse here) of 64 KiB at 32 spread offsets
    and the last 64 KiB: the 20 TiB sparse file is not read whole."""
    size = path.stat().st_size
    if size <= 64 << 20:
        return md5(path)
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for offset in [size * i // 32 for i in range(32)] + [4096 * 3, max(0, size - 65536)]:
            f.seek(offset)
            digest.update(f.read(65536))
    return digest.hexdigest()


def contents(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sampled_md5(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def make_tree(root: Path, seed: int = 0) -> None:
    """Every file type, hard links, xattrs, set times, sparse and big files."""
    rand = os.urandom
    (root / "dir/sub/deeper").mkdir(parents=True)
    (root / "dir/sub/deeper/file").write_bytes(rand(10_000 + seed))
    (root / "empty").touch()
    (root / "big").write_bytes(rand(3 * 1024 * 1024 + 123))
    with open(root / "sparse", "wb") as f:
        f.seek(5 << 30)
        f.write(b"far away")
        f.seek(4096 * 3)
        f.write(rand(5000))
    with open(root / "sparse-past-16TiB", "wb") as f:
        f.seek(20 << 40)
        f.write(b"beyond 2**32 pages")
    os.link(root / "big", root / "dir/hardlink-to-big")
    os.link(root / "big", root / "dir/sub/another-link")
    os.symlink("../big", root / "dir/symlink")
    os.symlink("/nowhere/at/all", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(root / "blockdev", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.setxattr(root / "big", "user.color", b"blue")
    os.setxattr(root / "dir", "trusted.secret", b"\x00\x01\x02" * 50)
    os.setxattr(root / "empty", "security.label", b"system_u:object_r")
    os.chown(root / "dir/sub", 1234, 5678)
    os.chmod(root / "dir/sub/deeper/file", 0o4751)
    os.utime(root / "empty", ns=(1_000_000_123, 2_000_000_456))
    os.utime(root / "dir/sub/deeper", ns=(123_456_789_012_345_678, 987_654_321))


def hibernate(machine: Machine, image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return kexec_sim(machine, "hibernate", "--image", str(image), *args)


def resume(
    machine: Machine, *images: Path, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    chain = [a for image in images for a in ("--image", str(image))]
    return kexec_sim(machine, "resume", *chain, *args)


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def powered(machine: Machine) -> bool:
    return Machine.open(machine.path, create=False).powered


def boot(machine: Machine) -> None:
    if not powered(machine):
        assert kexec_sim(machine, "boot").returncode == 0


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any *mode* (Python has only posix_fallocate); OSError on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def seek_map(fd: int) -> list[tuple[int, int]]:
    """The (data start, hole start) pairs a SEEK_DATA/SEEK_HOLE walk of *fd* finds, in order."""
    pairs: list[tuple[int, int]] = []
    offset = 0
    while True:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return pairs
            raise
        offset = os.lseek(fd, data, os.SEEK_HOLE)
        pairs.append((data, offset))
