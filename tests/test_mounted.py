"""Real FUSE mounts in subprocesses: the CLI, mount(8), fstab, ENOSPC, several mounts, cleanup."""

import contextlib
import errno
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from kexec_sim.machine import Machine
from kexec_sim.mounts import read_mountinfo
from pkramfs import control
from pkramfs.checker import check_machine

from .conftest import Mounts, wait_exit
from .util import BIN, kernel_tmpfs_in, path_env, run


def test_write_read_md5_and_unmount_frees_pages(mounts: Mounts, machine: Machine) -> None:
    mnt = mounts.mount("pkram=t1")
    data = os.urandom(5 * 1024 * 1024 + 123)
    (mnt / "f").write_bytes(data)
    subprocess.run(["sync"], check=True)
    got = run("md5sum", str(mnt / "f")).stdout.split()[0]
    assert got == hashlib.md5(data).hexdigest()
    st = os.stat(mnt / "f")
    assert st.st_size == len(data)
    assert st.st_blocks == ((len(data) + 4095) // 4096) * 8
    owner = control.query_status(str(mnt))["owner_id"]
    assert machine.page_ownership().count_by_owner()[owner] >= len(data) // 4096
    assert mounts.unmount(mnt), "the daemon did not exit by itself after the unmount"
    assert not os.path.ismount(mnt)
    assert machine.page_ownership().count_by_owner().get(owner, 0) == 0


def test_control_file_is_hidden_and_root_only(mounts: Mounts) -> None:
    mnt = mounts.mount()
    (mnt / "visible").write_text("x")
    assert os.listdir(mnt) == ["visible"]
    st = os.stat(control.control_path(str(mnt)))
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
    status = control.query_status(str(mnt))
    assert status["pid"] > 0 and status["inodes"] == 2


def test_option_errors_mount_nothing(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mountpoint()
    for opts, named in [("bogus", "bogus"), ("size=xyz", "size"), ("huge=maybe", "huge")]:
        result = run(str(BIN / "pkramfs"), "none", str(mnt), "-o", f"machine={machine.path},{opts}")
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not os.path.ismount(mnt)
    result = run(
        str(BIN / "pkramfs"), "none", str(mnt / "missing"), "-o", f"machine={machine.path}"
    )
    assert result.returncode == 32 and "does not exist" in result.stderr


def test_mount8_fuse_type_and_umount(mounts: Mounts, machine: Machine) -> None:
    mnt = mounts.mountpoint()
    result = run(
        "mount",
        "-t",
        "fuse.pkramfs",
        "-o",
        f"machine={machine.path},size=64M",
        "none",
        str(mnt),
        env=path_env(),
    )
    mounts.track(mnt)  # before asserting: a failed assertion still unmounts
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mnt)
    (mnt / "a").write_text("hello")
    assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 64 << 20
    pid = control.query_status(str(mnt))["pid"]
    assert check_machine(machine) == []
    assert run("umount", str(mnt)).returncode == 0
    assert not os.path.ismount(mnt)
    assert wait_exit(pid), "umount did not end the daemon"


def test_mount8_pkramfs_type_helper(mounts: Mounts, machine: Machine) -> None:
    mnt = mounts.mountpoint()
    result = run(
        "mount", "-t", "pkramfs", "-o", f"machine={machine.path}", "none", str(mnt), env=path_env()
    )
    mounts.track(mnt)  # before asserting: a failed assertion still unmounts
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mnt)
    line = next(
        line for line in Path("/proc/mounts").read_text().splitlines() if f" {mnt} " in line
    )
    assert " fuse.pkramfs " in line


def test_fstab_mount_a(mounts: Mounts, machine: Machine, tmp_path: Path) -> None:
    mnt = mounts.mountpoint()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"none {mnt} fuse.pkramfs machine={machine.path},size=32M,mode=0755,pkram=fst 0 0\n"
    )
    result = run("mount", "-a", "-T", str(fstab), env=path_env())
    mounts.track(mnt)  # before asserting: a failed assertion still unmounts
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mnt)
    assert os.stat(mnt).st_mode & 0o7777 == 0o755
    assert control.query_status(str(mnt))["pkram"] == "fst"


def test_remount_ro_and_rw(mounts: Mounts) -> None:
    mnt = mounts.mount()
    (mnt / "f").write_text("before")
    result = run("mount", "-o", "remount,ro", str(mnt), env=path_env())
    assert result.returncode == 0, result.stderr
    with pytest.raises(OSError) as info:
        (mnt / "g").write_text("x")
    assert info.value.errno == errno.EROFS
    assert control.query_status(str(mnt))["read_only"] is True
    assert (mnt / "f").read_text() == "before"
    result = run("mount", "-o", "remount,rw", str(mnt), env=path_env())
    assert result.returncode == 0, result.stderr
    (mnt / "g").write_text("after")
    assert (mnt / "g").read_text() == "after"


def test_remount_ro_is_refused_while_a_removed_file_is_open(
    mounts: Mounts, kernel_tmpfs: Path
) -> None:
    """As kernel tmpfs: EBUSY (exit 32) while a file without a name is still open, read-only
    or not; the mount stays writable. Once it is closed, remount,ro goes through."""
    for mnt in (mounts.mount(), kernel_tmpfs):
        (mnt / "gone").write_bytes(b"x" * 5000)
        with open(mnt / "gone", "rb"):
            os.unlink(mnt / "gone")
            result = run("mount", "-o", "remount,ro", str(mnt), env=path_env())
            assert result.returncode == 32, (mnt, result.stderr)
            (mnt / "still").write_text("writable")
        result = run("mount", "-o", "remount,ro", str(mnt), env=path_env())
        assert result.returncode == 0, (mnt, result.stderr)
        assert run("mount", "-o", "remount,rw", str(mnt), env=path_env()).returncode == 0


def super_and_mount_flags(mnt: Path) -> tuple[str, str]:
    """(the superblock's, the mount's) ro/rw of the mount on top at *mnt* (mountinfo)."""
    ours = [m for m in read_mountinfo() if m.mountpoint == str(mnt)]
    return (ours[-1].super_options[0], ours[-1].mount_options[0]) if ours else ("", "")


def test_remount_ro_sets_the_mounts_flag_not_the_superblocks(mounts: Mounts) -> None:
    """A superblock remount has the kernel drop every cached dentry of the filesystem first
    (~0.5 s after 100,000 files, inside a kexec's blackout); the mount's own flag refuses
    writes all the same. A mount made ro (its superblock ro) still becomes writable."""
    mnt = mounts.mount()
    assert run("mount", "-o", "remount,ro", str(mnt), env=path_env()).returncode == 0
    assert super_and_mount_flags(mnt) == ("rw", "ro")
    assert os.statvfs(mnt).f_flag & os.ST_RDONLY
    assert run("mount", "-o", "remount,rw", str(mnt), env=path_env()).returncode == 0
    assert super_and_mount_flags(mnt) == ("rw", "rw")
    made_ro = mounts.mount("ro")
    assert super_and_mount_flags(made_ro) == ("ro", "ro")
    with pytest.raises(OSError) as info:
        (made_ro / "g").write_text("x")
    assert info.value.errno == errno.EROFS
    result = run("mount", "-o", "remount,rw", str(made_ro), env=path_env())
    assert result.returncode == 0, result.stderr
    assert super_and_mount_flags(made_ro) == ("rw", "rw")
    (made_ro / "g").write_text("now")
    assert (made_ro / "g").read_text() == "now"


def test_enospc_keeps_existing_data(mounts: Mounts) -> None:
    mnt = mounts.mount("size=1M")
    keep = os.urandom(512 * 1024)
    (mnt / "keep").write_bytes(keep)
    with pytest.raises(OSError) as info, open(mnt / "big", "wb") as f:
        f.write(os.urandom(1024 * 1024))
        f.flush()
    assert info.value.errno == errno.ENOSPC
    assert (mnt / "keep").read_bytes() == keep
    os.unlink(mnt / "big")
    (mnt / "again").write_bytes(b"x" * 100_000)  # space is back


def test_unlink_gives_the_space_back_at_once(mounts: Mounts) -> None:
    """Issue #9.4: on size=1M, write 900 KiB, close and unlink, 200 times: never ENOSPC, and
    statvfs shows the blocks and the inode free right after each unlink (kernel tmpfs does;
    the kernel's FORGET comes later and must not hold the pages)."""
    mnt = mounts.mount("size=1M")
    before = os.statvfs(mnt)
    data = b"u" * (900 * 1024)
    enospc, late = 0, []
    for i in range(200):
        try:
            with open(mnt / "f", "wb") as f:
                f.write(data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            enospc += 1
        os.unlink(mnt / "f")
        after = os.statvfs(mnt)
        if (after.f_bfree, after.f_ffree) != (before.f_bfree, before.f_ffree):
            late.append(i)
    assert enospc == 0, f"{enospc} of 200 writes failed with ENOSPC"
    assert late == [], f"space not back right after the unlink in iterations {late[:10]}..."


def test_an_unlinked_open_file_keeps_its_data_until_the_last_close(mounts: Mounts) -> None:
    mnt = mounts.mount("size=1M")
    free = os.statvfs(mnt).f_bfree
    data = os.urandom(600 * 1024)
    (mnt / "f").write_bytes(data)
    first, second = os.open(mnt / "f", os.O_RDONLY), os.open(mnt / "f", os.O_RDWR)
    try:
        os.unlink(mnt / "f")
        assert os.statvfs(mnt).f_bfree == free - len(data) // 4096
        assert os.pread(first, len(data) + 1, 0) == data
        os.close(first)
        assert os.statvfs(mnt).f_bfree == free - len(data) // 4096
        assert os.pread(second, len(data) + 1, 0) == data
        assert os.fstat(second).st_nlink == 0
    finally:
        with contextlib.suppress(OSError):
            os.close(first)
        os.close(second)
    assert os.statvfs(mnt).f_bfree == free  # back at the last close, before any FORGET
    (mnt / "g").write_bytes(b"g" * (900 * 1024))


def test_same_size_truncates_and_empty_chowns_stamp_times_as_tmpfs(
    mounts: Mounts, kernel_tmpfs: Path
) -> None:
    """Issue #9.5, against this kernel's tmpfs: which of mtime and ctime ftruncate and
    truncate(2) to the current size and chown(-1, -1) change. POSIX wants ftruncate to stamp
    both and chown to stamp ctime, whatever tmpfs does with truncate(2)."""
    mnt = mounts.mount()

    def ftruncate(path: Path, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    cases: dict[str, tuple[str, Callable[[Path], None]]] = {
        "ftruncate empty": ("", lambda p: ftruncate(p, 0)),
        "ftruncate data": ("data", lambda p: ftruncate(p, 4)),
        "truncate empty": ("", lambda p: os.truncate(p, 0)),
        "truncate data": ("data", lambda p: os.truncate(p, 4)),
        "chown -1 -1": ("data", lambda p: os.chown(p, -1, -1)),
    }
    changed: dict[Path, dict[str, tuple[bool, bool]]] = {}
    for root in (kernel_tmpfs, mnt):
        changed[root] = {}
        for name, (text, change) in cases.items():
            path = root / name.replace(" ", "-")
            path.write_text(text)
            before = os.stat(path)  # a stat first: tmpfs's next stamp is then a new value
            change(path)
            after = os.stat(path)
            changed[root][name] = (
                after.st_mtime_ns != before.st_mtime_ns,
                after.st_ctime_ns != before.st_ctime_ns,
            )
    assert changed[mnt] == changed[kernel_tmpfs]
    assert changed[mnt]["ftruncate empty"] == changed[mnt]["ftruncate data"] == (True, True)
    assert changed[mnt]["chown -1 -1"] == (False, True)


def test_machine_ram_exhaustion_is_enospc(mounts: Mounts, machine: Machine) -> None:
    mnt = mounts.mount("size=0")  # unlimited: only the machine's RAM bounds it
    with pytest.raises(OSError) as info, open(mnt / "huge", "wb") as f:
        chunk = b"z" * (1 << 20)
        for _ in range(machine.ram_bytes >> 20):
            f.write(chunk)
    assert info.value.errno == errno.ENOSPC
    os.unlink(mnt / "huge")


def test_two_mounts_write_concurrently(mounts: Mounts) -> None:
    a, b = mounts.mount("pkram=a"), mounts.mount("pkram=b")
    payloads = {a: os.urandom(3 << 20), b: os.urandom(3 << 20)}
    errors: list[BaseException] = []

    def writer(mnt: Path) -> None:
        try:
            for i in range(8):
                (mnt / f"f{i}").write_bytes(payloads[mnt][i * 1000 :])
                if i % 3 == 2:
                    os.unlink(mnt / f"f{i - 1}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for mnt in (a, b):
        assert (mnt / "f7").read_bytes() == payloads[mnt][7000:]
        assert not (mnt / "f1").exists()


def test_killed_daemon_pages_are_reclaimed(mounts: Mounts, machine: Machine) -> None:
    mnt = mounts.mount()
    (mnt / "f").write_bytes(b"q" * (2 << 20))
    status = control.query_status(str(mnt))
    os.kill(status["pid"], signal.SIGKILL)
    assert wait_exit(status["pid"])
    run("fusermount3", "-u", "-z", str(mnt))
    ownership = machine.page_ownership()
    assert ownership.count_by_owner().get(status["owner_id"], 0) > 0
    assert status["owner_id"] in ownership.reclaim_dead_owners()
    assert ownership.count_by_owner().get(status["owner_id"], 0) == 0


def test_a_daemon_stopped_by_sigterm_gives_its_pages_back(mounts: Mounts, machine: Machine) -> None:
    """Only a machine stopping its boot lets a daemon leave its pages (test_handover.py): the
    pages of one told to stop by anybody else go back as it exits, as at an unmount."""
    mnt = mounts.mount()
    (mnt / "f").write_bytes(b"q" * (2 << 20))
    status = control.query_status(str(mnt))
    os.kill(status["pid"], signal.SIGTERM)
    assert wait_exit(status["pid"])
    assert not os.path.ismount(mnt)
    assert status["owner_id"] not in machine.page_ownership().owners()
    assert machine.page_ownership().count_by_owner().get(status["owner_id"], 0) == 0


def test_statfs_reflects_options(mounts: Mounts) -> None:
    mnt = mounts.mount("size=8M,nr_inodes=100")
    st = os.statvfs(mnt)
    assert st.f_bsize == 4096 and st.f_blocks == 2048 and st.f_files == 100
    assert st.f_namemax == 255
    (mnt / "f").write_bytes(b"x" * 8192)
    st2 = os.statvfs(mnt)
    assert st2.f_bfree == st.f_bfree - 2 and st2.f_ffree == st.f_ffree - 1


def test_mmap_shared_write_and_read(mounts: Mounts) -> None:
    mnt = mounts.mount()
    path = mnt / "m"
    path.write_bytes(bytes(8192))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
        m[4000:4010] = b"0123456789"
        m.flush()
    subprocess.run(["sync"], check=True)
    assert path.read_bytes()[4000:4010] == b"0123456789"


def test_other_users_get_tmpfs_permissions(mounts: Mounts) -> None:
    mnt = mounts.mount()
    (mnt / "open").mkdir(mode=0o777)
    os.chmod(mnt / "open", 0o777)
    (mnt / "closed").mkdir(mode=0o700)
    code = (
        "import os, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"open({str(mnt / 'open' / 'mine')!r}, 'w').write('x')\n"
        f"try:\n    os.listdir({str(mnt / 'closed')!r})\nexcept PermissionError:\n"
        "    sys.exit(0)\nsys.exit(3)\n"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    st = os.stat(mnt / "open" / "mine")
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_control_file_refuses_other_users(mounts: Mounts) -> None:
    """Only root may query the daemon's status or send it a command; the kernel checks 0600."""
    mnt = mounts.mount()
    ctrl = control.control_path(str(mnt))
    command = msgpack.packb({"cmd": "remount", "options": ["ro"]}, use_bin_type=True)
    code = (
        "import errno, os\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"os.stat({ctrl!r})  # visible: only its mode keeps this user out\n"
        "def attempt(call, *args):\n"
        "    try:\n"
        "        call(*args)\n"
        "    except OSError as exc:\n"
        "        return errno.errorcode.get(exc.errno, str(exc.errno))\n"
        "    return 'allowed'\n"
        f"print(attempt(os.getxattr, {ctrl!r}, {control.STATUS_XATTR.decode()!r}))\n"
        f"print(attempt(os.setxattr, {ctrl!r}, {control.COMMAND_XATTR.decode()!r}, {command!r}))\n"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    status_outcome, command_outcome = result.stdout.split()
    assert status_outcome in ("EACCES", "EPERM"), f"status query as nobody: {status_outcome}"
    assert command_outcome in ("EACCES", "EPERM"), f"command as nobody: {command_outcome}"
    assert control.query_status(str(mnt))["read_only"] is False  # the command had no effect
    (mnt / "still-writable").write_text("x")
    control.send_command(str(mnt), "remount", options=["size=16M"])  # root may
    assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 16 << 20


def test_status_counts_the_requests_of_every_handler(mounts: Mounts) -> None:
    """What one operation costs in round trips: `pkramfs-ctl status` counts each handler."""
    mnt = mounts.mount()
    before = control.query_status(str(mnt))["requests"]
    fd = os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x")
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    after = control.query_status(str(mnt))["requests"]
    grew = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert grew["create"] == 1 and grew["write"] == 1 and grew["release"] == 1
    assert grew["lookup"] >= 2  # "new" before its create, and "missing"


def test_a_missing_name_is_cached_and_every_way_of_making_it_is_seen(mounts: Mounts) -> None:
    """A lookup that finds nothing is answered with a negative entry the kernel keeps: asking
    again costs no request. Each way a name can appear goes through the kernel, which drops
    its negative entry: create (with and without O_EXCL), mkdir, symlink, link, rename,
    mknod."""
    mnt = mounts.mount()

    def lookups() -> int:
        counts: dict[str, int] = control.query_status(str(mnt))["requests"]
        return counts.get("lookup", 0)

    (mnt / "src").write_bytes(b"s")
    names = ["creat", "excl", "dir", "sym", "hard", "moved", "fifo"]
    query_cost = -lookups() + lookups()  # a status query looks its own name up
    for name in names:
        assert not os.path.lexists(mnt / name)
    first = lookups()
    for _ in range(3):
        for name in names:
            assert not os.path.lexists(mnt / name)
    assert lookups() - first == query_cost  # asked again: the kernel knew
    with open(mnt / "creat", "a"):
        pass
    os.close(os.open(mnt / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    os.mkdir(mnt / "dir")
    os.symlink("src", mnt / "sym")
    os.link(mnt / "src", mnt / "hard")
    (mnt / "other").write_bytes(b"o")
    os.rename(mnt / "other", mnt / "moved")
    os.mkfifo(mnt / "fifo")
    assert sorted(os.listdir(mnt)) == sorted([*names, "src"])
    assert (mnt / "hard").read_bytes() == b"s" and os.readlink(mnt / "sym") == "src"
    assert (mnt / "moved").read_bytes() == b"o" and not os.path.lexists(mnt / "other")
    for name in names:
        assert os.path.lexists(mnt / name)


def test_write_only_handles_spare_the_capability_query(mounts: Mounts) -> None:
    """The kernel asks for security.capability before each cached write; O_WRONLY avoids it."""
    mnt = mounts.mount()
    path = mnt / "f"
    path.write_bytes(bytes(1 << 20))

    def queries_for(flags: int) -> tuple[int, int]:
        before = control.query_status(str(mnt))["requests"]
        fd = os.open(path, flags)
        try:
            for i in range(64):
                os.pwrite(fd, b"w" * 4096, i * 8192)
        finally:
            os.close(fd)
        after = control.query_status(str(mnt))["requests"]
        return (
            after["capability_query"] - before["capability_query"],
            after["write"] - before["write"],
        )

    wronly_queries, wronly_writes = queries_for(os.O_WRONLY)
    rdwr_queries, rdwr_writes = queries_for(os.O_RDWR)
    assert wronly_writes == rdwr_writes == 64
    assert wronly_queries == 0
    assert rdwr_queries >= 64  # the kernel's behaviour this works around, still there
    assert path.read_bytes()[:4096] == b"w" * 4096


def test_huge_always_round_trips(mounts: Mounts) -> None:
    mnt = mounts.mount("huge=always")
    data = os.urandom(5 * (2 << 20) + 777)
    (mnt / "h").write_bytes(data)
    assert (mnt / "h").read_bytes() == data
    st = os.stat(mnt / "h")
    assert st.st_blocks == 6 * (2 << 20) // 512  # whole 2 MiB pages, as tmpfs huge=always


def test_size_as_a_percentage_of_ram(mounts: Mounts, machine: Machine) -> None:
    mnt = mounts.mount("size=25%")
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == machine.ram_bytes // 4


def test_direct_writes_keep_cached_readers_coherent(mounts: Mounts) -> None:
    """A write through an O_WRONLY (direct I/O) handle is seen by a reader whose pages were
    cached, and through a shared mapping."""
    mnt = mounts.mount()
    path = mnt / "c"
    path.write_bytes(b"a" * 8192)
    with open(path, "rb") as reader, open(path, "r+b") as rw, mmap.mmap(rw.fileno(), 8192) as m:
        assert reader.read() == b"a" * 8192 and m[:1] == b"a"  # now cached
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"b" * 4096, 4096)
        os.close(fd)
        reader.seek(0)
        assert reader.read() == b"a" * 4096 + b"b" * 4096
        assert m[4096:4100] == b"bbbb"


SPARSE_FILES: dict[str, tuple[list[tuple[int, bytes]], int | None]] = {
    "hole_then_byte": ([(1 << 20, b"x")], None),
    "data_then_hole": ([(0, b"y" * 5000)], 3 << 20),
    "scattered": ([(8192, b"a" * 10), (3 << 20, b"b" * 4096), ((5 << 20) | 100, b"c")], None),
    "only_holes": ([], 1 << 20),
    "partial_tail": ([(0, b"d" * (3 * 4096 + 7))], None),
}


def seek_results(root: Path) -> dict[tuple[str, int, int], int | str]:
    """lseek(SEEK_DATA) and lseek(SEEK_HOLE) of each SPARSE_FILES file at offsets around its
    pages, holes and end: the offset, or the errno's name."""
    results: dict[tuple[str, int, int], int | str] = {}
    for name, (writes, size) in SPARSE_FILES.items():
        fd = os.open(root / name, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
        try:
            for off, data in writes:
                os.pwrite(fd, data, off)
            if size is not None:
                os.ftruncate(fd, size)
            end = os.fstat(fd).st_size
            marks = {0, 1, 4095, 4096, 8191, 8192, 8200, 12288, 1 << 20, (1 << 20) + 1}
            marks |= {(3 << 20) - 1, 3 << 20, (3 << 20) + 4096, 5 << 20, (5 << 20) + 101}
            for off in sorted(marks | {end - 1, end, end + 1}):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    try:
                        results[(name, off, whence)] = os.lseek(fd, off, whence)
                    except OSError as exc:
                        results[(name, off, whence)] = errno.errorcode[exc.errno or 0]
        finally:
            os.close(fd)
    return results


@pytest.mark.parametrize("huge", ["never", "always"])
def test_seek_data_and_hole_as_on_tmpfs(mounts: Mounts, work_root: Path, huge: str) -> None:
    """SEEK_DATA and SEEK_HOLE answer from the page index exactly as kernel tmpfs does: holes
    are holes, a page written is data (a huge page: all 2 MiB of it), the end is a hole, ENXIO
    from the end on (issue #12; fallocated pages: test_fallocate.py)."""
    with kernel_tmpfs_in(work_root, f"size=256M,huge={huge}") as tmpfs:
        theirs = seek_results(tmpfs)
    ours = seek_results(mounts.mount(f"huge={huge}"))
    assert {k: (theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]} == {}
