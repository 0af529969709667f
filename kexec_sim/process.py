"""Host processes, robust to pid reuse (pid + start time from /proc): whether one is alive,
whether it can still run code of its own, and a pidfd to wait for its exit."""

import contextlib
import os
from pathlib import Path

_START_TIME_FIELD = 22  # starttime in /proc/PID/stat, clock ticks after host boot
_FLAGS_FIELD = 9  # the kernel's task flags in /proc/PID/stat
_FIELDS_BEFORE_STATE = 2  # pid and (comm)
PF_EXITING = 0x4
"""A task flag (include/linux/sched.h): the task is in the kernel's exit path, from which it
never returns to run code of its own."""


def _stat_fields(path: str) -> list[bytes] | None:
    """The fields of a /proc stat file from the state on (None if it cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields resume after the last ')'.
    return data[data.rfind(b")") + 1 :].split()


def _field(fields: list[bytes], number: int) -> int | None:
    index = number - _FIELDS_BEFORE_STATE - 1
    if len(fields) <= index:
        return None
    try:
        return int(fields[index])
    except ValueError:
        return None


def process_start_time(pid: int) -> int | None:
    """Return the start time of process *pid* (clock ticks), or None if it is gone or a zombie."""
    if pid <= 0:
        return None
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None or not fields or fields[0] in (b"Z", b"X"):
        return None
    return _field(fields, _START_TIME_FIELD)


def is_alive(pid: int, start_time: int) -> bool:
    """Whether the process *pid* started at *start_time* is still running (not reused)."""
    return process_start_time(pid) == start_time


def runs_code(pid: int, start_time: int) -> bool:
    """Whether the process *pid* started at *start_time* can still run code of its own: it
    is there (not reused) and one of its threads is neither dead nor exiting (PF_EXITING).

    A process whose threads are all exiting is only being torn down by the kernel, which for
    one that mapped gigabytes (a mount daemon and the machine's RAM) takes a while: it will
    never again touch its memory. A zombie main thread whose other threads still run counts as
    running.
    """
    if pid <= 0:
        return False
    leader = _stat_fields(f"/proc/{pid}/stat")
    if leader is None or _field(leader, _START_TIME_FIELD) != start_time:
        return False
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in threads:
        fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if not fields or fields[0] in (b"Z", b"X"):
            continue
        flags = _field(fields, _FLAGS_FIELD)
        if flags is None or not flags & PF_EXITING:
            return True
    return False


def open_pidfd(pid: int, start_time: int) -> int | None:
    """A pidfd of process *pid* started at *start_time* (readable once it has exited), or None
    when it is gone or the host has no pidfds (Linux before 5.3). Close it when done."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    if process_start_time(pid) != start_time:  # after opening: the fd is not a newcomer's
        with contextlib.suppress(OSError):
            os.close(pidfd)
        return None
    return pidfd
