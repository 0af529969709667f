"""``kexec-sim hibernate`` and ``kexec-sim resume``: their arguments, progress and reports.

On a terminal (stderr) a progress bar shows pages, MB/s and ETA per phase; otherwise, and
after the bar, one summary line goes to stdout; ``--json`` prints the summary as JSON instead
(pages, bytes, stored bytes, ratio, seconds per phase).
"""

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, TypeVar

from kexec_sim import power
from kexec_sim.errors import InvalidRequest, UsageError
from kexec_sim.hibernation import hibernate, resume
from kexec_sim.hibernation.format import COMPRESSIONS
from kexec_sim.hibernation.progress import Progress, ProgressBar
from kexec_sim.hibernation.report import Report
from kexec_sim.recovery import open_machine
from kexec_sim.shutdown import DEFAULT_STOP_TIMEOUT_S
from kexec_sim.sizes import parse_size

R = TypeVar("R", bound=Report)

PASSPHRASE_ENV = "KEXEC_SIM_PASSPHRASE"


def _note(message: str) -> None:
    print(f"kexec-sim: {message}", file=sys.stderr)


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / (1 << 20):.1f} MiB"


def _seconds(durations: dict[str, float]) -> str:
    return ", ".join(
        f"{name} {s * 1000:.0f} ms" for name, s in durations.items() if "." not in name
    )


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--key-file", metavar="FILE", type=Path, help="encrypt/decrypt with a key file"
    )
    keys.add_argument(
        "--passphrase",
        action="store_true",
        help=f"encrypt/decrypt with a passphrase (${PASSPHRASE_ENV}, else asked on the terminal)",
    )


def _passphrase(args: argparse.Namespace) -> str | None:
    if not args.passphrase:
        return None
    text = os.environ.get(PASSPHRASE_ENV)
    if text is None:
        if not sys.stdin.isatty():
            raise UsageError(f"--passphrase: set ${PASSPHRASE_ENV} or run on a terminal")
        text = getpass.getpass("image passphrase: ")
    if not text:
        raise UsageError("--passphrase: the passphrase is empty")
    return text


def _threads(args: argparse.Namespace) -> int | None:
    threads: int | None = args.threads
    if threads is not None and not 1 <= threads <= 256:
        raise UsageError(f"--threads: {threads} is not 1..256")
    return threads


class _KeyOptions(TypedDict):
    threads: int | None
    key_file: Path | None
    passphrase: str | None


def _key_options(args: argparse.Namespace) -> _KeyOptions:
    """The options hibernate and resume share: ``--threads``, then the key (which may ask for
    the passphrase on the terminal)."""
    threads = _threads(args)
    return {"threads": threads, "key_file": args.key_file, "passphrase": _passphrase(args)}


def hibernate_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``kexec-sim hibernate``'s arguments."""
    parser.add_argument("--image", required=True, type=Path, help="image file or block device")
    parser.add_argument(
        "--force", action="store_true", help="hibernate even if mounts without pkram= lose data"
    )
    parser.add_argument("--compression", choices=tuple(COMPRESSIONS), default="lz4")
    parser.add_argument("--threads", type=int, help="compression workers (default: the cores)")
    parser.add_argument(
        "--max-image-size", metavar="SIZE", help="fail cleanly if the image would be larger"
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="write only pages changed since --base (the image RAM was resumed from)",
    )
    parser.add_argument("--base", metavar="OLD_IMAGE", type=Path, help="the incremental's base")
    _key_arguments(parser)
    parser.add_argument(
        "--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S, help=argparse.SUPPRESS
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_hibernate(args: argparse.Namespace) -> int:
    """``kexec-sim hibernate``."""
    if args.incremental != (args.base is not None):
        raise UsageError("--incremental and --base OLD_IMAGE go together")
    max_bytes = None
    if args.max_image_size is not None:
        try:
            max_bytes = parse_size(args.max_image_size)
        except InvalidRequest as exc:
            raise UsageError(f"--max-image-size: {exc}") from None
    machine = open_machine(args.machine, notify=_note)
    report = _run(
        args,
        lambda bar: hibernate.hibernate(
            machine,
            args.image,
            force=args.force,
            compression=args.compression,
            **_key_options(args),
            max_bytes=max_bytes,
            base=args.base,
            scrub=power.check_scrub_env(),
            stop_timeout_s=args.stop_timeout,
            progress=bar,
        ),
    )
    kind = "incremental image" if report.base_image_id else "image"
    return _summary(
        args,
        report,
        f"hibernate: {report.pages} pages ({_mib(report.data_bytes)} of data, "
        f"{report.zero_pages} zero, {report.in_base_pages} in the base) -> {kind} "
        f"{report.image} {_mib(report.image_bytes)} ({report.compression}, ratio "
        f"{report.ratio:.2f}{', encrypted' if report.encrypted else ''}); machine powered "
        f"off [{_seconds(report.durations_s)}]",
    )


def resume_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``kexec-sim resume``'s arguments."""
    parser.add_argument(
        "--image",
        required=True,
        action="append",
        type=Path,
        help="the image; repeat for a chain: the full image first, then its increments",
    )
    parser.add_argument("--threads", type=int, help="decompression workers (default: the cores)")
    _key_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_resume(args: argparse.Namespace) -> int:
    """``kexec-sim resume``."""
    machine = open_machine(args.machine, notify=_note)
    report = _run(
        args, lambda bar: resume.resume(machine, args.image, **_key_options(args), progress=bar)
    )
    return _summary(
        args,
        report,
        f"resume: {report.pages} pages ({_mib(report.data_bytes)} of data, {report.zero_pages} "
        f"zero) from {len(report.images)} image(s); generation {report.generation} booted "
        f"with pkram={report.super_block_pfn} ({report.preserved_pages} preserved pages) "
        f"[{_seconds(report.durations_s)}]",
    )


def _run(args: argparse.Namespace, command: Callable[[Progress | None], R]) -> R:
    """Run *command* with a progress bar when stderr is a terminal (and not ``--json``)."""
    bar = None if args.json or not sys.stderr.isatty() else ProgressBar(sys.stderr, ("verify",))
    try:
        return command(bar)
    finally:
        if bar is not None:
            bar.close()


def _summary(args: argparse.Namespace, report: Report, line: str) -> int:
    """Print *report*'s warnings to stderr, then its JSON form (``--json``) or *line*."""
    for warning in report.warnings:
        print(f"kexec-sim: warning: {warning}", file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=2) if args.json else line)
    return 0
