"""Liveness of host processes, robust to pid reuse (pid + start time from /proc)."""

from pathlib import Path

_START_TIME_FIELD = 22  # starttime in /proc/PID/stat, clock ticks after host boot
_FIELDS_BEFORE_STATE = 2  # pid and (comm)


def process_start_time(pid: int) -> int | None:
    """Return the start time of process *pid* (clock ticks), or None if it is gone or a zombie."""
    if pid <= 0:
        return None
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields resume after the last ')'.
    fields = data[data.rfind(b")") + 1 :].split()
    index = _START_TIME_FIELD - _FIELDS_BEFORE_STATE - 1
    if len(fields) <= index or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[index])
    except ValueError:
        return None


def is_alive(pid: int, start_time: int) -> bool:
    """Whether the process *pid* started at *start_time* is still running (not reused)."""
    return process_start_time(pid) == start_time
