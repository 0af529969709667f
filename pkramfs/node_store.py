"""The preserved nodes of a machine: publish, find, take (restore), cancel, discard, check.

Every operation holds the machine's ownership lock, so it sees the node list and page owners as
one consistent state, and starts by settling what a process that died half-way left (a node
still SAVING or TAKEN: whoever holds the lock knows its writer is gone). Page ownership
moves with ``PageOwnership.transfer``, which is crash-atomic, so a node's pages are either all
PRESERVED or all someone else's.

Everything read from RAM is validated (page_chain, page_stream, byte_stream, tree_record) and
every page a node names must be PRESERVED and named once: a node failing that is refused with
the reason and left exactly as it is.
"""

import os
import signal
from dataclasses import dataclass

import numpy as np

from kexec_sim import (
    PRESERVED,
    PRESERVING,
    CorruptHandover,
    Machine,
    PageOwnership,
    PageRuns,
    PfnArray,
    Ram,
    read_record,
    read_super_block,
    refuse_changes,
)

from . import byte_stream, page_stream
from .errors import CorruptNode, CorruptNodeList, NodeError
from .pkram_node import (
    COMPLETE,
    SAVING,
    TAKEN,
    ListedNode,
    NodeHeader,
    link_first,
    set_node_state,
    unlink,
    walk_list,
)

FAULT_ENV = "PKRAMFS_FAULT"  # tests: "<operation>:<step>" kills the process at that step


@dataclass
class NodeContents:
    """A node read back and validated: its header, metadata bytes, entries and every page."""

    pfn: int
    header: NodeHeader
    meta: memoryview
    meta_pfns: PfnArray
    link_pfns: PfnArray
    pfns: PfnArray
    orders: PfnArray
    indexes: PfnArray
    data: PageRuns

    @property
    def metadata_pfns(self) -> PfnArray:
        """The node page, its byte pages and its link pages."""
        return np.concatenate([[self.pfn], self.meta_pfns, self.link_pfns]).astype(np.int64)

    @property
    def all_runs(self) -> PageRuns:
        """Every page the node holds, metadata and file data, as runs."""
        return PageRuns.concat(PageRuns.of_pfns(self.metadata_pfns), self.data)

    @property
    def all_pfns(self) -> PfnArray:
        """Every page the node holds (expanded: for checks and repairs, not the fast path)."""
        return self.all_runs.expand()


@dataclass(frozen=True)
class NodeInfo:
    """One node as ``pkramfs-ctl nodes`` lists it."""

    name: str
    pfn: int
    state: str
    generation: int
    data_pages: int
    objects: int
    error: str | None


def read_contents(ram: Ram, listed: ListedNode) -> NodeContents:
    """Read, validate and return everything node *listed* holds; CorruptNode if it is bad."""
    if listed.error is not None or listed.header is None:
        raise CorruptNode(listed.error or "unreadable node")
    header = listed.header
    what = f"pkram node {header.name!r}"
    meta_pfns, meta = byte_stream.read_stream(
        ram, header.meta_pfn, header.meta_pages, header.meta_bytes, f"{what} metadata"
    )
    link_pfns, pfns, orders, indexes = page_stream.read_stream(
        ram, header.links_pfn, header.link_pages, header.nr_entries, f"{what} page stream"
    )
    data = PageRuns.of_entries(pfns, orders)
    if data.nr_pages != header.data_pages:
        raise CorruptNode(
            f"{what}: entries cover {data.nr_pages} pages, node says {header.data_pages}"
        )
    contents = NodeContents(
        listed.pfn, header, meta, meta_pfns, link_pfns, pfns, orders, indexes, data
    )
    twice = contents.all_runs.first_repeat(ram.nr_pages)
    if twice is not None:
        raise CorruptNode(f"{what}: pfn {twice} is named twice")
    return contents


def fault_point(operation: str, step: str) -> None:
    """Die here if the tests asked to (``PKRAMFS_FAULT=<operation>:<step>``)."""
    if os.environ.get(FAULT_ENV) == f"{operation}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class NodeStore:
    """The node list of one machine's current boot, seen through one process's mappings."""

    def __init__(self, machine: Machine, ram: Ram, ownership: PageOwnership) -> None:
        self.machine = machine
        self.ram = ram
        self.ownership = ownership
        self.generation = machine.generation  # a boot outlives every process of it
        self.sb_pfn = machine.super_block_pfn
        """This boot's super block pfn (where the node list starts)."""

    def _list(self) -> tuple[list[ListedNode], str | None]:
        """The nodes of the list and why its walk stopped early, if it did.

        Raises CorruptNodeList unless the super block heading it is this boot's and valid.
        """
        try:
            sb = read_super_block(self.ram, self.sb_pfn)
        except CorruptHandover as exc:
            raise self._bad_list(str(exc).removeprefix(f"pkram={self.sb_pfn}: ")) from None
        if sb.generation != self.generation:
            raise self._bad_list(f"written by generation {sb.generation}, not this boot's")
        return walk_list(self.ram, self.sb_pfn)

    def _bad_list(self, reason: str) -> CorruptNodeList:
        return CorruptNodeList(
            f"this boot's PKRAM super block (pfn {self.sb_pfn}, generation {self.generation}) "
            f"does not read back: {reason}; no preserved tree can be found ('kexec-sim check' "
            "shows the machine; 'kexec-sim reboot' starts afresh without them)"
        )

    def _walk(self) -> list[ListedNode]:
        nodes, _ = self._list()
        return nodes

    # -- listing ----------------------------------------------------------------------------

    def nodes(self) -> tuple[list[NodeInfo], str | None]:
        """List the nodes (validating each fully) and why the list walk stopped early, if it did."""
        with self.ownership.locked():
            self._remove_dead_remains()
            listed, stopped = self._list()
            infos = []
            for node in listed:
                error = node.error
                if error is None:
                    try:
                        self._check_owned(read_contents(self.ram, node))
                    except CorruptNode as exc:
                        error = str(exc)
                header = node.header
                infos.append(
                    NodeInfo(
                        header.name if header else node.raw_name,
                        node.pfn,
                        node.state.rstrip(b"\0").decode("ascii", errors="replace"),
                        header.generation if header else 0,
                        header.data_pages if header else 0,
                        header.nr_objects if header else 0,
                        error,
                    )
                )
            return infos, stopped

    def _check_owned(self, contents: NodeContents) -> None:
        """Every page of the node must be PRESERVED."""
        pfn = self.ownership.first_not_owned(contents.all_runs, PRESERVED)
        if pfn is not None:
            raise CorruptNode(
                f"pkram node {contents.header.name!r}: pfn {pfn} is not a preserved page"
            )

    def _find(self, name: str) -> tuple[ListedNode | None, ListedNode | None]:
        """Return the COMPLETE node named *name* and a damaged node that may be it.

        Raises CorruptNodeList when the list walk stopped before finding it (it may lie
        beyond the break).
        """
        damaged = None
        listed, stopped = self._list()
        for node in listed:
            if node.header is not None and node.header.name == name and node.state == COMPLETE:
                return node, None
            if node.error is not None and node.raw_name == name and damaged is None:
                damaged = node
        if stopped is not None and damaged is None:
            raise CorruptNodeList(
                f"the preserved node list is damaged ({stopped}): pkram node {name!r} may lie "
                "beyond the damage; nothing restored ('pkramfs-ctl nodes' lists what reads back)"
            )
        return None, damaged

    # -- preserving -------------------------------------------------------------------------

    def publish(self, owner_id: int, node_pfn: int, name: str, pages: PageRuns) -> None:
        """Make the node written at *node_pfn* (all its *pages* owned by *owner_id*) preserved.

        Linked as SAVING, its pages handed to PRESERVED in one transfer, then COMPLETE: the
        one store that makes it restorable. Raises NodeError if *name* is already preserved.
        """
        fault_point("preserve", "written")
        with self.ownership.locked():
            refuse_changes(self.machine.path, f"preserve {name!r}", allowed_during=PRESERVING)
            self._remove_dead_remains()
            node, _ = self._find(name)
            if node is not None:
                raise NodeError(f"a preserved node named {name!r} already exists (pfn {node.pfn})")
            link_first(self.ram, self.sb_pfn, node_pfn)
            fault_point("preserve", "linked")
            try:
                self.ownership.transfer_runs(pages, owner_id, PRESERVED)
            except BaseException:
                unlink(self.ram, self.sb_pfn, self._walk()[0])
                raise
            fault_point("preserve", "transferred")
            set_node_state(self.ram, node_pfn, COMPLETE)
        fault_point("preserve", "complete")

    def cancel(self, owner_id: int, node_pfn: int, pages: PageRuns) -> None:
        """Undo `publish` of the node at *node_pfn*: its *pages* go back to *owner_id*."""
        with self.ownership.locked():
            refuse_changes(self.machine.path, "cancel a preservation")
            self._remove_dead_remains()
            node = next((n for n in self._walk() if n.pfn == node_pfn), None)
            if node is None or node.state != COMPLETE:
                raise NodeError(f"the preserved node at pfn {node_pfn} is gone (discarded?)")
            set_node_state(self.ram, node_pfn, TAKEN)
            self.ownership.transfer_runs(pages, PRESERVED, owner_id)
            unlink(self.ram, self.sb_pfn, node)

    # -- restoring --------------------------------------------------------------------------

    def find(self, name: str) -> NodeContents | None:
        """Read back and validate node *name* for a restore, changing nothing.

        Returns None when there is no node of that name. Raises CorruptNode when the node
        is bad, CorruptNodeList when the list cannot be trusted to show it.
        """
        with self.ownership.locked():
            refuse_changes(self.machine.path, f"restore {name!r}")
            self._remove_dead_remains()
            node, damaged = self._find(name)
            if node is None:
                if damaged is not None:
                    raise CorruptNode(f"pkram node {name!r}: {damaged.error or 'damaged'}")
                return None
            contents = read_contents(self.ram, node)
            self._check_owned(contents)
            return contents

    def take(self, contents: NodeContents, owner_id: int) -> None:
        """Give every page of the node `find` read to *owner_id* and remove it from the list.

        The node is marked TAKEN first: a taker that dies before its transfer leaves it to be
        made COMPLETE again (``_remove_dead_remains``). Raises NodeError, changing nothing,
        when the node is no longer the one that was read.
        """
        with self.ownership.locked():
            refuse_changes(self.machine.path, f"restore {contents.header.name!r}")
            self._remove_dead_remains()
            node, _ = self._find(contents.header.name)
            if node is None or node.pfn != contents.pfn or node.header != contents.header:
                raise NodeError(f"pkram node {contents.header.name!r} changed while restoring")
            set_node_state(self.ram, node.pfn, TAKEN)
            fault_point("restore", "taken")
            self.ownership.transfer_runs(contents.all_runs, PRESERVED, owner_id)
            unlink(self.ram, self.sb_pfn, node)

    # -- discarding -------------------------------------------------------------------------

    def discard(self, name: str, owner_id: int) -> int:
        """Remove node *name* and free the pages it holds; return how many were freed.

        A damaged node gives back the pages it can still be shown to hold (its own page and
        whatever of its streams reads back, if PRESERVED and named by no other node); then,
        if every remaining node reads back whole, PRESERVED pages that no node names are
        freed too (what the damaged node held but could no longer say).
        *owner_id* is a registered owner of the caller, which holds the pages for a moment.
        """
        with self.ownership.locked():
            refuse_changes(self.machine.path, f"discard {name!r}")
            self._remove_dead_remains()
            listed = self._walk()
            node = next((n for n in listed if n.header is not None and n.header.name == name), None)
            node = node or next((n for n in listed if n.raw_name == name), None)
            if node is None:
                raise NodeError(f"no preserved node named {name!r}")
            pages = self._attributable_pages(node, [n for n in listed if n.pfn != node.pfn])
            set_node_state(self.ram, node.pfn, TAKEN)
            self.ownership.transfer(pages, PRESERVED, owner_id)
            unlink(self.ram, self.sb_pfn, node)
            self.ownership.free(owner_id, pages)
            return len(pages) + self._free_orphans(owner_id)

    def _free_orphans(self, owner_id: int) -> int:
        """Free the PRESERVED pages no node names, if every remaining node reads back whole
        (a damaged one might name them); return how many. Lock held."""
        named, damage, stopped = self._named_pages()
        if damage or stopped is not None:
            return 0
        orphans = self._orphans(named)
        if orphans.size:
            self.ownership.transfer(orphans, PRESERVED, owner_id)
            self.ownership.free(owner_id, orphans)
        return int(orphans.size)

    def _named_pages(self) -> tuple[PfnArray, list[str], str | None]:
        """Every page the nodes in the list name (whole, preserved nodes only), the reasons the
        others are damaged, and why the list walk stopped early if it did. Lock held."""
        listed, stopped = self._list()
        named: list[PfnArray] = [np.empty(0, dtype=np.int64)]
        damage: list[str] = []
        for node in listed:
            try:
                contents = read_contents(self.ram, node)
                self._check_owned(contents)
                named.append(contents.all_pfns)
            except CorruptNode as exc:
                damage.append(str(exc))
        return np.concatenate(named), damage, stopped

    def _orphans(self, named: PfnArray) -> PfnArray:
        """The PRESERVED pages that are not in *named*. Lock held."""
        preserved = np.flatnonzero(self.ownership.owner_map == PRESERVED)
        return preserved[~np.isin(preserved, named)]

    def _attributable_pages(self, node: ListedNode, others: list[ListedNode]) -> PfnArray:
        """The PRESERVED pages *node* can be shown to hold that no other node names."""
        try:
            candidates = read_contents(self.ram, node).all_pfns
        except CorruptNode:
            candidates = np.array([node.pfn], dtype=np.int64)
        claimed = [np.empty(0, dtype=np.int64)]
        for other in others:
            try:
                claimed.append(read_contents(self.ram, other).all_pfns)
            except CorruptNode:
                claimed.append(np.array([other.pfn], dtype=np.int64))
        candidates = np.sort(candidates)  # read_contents proved them distinct
        keep = ~np.isin(candidates, np.concatenate(claimed))
        keep &= self.ownership.owner_map[candidates] == PRESERVED
        return candidates[keep]

    def _remove_dead_remains(self) -> None:
        """Settle the nodes a process that died left SAVING or TAKEN (lock held).

        A node whose pages are all PRESERVED and named by no other node is made COMPLETE: a
        SAVING one was written whole and handed over before its preserve died (the node is
        the tree now), a TAKEN one lost its taker (a restore, cancel or discard) before the
        transfer, so nothing was taken. Any other is unlinked: its pages belong to someone
        else by now (a dead preserve's daemon, reclaimed as a dead owner's).
        """
        if read_record(self.machine.path) is not None:
            return  # a power-state change decides what is kept: settle after it
        while True:
            listed = self._walk()
            dead = next((n for n in listed if n.state in (SAVING, TAKEN) and n.error is None), None)
            if dead is None:
                return
            try:
                contents = read_contents(self.ram, dead)
            except CorruptNode:
                unlink(self.ram, self.sb_pfn, dead)
                continue
            pages = self._attributable_pages(dead, [n for n in listed if n.pfn != dead.pfn])
            if len(pages) == len(contents.all_pfns):
                set_node_state(self.ram, dead.pfn, COMPLETE)
            else:
                unlink(self.ram, self.sb_pfn, dead)

    # -- checking ---------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems of the preserved pages: every PRESERVED page named by exactly one node."""
        with self.ownership.locked():
            try:
                self._remove_dead_remains()
                named, damage, stopped = self._named_pages()
            except CorruptNodeList as exc:
                return [str(exc)]
            problems = ([stopped] if stopped else []) + damage
            everything = np.sort(named)
            twice = everything[1:][everything[1:] == everything[:-1]]
            if twice.size:
                problems.append(f"pfn {int(twice[0])} is named by two nodes")
            orphans = self._orphans(everything)
            if orphans.size and not damage:
                problems.append(
                    f"{orphans.size} preserved pages belong to no node (pfn {int(orphans[0])})"
                )
            return problems
