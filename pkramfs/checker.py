"""The ownership checker across mounts: every page owned exactly once, none leaked.

Each running mount of the machine dumps the pfns it believes it owns (files and idle pool);
the machine's ownership map must agree exactly (kexec_sim's PageOwnership.check).
"""

import os
from pathlib import Path

import numpy as np

from kexec_sim.machine import Machine
from kexec_sim.pages import PfnArray

from . import control
from .errors import MountError
from .filesystem import OWNER_PREFIX
from .mounts import pkramfs_mounts


def gather_claims(machine: Machine) -> dict[int, PfnArray]:
    """Ask every running mount of *machine* for its pages; return {owner id: pfns}."""
    claims: dict[int, PfnArray] = {}
    machine_dir = str(Path(machine.path).resolve())
    # Only mounts whose daemons registered on this machine: never query a foreign mount.
    registered = {
        info.name.split(":", 2)[2]
        for info in machine.page_ownership().owners().values()
        if info.name.startswith(OWNER_PREFIX)
    }
    for entry in pkramfs_mounts():
        if entry.mountpoint not in registered:
            continue
        try:
            status = control.query_status(entry.mountpoint)
        except MountError:
            continue  # a daemon that is gone: its pages are reclaimed as a dead owner's
        if str(Path(status["machine"]).resolve()) != machine_dir:
            continue
        path = control.query_claims_path(entry.mountpoint)
        claims[int(status["owner_id"])] = np.load(path, allow_pickle=False)
        os.unlink(path)
    return claims


def check_machine(machine: Machine) -> list[str]:
    """Return the ownership problems of *machine* (empty when every page is accounted for)."""
    ownership = machine.page_ownership()
    ownership.reclaim_dead_owners()
    return ownership.check(gather_claims(machine))
