"""Stopping the running "kernel": the processes registered as owners of the current boot.

For each owner serving a FUSE mount, the mount is first detached (``umount -l``) so its users
see it gone rather than a dead connection; then every owner process gets SIGTERM, and those
still running after a grace period SIGKILL. A process counts as gone once /proc says so, or it
is a zombie, or its pid now belongs to another process (pid + start time, kexec_sim.process).
Only FUSE mounts are unmounted: they are the ones a daemon of this boot serves.
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kexec_sim.mounts import is_fuse, read_mounts
from kexec_sim.owners import OwnerInfo
from kexec_sim.ownership import PageOwnership
from kexec_sim.process import is_alive

DEFAULT_STOP_TIMEOUT_S = 5.0
KILL_WAIT_S = 5.0
POLL_S = 0.01
UMOUNT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StoppedOwner:
    """An owner whose process was stopped, and how: ``gone`` (already), ``term``, ``kill``,
    ``alive`` (it survived SIGKILL, e.g. stuck in the host kernel) or ``self`` (the caller,
    not stopped)."""

    owner_id: int
    name: str
    pid: int
    mountpoint: str | None
    how: str
    unmounted: bool


def fuse_mountpoints() -> set[str]:
    """The mountpoints of FUSE filesystems in this mount namespace."""
    return {entry.mountpoint for entry in read_mounts() if is_fuse(entry)}


def _lazy_unmount(mountpoint: str) -> bool:
    """``umount -l``; return whether it succeeded (never raises)."""
    try:
        done = subprocess.run(
            ["umount", "-l", mountpoint],
            capture_output=True,
            check=False,
            timeout=UMOUNT_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _wait_gone(procs: Iterable[OwnerInfo], timeout_s: float) -> set[int]:
    """Poll until every process of *procs* is gone or *timeout_s* passed; return the pids left."""
    left = {info.pid: info for info in procs}
    deadline = time.monotonic() + timeout_s
    while True:
        left = {pid: info for pid, info in left.items() if is_alive(pid, info.pid_start_time)}
        if not left or time.monotonic() >= deadline:
            return set(left)
        time.sleep(POLL_S)


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_owners(
    owners: Mapping[int, OwnerInfo], timeout_s: float = DEFAULT_STOP_TIMEOUT_S
) -> list[StoppedOwner]:
    """Stop the processes of *owners* (never this process); return what happened to each.

    Unmounts their FUSE mounts lazily, sends SIGTERM, waits up to *timeout_s*, then SIGKILL
    (and waits up to KILL_WAIT_S more).
    """
    mounted = fuse_mountpoints()
    unmounted = {
        info.mountpoint: _lazy_unmount(info.mountpoint)
        for info in owners.values()
        if info.mountpoint is not None and info.mountpoint in mounted
    }
    procs = {
        info.pid: info
        for info in owners.values()
        if info.pid != os.getpid() and is_alive(info.pid, info.pid_start_time)
    }
    _signal(procs, signal.SIGTERM)
    stubborn = _wait_gone(procs.values(), timeout_s)
    _signal(stubborn, signal.SIGKILL)
    survivors = _wait_gone((procs[pid] for pid in stubborn), KILL_WAIT_S)
    stopped = []
    for owner_id, info in sorted(owners.items()):
        if info.pid == os.getpid():
            how = "self"
        elif info.pid not in procs:
            how = "gone"
        elif info.pid in survivors:
            how = "alive"
        else:
            how = "kill" if info.pid in stubborn else "term"
        was_unmounted = unmounted.get(info.mountpoint, False) if info.mountpoint else False
        stopped.append(
            StoppedOwner(owner_id, info.name, info.pid, info.mountpoint, how, was_unmounted)
        )
    return stopped


def _losses(po: PageOwnership, owners: Mapping[int, OwnerInfo]) -> list[str]:
    """One warning per registered owner holding pages: those pages are lost."""
    counts = po.count_by_owner()
    return [
        f"{info.mountpoint or info.name} (owner {owner_id}): {counts[owner_id]} pages not "
        "preserved, lost"
        for owner_id, info in sorted(owners.items())
        if counts.get(owner_id, 0)
    ]


def stop_everyone(
    po: PageOwnership, stop_timeout_s: float, warnings: list[str]
) -> list[StoppedOwner]:
    """Stop every registered owner of the boot (daemons), after warning which lose pages.

    Appends to *warnings* the mounts that lose data and the processes that survived SIGKILL.
    """
    with po.locked():
        owners = po.owners()
        warnings += _losses(po, owners)
    stopped = stop_owners(owners, stop_timeout_s)
    warnings += [f"{s.name} (pid {s.pid}) survived SIGKILL" for s in stopped if s.how == "alive"]
    return stopped
