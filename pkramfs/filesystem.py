"""One mounted pkramfs: the machine it lives on, its pages, its tree and its options."""

import errno
import os
import time
from typing import Any

import numpy as np

from kexec_sim.machine import Machine

from .errors import FsError, MountError, OptionError
from .options import MountOptions, parse_options
from .page_pool import PagePool
from .tree import Tree

OWNER_PREFIX = "pkramfs:"  # owner names: pkramfs:<pkram name or ->:<mountpoint>


class PkramFilesystem:
    """The state of one mount, owned by its daemon process."""

    def __init__(self, options: MountOptions, *, mountpoint: str) -> None:
        self.options = options
        self.mountpoint = mountpoint
        self.machine = Machine.open(options.machine)
        self.ram = self.machine.ram()
        self.ownership = self.machine.page_ownership()
        name = f"{OWNER_PREFIX}{options.pkram or '-'}:{mountpoint}"
        self.owner_id = self.ownership.register_owner(name, os.getpid())
        limit_pages = options.resolved_size_pages(self.machine.nr_pages)
        self.pool = PagePool(self.ownership, self.ram, self.owner_id, limit_pages)
        self.tree = Tree(
            self.ram,
            self.pool,
            root_mode=options.mode,
            root_uid=options.uid,
            root_gid=options.gid,
            max_inodes=options.resolved_nr_inodes(self.machine.nr_pages),
            huge=options.huge == "always",
        )
        self.tree.read_only = options.read_only
        self.started_ns = time.time_ns()

    def status(self) -> dict[str, Any]:
        """Return what ``pkramfs-ctl status`` shows (small: fits in one xattr)."""
        return {
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "machine": str(self.machine.path),
            "generation": self.machine.generation,
            "owner_id": self.owner_id,
            "pkram": self.options.pkram,
            "read_only": self.tree.read_only,
            "huge": self.options.huge,
            "size_pages": self.pool.limit_pages,
            "used_pages": self.pool.used_pages,
            "idle_pages": len(self.pool.idle_pages),
            "inodes": len(self.tree.inodes),
            "max_inodes": self.tree.max_inodes,
            "open_writers": self.tree.writers(),
        }

    def dump_claims(self) -> str:
        """Write every pfn this mount believes it owns to a .npy file; return its path."""
        path = str(self.machine.boot_dir / f"claims-{self.owner_id}.npy")
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as out:
            np.save(out, self.tree.owned_pfns())
        os.replace(tmp, path)
        return path

    def remount(self, items: list[str]) -> None:
        """Apply ``mount -o remount,...``: ro/rw, size=, nr_inodes= (others must not change)."""
        new = parse_options(items, ram_bytes=self.machine.ram_bytes)
        if new.pkram is not None and new.pkram != self.options.pkram:
            raise OptionError("pkram= cannot change on remount")
        if new.machine is not None and new.machine != self.options.machine:
            raise OptionError("machine= cannot change on remount")
        if new.size_bytes is not None:
            limit = new.resolved_size_pages(self.machine.nr_pages)
            if limit and limit < self.pool.used_pages:
                raise MountError("size= is smaller than what the files already use")
            self.pool.limit_pages = limit
        if new.nr_inodes is not None:
            if new.nr_inodes and new.nr_inodes < len(self.tree.inodes):
                raise MountError("nr_inodes= is smaller than the inodes in use")
            self.tree.max_inodes = new.nr_inodes
        if "ro" in new.kernel_flags or "rw" in new.kernel_flags:
            if new.read_only and not self.tree.read_only and self.tree.writers():
                raise FsError(errno.EBUSY, "a file is open for writing")
            self.tree.read_only = new.read_only

    def close(self) -> None:
        """Give every page back to the machine and leave the ownership registry (unmount)."""
        self.ownership.unregister_owner(self.owner_id)
        self.ram.close()
