"""``kexec-sim``'s entry point: an exec runs warm when the exec agent waits for it
(kexec_sim.exec_agent); every other command, and an exec without an agent, runs
kexec_sim.cli as it is. Only the standard library's lightest modules are imported first."""

import sys

from kexec_sim.machine_dir import machine_path
from kexec_sim.warm_start import run_warm

_EXEC_KIND = "exec"  # kexec_sim.exec_agent.KIND (not imported: it starts a process)


def _exec_machine(argv: list[str]) -> str | None:
    """The machine an ``exec`` command line names (None: not an exec, or one asking for help
    or spelling its options in a way left to argparse)."""
    named = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--machine" and i + 1 < len(argv):
            named, i = argv[i + 1], i + 2
        elif arg.startswith("--machine="):
            named, i = arg.partition("=")[2], i + 1
        elif arg.startswith("-"):
            return None
        else:
            rest = argv[i + 1 :]
            if arg != "exec" or "-h" in rest or "--help" in rest:
                return None
            return machine_path(named)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``kexec-sim`` with *argv* (default: sys.argv[1:]); return the exit code."""
    args = sys.argv[1:] if argv is None else argv
    machine = _exec_machine(args)
    if machine is not None:
        code = run_warm(_EXEC_KIND, machine, [sys.argv[0], *args], "kexec-sim")
        if code is not None:
            return code
    from kexec_sim.cli import main as run_cold

    return run_cold(args)
