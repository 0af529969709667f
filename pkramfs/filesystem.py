"""One mounted pkramfs: the machine it lives on, its pages, its tree and its options."""

import errno
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from kexec_sim import Machine, OwnerInfo, PageOwnership, PfnArray, boot_stopping

from . import preserve
from .errors import FsError, MountError, OptionError
from .node_store import NodeStore
from .options import MountOptions, parse_options
from .page_pool import PagePool
from .preserve import Preserved, PreserveStats, Restoring
from .tree import Tree
from .tree_record import MountSettings

log = logging.getLogger(__name__)

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
        self.owner_id = self.ownership.register_owner(
            name, os.getpid(), mountpoint=mountpoint, preservable=options.pkram is not None
        )
        if options.pkram is not None:
            try:
                _check_name_free(self.ownership, options.pkram, self.owner_id)
            except MountError:
                self.ownership.unregister_owner(self.owner_id)
                raise
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
        self.tree.secret = bool(options.secret)
        self.started_ns = time.time_ns()
        self.store = NodeStore(self.machine, self.ram, self.ownership)
        self.preserved: Preserved | None = None
        self.last_preserve: PreserveStats | None = None
        self.restored: PreserveStats | None = None
        self._restoring: Restoring | None = None
        if options.pkram is not None:
            try:
                self._restore(options.pkram)
            except BaseException:
                self.close()
                raise

    def _restore(self, name: str) -> None:
        """Bring back the tree of node *name*, if there is one, and the mount's settings with
        it; its pages stay the node's until `take_restored` (the mount is live by then)."""
        restoring = preserve.restore(self.store, self.tree, name)
        if restoring is None:
            return
        self._restoring = restoring
        saved = restoring.mount
        if self.options.size_bytes is None:
            self.pool.limit_pages = saved.size_pages
        if self.options.nr_inodes is None:
            self.tree.max_inodes = saved.max_inodes
        if self.options.huge is None:
            self.tree.huge = saved.huge
        if saved.secret:  # a secret mount stays secret: the option cannot be undone
            self.tree.secret = True

    def take_restored(self) -> None:
        """Take the pages of the node the tree was restored from (once mounted, before the first
        request): the node leaves RAM and the tree is this mount's. A mount that dies before
        this leaves the node as it was. Raises NodeError if the node changed meanwhile."""
        restoring, self._restoring = self._restoring, None
        if restoring is None:
            return
        self.restored = preserve.take_restored(self.store, self.owner_id, restoring)
        self.tree.hide_secret_pages()
        log.info(
            "restored pkram node %r: %d objects, %d pages in %.1f ms",
            self.options.pkram,
            self.restored.objects,
            self.restored.data_pages,
            self.restored.seconds * 1e3,
        )

    def _mount_settings(self) -> MountSettings:
        return MountSettings(
            size_pages=self.pool.limit_pages,
            max_inodes=self.tree.max_inodes,
            huge=self.tree.huge,
            secret=self.tree.secret,
        )

    def status(self) -> dict[str, Any]:
        """Return what ``pkramfs-ctl status`` shows (small: fits in one xattr)."""
        return {
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "machine": str(self.machine.path),
            "ram_bytes": self.machine.ram_bytes,
            "generation": self.machine.generation,
            "owner_id": self.owner_id,
            "pkram": self.options.pkram,
            "read_only": self.tree.read_only,
            "huge": "always" if self.tree.huge else "never",
            "size_pages": self.pool.limit_pages,
            "used_pages": self.pool.used_pages,
            "idle_pages": len(self.pool.idle_pages),
            "inodes": self.tree.inodes_in_use(),
            "quiet_inodes": len(self.tree.inodes.quiet),
            "max_inodes": self.tree.max_inodes,
            "open_writers": self.tree.writers(),
            "secret": self.tree.secret,
            "secret_pages": self.ram.unmapped_pages,
            "unmapped_ranges": len(self.ram.unmapped_runs()[0]),
            "preserved_node": None if self.preserved is None else self.preserved.node_pfn,
            "last_preserve": None if self.last_preserve is None else asdict(self.last_preserve),
            "restored": None if self.restored is None else asdict(self.restored),
        }

    def dump_claims(self) -> str:
        """Write every pfn this mount believes it owns to a .npy file; return its path."""
        path = str(self.machine.boot_dir / f"claims-{self.owner_id}.npy")
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as out:
            np.save(out, self.owned_pfns())
        os.replace(tmp, path)
        return path

    def remount(self, items: list[str]) -> None:
        """Apply ``mount -o remount,...``: ro/rw, size=, nr_inodes= (others must not change)."""
        new = parse_options(items, ram_bytes=self.machine.ram_bytes)
        if new.pkram is not None and new.pkram != self.options.pkram:
            raise OptionError("pkram= cannot change on remount")
        if new.machine is not None and new.machine != self.options.machine:
            raise OptionError("machine= cannot change on remount")
        if new.secret and not self.tree.secret:
            raise OptionError("secret cannot be added on remount")
        limit = None if new.size_bytes is None else new.resolved_size_pages(self.machine.nr_pages)
        if limit and limit < self.pool.used_pages:
            raise MountError("size= is smaller than what the files already use")
        if new.nr_inodes and new.nr_inodes < self.tree.inodes_in_use():
            raise MountError("nr_inodes= is smaller than the inodes in use")
        # Checked all before changing any: a refused remount leaves every setting as it was.
        if limit is not None:
            self.pool.limit_pages = limit
        if new.nr_inodes is not None:
            self.tree.max_inodes = new.nr_inodes
        if new.preserve:
            self._preserve()
        elif "ro" in new.kernel_flags or "rw" in new.kernel_flags:
            if new.read_only and not self.tree.read_only:
                self._refuse_busy()
            if not new.read_only and self.preserved is not None:
                preserve.cancel(self.store, self.owner_id, self.preserved)
                self.preserved = None
                log.info("preservation cancelled: the node is discarded, the mount is writable")
            self.tree.read_only = new.read_only

    def _refuse_busy(self) -> None:
        """EBUSY, as the kernel answers a tmpfs remount,ro: while a file is open for writing,
        or a removed file or directory is still in use."""
        if self.tree.writers():
            raise FsError(errno.EBUSY, "a file is open for writing")
        if self.tree.removed_in_use():
            raise FsError(errno.EBUSY, "a removed file or directory is still in use")

    def _preserve(self) -> None:
        """``remount,preserve``: record the tree in a node of RAM; the mount becomes read-only."""
        if self.options.pkram is None:
            raise FsError(errno.EINVAL, "remount,preserve needs a mount made with -o pkram=NAME")
        if self.preserved is not None:
            return  # already preserved, and read-only since
        self._refuse_busy()
        self.pool.give_back_idle()
        self.preserved, self.last_preserve = preserve.preserve(
            self.store, self.tree, self.owner_id, self.options.pkram, self._mount_settings()
        )
        self.tree.read_only = True
        stats = self.last_preserve
        log.info(
            "preserved as pkram node %r at pfn %d: %d objects, %d entries, %d pages "
            "(%d relocated) in %.1f ms",
            self.options.pkram,
            self.preserved.node_pfn,
            stats.objects,
            stats.entries,
            stats.data_pages,
            stats.relocated_pages,
            stats.seconds * 1e3,
        )

    def owned_pfns(self) -> PfnArray:
        """The pages this mount owns: its files' (unless preserved) and the pool's idle ones."""
        if self.preserved is None:
            return self.tree.owned_pfns()
        preserved = self.preserved.pages.expand()
        mine = self.tree.owned_pfns()
        return mine[~np.isin(mine, preserved)]

    def close(self) -> None:
        """Give every page back to the machine and leave the ownership registry (unmount)."""
        self.ownership.unregister_owner(self.owner_id)
        self.ram.close()

    def boot_stopping(self) -> bool:
        """Whether the machine is stopping this boot (exec, reboot, power off stop its
        processes: kexec_sim's boot_stopping)."""
        return boot_stopping(self.machine.path)

    def leave(self) -> None:
        """End with the boot, as the machine stops it: give nothing back, unmap nothing.

        The transition stopping the boot scrubs or hands over every page (the preserved ones
        are PRESERVED, never this mount's), and drops the boot's owners. The RAM stays mapped
        for the process's exit to drop: an munmap here (~0.2 s per 2 GiB this daemon touched)
        would keep the process running, and the transition waiting for it.
        """
        log.info("the machine is stopping the boot: exiting with the boot's pages left to it")


def mount_using(
    ownership: PageOwnership, name: str, registered_before: int | None = None
) -> tuple[str, OwnerInfo] | None:
    """The mountpoint and owner of a mount registered with ``pkram=NAME`` (only among owner
    ids below *registered_before*, when given), or None."""
    prefix = f"{OWNER_PREFIX}{name}:"
    for other_id, info in ownership.owners().items():
        if info.name.startswith(prefix) and (
            registered_before is None or other_id < registered_before
        ):
            return info.name[len(prefix) :], info
    return None


def _check_name_free(ownership: PageOwnership, name: str, owner_id: int) -> None:
    """Refuse a second live mount with the same ``pkram=NAME`` on one boot.

    Checked after registering: of two mounts racing for a name, the later registration loses.
    """
    other = mount_using(ownership, name, registered_before=owner_id)
    if other is not None:
        where, info = other
        raise MountError(f"pkram={name} is in use by the mount at {where} (pid {info.pid})")
