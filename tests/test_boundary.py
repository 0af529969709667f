"""One request never kills the daemon: values the mount cannot report are refused up front,
and a failure inside any handler is answered EIO while the mount serves on."""

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kexec_sim.machine import Machine
from pkramfs import control
from pkramfs.errors import MountError
from pkramfs.operations import HANDLER_FAULT_ENV

from .conftest import Mounts
from .util import BIN, ctl_status, path_env, run

LARGEST_SIZE = "18446744073709547520"  # 2^64 bytes less one page
LARGEST_NR_INODES = "18014398509481983"  # 2^54 - 1, as kernel tmpfs
TOO_LARGE = [
    "size=99999999999999999999999",
    "size=18446744073709547521",  # the largest size and a byte: one page more
    "size=16E",
    "size=10000000000000%",  # of the test machine's 256 MiB: past 2^64 bytes
    "nr_inodes=99999999999999999999999",
    "nr_inodes=18446744073709551616",
    "nr_inodes=18014398509481984",  # the largest and one
]


def remount(mnt: Path, options: str) -> subprocess.CompletedProcess[str]:
    """``mount -o remount,OPTIONS MNT`` through this checkout's helper, as mount(8) runs it."""
    return run(str(BIN / "pkramfs"), "none", str(mnt), "-o", f"remount,{options}")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused command printed (asserting there is exactly one)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def answers(mnt: Path) -> None:
    """Assert the mount answers statfs (df), its status query and a write."""
    assert run("df", str(mnt)).returncode == 0
    assert run("df", "-i", str(mnt)).returncode == 0
    status = run(str(BIN / "pkramfs-ctl"), "status", str(mnt))
    assert status.returncode == 0, status.stderr
    (mnt / "probe").write_bytes(b"probe")
    (mnt / "probe").unlink()


@pytest.mark.parametrize("option", TOO_LARGE)
def test_a_mount_with_a_value_it_cannot_report_is_refused(
    machine: Machine, mounts: Mounts, option: str
) -> None:
    mnt = mounts.mountpoint()
    mounts.track(mnt)
    result = run(str(BIN / "pkramfs"), "none", str(mnt), "-o", f"machine={machine.path},{option}")
    assert result.returncode == 1
    assert option.split("=")[0] in one_line(result)
    assert not os.path.ismount(mnt)


def test_a_remount_with_a_value_it_cannot_report_is_refused_and_changes_nothing(
    mounts: Mounts,
) -> None:
    mnt = mounts.mount("size=8M,nr_inodes=100")
    (mnt / "f").write_bytes(b"kept" * 1000)
    before = os.statvfs(mnt)
    for option in TOO_LARGE:
        key = option.split("=")[0]
        result = remount(mnt, option)
        assert result.returncode == 1  # a bad option, as for any other remount option
        assert key in one_line(result)
        # mount(8) refuses it too (its helper may be another checkout's, which leaves the
        # refusal to the daemon: exit 32), and so does the daemon, whoever sends the command.
        result = run("mount", "-o", f"remount,{option}", str(mnt), env=path_env())
        assert result.returncode != 0 and key in one_line(result)
        with pytest.raises(MountError, match=key):
            control.send_command(str(mnt), "remount", options=[option])
        answers(mnt)
    after = os.statvfs(mnt)
    assert (after.f_blocks, after.f_files) == (before.f_blocks, before.f_files) == (2048, 100)
    assert (mnt / "f").read_bytes() == b"kept" * 1000


def test_a_remount_refused_by_one_option_applies_none(mounts: Mounts) -> None:
    mnt = mounts.mount("size=8M,nr_inodes=100")
    (mnt / "f").write_bytes(b"kept" * 1000)
    result = remount(mnt, "size=16M,nr_inodes=1")  # two inodes are in use
    assert result.returncode == 32 and "nr_inodes" in one_line(result)
    st = os.statvfs(mnt)
    assert (st.f_blocks, st.f_files) == (2048, 100)


def test_the_largest_values_are_served_and_one_more_is_refused(mounts: Mounts) -> None:
    mnt = mounts.mount(f"size={LARGEST_SIZE},nr_inodes={LARGEST_NR_INODES}")
    answers(mnt)
    for option in (f"size={int(LARGEST_SIZE) + 1}", f"nr_inodes={int(LARGEST_NR_INODES) + 1}"):
        assert remount(mnt, option).returncode == 1
        answers(mnt)
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 2**64 - 4096 and st.f_files == 2**54 - 1
    status = ctl_status(mnt)
    assert (status["size_pages"], status["max_inodes"]) == (2**52 - 1, 2**54 - 1)
    result = remount(mnt, "size=1M,nr_inodes=10")
    assert result.returncode == 0, result.stderr
    result = remount(mnt, f"size={LARGEST_SIZE},nr_inodes={LARGEST_NR_INODES}")
    assert result.returncode == 0, result.stderr
    answers(mnt)
    assert os.statvfs(mnt).f_files == 2**54 - 1


FILES = 6  # written one write request each (O_WRONLY handles are direct I/O), before a fault


def write_files(mnt: Path) -> dict[str, str]:
    """Write FILES files of random bytes, one write(2) each; return their md5 by name."""
    sums = {}
    for i in range(FILES):
        data = os.urandom(1000 + 9000 * i)
        fd = os.open(mnt / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.write(fd, data) == len(data)
        finally:
            os.close(fd)
        sums[f"f{i}"] = hashlib.md5(data).hexdigest()
    return sums


def md5s(mnt: Path) -> dict[str, str]:
    """The md5 of every regular file at the top of *mnt*, by name."""
    return {
        path.name: hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(mnt.iterdir())
        if path.is_file()
    }


def write_one_more(mnt: Path) -> None:
    fd = os.open(mnt / "one-more", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"one more")
    finally:
        os.close(fd)


def unlink_a_file(mnt: Path) -> None:
    """Make the kernel send a FORGET: an unlinked file nobody holds leaves its inode cache."""
    (mnt / "victim").write_bytes(b"")
    (mnt / "victim").unlink()


# (handler, calls that pass before the fault, what triggers it, whether the caller sees EIO)
FAULTS: list[tuple[str, int, Callable[[Path], object], bool]] = [
    ("statfs", 0, os.statvfs, True),
    ("readdir", 0, os.listdir, True),
    ("write", FILES, write_one_more, True),
    ("forget", 0, unlink_a_file, False),  # no reply: nothing to see but the log
]


@pytest.mark.parametrize(("handler", "skip", "trigger", "eio"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_handler_that_raises_is_answered_eio_and_the_mount_serves_on(
    mounts: Mounts,
    monkeypatch: pytest.MonkeyPatch,
    handler: str,
    skip: int,
    trigger: Callable[[Path], object],
    eio: bool,
) -> None:
    monkeypatch.setenv(HANDLER_FAULT_ENV, f"{handler}:{skip}:1")
    mnt = mounts.mount()
    mounts.expect_log_error(rf" ERROR {handler} failed")
    pid = control.query_status(str(mnt))["pid"]
    sums = write_files(mnt)
    if eio:
        with pytest.raises(OSError) as info:
            trigger(mnt)
        assert info.value.errno == errno.EIO
    else:
        trigger(mnt)
    trigger(mnt)  # the fault was once: the same request now works
    assert control.query_status(str(mnt))["pid"] == pid
    answers(mnt)
    assert {name: md5 for name, md5 in md5s(mnt).items() if name != "one-more"} == sums


def test_a_failure_past_the_guard_is_logged_and_the_daemon_serves_on(
    mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that reaches pyfuse3's loop itself (here: raised in forget, outside the
    guard) ends that loop; the daemon logs it and serves on."""
    monkeypatch.setenv(HANDLER_FAULT_ENV, "forget:0:1:unguarded")
    mnt = mounts.mount()
    mounts.expect_log_error(r" ERROR a request failed outside the handlers' guard")
    pid = control.query_status(str(mnt))["pid"]
    sums = write_files(mnt)
    unlink_a_file(mnt)
    unlink_a_file(mnt)
    assert control.query_status(str(mnt))["pid"] == pid
    answers(mnt)
    assert md5s(mnt) == sums
