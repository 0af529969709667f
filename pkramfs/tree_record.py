"""A tree as a preserved node holds it: one msgpack record per inode, plus page-stream entries.

``snapshot`` turns a Tree into the metadata bytes and the entries of its page stream; ``rebuild``
does the reverse from what a node held, trusting nothing: every field is type- and range-checked
and the whole structure (names, links, link counts, reachability, page slices) must be a tree
pkramfs itself could have made, or CorruptNode says what is wrong.

The metadata is a msgpack map ``{"format": 1, "mount": {...}, "next_ino": N, "inodes": [...]}``;
each inode is an array ``[ino, mode, uid, gid, nlink, rdev, size, atime_ns, mtime_ns, ctime_ns,
xattrs, content]`` where content is, by type: a directory ``[parent_ino, [[name, ino], ...]]``,
a regular file ``[first_entry, nr_entries]`` (its slice of the page stream), a symlink its
target bytes, anything else nil.
"""

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from kexec_sim.pages import HUGE_ORDER, PAGE_SIZE, PfnArray

from .errors import CorruptNode
from .file_pages import FilePages
from .inode import Inode
from .tree import (
    FIRST_FREE_INO,
    MAX_FILE_BYTES,
    NAME_MAX,
    ROOT_INO,
    XATTR_NAME_MAX,
    XATTR_NAMESPACES,
    XATTR_SIZE_MAX,
    Tree,
)

RECORD_FORMAT = 1
_FIELDS = 12
_MAX_TIME_NS = 1 << 63
_KINDS = (
    stat.S_IFREG,
    stat.S_IFDIR,
    stat.S_IFLNK,
    stat.S_IFIFO,
    stat.S_IFSOCK,
    stat.S_IFCHR,
    stat.S_IFBLK,
)


@dataclass
class TreeSnapshot:
    """What preserving a tree writes: metadata bytes and the page stream's entries."""

    meta: bytes
    pfns: PfnArray
    orders: PfnArray
    indexes: PfnArray
    nr_objects: int


@dataclass
class RebuiltTree:
    """What a node's records rebuild: the inodes, the next free inode number, mount settings."""

    inodes: dict[int, Inode]
    next_ino: int
    mount: dict[str, Any]


def snapshot(tree: Tree, mount: dict[str, Any]) -> TreeSnapshot:
    """Record every linked inode of *tree* (open-but-unlinked files are not preserved)."""
    records: list[list[Any]] = []
    columns: list[tuple[PfnArray, PfnArray, PfnArray]] = []
    n_entries = 0
    for ino in sorted(tree.inodes):
        inode = tree.inodes[ino]
        if inode.nlink == 0:
            continue
        content: Any = None
        if inode.entries is not None:
            content = [inode.parent_ino, [[name, child] for name, child in inode.entries.items()]]
        elif inode.pages is not None:
            pfns, orders, indexes = inode.pages.link_entries()
            content = [n_entries, len(pfns)]
            if len(pfns):
                columns.append((pfns, orders, indexes))
                n_entries += len(pfns)
        elif inode.target is not None:
            content = inode.target
        records.append(
            [
                ino,
                inode.mode,
                inode.uid,
                inode.gid,
                inode.nlink,
                inode.rdev,
                inode.size_bytes,
                inode.atime_ns,
                inode.mtime_ns,
                inode.ctime_ns,
                inode.xattrs or None,
                content,
            ]
        )
    meta = msgpack.packb(
        {"format": RECORD_FORMAT, "mount": mount, "next_ino": tree.next_ino, "inodes": records},
        use_bin_type=True,
    )
    if columns:
        pfns, orders, indexes = (np.concatenate(c) for c in zip(*columns, strict=True))
    else:
        pfns = orders = indexes = np.empty(0, dtype=np.int64)
    return TreeSnapshot(meta, pfns, orders, indexes, len(records))


def rebuild(
    meta: bytes, pfns: PfnArray, orders: PfnArray, indexes: PfnArray, what: str
) -> RebuiltTree:
    """Rebuild the inodes from a node's metadata and page entries; CorruptNode if they are bad."""
    try:
        document = msgpack.unpackb(meta, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many types for bad input
        raise CorruptNode(f"{what}: metadata is not msgpack ({exc})") from None
    check = _Checker(what)
    check.that(isinstance(document, dict), "metadata is not a map")
    check.that(
        document.get("format") == RECORD_FORMAT, f"metadata format {document.get('format')!r}"
    )
    mount = document.get("mount")
    check.that(isinstance(mount, dict), "no mount settings")
    next_ino = check.integer(document.get("next_ino"), "next_ino", FIRST_FREE_INO, 1 << 62)
    records = document.get("inodes")
    check.that(isinstance(records, list), "no inode list")
    inodes: dict[int, Inode] = {}
    slices: list[tuple[int, int, Inode]] = []
    for record in records:
        inode, content = check.inode(record, next_ino)
        check.that(inode.ino not in inodes, f"inode {inode.ino} recorded twice")
        inodes[inode.ino] = inode
        if inode.is_dir:
            check.that(
                isinstance(content, list) and len(content) == 2, f"inode {inode.ino}: bad directory"
            )
            inode.parent_ino = check.integer(content[0], "parent", ROOT_INO, next_ino)
            entries = content[1]
            check.that(isinstance(entries, list), f"inode {inode.ino}: bad entries")
            assert inode.entries is not None
            for entry in entries:
                check.that(isinstance(entry, list) and len(entry) == 2, "bad directory entry")
                name, child = entry
                check.name(name)
                check.that(name not in inode.entries, f"name {name!r} twice in inode {inode.ino}")
                inode.entries[name] = check.integer(child, "entry", ROOT_INO + 1, next_ino)
        elif inode.is_reg:
            check.that(
                isinstance(content, list) and len(content) == 2, f"inode {inode.ino}: bad pages"
            )
            first = check.integer(content[0], "first entry", 0, len(pfns))
            count = check.integer(content[1], "entry count", 0, len(pfns) - first)
            slices.append((first, count, inode))
        elif stat.S_ISLNK(inode.mode):
            check.that(isinstance(content, bytes) and 0 < len(content) < PAGE_SIZE, "bad symlink")
            inode.target = content
        else:
            check.that(content is None, f"inode {inode.ino}: unexpected content")
    _attach_pages(check, slices, pfns, orders, indexes)
    _check_structure(check, inodes)
    return RebuiltTree(inodes, next_ino, mount)


class _Checker:
    """Checks of untrusted values that raise CorruptNode naming the node."""

    def __init__(self, what: str) -> None:
        self.what = what

    def that(self, condition: bool, reason: str) -> None:
        if not condition:
            raise CorruptNode(f"{self.what}: {reason}")

    def integer(self, value: object, field: str, low: int, high: int) -> int:
        """Return *value* if it is an int in [low, high], else fail."""
        self.that(
            isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
            f"{field} {value!r} out of range",
        )
        assert isinstance(value, int)
        return value

    def name(self, name: object) -> None:
        self.that(
            isinstance(name, bytes)
            and 0 < len(name) <= NAME_MAX
            and b"/" not in name
            and b"\0" not in name
            and name not in (b".", b".."),
            f"bad file name {name!r}",
        )

    def inode(self, record: object, next_ino: int) -> tuple[Inode, object]:
        self.that(isinstance(record, list) and len(record) == _FIELDS, "bad inode record")
        assert isinstance(record, list)
        ino = self.integer(record[0], "inode number", ROOT_INO, next_ino - 1)
        self.that(ino == ROOT_INO or ino >= FIRST_FREE_INO, f"inode number {ino} is reserved")
        mode = self.integer(record[1], "mode", 0, 0o177777)
        self.that(stat.S_IFMT(mode) in _KINDS, f"inode {ino}: unknown file type")
        inode = Inode(ino, mode, 0, 0, 0)
        inode.uid = self.integer(record[2], "uid", 0, 2**32 - 1)
        inode.gid = self.integer(record[3], "gid", 0, 2**32 - 1)
        inode.nlink = self.integer(record[4], "nlink", 1, 2**32 - 1)
        inode.rdev = self.integer(record[5], "rdev", 0, 2**64 - 1)
        inode.size_bytes = self.integer(record[6], "size", 0, MAX_FILE_BYTES)
        inode.atime_ns = self.integer(record[7], "atime", -_MAX_TIME_NS, _MAX_TIME_NS)
        inode.mtime_ns = self.integer(record[8], "mtime", -_MAX_TIME_NS, _MAX_TIME_NS)
        inode.ctime_ns = self.integer(record[9], "ctime", -_MAX_TIME_NS, _MAX_TIME_NS)
        xattrs = record[10]
        if xattrs is not None:
            self.that(isinstance(xattrs, dict), f"inode {ino}: bad xattrs")
            assert isinstance(xattrs, dict)
            for key, value in xattrs.items():
                self.that(
                    isinstance(key, bytes)
                    and 0 < len(key) <= XATTR_NAME_MAX
                    and key.startswith(XATTR_NAMESPACES)
                    and isinstance(value, bytes)
                    and len(value) <= XATTR_SIZE_MAX,
                    f"inode {ino}: bad xattr {key!r}",
                )
            inode.xattrs = dict(xattrs)
        return inode, record[11]


def _attach_pages(
    check: _Checker,
    slices: Iterable[tuple[int, int, Inode]],
    pfns: PfnArray,
    orders: PfnArray,
    indexes: PfnArray,
) -> None:
    """Give each regular file its slice of entries, which must tile the stream in order."""
    position = 0
    for first, count, inode in slices:
        check.that(first == position or count == 0, f"inode {inode.ino}: page slice out of order")
        position = first + count if count else position
        lo, hi = first, first + count
        file_indexes, file_orders = indexes[lo:hi], orders[lo:hi]
        if count:
            ends = file_indexes + (np.int64(1) << file_orders)
            check.that(
                bool((file_indexes[1:] >= ends[:-1]).all()), f"inode {inode.ino}: pages overlap"
            )
            limit = -(-max(inode.size_bytes, 1) // (PAGE_SIZE << HUGE_ORDER)) << HUGE_ORDER
            check.that(
                int(ends[-1]) <= limit, f"inode {inode.ino}: a page lies past the end of file"
            )
        inode.pages = FilePages.from_link_entries(pfns[lo:hi], file_orders, file_indexes)
    check.that(position == len(pfns), "page stream entries belong to no file")


def _check_structure(check: _Checker, inodes: dict[int, Inode]) -> None:
    """Every inode reachable from the root once per link; link counts and parents right."""
    root = inodes.get(ROOT_INO)
    check.that(
        root is not None and root.is_dir and root.parent_ino == ROOT_INO, "no root directory"
    )
    references = dict.fromkeys(inodes, 0)
    subdirs = dict.fromkeys(inodes, 0)
    for directory in inodes.values():
        for child_ino in (directory.entries or {}).values():
            child = inodes.get(child_ino)
            check.that(child is not None, f"entry names missing inode {child_ino}")
            assert child is not None
            references[child_ino] += 1
            if child.is_dir:
                check.that(
                    child.parent_ino == directory.ino, f"directory {child_ino}: wrong parent"
                )
                subdirs[directory.ino] += 1
    for ino, inode in inodes.items():
        if inode.is_dir:
            expected_refs = 0 if ino == ROOT_INO else 1
            check.that(
                references[ino] == expected_refs, f"directory {ino} linked {references[ino]} times"
            )
            check.that(inode.nlink == 2 + subdirs[ino], f"directory {ino}: wrong link count")
        else:
            check.that(
                references[ino] == inode.nlink,
                f"inode {ino}: link count {inode.nlink}, {references[ino]} names",
            )
    seen = {ROOT_INO}
    stack = [ROOT_INO]
    while stack:
        for child_ino in (inodes[stack.pop()].entries or {}).values():
            if inodes[child_ino].is_dir and child_ino not in seen:
                seen.add(child_ino)
                stack.append(child_ino)
    unreachable = [i for i, inode in inodes.items() if inode.is_dir and i not in seen]
    check.that(not unreachable, f"directories unreachable from the root: {unreachable[:3]}")
