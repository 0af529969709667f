"""Shared fixtures: private machines in /dev/shm, real mounts with guaranteed cleanup.

Every mount a test starts is torn down in ``finally`` (unmount, lazily if need be, then wait
for the daemon, escalating to SIGTERM and SIGKILL). Teardown never talks to a daemon: it finds
daemons in the machine's owner registry and mounts in /proc/self/mounts, so a hung daemon
cannot block it. After each test that mounted something, the ownership checker runs over the
machine and the daemons' logs must hold no error (but those the test declared with
``Mounts.expect_log_error``, which must then appear). A test that outlives pytest-timeout's limit
has this session's daemons killed, since a request to a hung daemon ignores SIGALRM.
"""

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import pytest_timeout

from kexec_sim.machine import Machine
from kexec_sim.mounts import read_mounts
from kexec_sim.owners import OwnerInfo, OwnerRegistry
from kexec_sim.process import process_start_time
from pkramfs.checker import check_machine
from pkramfs.filesystem import PkramFilesystem
from pkramfs.operations import Operations
from pkramfs.options import parse_options, split_option_list

from .util import BIN, SMALL_RAM_BYTES, kernel_tmpfs_in, run

SHM_BASE = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
TEST_RAM = "256M"
CLEANUP_TIMEOUT_S = 30.0
LOG_ALARMS = ("ERROR", "CRITICAL", "Traceback")
LOG_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ ")  # mount_cli's format
KILL_AFTER_TIMEOUT_S = 5.0
EXIT_AFTER_TIMEOUT_S = 65.0
_WATCHDOG = pytest.StashKey[list[threading.Timer]]()


def _try(*cmd: str) -> bool:
    """Run a cleanup command with a timeout; return whether it succeeded (never raise)."""
    try:
        return run(*cmd, timeout=CLEANUP_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _mountpoints() -> list[str]:
    """Return every mountpoint of this mount namespace, in mount order (no syscall on them)."""
    return [entry.mountpoint for entry in read_mounts()]


def _canonical(path: Path) -> str:
    """*path* with its parent resolved, the way the daemon names it; never stats *path* itself."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def _is_mounted(path: Path) -> bool:
    """Whether something is mounted on *path* (from /proc, without touching the mount)."""
    return _canonical(path) in _mountpoints()


def _machine_dirs(root: Path) -> list[Path]:
    """The machines in *root*, found without looking into a mount (a hung one would block)."""
    base = os.path.realpath(root)
    mounted = set(_mountpoints())
    try:
        paths = [os.path.join(base, name) for name in os.listdir(base)]
    except OSError:
        return []
    return [
        Path(path)
        for path in paths
        if path not in mounted and os.path.isfile(os.path.join(path, "machine.json"))
    ]


def _registered_owners(machine_dir: Path) -> list[OwnerInfo]:
    """The owners in the machine's registry (``boot/owners.json``), read without the lock.

    The registry is replaced atomically, so a lock-free read is consistent, and a daemon hung
    while holding ``boot/lock`` cannot block the teardown. Empty if the machine is half made.
    """
    try:
        registry = OwnerRegistry.load(machine_dir / "boot" / "owners.json")
    except Exception:  # best effort: missing, corrupt or half-written machine
        return []
    return [info for info in registry.owners.values() if info.pid != os.getpid()]


def daemon_owners(machine: Machine, mnt: Path) -> list[OwnerInfo]:
    """The live registered owners serving *mnt* (named ``pkramfs:{pkram or '-'}:{mnt}``)."""
    suffix = ":" + _canonical(mnt)
    return [
        info
        for info in _registered_owners(machine.path)
        if info.name.startswith("pkramfs:")
        and info.name.endswith(suffix)
        and process_start_time(info.pid) == info.pid_start_time
    ]


def wait_exit(pid: int, start_time: int | None = None, timeout_s: float = 10.0) -> bool:
    """Wait for process *pid* to exit; return True if it did so by itself within *timeout_s*.

    Otherwise send SIGTERM, then SIGKILL, 5 s apart, and return False. *start_time* (from
    /proc, as in the owner registry) guards against a reused pid; a zombie counts as gone.
    """
    if start_time is None:
        start_time = process_start_time(pid)
        if start_time is None:
            return True
    for sig, wait_s in ((None, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while process_start_time(pid) == start_time:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return sig is None
    return False


def _session_root() -> Path:
    """The directory of this session's machines and mounts (see ``work_root``)."""
    given = os.environ.get("PKRAMFS_TEST_ROOT")  # scripts/test names it, to clean up after us
    return Path(given) if given else SHM_BASE / f"pkramfs-tests-{os.getpid()}"


MOUNTING_FIXTURES = frozenset(["mounts", "kernel_tmpfs"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``mounted`` every test that uses a fixture that mounts (directly or through another
    fixture), so that ``-m "not mounted"`` mounts nothing; a test that mounted some other way
    would have to carry the mark itself (none does)."""
    for item in items:
        if MOUNTING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mounted)


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: pytest_timeout.Settings) -> None:
    """Back pytest-timeout's SIGALRM up for tests stuck in a request to a hung daemon.

    Such a request ignores signals until its daemon dies. Shortly after the timeout, kill this
    session's daemons: the pending SIGALRM then fails the test and its fixtures clean up. If
    the test is still stuck a minute later, dump the stacks and exit (pytest-timeout's thread
    method): CI must never hang. Returns None, so pytest-timeout still sets its own timer.
    """
    timers = [
        threading.Timer(
            settings.timeout + KILL_AFTER_TIMEOUT_S, _kill_daemons_under, [_session_root()]
        ),
        threading.Timer(
            settings.timeout + EXIT_AFTER_TIMEOUT_S, pytest_timeout.timeout_timer, [item, settings]
        ),
    ]
    for timer in timers:
        timer.daemon = True
        timer.start()
    item.stash[_WATCHDOG] = timers


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    """Stop the watchdog of *item* (pytest-timeout cancels its own timer as well)."""
    for timer in item.stash.get(_WATCHDOG, []):
        timer.cancel()


@pytest.fixture(scope="session")
def work_root() -> Iterator[Path]:
    """A private directory for this session's machines and mountpoints, wiped at the end."""
    root = _session_root()
    root.mkdir(mode=0o755, exist_ok=True)  # 0755: tests as other users must reach the mounts
    try:
        yield root
    finally:
        _unmount_everything_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _unmount_everything_under(root: Path) -> None:
    """Lazily unmount every mount below *root*, then SIGKILL every machine's registered owners."""
    prefix = os.path.realpath(root) + "/"
    for mountpoint in reversed(_mountpoints()):  # the innermost first
        if mountpoint.startswith(prefix):
            _try("umount", "-l", "-c", mountpoint)
    _kill_daemons_under(root)


def _kill_daemons_under(root: Path) -> None:
    """SIGKILL the live registered owners (but us) of every machine in *root*."""
    for machine_dir in _machine_dirs(root):
        _kill_owners_of(machine_dir)


def _kill_owners_of(machine_dir: Path) -> None:
    """SIGKILL the live registered owners (but us) of the machine in *machine_dir*."""
    for info in _registered_owners(machine_dir):
        if process_start_time(info.pid) == info.pid_start_time:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info.pid, signal.SIGKILL)


@pytest.fixture
def machine(work_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    """A fresh private machine (256 MiB RAM), also selected by KEXEC_SIM_MACHINE; RAM that
    kexec, reboot or power off lose is poisoned (KEXEC_SIM_SCRUB=poison), so reading a page
    nobody preserved or restored shows 0xAA, not plausible zeros. Removed afterwards (its
    owners killed first, if any outlived the test): a poisoned RAM holds host memory, ~16 GiB
    over the suite if every machine were kept to the end."""
    path = work_root / f"machine-{uuid.uuid4().hex[:8]}"
    result = run(str(BIN / "kexec-sim"), "--machine", str(path), "init", "--ram", TEST_RAM)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("KEXEC_SIM_MACHINE", str(path))
    monkeypatch.setenv("KEXEC_SIM_SCRUB", "poison")
    try:
        yield Machine.open(str(path), create=False)
    finally:
        _kill_owners_of(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def small_machine(work_root: Path) -> Iterator[Machine]:
    """A fresh 64 MiB machine made in this process (``Machine.create``), alone in a directory of
    the session's root: nothing in the environment names it, and RAM that kexec, reboot or power
    off lose is punched unless a test asks for poison. Removed afterwards."""
    home = work_root / f"small-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    try:
        yield Machine.create(home / "machine", SMALL_RAM_BYTES)
    finally:
        shutil.rmtree(home, ignore_errors=True)


class Mounts:
    """Starts pkramfs mounts on one machine and tears every one of them down."""

    def __init__(self, machine: Machine, root: Path) -> None:
        self.machine = machine
        self.root = root
        self.mountpoints: list[Path] = []
        self.expected_log_errors: list[re.Pattern[str]] = []

    def mountpoint(self) -> Path:
        """Return a new empty directory to mount on."""
        path = self.root / f"mnt-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def mount(self, options: str = "", mountpoint: Path | None = None) -> Path:
        """Mount a pkramfs with ``-o machine=...,OPTIONS`` through the CLI; return where."""
        mnt = mountpoint or self.mountpoint()
        opts = f"machine={self.machine.path}" + (f",{options}" if options else "")
        self.track(mnt)  # before any assertion: a half-made mount is torn down too
        result = run(str(BIN / "pkramfs"), "none", str(mnt), "-o", opts)
        assert result.returncode == 0, f"mount failed: {result.stderr}"
        assert os.path.ismount(mnt)
        return mnt

    def expect_log_error(self, pattern: str) -> None:
        """Let the daemon logs hold records whose first line matches the regex *pattern*, each
        with the one traceback printed after it; the test fails if no record matches."""
        self.expected_log_errors.append(re.compile(pattern))

    def track(self, mnt: Path) -> None:
        """Tear down *mnt* too (mounted some other way, e.g. by mount(8))."""
        if mnt not in self.mountpoints:
            self.mountpoints.append(mnt)

    def unmount(self, mnt: Path) -> bool:
        """Unmount *mnt* (lazily if need be); return whether its daemon then exited by itself.

        A daemon that does not exit within 10 s is sent SIGTERM, then SIGKILL.
        """
        daemons = daemon_owners(self.machine, mnt)  # before: an exiting daemon unregisters
        if not _try("fusermount3", "-u", str(mnt)) and _is_mounted(mnt):
            _try("fusermount3", "-u", "-z", str(mnt))
        return all([wait_exit(info.pid, info.pid_start_time) for info in daemons])

    def teardown(self) -> list[str]:
        """Unmount everything and end every daemon of the machine; return what went wrong.

        Each daemon that had to be killed is a problem: unmounting must end a daemon.
        """
        problems = []
        for mnt in self.mountpoints:
            if _is_mounted(mnt) and not self.unmount(mnt):
                problems.append(f"the daemon of {mnt} did not exit after unmount (killed)")
        for info in _registered_owners(self.machine.path):  # untracked or stuck daemons
            if process_start_time(info.pid) != info.pid_start_time:
                continue
            for mountpoint in _mountpoints():
                if info.name.endswith(":" + mountpoint):
                    _try("fusermount3", "-u", "-z", mountpoint)
            if not wait_exit(info.pid, info.pid_start_time):
                problems.append(f"{info.name} (pid {info.pid}) outlived its mount (killed)")
        return problems


def log_errors(machine: Machine, expected: Sequence[re.Pattern[str]] = ()) -> list[str]:
    """Return the lines of the machine's daemon logs that report an error or a traceback, but
    records an *expected* pattern matches (with their traceback); then a line for each
    expected pattern that matched no record."""
    problems = []
    seen = set()
    for log in sorted((machine.path / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            index += 1
            matching = [p for p in expected if p.search(line)]
            if matching and LOG_RECORD_START.match(line):
                seen.update(matching)
                index = _after_traceback(lines, index)
            elif any(alarm in line for alarm in LOG_ALARMS):
                problems.append(f"{log.name}: {line}")
    missing = [f"expected, never logged: {p.pattern}" for p in expected if p not in seen]
    return problems + missing


def _after_traceback(lines: list[str], index: int) -> int:
    """The index past the traceback starting at *lines[index]*, if one does; else *index*."""
    if index < len(lines) and lines[index] == "Traceback (most recent call last):":
        index += 1
        while index < len(lines) and lines[index].startswith(" "):
            index += 1
        if index < len(lines) and not LOG_RECORD_START.match(lines[index]):
            index += 1  # the exception's own line
    return index


@pytest.fixture
def mounts(machine: Machine, work_root: Path) -> Iterator[Mounts]:
    """Mount factory on the test's machine; checks ownership, unmounts everything, reads logs."""
    factory = Mounts(machine, work_root)
    try:
        yield factory
        problems = check_machine(machine)  # this machine's mounts only
        assert problems == [], "ownership checker: " + "; ".join(problems)
    finally:
        stuck = factory.teardown()
    assert stuck == [], "; ".join(stuck)
    assert_no_page_owned(machine)
    errors = log_errors(machine, factory.expected_log_errors)
    assert errors == [], "errors in the daemon logs:\n" + "\n".join(errors)


def assert_no_page_owned(machine: Machine) -> None:
    """After every mount is gone, no page may remain owned by anybody."""
    with machine.page_ownership() as after:
        after.reclaim_dead_owners()
        leftover = {k: v for k, v in after.count_by_owner().items() if k > 0}
    assert leftover == {}, f"pages still owned after unmount: {leftover}"


class InProcessMounts:
    """Filesystems served in this process without FUSE: each a `PkramFilesystem` on the test's
    machine and the pyfuse3 `Operations` over it, whose handlers a test awaits directly with a
    stand-in request context (`tests.util.caller`). The tier between `Tree` and a real mount."""

    def __init__(self, machine: Machine, root: Path) -> None:
        self.machine = machine
        self.root = root
        self.filesystems: list[PkramFilesystem] = []
        self.expected_log_errors: list[re.Pattern[str]] = []

    def start(self, options: str = "") -> Operations:
        """What a mount with ``-o OPTIONS`` serves, as the daemon makes it; never mounted (the
        mountpoint only names the owner)."""
        text = f"machine={self.machine.path}" + (f",{options}" if options else "")
        parsed = parse_options(split_option_list(text), ram_bytes=self.machine.ram_bytes)
        fs = PkramFilesystem(parsed, mountpoint=str(self.root / f"ops-{uuid.uuid4().hex[:8]}"))
        self.filesystems.append(fs)
        fs.take_restored()  # the daemon does it once mounted, before the first request
        return Operations(fs)

    def stop(self, operations: Operations) -> None:
        """Unmount: the filesystem gives its pages back and leaves the registry."""
        self.filesystems.remove(operations.fs)
        operations.fs.close()

    def expect_log_error(self, pattern: str) -> None:
        """Let error records whose message matches the regex *pattern* pass; the test fails
        if none does (as `Mounts.expect_log_error`)."""
        self.expected_log_errors.append(re.compile(pattern))

    def problems(self) -> list[str]:
        """The ownership checker over the machine, with the claims of every running filesystem
        (what `pkramfs.checker.check_machine` asks each mount for)."""
        if not self.filesystems:
            return []
        claims = {each.owner_id: each.owned_pfns() for each in self.filesystems}
        return check_machine(self.machine, claims)

    def log_errors(self, records: Sequence[logging.LogRecord]) -> list[str]:
        """The error records among *records* no expected pattern matches, then each expected
        pattern that matched none."""
        problems, seen = [], set()
        for record in records:
            if record.levelno < logging.ERROR and not record.exc_info:
                continue
            matching = [p for p in self.expected_log_errors if p.search(record.getMessage())]
            seen.update(matching)
            if not matching:
                problems.append(f"{record.name}: {record.getMessage()}")
        missing = [p.pattern for p in self.expected_log_errors if p not in seen]
        return problems + [f"expected, never logged: {pattern}" for pattern in missing]


@pytest.fixture
def in_process(
    small_machine: Machine, work_root: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[InProcessMounts]:
    """Factory of filesystems served in this process (`InProcessMounts`) on a private machine.
    Afterwards, as for `mounts`: the ownership checker, no page left owned once every
    filesystem is closed, and no error logged but the expected ones."""
    factory = InProcessMounts(small_machine, work_root)
    try:
        yield factory
        problems = factory.problems()
        assert problems == [], "ownership checker: " + "; ".join(problems)
    finally:
        for fs in factory.filesystems:
            fs.close()
    assert_no_page_owned(small_machine)
    records = [r for phase in ("setup", "call", "teardown") for r in caplog.get_records(phase)]
    errors = factory.log_errors(records)
    assert errors == [], "errors logged:\n" + "\n".join(errors)


@pytest.fixture
def kernel_tmpfs(work_root: Path) -> Iterator[Path]:
    """A kernel tmpfs mounted for comparison (256 MiB)."""
    with kernel_tmpfs_in(work_root, "size=256M") as path:
        yield path
