"""Preserving a mount's tree into a PKRAM node, cancelling that, and restoring it.

Preserve copies no file data: the node records which pfns hold each file and those pages change
owner to PRESERVED. The exception is pages lying where the next kernel will be loaded (the
range ``kexec-sim load`` chose, else the default kernel range), which kexec would overwrite:
they are copied to pages outside it first. The cost is a few numpy passes over the pfn arrays
(and one msgpack record per inode), not a pass over the bytes.
"""

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kexec_sim import PageRuns, PfnArray, next_kernel_range

from . import byte_stream, page_stream, tree_record
from .errors import CorruptNode
from .node_store import NodeContents, NodeStore, fault_point
from .pkram_node import NodeHeader, write_node
from .quiet_inodes import QuietInodes
from .relocation import relocate_out_of
from .tree import Tree


@dataclass
class Preserved:
    """A published node of this mount: where it is and every page it holds."""

    node_pfn: int
    pages: PageRuns
    metadata_pfns: PfnArray
    seconds: float


@dataclass
class PreserveStats:
    """What a preserve or restore did, for status and the benchmarks."""

    data_pages: int
    entries: int
    objects: int
    relocated_pages: int
    seconds: float
    phases_ms: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Milliseconds per phase of one preserve or restore."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round((now - self._last) * 1e3, 3)
        self._last = now


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector off while records are built or read: that makes
    a container per directory or file, and each collection on the way would walk every
    object of the tree (a 100,000-file snapshot: 720 ms with it, ~250 ms without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def preserve(
    store: NodeStore, tree: Tree, owner_id: int, name: str, mount: tree_record.MountSettings
) -> tuple[Preserved, PreserveStats]:
    """Record *tree* as node *name* and hand its pages to PRESERVED; the tree must be quiet.

    Raises NodeError if a node of that name is already preserved, OutOfMemory if no page is
    left for the node's metadata; in both cases nothing is preserved.
    """
    started = time.perf_counter()
    clock = _Clock()
    machine, ram, ownership = store.machine, store.ram, store.ownership
    start, end = next_kernel_range(machine)
    relocated = relocate_out_of(tree, start, end)
    clock.lap("relocate")
    with _collector_paused():
        snap = tree_record.snapshot(record_parts(tree), tree.next_ino, mount)
    clock.lap("snapshot")
    n_links = page_stream.link_pages_needed(snap.indexes)
    n_meta = byte_stream.pages_needed(len(snap.meta))
    metadata = ownership.allocate(owner_id, 1 + n_meta + n_links, avoid=(start, end))
    ram.populate(metadata)  # fault the new pages in at once, not one store at a time
    clock.lap("allocate")
    node_pfn, meta_pfns, link_pfns = (
        int(metadata[0]),
        metadata[1 : 1 + n_meta],
        metadata[1 + n_meta :],
    )
    try:
        byte_stream.write_stream(ram, meta_pfns, snap.meta)
        page_stream.write_stream(ram, link_pfns, snap.pfns, snap.orders, snap.indexes)
        data = PageRuns.of_entries(snap.pfns, snap.orders)
        header = NodeHeader(
            name=name,
            generation=machine.generation,
            saved_ns=time.time_ns(),
            meta_pfn=int(meta_pfns[0]) if n_meta else 0,
            meta_bytes=len(snap.meta),
            meta_pages=n_meta,
            links_pfn=int(link_pfns[0]) if n_links else 0,
            link_pages=n_links,
            nr_entries=len(snap.pfns),
            data_pages=data.nr_pages,
            nr_objects=snap.nr_objects,
        )
        write_node(ram, node_pfn, header)
        pages = PageRuns.concat(PageRuns.of_pfns(metadata), data)
        clock.lap("write")
        store.publish(owner_id, node_pfn, name, pages)
        clock.lap("publish")
    except BaseException:
        ownership.free(owner_id, metadata)
        raise
    seconds = time.perf_counter() - started
    stats = PreserveStats(
        data.nr_pages, len(snap.pfns), snap.nr_objects, relocated, seconds, clock.phases
    )
    return Preserved(node_pfn, pages, metadata, seconds), stats


def record_parts(tree: Tree) -> list[tuple[tree_record.InodeColumns, tree_record.PageEntries]]:
    """The linked inodes of *tree* as columns (open-but-unlinked files are not preserved):
    those in use, and the quiet ones (in columns already)."""
    linked = [inode for inode in tree.inodes.in_use() if inode.nlink]
    return [tree_record.inode_columns(linked), *tree.inodes.quiet.parts()]


def cancel(store: NodeStore, owner_id: int, preserved: Preserved) -> None:
    """Take a published node back (``remount,rw``): its pages are the mount's again."""
    store.cancel(owner_id, preserved.node_pfn, preserved.pages)
    store.ownership.free(owner_id, preserved.metadata_pfns)


@dataclass
class Restoring:
    """A node read back into a tree that does not own its pages yet (``take_restored``)."""

    contents: NodeContents
    mount: tree_record.MountSettings
    stats: PreserveStats


def restore(store: NodeStore, tree: Tree, name: str) -> Restoring | None:
    """Fill the fresh *tree* from node *name*, changing nothing in RAM or page ownership;
    None if there is none (an empty fs). ``take_restored`` then makes the pages the mount's.

    Raises CorruptNode, changing nothing, when the node fails validation, CorruptNodeList
    when this boot's node list cannot show whether it exists.
    """
    started = time.perf_counter()
    clock = _Clock()
    try:
        contents = store.find(name)
        if contents is None:
            return None
        clock.lap("read")  # found, read back and checked: now rebuild the tree
        with _collector_paused():
            rebuilt = tree_record.rebuild(
                contents.meta,
                contents.pfns,
                contents.orders,
                contents.indexes,
                f"pkram node {name!r}",
            )
    except CorruptNode as exc:
        raise CorruptNode(
            f"{exc}; the node is left preserved (pkramfs-ctl discard {name} frees it)"
        ) from None
    clock.lap("rebuild")
    tree.install(QuietInodes.restored(rebuilt.inodes, rebuilt.pages), rebuilt.next_ino)
    clock.lap("install")
    fault_point("restore", "read")
    stats = PreserveStats(
        contents.data.nr_pages,
        len(contents.pfns),
        contents.header.nr_objects,
        0,
        time.perf_counter() - started,
        clock.phases,
    )
    return Restoring(contents, rebuilt.mount, stats)


def take_restored(store: NodeStore, owner_id: int, restoring: Restoring) -> PreserveStats:
    """Make the restored node's pages *owner_id*'s and drop the node (its metadata pages are
    freed): from here the tree lives in the mount. Raises NodeError, changing nothing, if the
    node changed since it was read."""
    started = time.perf_counter()
    store.take(restoring.contents, owner_id)
    store.ownership.free(owner_id, restoring.contents.metadata_pfns)
    stats = restoring.stats
    stats.phases_ms["take"] = round((time.perf_counter() - started) * 1e3, 3)
    stats.seconds += time.perf_counter() - started
    return stats
