"""``pkramfs-ctl``: talk to running pkramfs mounts.

``pkramfs-ctl status MOUNTPOINT [--json]`` shows a mount's state; ``pkramfs-ctl check
[--machine DIR]`` runs the ownership checker over every mount of a machine.

Exit codes: 0 fine; 1 the check found problems or a mount did not answer; 2 bad invocation.
"""

import argparse
import json
import sys

from kexec_sim.errors import MachineError
from kexec_sim.machine import Machine

from . import control
from .checker import check_machine
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
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            state = control.query_status(args.mountpoint)
            if args.json:
                print(json.dumps(state, indent=2, sort_keys=True))
            else:
                for key in sorted(state):
                    print(f"{key}: {state[key]}")
            return 0
        problems = check_machine(Machine.open(args.machine, create=False))
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s)")
        return EXIT_PROBLEM if problems else 0
    except (PkramfsError, MachineError) as exc:
        print(f"pkramfs-ctl: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
