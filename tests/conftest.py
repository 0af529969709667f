"""Shared fixtures: private machines in /dev/shm, real mounts with guaranteed cleanup.

Every mount a test starts is torn down in ``finally`` (lazy unmount, then terminate, then kill),
and the ownership checker runs over the machine after each test that mounted something.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kexec_sim.machine import Machine
from pkramfs.checker import check_machine
from pkramfs.mounts import pkramfs_mounts

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHM_BASE = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
TEST_RAM = "256M"


def _run(*cmd: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def work_root() -> Iterator[Path]:
    """A private directory for this session's machines and mountpoints, wiped at the end."""
    given = os.environ.get("PKRAMFS_TEST_ROOT")  # scripts/test names it, to clean up after us
    root = Path(given) if given else SHM_BASE / f"pkramfs-tests-{os.getpid()}"
    root.mkdir(mode=0o755, exist_ok=True)  # 0755: tests as other users must reach the mounts
    try:
        yield root
    finally:
        _unmount_everything_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _unmount_everything_under(root: Path) -> None:
    for entry in pkramfs_mounts():
        if entry.mountpoint.startswith(str(root)):
            _run("fusermount3", "-u", "-z", entry.mountpoint, check=False)
    for machine_json in root.glob("*/machine.json"):
        _kill_owners(machine_json.parent)


def _kill_owners(machine_dir: Path) -> None:
    """SIGKILL every process still registered as a page owner of the machine (not ourselves)."""
    with contextlib.suppress(Exception):  # best effort: the machine may be half made
        for info in Machine.open(str(machine_dir), create=False).page_ownership().owners().values():
            if info.pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(info.pid, signal.SIGKILL)


@pytest.fixture
def machine(work_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    """A fresh private machine (256 MiB RAM), also selected by KEXEC_SIM_MACHINE."""
    path = work_root / f"machine-{uuid.uuid4().hex[:8]}"
    result = _run(str(BIN / "kexec-sim"), "--machine", str(path), "init", "--ram", TEST_RAM)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("KEXEC_SIM_MACHINE", str(path))
    yield Machine.open(str(path), create=False)


class Mounts:
    """Starts pkramfs mounts on one machine and tears every one of them down."""

    def __init__(self, machine: Machine, root: Path) -> None:
        self.machine = machine
        self.root = root
        self.mountpoints: list[Path] = []

    def mountpoint(self) -> Path:
        """Return a new empty directory to mount on."""
        path = self.root / f"mnt-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def mount(self, options: str = "", mountpoint: Path | None = None) -> Path:
        """Mount a pkramfs with ``-o machine=...,OPTIONS`` through the CLI; return where."""
        mnt = mountpoint or self.mountpoint()
        opts = f"machine={self.machine.path}" + (f",{options}" if options else "")
        result = _run(str(BIN / "pkramfs"), "none", str(mnt), "-o", opts, check=False)
        assert result.returncode == 0, f"mount failed: {result.stderr}"
        assert os.path.ismount(mnt)
        self.mountpoints.append(mnt)
        return mnt

    def track(self, mnt: Path) -> None:
        """Tear down *mnt* too (mounted some other way, e.g. by mount(8))."""
        self.mountpoints.append(mnt)

    def unmount(self, mnt: Path) -> None:
        """Unmount *mnt* and wait for its daemon to exit."""
        pid = _daemon_pid(mnt)
        _run("fusermount3", "-u", str(mnt), check=False)
        if os.path.ismount(mnt):
            _run("fusermount3", "-u", "-z", str(mnt), check=False)
        if pid:
            _wait_gone(pid)

    def teardown(self) -> None:
        """Unmount everything: lazily, then terminate, then kill the daemons."""
        for mnt in self.mountpoints:
            if os.path.ismount(mnt):
                self.unmount(mnt)


def _daemon_pid(mnt: Path) -> int | None:
    from pkramfs import control
    from pkramfs.errors import MountError

    try:
        return int(control.query_status(str(mnt))["pid"])
    except (MountError, OSError, KeyError):
        return None


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    sig = signal.SIGTERM
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            sig = signal.SIGKILL
            deadline = time.monotonic() + 5
        time.sleep(0.02)


@pytest.fixture
def mounts(machine: Machine, work_root: Path) -> Iterator[Mounts]:
    """Mount factory on the test's machine; checks page ownership, then unmounts everything."""
    factory = Mounts(machine, work_root)
    try:
        yield factory
        problems = check_machine(machine)
        assert problems == [], "ownership checker: " + "; ".join(problems)
    finally:
        factory.teardown()
    # After every daemon is gone, no page may remain owned by anybody.
    after = machine.page_ownership()
    after.reclaim_dead_owners()
    leftover = {k: v for k, v in after.count_by_owner().items() if k > 0}
    assert leftover == {}, f"pages still owned after unmount: {leftover}"


@pytest.fixture
def kernel_tmpfs(work_root: Path) -> Iterator[Path]:
    """A kernel tmpfs mounted for comparison."""
    path = work_root / f"tmpfs-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "size=256M", "tmpfs", str(path))
    try:
        yield path
    finally:
        _run("umount", "-l", str(path), check=False)
