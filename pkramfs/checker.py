"""The ownership checker across mounts: every page owned exactly once, none leaked.

Each running mount of the machine dumps the pfns it believes it owns (files and idle pool);
the machine's ownership map must agree exactly (kexec_sim's PageOwnership.check).
"""

import os
from pathlib import Path

import numpy as np

from kexec_sim import Machine, PageOwnership, PfnArray, Ram, handover_problems, read_mounts

from . import control
from .errors import MountError, NodeError
from .filesystem import OWNER_PREFIX, mount_using
from .node_store import NodeInfo, NodeStore
from .options import FSTYPE


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
    for entry in read_mounts():
        if entry.fstype != FSTYPE:
            continue
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


def _store(machine: Machine) -> tuple[NodeStore, PageOwnership, Ram]:
    ram = machine.ram()
    ownership = machine.page_ownership()
    return NodeStore(machine, ram, ownership), ownership, ram


def check_machine(machine: Machine, claims: dict[int, PfnArray] | None = None) -> list[str]:
    """Return the ownership problems of *machine* (empty when every page is accounted for):
    the mounts' pages (*claims*, else what every running mount says it owns), this boot's
    super block and table, and every preserved page named by exactly one valid node."""
    store, ownership, ram = _store(machine)
    try:
        ownership.reclaim_dead_owners()
        boot = machine.boot_record()
        problems = ownership.check(gather_claims(machine) if claims is None else claims, boot)
        handover = handover_problems(ram, store.sb_pfn, store.generation)
        return problems + (handover or store.check())
    finally:
        ownership.close()
        ram.close()


def list_nodes(machine: Machine) -> tuple[list[NodeInfo], str | None]:
    """Return the preserved nodes of *machine* and why the list walk stopped early, if so."""
    store, ownership, ram = _store(machine)
    try:
        return store.nodes()
    finally:
        ownership.close()
        ram.close()


def discard_node(machine: Machine, name: str) -> int:
    """Free preserved node *name* and its pages; return how many pages were freed.

    Refused (NodeError) while a running mount uses that name: its pages are its files.
    """
    store, ownership, ram = _store(machine)
    try:
        user = mount_using(ownership, name)
        if user is not None:
            raise NodeError(
                f"pkram node {name!r} belongs to the running mount at {user[0]}: "
                "unmount it or remount it rw"
            )
        owner_id = ownership.register_owner(f"pkramfs-ctl:discard:{name}", os.getpid())
        try:
            return store.discard(name, owner_id)
        finally:
            ownership.unregister_owner(owner_id)
    finally:
        ownership.close()
        ram.close()
