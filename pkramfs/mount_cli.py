"""``pkramfs`` / ``mount.pkramfs``: mount a pkramfs, or forward ``-o remount,...`` to its daemon.

Usage (the mount helper convention): ``pkramfs SOURCE MOUNTPOINT [-o OPTIONS] [-f] [-d]``.
The command returns once the mount is live; the daemon then runs detached (``-f`` keeps it in
the foreground, ``-d`` logs debug output). Called as ``mount.pkramfs`` by mount(8), ``-f`` means
"fake" as for every mount helper, and ``-n``, ``-s``, ``-v`` are accepted.

Exit codes (those of mount(8)): 0 mounted; 1 bad invocation or bad option (a one-line message
names it; nothing is mounted); 4 internal error, a bug (mount(8)'s "internal mount bug": one
line naming it and the log file with its traceback); 32 the mount or remount failed (the
message says why).
"""

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from kexec_sim import MachineError, transition_recorded

from . import control
from .errors import MountError, OptionError, PkramfsError
from .options import FSTYPE, MountOptions, parse_options, split_option_list

if TYPE_CHECKING:
    from pathlib import Path

# What only a new mount or an error needs (the machine's code, logging, the daemon's) is
# imported where it is used: a remount helper runs in every blackout.

EXIT_USAGE = 1
EXIT_INTERNAL = 4
EXIT_FAILED = 32
READY = b"mounted\n"  # what the daemon writes to the pipe once the mount is live


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise OptionError(message)


def _parse_args(argv: list[str], helper: bool) -> argparse.Namespace:
    parser = _Parser(prog="mount.pkramfs" if helper else "pkramfs", add_help=True)
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-f", dest="flag_f", action="store_true")
    parser.add_argument("-d", dest="debug", action="store_true")
    if helper:
        for flag in ("-n", "-s", "-v"):
            parser.add_argument(flag, action="store_true")
        parser.add_argument("-t", dest="fstype")
        parser.add_argument("-N", dest="namespace")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pkramfs`` and ``mount.pkramfs``; returns the exit code."""
    helper = os.path.basename(sys.argv[0]).startswith("mount.")
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv, helper)
        items = [item for text in args.options for item in split_option_list(text)]
        if "remount" in items:
            return _remount(args.mountpoint, items)
        if "preserve" in items:
            raise OptionError("'preserve' only goes with 'remount'")
        # Option errors first, before any machine is touched (a size=N% is checked for syntax
        # here and resolved against the machine's RAM below).
        options = parse_options(items, ram_bytes=0)
        if helper and args.flag_f:
            return 0  # mount -f: fake it
        from kexec_sim import open_machine

        machine = open_machine(options.machine, create=True, notify=_note)
        options = parse_options(items, ram_bytes=machine.ram_bytes)
        options.fsname = options.fsname or (None if args.source == "none" else args.source)
        mountpoint = _check_mountpoint(args.mountpoint)
        foreground = args.flag_f and not helper
        return _mount(options, mountpoint, machine.path, foreground=foreground, debug=args.debug)
    except OptionError as exc:
        print(f"pkramfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (PkramfsError, MachineError, OSError) as exc:
        print(f"pkramfs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug: one line and the log, never a traceback
        from kexec_sim import report_internal_error

        print(report_internal_error("pkramfs", exc, None), file=sys.stderr)
        return EXIT_INTERNAL


def _note(message: str) -> None:
    print(f"pkramfs: {message}", file=sys.stderr)


def _check_mountpoint(path: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise MountError(f"mount point {path} does not exist or is not a directory")
    return real


def _remount(mountpoint: str, items: list[str]) -> int:
    """Forward ``-o remount,...`` to the daemon, then apply ro/rw to the kernel's mount.

    Going read-only (``ro``, or ``preserve`` which implies it), the daemon changes first (it
    answers EBUSY while a file is open for writing or a removed one is still in use) and is put
    back if the kernel then refuses;
    going read-write, the kernel first. The control file takes commands only on a writable
    mount: a read-only one is made writable in the kernel around the command (the daemon
    still refuses every write). ``preserve`` of a mount already preserved (so read-only and
    unchanged since) succeeds doing nothing.
    """
    mountpoint = _check_mountpoint(mountpoint)
    status = control.query_status(mountpoint)
    options = parse_options(items, ram_bytes=_ram_bytes(status))
    forwarded = [item for item in items if item != "remount"]
    kernel_read_only = bool(os.statvfs(mountpoint).f_flag & os.ST_RDONLY)
    if (
        kernel_read_only
        and status["preserved_node"] is not None
        and set(forwarded) <= {"preserve", "ro"}
    ):
        return 0  # preserved already: the node in RAM is the tree as it is
    to_read_only = options.read_only or options.preserve
    changes_mode = "ro" in options.kernel_flags or "rw" in options.kernel_flags or options.preserve
    stays_read_only = to_read_only if changes_mode else kernel_read_only
    if kernel_read_only:
        _kernel_remount(mountpoint, "rw")
    try:
        control.send_command(mountpoint, "remount", options=forwarded)
    except BaseException:
        if kernel_read_only:
            _kernel_remount(mountpoint, "ro")
        raise
    if stays_read_only:
        try:
            _kernel_remount(mountpoint, "ro")
        except MountError:
            if not kernel_read_only:
                control.send_command(mountpoint, "remount", options=["rw"])
            raise
    return 0


def _ram_bytes(status: dict[str, object]) -> int:
    """The RAM of the mount's machine, from the daemon's status unless a transition is
    recorded (then the machine is opened, which recovers an interrupted one)."""
    ram_bytes, machine_dir = status.get("ram_bytes"), status["machine"]
    if type(ram_bytes) is int and not transition_recorded(str(machine_dir)):
        return ram_bytes
    from kexec_sim import open_machine

    return open_machine(str(machine_dir), notify=_note, while_running=True).ram_bytes


def _kernel_remount(mountpoint: str, flag: str) -> None:
    """Set the kernel's ro/rw flag of the mount without calling this helper again (-i).

    The mount's own flag (a bind remount), unless going read-write from a read-only superblock
    (a mount made ``ro``). A superblock remount has the kernel drop every unused dentry of
    the filesystem first (reconfigure_super's shrink_dcache_sb: ~0.5 s after 100,000 files
    were made, all in the blackout); the mount's flag alone refuses writes just as well, and
    the daemon refuses them either way.
    """
    how = "remount,rw" if flag == "rw" and _superblock_read_only(mountpoint) else "remount,bind"
    result = subprocess.run(
        ["mount", "-i", "-o", f"{how},{flag}", mountpoint],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise MountError(f"remount,{flag} of {mountpoint}: {result.stderr.strip()}")


def _superblock_read_only(mountpoint: str) -> bool:
    """Whether the superblock of the mount on top at *mountpoint* is read-only."""
    from kexec_sim import read_mountinfo

    ours = [m.super_options for m in read_mountinfo() if m.mountpoint == mountpoint]
    return bool(ours) and "ro" in ours[-1]


def _mount(
    options: MountOptions, mountpoint: str, machine_dir: "Path", *, foreground: bool, debug: bool
) -> int:
    """Start the daemon; return once the mount is live (or failed), or serve (foreground)."""
    if foreground:
        _setup_logging(debug)
        return _run_daemon(options, mountpoint, _print_error)
    mounted_before = _pkramfs_mount_count(mountpoint)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            os.setsid()
            _detach_stdio(machine_dir, options, debug)

            def report(error: str | None) -> None:
                os.write(write_fd, error.encode() if error else READY)
                os.close(write_fd)

            code = _run_daemon(options, mountpoint, report)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read()
    if message != READY:  # an error, or nothing at all: the daemon died before mounting
        reason = message.decode(errors="replace").strip() or "the mount daemon died"
        if _pkramfs_mount_count(mountpoint) > mounted_before:  # it died after mounting
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
            reason += " (its dead mount was detached)"
        print(f"pkramfs: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _pkramfs_mount_count(mountpoint: str) -> int:
    """How many pkramfs mounts are stacked on *mountpoint* (from /proc/mounts)."""
    from kexec_sim import read_mounts

    return sum(1 for e in read_mounts() if e.fstype == FSTYPE and e.mountpoint == mountpoint)


def _run_daemon(options: MountOptions, mountpoint: str, ready: Callable[[str | None], None]) -> int:
    from .daemon import serve  # imports pyfuse3: only the daemon needs it
    from .filesystem import PkramFilesystem

    try:
        fs = PkramFilesystem(options, mountpoint=mountpoint)
    except (PkramfsError, MachineError, OSError) as exc:
        ready(str(exc))
        return EXIT_FAILED
    return serve(fs, ready)


def _print_error(error: str | None) -> None:
    if error:
        print(f"pkramfs: {error}", file=sys.stderr)


def _detach_stdio(machine_dir: "Path", options: MountOptions, debug: bool) -> None:
    """Point stdin at /dev/null and stdout/stderr at the mount's log file."""
    log_dir = machine_dir / "logs"
    log_dir.mkdir(mode=0o700, exist_ok=True)
    log_path = log_dir / f"pkramfs-{options.pkram or 'anon'}-{os.getpid()}.log"
    devnull = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    _setup_logging(debug)


def _setup_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
