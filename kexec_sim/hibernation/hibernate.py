"""Hibernation through the page store: preserve, write the page set to an image, power off.

``hibernate`` is kexec-based hibernation over PKRAM:

1. every registered owner holding pages must be a preservable mount (``pkram=``), else it
   refuses, changing nothing (unless *force*: those pages are lost);
2. it asks each preservable mount to preserve itself (``mount -o remount,preserve,ro``): the
   trees are serialized into RAM and their pages become PRESERVED;
3. under the ownership lock it writes the preserved-pages table and the super block, exactly
   as ``kexec-sim exec`` would (a table left by an interrupted hibernate is dropped first);
4. a fresh process (kexec_sim.hibernation.writer_process) writes the image from that handover
   alone: the super block, the table, the pages the table marks and their storage keys;
5. it powers the machine off. If anything fails before the power off scrubs RAM, the table
   is dropped, an image at the path is invalidated, the mounts it preserved are made writable
   again (``remount,rw`` cancels a preservation) and the error is raised: nothing is lost.

It runs as one transition (kexec_sim.transition), recorded from the preserve on; its point of
no return is its power off's scrub.

The way back is kexec_sim.hibernation.resume.
"""

import json
import subprocess
import sys
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kexec_sim.errors import CorruptImage, ImageTooLarge, MachineError
from kexec_sim.handover import drop_stale_table, write_handover
from kexec_sim.hibernation import reader, writer
from kexec_sim.hibernation.crypto import ImageKey, image_key
from kexec_sim.hibernation.last_image import read_last_image
from kexec_sim.hibernation.progress import Progress
from kexec_sim.hibernation.report import Report, reason
from kexec_sim.machine import Machine
from kexec_sim.mounts import read_mounts
from kexec_sim.owners import OwnerInfo
from kexec_sim.ownership import PageOwnership
from kexec_sim.power import DEFAULT_SCRUB, begin_transition, poweroff
from kexec_sim.report import Phases
from kexec_sim.shutdown import DEFAULT_STOP_TIMEOUT_S
from kexec_sim.super_block import read_super_block
from kexec_sim.transition import give_up

__all__ = ["HibernateReport", "HibernationRefused", "hibernate", "undo_hibernate"]

REMOUNT_TIMEOUT_S = 120.0
WRITER_MODULE = "kexec_sim.hibernation.writer_process"


class HibernationRefused(MachineError):
    """hibernate refuses before changing anything (data would be lost, bad base image, ...)."""


@dataclass(frozen=True)
class HibernateReport(Report):
    """What a hibernate did."""

    image: str
    image_id: str
    base_image_id: str | None
    generation: int
    super_block_pfn: int
    pages: int
    zero_pages: int
    in_base_pages: int
    fetch_protected_pages: int
    """Pages the writer read through temporary mappings only (secret files' pages)."""
    data_bytes: int
    stored_bytes: int
    image_bytes: int
    compression: str
    encrypted: bool
    preserved_mounts: tuple[str, ...]
    warnings: tuple[str, ...]
    durations_s: dict[str, float] = field(default_factory=dict)


# -- hibernate ------------------------------------------------------------------------------


def _mount_options(mountpoint: str) -> tuple[str, ...] | None:
    """The options of the FUSE mount at *mountpoint* (the top one), None if absent."""
    found = None
    for entry in read_mounts():
        if entry.mountpoint == mountpoint:
            found = entry.options
    return found


def _remount(mountpoint: str, options: str) -> str | None:
    """``mount -o remount,OPTIONS MOUNTPOINT``; None on success, else the error it printed."""
    try:
        done = subprocess.run(
            ["mount", "-o", f"remount,{options}", mountpoint],
            capture_output=True,
            text=True,
            check=False,
            timeout=REMOUNT_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    return (done.stderr.strip() or f"mount exited with {done.returncode}").splitlines()[-1]


def _plan(po: PageOwnership, force: bool) -> tuple[list[OwnerInfo], list[str]]:
    """(the mounts to preserve, warnings); HibernationRefused when data would be lost."""
    with po.locked():
        po.reclaim_dead_owners()
        owners = po.owners()
        counts = po.count_by_owner()
    preservable = []
    losses = []
    for owner_id, info in sorted(owners.items()):
        if info.preservable and info.mountpoint is not None:
            preservable.append(info)
        elif counts.get(owner_id, 0):
            where = info.mountpoint or info.name
            losses.append(f"{where} (owner {owner_id}): {counts[owner_id]} pages not preservable")
    if losses and not force:
        raise HibernationRefused(
            f"{losses[0]}{f' (and {len(losses) - 1} more)' if len(losses) > 1 else ''}: "
            "hibernation would lose them (mount with -o pkram=NAME, unmount it, or --force)"
        )
    return preservable, [f"{loss}: lost" for loss in losses]


def _preserve_mounts(mounts: list[OwnerInfo]) -> list[str]:
    """Preserve every mount of *mounts*; return those it made read-only (to undo on failure).

    Raises MachineError (after undoing) when one refuses.
    """
    changed: list[str] = []
    for info in mounts:
        assert info.mountpoint is not None
        options = _mount_options(info.mountpoint)
        if options is None:
            continue  # not mounted here any more: its pages, if any, are its daemon's
        error = _remount(info.mountpoint, "preserve,ro")
        if error is not None:
            _undo_preserve(changed)
            raise HibernationRefused(f"{info.mountpoint}: could not preserve: {error}")
        if "rw" in options:
            changed.append(info.mountpoint)
    return changed


def _undo_preserve(mountpoints: list[str]) -> list[str]:
    """Make *mountpoints* writable again (cancelling their preservation); return the failures."""
    failures = []
    for mountpoint in mountpoints:
        error = _remount(mountpoint, "rw")
        if error is not None:
            failures.append(f"{mountpoint}: could not be made writable again: {error}")
    return failures


@dataclass(frozen=True)
class _Base:
    """The image an incremental hibernate builds on."""

    path: str
    image_id: bytes


def _base_image(machine: Machine, base: Path, key: ImageKey | None) -> _Base:
    """Read and check the base of an incremental image; HibernationRefused if unusable."""
    try:
        header = reader.read_header(base, key=key, allow_used=True)
        reader.read_pfn_list(base, header, key=key)  # the writer reads it again
    except (OSError, CorruptImage) as exc:
        raise HibernationRefused(f"base image {base}: {reason(exc)}") from None
    if header.machine_id != machine.machine_id:
        raise HibernationRefused(f"base image {base} was taken on another machine")
    last = read_last_image(machine.path)
    if last is None or last[-1] != header.image_id.hex():
        raise HibernationRefused(
            f"base image {base} is not the image this machine's RAM was last resumed from"
            + ("" if last is None else f" (that was image {last[-1]})")
            + ": write a full image"
        )
    return _Base(str(base), header.image_id)


def hibernate(
    machine: Machine,
    image: Path,
    *,
    force: bool = False,
    compression: str = "lz4",
    threads: int | None = None,
    key_file: Path | None = None,
    passphrase: str | None = None,
    max_bytes: int | None = None,
    base: Path | None = None,
    scrub: str = DEFAULT_SCRUB,
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    progress: Progress | None = None,
) -> HibernateReport:
    """Hibernate *machine* to *image* (a regular file or a block device) and power it off.

    *base* makes the image incremental to that image, which must be the last one RAM was
    resumed from; *scrub* is how power off loses RAM (kexec_sim.scrub). Raises
    HibernationRefused or MachineError (ImageTooLarge when the image
    would exceed *max_bytes*), leaving the machine running with its mounts as they were.
    """
    phases = Phases()
    key = image_key(key_file, passphrase)
    image = image.absolute()
    if not image.parent.is_dir():
        raise HibernationRefused(f"{image.parent}: no such directory")
    base_info = _base_image(machine, base, key) if base is not None else None
    sb_pfn = machine.super_block_pfn
    generation = machine.generation
    transition = begin_transition(machine, "hibernate", generation)
    made_ro: list[str] = []
    try:
        with machine.page_ownership() as po:
            mounts, warnings = _plan(po, force)
            transition.record("preserve", image=str(image), scrub=scrub)
            with phases("preserve"):
                made_ro = _preserve_mounts(mounts)
            transition.record("handover")
            with machine.ram() as ram, po.locked(), phases("handover"):
                drop_stale_table(ram, po, sb_pfn)
                sb = read_super_block(ram, sb_pfn)
                write_handover(ram, po, sb_pfn, sb, None, generation)
            transition.record("write")
            with phases("write"):
                result = _run_writer(
                    machine, image, sb_pfn, compression, threads, key_file, passphrase,
                    max_bytes, base_info, progress,
                )  # fmt: skip
            transition.record("image-complete")
        with phases("poweroff"):
            report = poweroff(
                machine, scrub=scrub, stop_timeout_s=stop_timeout_s, transition=transition
            )
    except BaseException as exc:
        if transition.committed:  # the power off had begun scrubbing: the next command ends it
            transition.abandon()
            raise
        give_up(transition, lambda: undo_hibernate(machine, transition.facts))
        failures = _undo_preserve(made_ro)  # once the record is gone: nodes may change again
        if failures and isinstance(exc, MachineError):
            raise MachineError(f"{exc}; also: {'; '.join(failures)}") from None
        raise
    transition.end()
    return HibernateReport(
        image=str(image),
        image_id=str(result["image_id"]),
        base_image_id=None if base_info is None else base_info.image_id.hex(),
        generation=generation,
        super_block_pfn=sb_pfn,
        pages=int(result["pages"]),
        zero_pages=int(result["zero_pages"]),
        in_base_pages=int(result["in_base_pages"]),
        fetch_protected_pages=int(result["fetch_protected_pages"]),
        data_bytes=int(result["data_bytes"]),
        stored_bytes=int(result["stored_bytes"]),
        image_bytes=int(result["image_bytes"]),
        compression=compression,
        encrypted=key is not None,
        preserved_mounts=tuple(m.mountpoint or m.name for m in mounts),
        warnings=tuple(warnings + [w for w in report.warnings if "preserved pages" not in w]),
        durations_s=phases.durations_s | {f"write.{k}": v for k, v in result["seconds"].items()},
    )


def undo_hibernate(machine: Machine, facts: Mapping[str, object]) -> None:
    """Drop what a hibernate that did not complete its image left: the table it wrote, and the
    image at its path if one is there (never resumable: the machine runs on). The mounts it
    preserved stay preserved and read-only (a ``remount,rw`` cancels that)."""
    with machine.page_ownership() as po, machine.ram() as ram, po.locked():
        drop_stale_table(ram, po, machine.super_block_pfn)
    image = facts.get("image")
    if isinstance(image, str):
        with suppress(OSError, CorruptImage):
            writer.invalidate(image)


def _run_writer(
    machine: Machine,
    image: Path,
    sb_pfn: int,
    compression: str,
    threads: int | None,
    key_file: Path | None,
    passphrase: str | None,
    max_bytes: int | None,
    base: _Base | None,
    progress: Progress | None,
) -> dict[str, Any]:
    """Run the image writer in a fresh process; return its result. MachineError on failure."""
    request = {
        "machine": str(machine.path),
        "image": str(image),
        "super_block_pfn": sb_pfn,
        "compression": compression,
        "threads": threads,
        "key_file": None if key_file is None else str(Path(key_file).absolute()),
        "passphrase": passphrase,
        "max_bytes": max_bytes,
        "base": None if base is None else base.path,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", WRITER_MODULE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
        result: dict[str, Any] | None = None
        error: str | None = None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not the protocol's: the writer's stderr tail says what went wrong
            if "progress" in message and progress is not None:
                done, total = message["progress"]
                progress("write", int(done), int(total))
            elif "result" in message:
                result = message["result"]
            elif "error" in message:
                error = str(message["error"])
                kind = str(message.get("kind", ""))
        stderr = proc.stderr.read()
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code == 0 and result is not None:
        return result
    if error is not None:
        raise _WRITER_ERRORS.get(kind, MachineError)(error)
    tail = stderr.strip().splitlines()[-1:] or [f"exit status {code}"]
    raise MachineError(f"the image writer failed: {tail[0]}")


_WRITER_ERRORS: Mapping[str, type[MachineError]] = {
    "too_large": ImageTooLarge,
    "refused": HibernationRefused,
}


def _die_with_parent() -> None:
    """In the writer child: be killed when hibernate dies (PR_SET_PDEATHSIG), so a killed
    hibernate never leaves a writer finishing an image of a machine that keeps running."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
