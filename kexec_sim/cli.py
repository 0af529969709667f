"""``kexec-sim``: manage a simulated machine from the shell.

Usage: ``kexec-sim [--machine DIR] COMMAND ...``; the machine directory is ``--machine``, else
``$KEXEC_SIM_MACHINE``, else ``/dev/shm/kexec-sim/default``.

Commands (docs/KEXEC-SIM.md has the details):
    init [--ram SIZE] [--force]   create a machine (RAM like 512M, 8G, 1GiB; default 8G)
    status [--json]               boot, power, super block, pages, staged image, mounts
    check                         reclaim dead owners, print page counts, check the map
    load [KERNEL] [options]       stage the next kernel (kexec -l)
    unload                        drop the staged kernel (kexec -u)
    exec [--scrub MODE] [--force] boot the staged kernel (kexec -e)
    reboot [--scrub MODE]         stop everything, scrub all RAM, boot afresh
    poweroff                      stop everything, lose all RAM, power off
    boot                          power on: a fresh boot
    hibernate --image PATH [...]  preserve the mounts, write the page set to an image, power off
    resume --image PATH [...]     restore a hibernated machine from its image(s) and boot it

Exit codes:
    0   success
    1   machine state problem: no machine, machine exists, corrupt files, check found
        problems, powered off, nothing loaded, preserved pages in the load range, host I/O
    2   usage error or bad input (unknown option, bad size, bad address or command line,
        a load address over preserved pages, exec of a pkram= that is not this boot's)
    3   a hibernation image refused: corrupt, truncated, tampered, wrong or missing key,
        another machine's, already used, or stale (the machine booted since)
    70  internal error (a bug): one line naming it and the log file with its traceback
    130 interrupted (Ctrl-C)

Every error is one line ``kexec-sim: error: ...`` on stderr, never a traceback; warnings are
lines ``kexec-sim: warning: ...`` on stderr.
"""

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kexec_sim import exec_agent, kernel_image
from kexec_sim.cmdline import PKRAM_PARAM, join_cmdline, without_param
from kexec_sim.errors import (
    CorruptImage,
    CorruptMachine,
    InvalidRequest,
    MachineError,
    MachineExists,
    UsageError,
)
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.internal_error import EXIT_INTERNAL, report_internal_error
from kexec_sim.kernel_image import LoadedImage, default_image_pages, loaded_image
from kexec_sim.machine import DEFAULT_RAM_BYTES, Machine, check_ram_bytes, resolve_machine_dir
from kexec_sim.machine_dir import DEFAULT_MACHINE_PATH, MACHINE_ENV
from kexec_sim.owners import (
    FIRMWARE,
    FREE,
    HANDOVER,
    KERNEL,
    NOSAVE,
    PRESERVED,
    RESERVED_OWNERS,
)
from kexec_sim.process import is_alive
from kexec_sim.recovery import open_machine
from kexec_sim.sizes import parse_size

if TYPE_CHECKING:
    from kexec_sim.ownership import PageOwnership
    from kexec_sim.report import ExecReport

# A command imports what only it uses (kexec, power, hibernation) in its own functions: a
# ``kexec-sim load`` on the critical path of a handover starts without them.

PROG = "kexec-sim"
EXIT_OK = 0
EXIT_MACHINE = 1
EXIT_USAGE = 2
EXIT_IMAGE = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage dump) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _format_bytes(size_bytes: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size_bytes >= 1 << shift:
            return f"{size_bytes / (1 << shift):.1f} {unit}"
    return f"{size_bytes} bytes"


# -- commands -------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        ram_bytes = parse_size(args.ram)
        check_ram_bytes(ram_bytes)
    except InvalidRequest as exc:
        raise UsageError(f"--ram: {exc}") from None
    try:
        machine = Machine.create(args.machine, ram_bytes, force=args.force)
    except MachineExists as exc:
        raise MachineExists(f"{exc} (--force wipes it)") from None
    print(
        f"machine {machine.path}: {_format_bytes(machine.ram_bytes)} RAM, "
        f"{machine.nr_pages} pages, generation {machine.generation}"
    )
    return EXIT_OK


PAGE_KINDS = (
    "free",
    "owned",
    "preserved",
    "handover",
    "reserved",
    "firmware",
    "kernel",
    "nosave",
    "unregistered",
)


def _image_report(image: LoadedImage | None) -> dict[str, Any] | None:
    if image is None:
        return None
    return {
        "address": image.start_pfn * PAGE_SIZE,
        "start_pfn": image.start_pfn,
        "nr_pages": image.nr_pages,
        "size_bytes": image.image_bytes,
        "cmdline": image.cmdline,
        "kaslr": image.kaslr,
        "kernel_file": image.kernel_file,
        "warnings": list(image.warnings),
    }


def _page_report(machine: Machine, ownership: "PageOwnership | None") -> dict[str, Any]:
    """Return the status document: boot, power, page counts by kind and by owner, staged image.

    *ownership* is None for a powered-off machine (no pages, owners or image to report).
    """
    boot = machine.boot_record()
    report: dict[str, Any] = {
        "machine": str(machine.path),
        "generation": boot.generation,
        "cmdline": boot.cmdline,
        "powered": boot.powered,
        "ram_bytes": machine.ram_bytes,
        "page_size": PAGE_SIZE,
        "super_block_pfn": None,
        "pages": None,
        "bytes": None,
        "loaded": None,
        "owners": [],
        "mounts": [],
    }
    if ownership is None:
        return report
    with ownership.locked():
        counts = ownership.count_by_owner()
        owners = ownership.owners()
        image = loaded_image(machine)
    special = {FREE, PRESERVED, HANDOVER, *RESERVED_OWNERS}
    pages = {
        "total": machine.nr_pages,
        "free": counts.get(FREE, 0),
        "owned": sum(counts.get(i, 0) for i in owners),
        "preserved": counts.get(PRESERVED, 0),
        "handover": counts.get(HANDOVER, 0),
        "reserved": sum(counts.get(i, 0) for i in RESERVED_OWNERS),
        "firmware": counts.get(FIRMWARE, 0),
        "kernel": counts.get(KERNEL, 0),
        "nosave": counts.get(NOSAVE, 0),
        "unregistered": sum(n for i, n in counts.items() if i not in special and i not in owners),
    }
    owner_list = [
        {
            "id": owner_id,
            "name": info.name,
            "pid": info.pid,
            "alive": is_alive(info.pid, info.pid_start_time),
            "pages": counts.get(owner_id, 0),
            "mountpoint": info.mountpoint,
        }
        for owner_id, info in sorted(owners.items())
    ]
    try:
        report["super_block_pfn"] = machine.super_block_pfn
    except CorruptMachine as exc:  # status is how one finds out: report it, do not fail
        report["super_block_error"] = str(exc)
    report.update(
        pages=pages,
        bytes={kind: n * PAGE_SIZE for kind, n in pages.items()},
        loaded=_image_report(image),
        owners=owner_list,
        mounts=[
            {k: o[k] for k in ("mountpoint", "id", "name", "pid", "alive", "pages")}
            for o in owner_list
            if o["mountpoint"] is not None
        ],
    )
    return report


def _print_report(report: dict[str, Any]) -> None:
    print(f"machine:     {report['machine']}")
    print(f"generation:  {report['generation']}")
    print(f"cmdline:     {report['cmdline']}")
    ram_bytes, pages = report["ram_bytes"], report["pages"]
    print(
        f"RAM:         {_format_bytes(ram_bytes)}, {ram_bytes // PAGE_SIZE} pages of "
        f"{PAGE_SIZE} bytes"
    )
    if not report["powered"]:
        print("powered:     off (run 'kexec-sim boot')")
        return
    print("powered:     on")
    if report["super_block_pfn"] is None:
        print(
            f"super block: none ({report.get('super_block_error')}; 'kexec-sim reboot' makes one)"
        )
    else:
        print(f"super block: pfn {report['super_block_pfn']} (sys/kernel/{PKRAM_PARAM})")
    for kind in PAGE_KINDS:
        print(f"  {kind + ':':<14}{pages[kind]:>12} pages  {_format_bytes(report['bytes'][kind])}")
    for owner in report["owners"]:
        state = "alive" if owner["alive"] else "dead"
        where = f", {owner['mountpoint']}" if owner["mountpoint"] else ""
        print(
            f"    owner {owner['id']} {owner['name']!r} (pid {owner['pid']}, {state}{where}): "
            f"{owner['pages']} pages"
        )
    loaded = report["loaded"]
    if loaded is None:
        print("loaded:      nothing")
    else:
        print(
            f"loaded:      {loaded['nr_pages']} pages ({_format_bytes(loaded['size_bytes'])}) at "
            f"{loaded['address']:#x}{' (kaslr)' if loaded['kaslr'] else ''}, "
            f"command line {loaded['cmdline']!r}"
        )


def _cmd_status(args: argparse.Namespace) -> int:
    machine = _open(args)
    if machine.powered:
        with machine.page_ownership() as ownership:
            report = _page_report(machine, ownership)
    else:
        report = _page_report(machine, None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from kexec_sim.ownership_check import handover_problems

    machine = _open(args)
    with machine.page_ownership() as ownership, ownership.locked(), machine.ram() as ram:
        reclaimed = ownership.reclaim_dead_owners()
        report = _page_report(machine, ownership)
        boot = machine.boot_record()
        problems = ownership.check({}, boot)
        problems += handover_problems(ram, boot.super_block_pfn, boot.generation)
    if reclaimed:
        print(f"reclaimed {len(reclaimed)} dead owners: {', '.join(map(str, reclaimed))}")
    _print_report(report)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problems")
    return EXIT_MACHINE if problems else EXIT_OK


def _open(args: argparse.Namespace) -> Machine:
    """The machine the command names, after recovering an interrupted transition."""
    return open_machine(args.machine, notify=_note)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _warn(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)


def _parse_addr(text: str) -> int:
    """A byte address, decimal or 0x hex, page aligned; return its pfn."""
    try:
        addr = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise UsageError(f"--addr: not an address: {text!r}") from None
    if addr < 0 or addr % PAGE_SIZE:
        raise UsageError(f"--addr: {text} is not a multiple of the page size ({PAGE_SIZE})")
    return addr // PAGE_SIZE


def _cmd_load(args: argparse.Namespace) -> int:
    machine = _open(args)
    base = args.command_line or ""
    if args.reuse_cmdline:
        base = without_param(machine.cmdline, PKRAM_PARAM)  # this boot's handover is spent
    cmdline = join_cmdline(base, args.append or "")
    addr_pfn = None if args.addr is None else _parse_addr(args.addr)
    if args.kernel is not None and args.image_size is not None:
        raise UsageError("--image-size: not allowed with a KERNEL file (its size is the image's)")
    try:
        image_size = (
            default_image_pages(machine.memory_map) * PAGE_SIZE
            if args.image_size is None
            else parse_size(args.image_size)
        )
    except InvalidRequest as exc:
        raise UsageError(f"--image-size: {exc}") from None
    try:
        image = kernel_image.load(
            machine,
            cmdline,
            addr_pfn=addr_pfn,
            kaslr=args.kaslr,
            image_size=image_size,
            image_file=args.kernel,
        )
    except OSError as exc:
        raise UsageError(f"{args.kernel}: {exc.strerror or exc}") from None
    _warn(image.warnings)
    exec_agent.start(str(machine.path), machine.generation)
    how = " (kaslr)" if image.kaslr else ""
    print(
        f"loaded {image.nr_pages} pages ({_format_bytes(image.image_bytes)}) at "
        f"{image.start_pfn * PAGE_SIZE:#x}{how}, pfns {image.start_pfn}..{image.end_pfn - 1}, "
        f"command line {image.cmdline!r}"
    )
    return EXIT_OK


def _cmd_unload(args: argparse.Namespace) -> int:
    machine = _open(args)
    with machine.page_ownership() as po, po.locked():
        found = kernel_image.unload(machine)
    print("unloaded" if found else "nothing was loaded")
    return EXIT_OK


def _scrub_mode(args: argparse.Namespace) -> str:
    from kexec_sim import power

    if args.scrub is not None:
        mode: str = args.scrub
        return mode
    return power.check_scrub_env()


def _print_exec(report: "ExecReport", as_json: bool) -> None:
    _warn(report.warnings)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    if report.action == "poweroff":
        print(f"poweroff: generation {report.generation} is off, RAM lost")
    else:
        print(
            f"{report.action}: generation {report.generation} booted, command line "
            f"{report.cmdline!r}"
        )
    if report.image_range is not None:
        start, end = report.image_range
        print(f"  image:       {end - start} pages at {start * PAGE_SIZE:#x} (pfn {start})")
    if report.action != "poweroff":
        print(
            f"  handed over: {report.preserved_pages} preserved pages (table of "
            f"{report.table_pages} pages); super block at pfn {report.super_block_pfn}"
        )
    if report.scrubbed_pages:
        print(f"  scrubbed:    {report.scrubbed_pages} pages ({report.scrub})")
    pids = len({s.pid for s in report.stopped if s.how in ("gone", "term", "kill", "alive")})
    print(
        f"  stopped:     {pids} processes ({report.stopped_by('gone')} gone once unmounted, "
        f"{report.stopped_by('term')} by SIGTERM, {report.stopped_by('kill')} by SIGKILL)"
    )
    durations = ", ".join(
        f"{name} {seconds * 1000:.1f} ms" for name, seconds in report.durations_s.items()
    )
    print(f"  durations:   {durations}")


def _stop_timeout(args: argparse.Namespace) -> float:
    timeout: float = args.stop_timeout
    if not 0 <= timeout <= 3600:
        raise UsageError(f"--stop-timeout: {timeout} is not 0..3600 seconds")
    return timeout


def _cmd_exec(args: argparse.Namespace) -> int:
    from kexec_sim import kexec

    machine = _open(args)
    scrub, timeout = _scrub_mode(args), _stop_timeout(args)
    report = kexec.exec_(machine, scrub=scrub, force=args.force, stop_timeout_s=timeout)
    _print_exec(report, args.json)
    return EXIT_OK


def _cmd_reboot(args: argparse.Namespace) -> int:
    from kexec_sim import power
    from kexec_sim.recovery import discard_transition

    scrub, timeout = _scrub_mode(args), _stop_timeout(args)
    if args.force:  # the way out when recovering an interrupted transition keeps failing
        discarded = discard_transition(resolve_machine_dir(args.machine))
        if discarded is not None:
            _warn([f"an interrupted {discarded.describe()} was discarded, not recovered"])
        machine = Machine.open(args.machine, create=False)
        if not machine.powered:
            _print_exec(power.power_on(machine), args.json)
            return EXIT_OK
    else:
        machine = _open(args)
    _print_exec(power.reboot(machine, scrub=scrub, stop_timeout_s=timeout), args.json)
    return EXIT_OK


def _cmd_poweroff(args: argparse.Namespace) -> int:
    from kexec_sim import power

    machine = _open(args)
    scrub, timeout = _scrub_mode(args), _stop_timeout(args)
    _print_exec(power.poweroff(machine, scrub=scrub, stop_timeout_s=timeout), args.json)
    return EXIT_OK


def _cmd_boot(args: argparse.Namespace) -> int:
    from kexec_sim import power

    machine = _open(args)
    _print_exec(power.power_on(machine), args.json)
    return EXIT_OK


# -- the command table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, how to declare its arguments, and its handler."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ram",
        default=f"{DEFAULT_RAM_BYTES >> 30}G",
        metavar="SIZE",
        help="RAM size (512M, 8G, 1GiB)",
    )
    parser.add_argument("--force", action="store_true", help="wipe an existing machine")


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kernel", nargs="?", metavar="KERNEL", help="kernel image file (default: synthetic)"
    )
    parser.add_argument("--append", metavar="TEXT", help="append TEXT to the command line")
    line = parser.add_mutually_exclusive_group()
    line.add_argument(
        "--reuse-cmdline",
        action="store_true",
        help="start from the current command line (its pkram= dropped)",
    )
    line.add_argument("--command-line", metavar="TEXT", help="start from TEXT")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--addr", metavar="ADDR", help="load address in bytes (decimal or 0x hex)")
    where.add_argument("--kaslr", action="store_true", help="a random free 2 MiB-aligned address")
    parser.add_argument(
        "--image-size", metavar="SIZE", help="size of the synthetic image (default 16M)"
    )


def _stop_argument(parser: argparse.ArgumentParser) -> None:
    from kexec_sim.shutdown import DEFAULT_STOP_TIMEOUT_S

    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT_S,
        metavar="SECONDS",
        help=f"SIGTERM to SIGKILL grace period (default {DEFAULT_STOP_TIMEOUT_S:g})",
    )


def _scrub_argument(parser: argparse.ArgumentParser) -> None:
    from kexec_sim import power
    from kexec_sim.scrub import SCRUB_MODES

    parser.add_argument(
        "--scrub",
        choices=SCRUB_MODES,
        help=f"punch holes or poison (default: ${power.SCRUB_ENV} or {power.DEFAULT_SCRUB})",
    )


def _exec_arguments(parser: argparse.ArgumentParser) -> None:
    _scrub_argument(parser)
    parser.add_argument(
        "--force", action="store_true", help="exec even if pkram= or the super block is wrong"
    )
    _stop_argument(parser)
    _status_arguments(parser)


def _reboot_arguments(parser: argparse.ArgumentParser) -> None:
    _scrub_argument(parser)
    _stop_argument(parser)
    _status_arguments(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="discard an interrupted power-state change without recovering it, then reboot "
        "(boot, if the machine is off): what it had preserved is lost",
    )


def _poweroff_arguments(parser: argparse.ArgumentParser) -> None:
    _stop_argument(parser)
    _scrub_argument(parser)
    _status_arguments(parser)


def _hibernate_arguments(parser: argparse.ArgumentParser) -> None:
    from kexec_sim.hibernation.cli import hibernate_arguments

    hibernate_arguments(parser)


def _run_hibernate(args: argparse.Namespace) -> int:
    from kexec_sim.hibernation.cli import run_hibernate

    return run_hibernate(args)


def _resume_arguments(parser: argparse.ArgumentParser) -> None:
    from kexec_sim.hibernation.cli import resume_arguments

    resume_arguments(parser)


def _run_resume(args: argparse.Namespace) -> int:
    from kexec_sim.hibernation.cli import run_resume

    return run_resume(args)


COMMANDS: dict[str, Command] = {
    "init": Command("create a machine", _init_arguments, _cmd_init),
    "status": Command("show the machine's boot and pages", _status_arguments, _cmd_status),
    "check": Command("reclaim dead owners and check page ownership", lambda p: None, _cmd_check),
    "load": Command("stage the next kernel (kexec -l)", _load_arguments, _cmd_load),
    "unload": Command("drop the staged kernel (kexec -u)", lambda p: None, _cmd_unload),
    "exec": Command("boot the staged kernel (kexec -e)", _exec_arguments, _cmd_exec),
    "reboot": Command("stop everything, scrub RAM, boot afresh", _reboot_arguments, _cmd_reboot),
    "poweroff": Command("stop everything and power off", _poweroff_arguments, _cmd_poweroff),
    "boot": Command("power on: a fresh boot", _status_arguments, _cmd_boot),
    "hibernate": Command(
        "preserve the mounts, write an image, power off",
        _hibernate_arguments,
        _run_hibernate,
    ),
    "resume": Command(
        "resume a hibernated machine from its image(s)", _resume_arguments, _run_resume
    ),
}


@functools.cache
def build_parser(declare: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of ``kexec-sim``, with the arguments of the commands named
    in *declare* (None: of every command). An undeclared command has no arguments, no -h.
    Built once per *declare* (the exec agent builds the exec's ahead)."""
    parser = _Parser(prog=PROG, description="Manage a simulated machine (RAM, boot, kexec).")
    parser.add_argument(
        "--machine",
        metavar="DIR",
        help=f"machine directory (default: ${MACHINE_ENV}, else {DEFAULT_MACHINE_PATH})",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        declared = declare is None or name in declare
        sub = subparsers.add_parser(
            name, help=command.help, description=command.help, add_help=declared
        )
        if declared:
            command.add_arguments(sub)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a command line: first which command it names, then with that command's arguments
    only (declaring another's could import its modules: the hibernation code, say)."""
    command = build_parser(declare=()).parse_known_args(argv)[0].command
    return build_parser(declare=(command,)).parse_args(argv)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kexec-sim`` with *argv* (default: sys.argv[1:]); return the exit code."""
    try:
        args = parse_args(argv)
        run: Callable[[argparse.Namespace], int] = COMMANDS[args.command].run
        return run(args)
    except (UsageError, InvalidRequest) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except CorruptImage as exc:
        return _fail(str(exc), EXIT_IMAGE)
    except MachineError as exc:
        return _fail(str(exc), EXIT_MACHINE)
    except OSError as exc:
        return _fail(
            f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", EXIT_MACHINE
        )
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # a bug: one line and the log, never a traceback
        print(report_internal_error(PROG, exc, _machine_dir(argv)), file=sys.stderr)
        return EXIT_INTERNAL


def _machine_dir(argv: Sequence[str] | None) -> Path | None:
    """The machine directory a command line names (for the internal-error log), if any."""
    args = list(sys.argv[1:] if argv is None else argv)
    named = args[args.index("--machine") + 1] if "--machine" in args[:-1] else None
    return resolve_machine_dir(named)


if __name__ == "__main__":
    sys.exit(main())
