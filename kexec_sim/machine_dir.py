"""Which directory is the machine, and whether a transition is recorded there: light enough
for a command's first step.

The directory is the explicit path given, else ``$KEXEC_SIM_MACHINE``, else
``/dev/shm/kexec-sim/default``. Only ``os`` is imported: a warm start (kexec_sim.warm_start)
resolves the machine before anything heavier is imported.
"""

import os

MACHINE_ENV = "KEXEC_SIM_MACHINE"
DEFAULT_MACHINE_PATH = "/dev/shm/kexec-sim/default"
TRANSITION_FILE = "transition.json"
"""The record of a power-state change under way (kexec_sim.transition)."""


def machine_path(path: str | os.PathLike[str] | None) -> str:
    """Return the machine directory, absolute: *path*, else $KEXEC_SIM_MACHINE, else the default."""
    chosen = os.fspath(path) if path is not None else os.environ.get(MACHINE_ENV, "")
    if not chosen:
        return DEFAULT_MACHINE_PATH
    expanded = os.path.expanduser(chosen)
    return expanded if os.path.isabs(expanded) else os.path.join(os.getcwd(), expanded)


def transition_recorded(machine_dir: str | os.PathLike[str]) -> bool:
    """Whether the machine has a transition recorded: one running, or one a dead process left
    for the next command to recover (kexec_sim.recovery)."""
    return os.path.exists(os.path.join(machine_dir, TRANSITION_FILE))
