"""The patched pyfuse3 (patches/, built by scripts/build-pyfuse3): its Operations carry the new
methods, and a real mount of a throwaway filesystem (tests/pyfuse3_probe.py) gets the kernel's
FUSE_FALLOCATE, FUSE_LSEEK and FUSE_COPY_FILE_RANGE requests in them."""

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from pkramfs.daemon import missing_operations

from .conftest import wait_exit
from .pyfuse3_probe import DATA_START, FILE_NAME
from .util import run

PROBE = Path(__file__).with_name("pyfuse3_probe.py")
MOUNT_WAIT_S = 30.0
MIB = 1 << 20


def test_operations_have_the_new_methods() -> None:
    for name in ("fallocate", "lseek", "copy_file_range"):
        assert callable(getattr(pyfuse3.Operations, name, None)), name


@pytest.fixture
def probe(work_root: Path) -> Iterator[tuple[Path, Path]]:
    """The probe filesystem mounted in a subprocess: (its mountpoint, its call log)."""
    mnt = work_root / "pyfuse3-probe"
    mnt.mkdir()
    call_log = work_root / "pyfuse3-probe.calls"
    daemon = subprocess.Popen([sys.executable, str(PROBE), str(mnt), str(call_log)])
    try:
        for _ in range(int(MOUNT_WAIT_S * 10)):
            if os.path.ismount(mnt):
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(0.1)
                break  # it exited without mounting
        assert os.path.ismount(mnt), f"the probe did not mount (exit status {daemon.poll()})"
        yield mnt, call_log
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        if not wait_exit(daemon.pid):
            daemon.kill()
        daemon.wait()
        mnt.rmdir()
        call_log.unlink(missing_ok=True)


def _calls(call_log: Path) -> list[dict[str, int | str]]:
    return [json.loads(line) for line in call_log.read_text().splitlines()]


@pytest.mark.mounted
def test_fallocate_lseek_and_copy_file_range_reach_the_handlers(
    probe: tuple[Path, Path],
) -> None:
    mnt, call_log = probe
    path = mnt / FILE_NAME.decode()
    result = run("fallocate", "-l", "1M", str(path))
    assert result.returncode == 0, result.stderr
    assert os.stat(path).st_size == MIB
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == DATA_START
        assert os.lseek(fd, DATA_START, os.SEEK_HOLE) == MIB
        assert os.copy_file_range(fd, fd, 100, 0, 2 * DATA_START) == 100
    finally:
        os.close(fd)
    ino = os.stat(path).st_ino
    calls = _calls(call_log)
    assert calls[0] == {
        "op": "fallocate",
        "inode": ino,
        "fh": ino,
        "mode": 0,
        "off": 0,
        "length": MIB,
    }
    assert calls[1:3] == [
        {"op": "lseek", "inode": ino, "fh": ino, "off": 0, "whence": os.SEEK_DATA},
        {"op": "lseek", "inode": ino, "fh": ino, "off": DATA_START, "whence": os.SEEK_HOLE},
    ]
    assert calls[3] == {
        "op": "copy_file_range",
        "inode_in": ino,
        "fh_in": ino,
        "off_in": 0,
        "inode_out": ino,
        "fh_out": ino,
        "off_out": 2 * DATA_START,
        "length": 100,
        "flags": 0,
    }
    assert len(calls) == 4


def test_the_daemon_names_the_operations_a_stock_pyfuse3_lacks() -> None:
    """A venv made without scripts/setup has stock pyfuse3: the daemon logs which patched
    operations are missing (their requests get the kernel's fallbacks) instead of nothing."""

    class Stock:
        def lseek(self) -> None: ...

    assert missing_operations(Stock) == ["fallocate", "copy_file_range"]
    assert missing_operations(pyfuse3.Operations) == []  # this checkout's, patched
