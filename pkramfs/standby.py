"""The standby: the next boot's ``pkramfs`` mounts run warm (kexec_sim.warm_start).

The daemon of a mount with ``pkram=`` starts one (``start``) for the machine's next boot,
detached, once it serves. It imports the daemon (trio, pyfuse3, numpy, the tree: ~0.25 s, most
of a restoring mount's time otherwise) and waits; in the next boot, each ``pkramfs`` mount of
that machine runs in a child it forks, as the command would have run. Like the next kernel's
image staged by ``kexec -l``, it is code loaded ahead: it touches the machine only when it
runs a mount.

While its boot has not come, it waits as long as a pkramfs daemon of the machine runs or a
transition (an exec) is recorded; in its boot, it ends once IDLE_S passed without a mount (from
the boot's start or the last mount), or once it ran a mount and no pkramfs daemon of the
machine is left; and when the machine is off, gone, or past its boot. One standby
per machine and boot: a second one ends at once.
"""

import gc
import sys
import time
from pathlib import Path

from kexec_sim import (
    Machine,
    MachineError,
    WarmListener,
    read_record,
    running_generation,
    spawn_detached,
)

__all__ = ["KIND", "start"]

KIND = "pkramfs-mount"
POLL_S = 0.25
"""How often a waiting standby looks at its machine."""
IDLE_S = 30.0
"""How long a standby waits in its boot for a mount (from the boot's start or the last
mount) before it ends."""
LOG_FILE = "standby.log"


def start(machine_dir: Path, generation: int) -> None:
    """Start the standby for the boot after *generation*, detached; never raises (without one
    the next boot's mount runs cold)."""
    spawn_detached(
        [sys.executable, "-m", "pkramfs.standby", str(machine_dir), str(generation + 1)],
        str(machine_dir / "logs" / LOG_FILE),
    )


class _Watch:
    """Whether the standby for boot *target* of the machine in *machine_dir* should go on."""

    def __init__(self, machine_dir: str, target: int) -> None:
        self.machine_dir = machine_dir
        self.target = target
        self.last_seen: float | None = None
        """When its boot was first seen running, or its last mount came."""
        self.served = False
        """Whether a mount of its boot came."""
        self.machine: Machine | None = None

    def ready(self) -> bool:
        """Its boot runs: a mount now runs here."""
        if running_generation(self.machine_dir) != self.target:
            return False
        self.last_seen = time.monotonic()
        self.served = True
        return True

    def keep_waiting(self) -> bool:
        generation = running_generation(self.machine_dir)
        if generation == self.target:
            now = time.monotonic()
            if self.served and not self._daemon_runs():
                return False  # its mounts are done and gone: nothing of its boot is left to do
            self.last_seen = self.last_seen or now
            return now - self.last_seen < IDLE_S
        if generation != self.target - 1:
            return False  # off, gone or past its boot
        # Looked at in this order, an exec cannot slip between: it records its transition
        # before it stops the daemons and moves the generation before it drops the record.
        if self._daemon_runs() or self._transition_recorded():
            return True
        return running_generation(self.machine_dir) == self.target

    def _daemon_runs(self) -> bool:
        if self.machine is None:  # opened once: machine.json and the memory map do not change
            try:
                self.machine = Machine.open(self.machine_dir, create=False)
            except MachineError:
                return False
        return any(o.name.startswith("pkramfs:") for o in self.machine.live_owners())

    def _transition_recorded(self) -> bool:
        try:
            return read_record(Path(self.machine_dir)) is not None
        except MachineError:
            return True  # unreadable: whoever recovers it decides; look again later


def main(argv: list[str]) -> int:
    """``python -m pkramfs.standby MACHINE_DIR GENERATION``."""
    machine_dir, target = argv[0], int(argv[1])
    try:
        listener = WarmListener(KIND, machine_dir, target)
    except OSError:
        return 0  # another standby waits for that boot
    # The point: all a mount runs, imported before it comes.
    from kexec_sim import open_machine, read_mounts  # noqa: F401

    from . import daemon, mount_cli, standby  # noqa: F401

    gc.freeze()  # what is imported stays shared with the daemon the mount forks: no copies
    watch = _Watch(machine_dir, target)
    listener.serve_forking(
        mount_cli.main, ready=watch.ready, keep_waiting=watch.keep_waiting, poll_s=POLL_S
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
