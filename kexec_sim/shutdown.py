"""Stopping the running "kernel": the processes registered as owners of the current boot.

For each owner serving a FUSE mount, the mount is first detached (a lazy unmount, in a thread
whose return, where the host drops what the mount cached, is not waited for) so its users see
it gone rather than a dead connection; then every owner process gets SIGTERM, and those
still running after a grace period SIGKILL. A process counts as stopped once it runs no code of
its own (kexec_sim.process.runs_code): it is gone, a zombie, its pid belongs to another
process, or every thread of it is in the kernel's exit path. The last is what a real kexec
needs (nothing of the old boot runs any more) without waiting for the kernel to unmap the
RAM a daemon mapped: ~0.2 s per 2 GiB it touched. Exits wake the wait at once (a pidfd per
process, signalled through it too: no pid reuse race); the exiting state is polled each ms.
Only FUSE mounts are unmounted: they are the ones a daemon of this boot serves.
"""

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kexec_sim.mounts import is_fuse, read_mounts
from kexec_sim.owners import OwnerInfo
from kexec_sim.ownership import PageOwnership
from kexec_sim.process import is_alive, open_pidfd, runs_code

DEFAULT_STOP_TIMEOUT_S = 5.0
KILL_WAIT_S = 5.0
POLL_S = 0.001
"""How often a process's exiting state is looked at while waiting (its exit wakes the wait)."""
UMOUNT_TIMEOUT_S = 30.0
MNT_DETACH = 2
_umount2 = ctypes.CDLL(None, use_errno=True).umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int


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
    """Detach *mountpoint* (umount2 MNT_DETACH, else ``umount -l``, e.g. when not root);
    return whether it succeeded (never raises)."""
    if _umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return True
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


def _detach(mountpoints: set[str | None]) -> dict[str, bool]:
    """Lazily unmount *mountpoints*, each in a thread of its own; return whether each was
    detached, once each is gone from the mount table (or its unmount ended).

    The host tears a detached mount down (drops its page cache and dentries: ~170 ms per GiB
    it cached) as the detaching syscall returns, in that thread: the stop does not wait for
    it, as it does not wait for the host to unmap an exiting daemon's RAM.
    """
    results: dict[str, bool] = {}
    threads = {}
    for mountpoint in filter(None, mountpoints):
        thread = threading.Thread(
            target=lambda mp=mountpoint: results.__setitem__(mp, _detach_at_low_priority(mp)),
            name=f"detach {mountpoint}",
            daemon=True,
        )
        thread.start()
        threads[mountpoint] = thread
    deadline = time.monotonic() + UMOUNT_TIMEOUT_S
    while threads and time.monotonic() < deadline:
        mounted = fuse_mountpoints()
        for mountpoint in list(threads):
            if mountpoint in results or mountpoint not in mounted:
                results.setdefault(mountpoint, True)
                del threads[mountpoint]
        time.sleep(POLL_S)
    return {mountpoint: results.get(mountpoint, False) for mountpoint in filter(None, mountpoints)}


def _detach_at_low_priority(mountpoint: str) -> bool:
    """``_lazy_unmount`` from a thread at the lowest priority: the host's teardown of the
    mount gives way to the exec's own work and the next boot's."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return _lazy_unmount(mountpoint)


class _Processes:
    """The processes being stopped, each with a pidfd when the host has them."""

    def __init__(self, procs: Mapping[int, OwnerInfo]) -> None:
        self.procs = dict(procs)
        self.pidfds: dict[int, int] = {}
        for pid, info in self.procs.items():
            pidfd = open_pidfd(pid, info.pid_start_time)
            if pidfd is not None:
                self.pidfds[pid] = pidfd

    def close(self) -> None:
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.pidfds.clear()

    def signal(self, pids: Iterable[int], sig: signal.Signals) -> None:
        """Send *sig* to *pids* (through their pidfds: never to a process that reused a pid)."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pid in self.pidfds:
                    signal.pidfd_send_signal(self.pidfds[pid], sig)
                elif is_alive(pid, self.procs[pid].pid_start_time):
                    os.kill(pid, sig)

    def wait_stopped(self, pids: Iterable[int], timeout_s: float) -> set[int]:
        """Wait until no process of *pids* runs code of its own, or *timeout_s* passed; return
        the pids still running."""
        left = set(pids)
        poller = select.poll()
        for pid in left & self.pidfds.keys():
            poller.register(self.pidfds[pid], select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            stopped = {pid for pid in left if not runs_code(pid, self.procs[pid].pid_start_time)}
            for pid in stopped & self.pidfds.keys():
                poller.unregister(self.pidfds[pid])  # else its exit would wake every poll
            left -= stopped
            remaining_s = deadline - time.monotonic()
            if not left or remaining_s <= 0:
                return left
            poller.poll(max(1, round(min(POLL_S, remaining_s) * 1000)))


def stop_owners(
    owners: Mapping[int, OwnerInfo], timeout_s: float = DEFAULT_STOP_TIMEOUT_S
) -> list[StoppedOwner]:
    """Stop the processes of *owners* (never this process); return what happened to each.

    Unmounts their FUSE mounts lazily, sends SIGTERM, waits up to *timeout_s*, then SIGKILL
    (and waits up to KILL_WAIT_S more).
    """
    mounted = fuse_mountpoints()
    unmounted = _detach({info.mountpoint for info in owners.values() if info.mountpoint in mounted})
    procs = {
        info.pid: info
        for info in owners.values()
        if info.pid != os.getpid() and runs_code(info.pid, info.pid_start_time)
    }
    processes = _Processes(procs)
    try:
        processes.signal(procs, signal.SIGTERM)
        stubborn = processes.wait_stopped(procs, timeout_s)
        processes.signal(stubborn, signal.SIGKILL)
        survivors = processes.wait_stopped(stubborn, KILL_WAIT_S)
    finally:
        processes.close()
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
