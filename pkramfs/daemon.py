"""The mount daemon: mounts with FUSE, serves requests until unmounted or told to stop."""

import functools
import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from kexec_sim import MachineError, read_mountinfo

from . import standby
from .errors import PkramfsError
from .filesystem import PkramFilesystem
from .node_store import fault_point
from .operations import Operations
from .options import SUBTYPE
from .prepare import keep_prepared

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READAHEAD_KB = 1024


def fuse_options(fs: PkramFilesystem) -> set[str]:
    """Return the FUSE/kernel mount options for *fs* (always default_permissions, allow_other)."""
    opts = fs.options
    result = {"default_permissions", "allow_other", f"subtype={SUBTYPE}"}
    result.add(f"fsname={opts.fsname or (opts.pkram and 'pkram:' + opts.pkram) or 'pkramfs'}")
    result.update(flag for flag in opts.kernel_flags if flag != "rw")
    # tmpfs allows set-uid files and device nodes unless told otherwise; FUSE's default is not to.
    result.update(f for f in ("suid", "dev") if f"no{f}" not in opts.kernel_flags)
    result.update(flag for flag in opts.fuse_flags if flag != "allow_root")
    return result


PATCHED_OPERATIONS = ("fallocate", "lseek", "copy_file_range")
"""What the pyfuse3 patch (patches/, built by scripts/setup) adds; stock pyfuse3 lacks them."""


def missing_operations(binding: type) -> list[str]:
    """The operations of the pyfuse3 patch *binding* (pyfuse3.Operations) has not."""
    return [name for name in PATCHED_OPERATIONS if not hasattr(binding, name)]


def serve(fs: PkramFilesystem, ready: Callable[[str | None], None]) -> int:
    """Mount *fs* at its mountpoint and serve it; call *ready* (None or an error) once mounted.

    Returns the process exit code. Pages go back to the machine however serving ends, but when
    the machine is stopping the boot (exec, reboot, power off: `PkramFilesystem.leave`).
    """
    operations = Operations(fs)
    if missing := missing_operations(pyfuse3.Operations):
        log.warning(
            "pyfuse3 %s lacks %s (the patch scripts/setup builds): the kernel answers those "
            "with its own fallbacks (SEEK_DATA: all data, fallocate: EOPNOTSUPP)",
            pyfuse3.__version__,
            ", ".join(missing),
        )
    try:
        pyfuse3.init(operations, fs.mountpoint, fuse_options(fs))
    except RuntimeError as exc:
        fs.close()
        ready(f"cannot mount {fs.mountpoint}: {exc}")
        return 32
    fault_point("restore", "mounted")
    ready(None)
    fault_point("restore", "ready")
    try:
        # Before the first request is read. Only now does the node leave RAM: a daemon that
        # dies before this (a dead mount for the user to unmount) leaves it to be mounted again.
        fs.take_restored()
    except (PkramfsError, MachineError) as exc:
        log.error("the restored tree cannot take its node, unmounting: %s", exc)
        pyfuse3.close(unmount=True)
        fs.close()
        return 32
    code = 0
    try:
        trio.run(_serve_until_stopped, fs)
    except BaseException:
        log.exception("the FUSE main loop failed: unmounting")
        code = 1
    finally:
        pyfuse3.close(unmount=True)
        if fs.boot_stopping():
            fs.leave()
        else:
            fs.close()
    return code


def _tune_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB (one max-size FUSE read) instead of its 128 KiB default.

    Runs in a worker thread once serving: the stat waits for the kernel's FUSE INIT, which
    would reset the knob to what INIT negotiated. Measured: cold sequential reads go from
    ~0.3 to ~3.9 GB/s. Never raises: a failure here must not end serving.
    """
    try:
        os.stat(mountpoint)
        ours = [m.device for m in read_mountinfo() if m.mountpoint == mountpoint]
        if not ours:
            return
        device = ours[-1]  # the one on top; major:minor, the FUSE connection's bdi name
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as knob:
            knob.write(str(READAHEAD_KB))
    except OSError as exc:
        log.info("cannot raise the read-ahead of %s: %s", mountpoint, exc)
    except Exception:
        log.exception("raising the read-ahead of %s failed", mountpoint)


async def _serve_until_stopped(fs: PkramFilesystem) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(trio.to_thread.run_sync, _tune_readahead, fs.mountpoint)
        if fs.options.pkram is not None:  # a mount that can be preserved
            nursery.start_soon(keep_prepared, fs.tree)  # its record kept ready
            start = functools.partial(standby.start, fs.machine.path, fs.machine.generation)
            nursery.start_soon(trio.to_thread.run_sync, start)  # the next boot's mounts
        await _serve_requests()
        nursery.cancel_scope.cancel()


async def _serve_requests() -> None:
    """Run pyfuse3's loop until the mount goes away.

    The handlers' guard keeps their exceptions in, but one raised by pyfuse3 itself around a
    request (making its reply, say) still ends pyfuse3's loop. It is logged, that request stays
    unanswered, and the loop runs again. Only a failure to read the FUSE device (an OSError),
    which leaves nothing to serve, ends serving (serve logs it).
    """
    while True:
        try:
            # One worker: handlers never await, so more tasks only add scheduling (~20%).
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            return
        except Exception as failure:
            leaves = _leaves(failure)
            if any(isinstance(leaf, OSError) for leaf in leaves):
                raise
            for leaf in leaves:
                log.error(
                    "a request failed outside the handlers' guard, unanswered; serving on",
                    exc_info=leaf,
                )


def _leaves(failure: BaseException) -> list[BaseException]:
    """The exceptions in *failure*, exception groups (trio's nurseries) flattened."""
    if isinstance(failure, BaseExceptionGroup):
        return [leaf for inner in failure.exceptions for leaf in _leaves(inner)]
    return [failure]


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
