"""The exec agent: ``kexec-sim exec`` run warm (kexec_sim.warm_start).

``kexec-sim load`` starts it (``start``), detached, once per boot, and returns once it has
imported what an exec runs (numpy, the scrub, the handover, early boot: ~0.2 s that were the
exec's, in the blackout); it waits for the ``kexec-sim exec`` of that boot, which then runs
in it. It ends after that exec, or as soon as there is nothing left to exec: the staged image
is unloaded, the boot it serves is over (exec, reboot, power off) or the machine is gone. An
agent already waiting for the same boot makes a second one end at once. It touches the
machine only when it runs the exec.
"""

import os
import sys

from kexec_sim.machine_dir import machine_path
from kexec_sim.warm_start import WarmListener, running_generation, spawn_detached, wait_ready

__all__ = ["KIND", "start"]

KIND = "exec"
POLL_S = 0.25
"""How often an idle agent looks whether its boot and staged image are still there."""
READY_TIMEOUT_S = 10.0
LOG_FILE = "logs/exec-agent.log"
LOAD_FILE = "boot/kexec-load.json"


def start(machine_dir: str, generation: int) -> None:
    """Start the agent for boot *generation* of the machine, detached, and wait until it has
    imported the exec (what a load stages, the exec need not do); never raises (without an
    agent, an exec runs cold)."""
    spawn_detached(
        [sys.executable, "-m", "kexec_sim.exec_agent", machine_dir, str(generation)],
        os.path.join(machine_dir, LOG_FILE),
    )
    wait_ready(KIND, machine_dir, generation, READY_TIMEOUT_S)


def _still_wanted(machine_dir: str, generation: int) -> bool:
    return running_generation(machine_dir) == generation and os.path.exists(
        os.path.join(machine_dir, LOAD_FILE)
    )


def main(argv: list[str]) -> int:
    """``python -m kexec_sim.exec_agent MACHINE_DIR GENERATION``."""
    machine_dir, generation = machine_path(argv[0]), int(argv[1])
    try:
        listener = WarmListener(KIND, machine_dir, generation)
    except OSError:
        return 0  # another agent serves this boot
    from kexec_sim import cli, kexec  # noqa: F401  (the point: imported before the exec)

    cli.parse_args(["exec"])  # its parsers, built before the exec

    def wanted() -> bool:
        return _still_wanted(machine_dir, generation)

    listener.serve_one(cli.main, ready=wanted, keep_waiting=wanted, poll_s=POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
