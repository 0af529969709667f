"""``pkramfs-ctl``: talk to running pkramfs mounts.

``pkramfs-ctl status MOUNTPOINT [--json]`` shows a mount's state; ``pkramfs-ctl check
[--machine DIR]`` runs the ownership checker over every mount of a machine and its preserved
nodes; ``pkramfs-ctl nodes [--machine DIR] [--json]`` lists the preserved nodes (like reading
/sys/kernel/pkram's list), ``pkramfs-ctl discard NAME [--machine DIR]`` frees one.

Exit codes: 0 fine; 1 the check found problems, a mount did not answer or the host refused;
2 bad invocation; 70 internal error, a bug (one line naming it and the log file with its
traceback).
"""

import argparse
import json
import sys
from dataclasses import asdict

from kexec_sim import (
    EXIT_INTERNAL,
    Machine,
    MachineError,
    open_machine,
    report_internal_error,
    resolve_machine_dir,
)

from . import control
from .checker import check_machine, discard_node, list_nodes
from .errors import PkramfsError

EXIT_PROBLEM = 1  # argparse itself exits 2 on a usage error


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pkramfs-ctl``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="pkramfs-ctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="show a mount's state")
    status.add_argument("mountpoint")
    status.add_argument("--json", action="store_true")
    check = sub.add_parser("check", help="check page ownership over a machine's mounts")
    check.add_argument("--machine", default=None)
    nodes = sub.add_parser("nodes", help="list the preserved nodes of a machine")
    nodes.add_argument("--machine", default=None)
    nodes.add_argument("--json", action="store_true")
    discard = sub.add_parser("discard", help="free a preserved node and its pages")
    discard.add_argument("name")
    discard.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "nodes":
            return _list_nodes(_open(args), args.json)
        if args.command == "discard":
            freed = discard_node(_open(args), args.name)
            print(f"discarded pkram node {args.name!r}: {freed} pages freed")
            return 0
        if args.command == "status":
            state = control.query_status(args.mountpoint)
            if args.json:
                print(json.dumps(state, indent=2, sort_keys=True))
            else:
                for key in sorted(state):
                    print(f"{key}: {state[key]}")
            return 0
        problems = check_machine(_open(args))
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s)")
        return EXIT_PROBLEM if problems else 0
    except (PkramfsError, MachineError) as exc:
        print(f"pkramfs-ctl: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pkramfs-ctl: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except Exception as exc:  # a bug: one line and the log, never a traceback
        machine = None if args.command == "status" else resolve_machine_dir(args.machine)
        print(report_internal_error("pkramfs-ctl", exc, machine), file=sys.stderr)
        return EXIT_INTERNAL


def _open(args: argparse.Namespace) -> Machine:
    """The machine named by --machine, after recovering an interrupted power transition."""
    return open_machine(args.machine, notify=lambda m: print(f"pkramfs-ctl: {m}", file=sys.stderr))


def _list_nodes(machine: Machine, as_json: bool) -> int:
    infos, stopped = list_nodes(machine)
    if as_json:
        print(json.dumps({"nodes": [asdict(i) for i in infos], "list_error": stopped}, indent=2))
    else:
        print(
            f"{'NAME':<24} {'PFN':>10} {'STATE':<9} {'GEN':>4} {'PAGES':>10} {'FILES':>8}  PROBLEM"
        )
        for info in infos:
            print(
                f"{info.name:<24} {info.pfn:>10} {info.state:<9} {info.generation:>4} "
                f"{info.data_pages:>10} {info.objects:>8}  {info.error or ''}"
            )
        if stopped:
            print(f"(list walk stopped: {stopped})")
    bad = stopped is not None or any(i.error for i in infos)
    return EXIT_PROBLEM if bad else 0
