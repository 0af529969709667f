"""``kexec-sim``: manage a simulated machine from the shell.

Usage: ``kexec-sim [--machine DIR] COMMAND ...``; the machine directory is ``--machine``, else
``$KEXEC_SIM_MACHINE``, else ``/dev/shm/kexec-sim/default``.

Commands:
    init [--ram SIZE] [--force]   create a machine (RAM like 512M, 8G, 1GiB; default 8G)
    status [--json]               boot generation, command line, page counts per owner
    check                         reclaim dead owners, print page counts, check the map

Exit codes:
    0   success
    1   machine state problem: no machine, machine exists, corrupt files, check found
        problems, host I/O error
    2   usage error or bad input (unknown option, bad size)
    130 interrupted (Ctrl-C)

Every error is one line ``kexec-sim: error: ...`` on stderr, never a traceback.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from kexec_sim.errors import MachineError, MachineExists
from kexec_sim.machine import DEFAULT_RAM_BYTES, Machine, check_ram_bytes, resolve_machine_dir
from kexec_sim.owners import FIRMWARE, FREE, KERNEL, NOSAVE, PRESERVED, RESERVED_OWNERS
from kexec_sim.ownership import PageOwnership
from kexec_sim.pages import PAGE_SIZE
from kexec_sim.process import is_alive
from kexec_sim.sizes import parse_size

PROG = "kexec-sim"
EXIT_OK = 0
EXIT_MACHINE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line (exit code 2)."""


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
    except ValueError as exc:
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


def _page_report(machine: Machine, ownership: PageOwnership) -> dict[str, Any]:
    """Return the status document: boot, page counts by kind and by registered owner."""
    boot = machine.boot_record()
    with ownership.locked():
        counts = ownership.count_by_owner()
        owners = ownership.owners()
    special = {FREE, PRESERVED, *RESERVED_OWNERS}
    unregistered = sum(n for i, n in counts.items() if i not in special and i not in owners)
    return {
        "machine": str(machine.path),
        "generation": boot.generation,
        "cmdline": boot.cmdline,
        "ram_bytes": machine.ram_bytes,
        "page_size": PAGE_SIZE,
        "pages": {
            "total": machine.nr_pages,
            "free": counts.get(FREE, 0),
            "firmware": counts.get(FIRMWARE, 0),
            "kernel": counts.get(KERNEL, 0),
            "nosave": counts.get(NOSAVE, 0),
            "preserved": counts.get(PRESERVED, 0),
            "owned": sum(counts.get(i, 0) for i in owners),
            "unregistered": unregistered,
        },
        "owners": [
            {
                "id": owner_id,
                "name": info.name,
                "pid": info.pid,
                "alive": is_alive(info.pid, info.pid_start_time),
                "pages": counts.get(owner_id, 0),
            }
            for owner_id, info in sorted(owners.items())
        ],
    }


def _print_report(report: dict[str, Any]) -> None:
    pages, owners, ram_bytes = report["pages"], report["owners"], report["ram_bytes"]
    print(f"machine:     {report['machine']}")
    print(f"generation:  {report['generation']}")
    print(f"cmdline:     {report['cmdline']}")
    print(f"RAM:         {_format_bytes(ram_bytes)}, {pages['total']} pages of {PAGE_SIZE} bytes")
    for kind in ("free", "firmware", "kernel", "nosave", "preserved", "owned", "unregistered"):
        print(f"  {kind + ':':<14}{pages[kind]:>12} pages")
    for owner in owners:
        state = "alive" if owner["alive"] else "dead"
        print(
            f"    owner {owner['id']} {owner['name']!r} (pid {owner['pid']}, {state}): "
            f"{owner['pages']} pages"
        )


def _cmd_status(args: argparse.Namespace) -> int:
    machine = Machine.open(args.machine, create=False)
    with machine.page_ownership() as ownership:
        report = _page_report(machine, ownership)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    machine = Machine.open(args.machine, create=False)
    with machine.page_ownership() as ownership, ownership.locked():
        reclaimed = ownership.reclaim_dead_owners()
        report = _page_report(machine, ownership)
        problems = ownership.check({})
    if reclaimed:
        print(f"reclaimed {len(reclaimed)} dead owners: {', '.join(map(str, reclaimed))}")
    _print_report(report)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problems")
    return EXIT_MACHINE if problems else EXIT_OK


# -- the command table: load/exec/hibernate/resume are added here -----------------------------


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


COMMANDS: dict[str, Command] = {
    "init": Command("create a machine", _init_arguments, _cmd_init),
    "status": Command("show the machine's boot and pages", _status_arguments, _cmd_status),
    "check": Command("reclaim dead owners and check page ownership", lambda p: None, _cmd_check),
    # "load": ..., "exec": ..., "hibernate": ..., "resume": ...  (later features)
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``kexec-sim``."""
    parser = _Parser(prog=PROG, description="Manage a simulated machine (RAM, boot, kexec).")
    parser.add_argument(
        "--machine",
        metavar="DIR",
        help=f"machine directory (default: $KEXEC_SIM_MACHINE or {resolve_machine_dir(None)})",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kexec-sim`` with *argv* (default: sys.argv[1:]); return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except MachineError as exc:
        return _fail(str(exc), EXIT_MACHINE)
    except OSError as exc:
        return _fail(
            f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", EXIT_MACHINE
        )
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
