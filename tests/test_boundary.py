"""One request never kills the daemon: values the mount cannot report are refused up front,
and a failure inside any handler is answered EIO while the mount serves on."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from kexec_sim.machine import Machine
from pkramfs import control
from pkramfs.errors import MountError

from .conftest import BIN, Mounts

pytestmark = pytest.mark.mounted

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


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, env=env)


def path_env() -> dict[str, str]:
    """The environment with this checkout's commands first on PATH (for mount(8) helpers)."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


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


def test_the_largest_values_are_served_and_one_more_is_refused(mounts: Mounts) -> None:
    mnt = mounts.mount(f"size={LARGEST_SIZE},nr_inodes={LARGEST_NR_INODES}")
    answers(mnt)
    for option in (f"size={int(LARGEST_SIZE) + 1}", f"nr_inodes={int(LARGEST_NR_INODES) + 1}"):
        assert remount(mnt, option).returncode == 1
        answers(mnt)
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 2**64 - 4096 and st.f_files == 2**54 - 1
    status = json.loads(run(str(BIN / "pkramfs-ctl"), "status", str(mnt), "--json").stdout)
    assert (status["size_pages"], status["max_inodes"]) == (2**52 - 1, 2**54 - 1)
    result = remount(mnt, "size=1M,nr_inodes=10")
    assert result.returncode == 0, result.stderr
    result = remount(mnt, f"size={LARGEST_SIZE},nr_inodes={LARGEST_NR_INODES}")
    assert result.returncode == 0, result.stderr
    answers(mnt)
    assert os.statvfs(mnt).f_files == 2**54 - 1
