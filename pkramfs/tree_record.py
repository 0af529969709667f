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
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from kexec_sim import HUGE_ORDER, PAGE_SIZE, PfnArray

from . import file_pages, xattrs
from .errors import CorruptNode
from .file_pages import CHUNK_MASK, CHUNK_PAGES, CHUNK_SHIFT, HOLE, FilePages
from .inode import Inode
from .options import MAX_NR_INODES, MAX_SIZE_BYTES
from .tree import (
    FIRST_FREE_INO,
    MAX_FILE_BYTES,
    NAME_MAX,
    ROOT_INO,
    Tree,
)

RECORD_FORMAT = 1
MAX_SIZE_PAGES = MAX_SIZE_BYTES // PAGE_SIZE
_MAX_KEY_BYTES = 64
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


@dataclass(frozen=True)
class MountSettings:
    """The settings a preserved mount records (the ``mount`` map): a restoring mount takes
    those it is not given; a secret mount stays secret."""

    size_pages: int
    """The ``size=`` limit in pages (0: unlimited)."""
    max_inodes: int
    """``nr_inodes=`` (0: unlimited)."""
    huge: bool
    """``huge=always``."""
    secret: bool

    def to_record(self) -> dict[str, object]:
        """The ``mount`` map as the metadata stores it."""
        return {
            "size_pages": self.size_pages,
            "max_inodes": self.max_inodes,
            "huge": "always" if self.huge else "never",
            "secret": self.secret,
        }


@dataclass
class RebuiltTree:
    """What a node's records rebuild: the inodes, the next free inode number, mount settings."""

    inodes: dict[int, Inode]
    next_ino: int
    mount: MountSettings


def snapshot(tree: Tree, mount: MountSettings) -> TreeSnapshot:
    """Record every linked inode of *tree* (open-but-unlinked files are not preserved)."""
    records: list[list[Any]] = []
    files: list[tuple[list[int], FilePages]] = []
    for ino in sorted(tree.inodes):
        inode = tree.inodes[ino]
        if inode.nlink == 0:
            continue
        content: Any = None
        if inode.entries is not None:
            content = [inode.parent_ino, [[name, child] for name, child in inode.entries.items()]]
        elif inode.pages is not None:
            content = [0, 0]  # its slice of the page stream, filled in below
            if inode.pages.nr_pages:
                files.append((content, inode.pages))
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
    pfns, orders, indexes, per_file = file_pages.page_entries([pages for _, pages in files])
    first = 0
    for (content, _), count in zip(files, per_file.tolist(), strict=True):
        content[0], content[1] = first, count
        first += count
    meta = msgpack.packb(
        {
            "format": RECORD_FORMAT,
            "mount": mount.to_record(),
            "next_ino": tree.next_ino,
            "inodes": records,
        },
        use_bin_type=True,
    )
    return TreeSnapshot(meta, pfns, orders, indexes, len(records))


def rebuild(
    meta: bytes, pfns: PfnArray, orders: PfnArray, indexes: PfnArray, what: str
) -> RebuiltTree:
    """Rebuild the inodes from a node's metadata and page entries; CorruptNode if they are bad."""
    try:
        document = msgpack.unpackb(
            meta,
            raw=False,
            strict_map_key=False,
            use_list=True,
            max_str_len=_MAX_KEY_BYTES,  # map keys and the huge policy only
            max_bin_len=max(xattrs.SIZE_MAX, PAGE_SIZE),  # names, xattr values, symlink targets
            max_ext_len=0,  # none are written
            max_array_len=len(meta),  # each element takes a byte at least
            max_map_len=len(meta),
        )
    except Exception as exc:  # msgpack raises many types for bad input
        raise CorruptNode(f"{what}: metadata is not msgpack ({exc})") from None
    check = _Checker(what)
    check.that(isinstance(document, dict), "metadata is not a map")
    check.that(
        document.get("format") == RECORD_FORMAT, f"metadata format {document.get('format')!r}"
    )
    mount = check.mount_settings(document.get("mount"))
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
                if not (type(child) is int and ROOT_INO < child < next_ino):
                    check.that(False, f"inode {inode.ino}: entry {name!r} names inode {child!r}")
                inode.entries[name] = child
        elif inode.is_reg:
            check.that(
                isinstance(content, list) and len(content) == 2, f"inode {inode.ino}: bad pages"
            )
            first, count = content
            if not (type(first) is int and type(count) is int and 0 <= first <= len(pfns)):
                check.that(False, f"inode {inode.ino}: bad page slice")
            check.that(0 <= count <= len(pfns) - first, f"inode {inode.ino}: bad page slice")
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

    def mount_settings(self, raw: object) -> MountSettings:
        """The ``mount`` map as MountSettings; fail naming the first bad field."""
        self.that(isinstance(raw, dict), "no mount settings")
        assert isinstance(raw, dict)
        huge = raw.get("huge")
        self.that(huge in ("always", "never"), f"mount setting huge {huge!r}")
        secret = raw.get("secret", False)  # nodes written before -o secret existed lack it
        self.that(isinstance(secret, bool), f"mount setting secret {secret!r}")
        return MountSettings(
            size_pages=self.integer(raw.get("size_pages"), "size_pages", 0, MAX_SIZE_PAGES),
            max_inodes=self.integer(raw.get("max_inodes"), "max_inodes", 0, MAX_NR_INODES),
            huge=huge == "always",
            secret=bool(secret),
        )

    def name(self, name: object) -> None:
        self.that(
            isinstance(name, bytes)
            and 0 < len(name) <= NAME_MAX
            and b"/" not in name
            and b"\0" not in name
            and name not in (b".", b".."),
            f"bad file name {name!r}",
        )

    def inode(self, record: object, next_ino: int) -> tuple[Inode, Any]:
        """Build an Inode from a record; fail naming the first bad field."""
        if not _plausible(record, next_ino):
            self._explain(record, next_ino)
        assert isinstance(record, list)
        ino, mode, uid, gid, nlink, rdev, size, atime, mtime, ctime, attrs, content = record
        inode = Inode(ino, mode, uid, gid, 0)
        inode.nlink, inode.rdev, inode.size_bytes = nlink, rdev, size
        inode.atime_ns, inode.mtime_ns, inode.ctime_ns = atime, mtime, ctime
        if attrs is not None:
            self.that(isinstance(attrs, dict), f"inode {ino}: bad xattrs")
            for key, value in attrs.items():
                self.that(
                    isinstance(key, bytes)
                    and 0 < len(key) <= xattrs.NAME_MAX
                    and key.startswith(xattrs.NAMESPACES)
                    and isinstance(value, bytes)
                    and len(value) <= xattrs.SIZE_MAX,
                    f"inode {ino}: bad xattr {key!r}",
                )
            inode.xattrs = dict(attrs)
        return inode, content

    def _explain(self, record: object, next_ino: int) -> None:
        """Fail with the reason a record is not plausible (the slow path of `inode`)."""
        self.that(isinstance(record, list) and len(record) == _FIELDS, "bad inode record")
        assert isinstance(record, list)
        ino = self.integer(record[0], "inode number", ROOT_INO, next_ino - 1)
        self.that(ino == ROOT_INO or ino >= FIRST_FREE_INO, f"inode number {ino} is reserved")
        mode = self.integer(record[1], f"inode {ino}: mode", 0, 0o177777)
        self.that(stat.S_IFMT(mode) in _KINDS, f"inode {ino}: unknown file type")
        for position, (field, low, high) in enumerate(_INT_FIELDS, start=2):
            self.integer(record[position], f"inode {ino}: {field}", low, high)
        raise CorruptNode(f"{self.what}: inode {ino}: bad record")


_INT_FIELDS = (
    ("uid", 0, 2**32 - 1),
    ("gid", 0, 2**32 - 1),
    ("nlink", 1, 2**32 - 1),
    ("rdev", 0, 2**64 - 1),
    ("size", 0, MAX_FILE_BYTES),
    ("atime", -_MAX_TIME_NS, _MAX_TIME_NS),
    ("mtime", -_MAX_TIME_NS, _MAX_TIME_NS),
    ("ctime", -_MAX_TIME_NS, _MAX_TIME_NS),
)
_KIND_SET = frozenset(_KINDS)
_INT_ONLY = {int}


def _plausible(record: object, next_ino: int) -> bool:
    """Whether a record has the right shape and every number in range (one fast pass)."""
    if type(record) is not list or len(record) != _FIELDS:
        return False
    ino, mode, uid, gid, nlink, rdev, size, atime, mtime, ctime = record[:10]
    if set(map(type, record[:10])) != _INT_ONLY:
        return False
    return (
        (ino == ROOT_INO or FIRST_FREE_INO <= ino < next_ino)
        and 0 <= mode <= 0o177777
        and stat.S_IFMT(mode) in _KIND_SET
        and 0 <= uid < 2**32
        and 0 <= gid < 2**32
        and 1 <= nlink < 2**32
        and 0 <= rdev < 2**64
        and 0 <= size <= MAX_FILE_BYTES
        and -_MAX_TIME_NS <= atime <= _MAX_TIME_NS
        and -_MAX_TIME_NS <= mtime <= _MAX_TIME_NS
        and -_MAX_TIME_NS <= ctime <= _MAX_TIME_NS
    )


def _attach_pages(
    check: _Checker,
    slices: list[tuple[int, int, Inode]],
    pfns: PfnArray,
    orders: PfnArray,
    indexes: PfnArray,
) -> None:
    """Give each regular file its slice of entries, which must tile the stream in order.

    Within a file the entries must ascend without overlap and end before the end of the file
    (rounded up to 2 MiB, where a huge page may reach); all checked at once over the arrays.
    """
    with_pages = [(first, count, inode) for first, count, inode in slices if count]
    position = 0
    for first, count, inode in with_pages:
        check.that(first == position, f"inode {inode.ino}: page slice out of order")
        position += count
    check.that(position == len(pfns), "page stream entries belong to no file")
    for _, _, inode in slices:
        inode.pages = FilePages()
    if not with_pages:
        return
    counts = np.array([count for _, count, _ in with_pages], dtype=np.int64)
    file_of = np.repeat(np.arange(len(with_pages)), counts)
    ends = indexes + (np.int64(1) << orders)
    same_file = file_of[1:] == file_of[:-1]
    overlap = same_file & (indexes[1:] < ends[:-1])
    if overlap.any():
        inode = with_pages[int(file_of[1:][overlap][0])][2]
        check.that(False, f"inode {inode.ino}: pages overlap or are out of order")
    huge_span = PAGE_SIZE << HUGE_ORDER
    sizes = [inode.size_bytes for _, _, inode in with_pages]
    limits = np.array([-(-max(size, 1) // huge_span) << HUGE_ORDER for size in sizes])
    past_end = ends > limits[file_of]
    if past_end.any():
        inode = with_pages[int(file_of[past_end][0])][2]
        check.that(False, f"inode {inode.ino}: a page lies past the end of file")
    if _attach_dense(with_pages, counts, pfns, orders, indexes):
        return
    # One row of 512 pfns per (file, chunk): a huge entry fills its row, small ones scatter.
    chunk_nos = indexes >> CHUNK_SHIFT
    new_chunk = np.ones(len(pfns), dtype=bool)
    new_chunk[1:] = ~same_file | (chunk_nos[1:] != chunk_nos[:-1])
    row_of = np.cumsum(new_chunk) - 1
    rows = np.full((int(row_of[-1]) + 1, CHUNK_PAGES), HOLE, dtype=np.int64)
    small = orders == 0
    rows[row_of[small], indexes[small] & CHUNK_MASK] = pfns[small]
    huge_rows = row_of[~small]
    rows[huge_rows] = pfns[~small][:, None] + np.arange(CHUNK_PAGES, dtype=np.int64)
    is_huge = np.zeros(len(rows), dtype=bool)
    is_huge[huge_rows] = True
    starts = np.flatnonzero(new_chunk)
    pages_per_row = np.bincount(row_of, weights=np.left_shift(1, orders)).astype(np.int64)
    files = [inode.pages for _, _, inode in with_pages]
    for row, (entry, chunk_no, huge_row, n_pages) in enumerate(
        zip(
            starts.tolist(),
            chunk_nos[starts].tolist(),
            is_huge.tolist(),
            pages_per_row.tolist(),
            strict=True,
        )
    ):
        pages = files[int(file_of[entry])]
        assert pages is not None
        # Copies, fitted to their last page: a view would keep every row of `rows` alive.
        chunk = rows[row].copy() if huge_row else file_pages.fitted(rows[row])
        pages.adopt_chunk(chunk_no, chunk, huge_row, n_pages)


def _attach_dense(
    with_pages: list[tuple[int, int, Inode]],
    counts: PfnArray,
    pfns: PfnArray,
    orders: PfnArray,
    indexes: PfnArray,
) -> bool:
    """The common case at array speed: every file made of whole chunks of small pages.

    Entries already checked ascending and non-overlapping, so 512 of them whose first index is
    chunk-aligned and whose last is 511 further are exactly one full chunk. Returns False
    (nothing done) when the stream is not like that.
    """
    if (counts % CHUNK_PAGES).any() or orders.any():
        return False
    firsts, lasts = indexes[::CHUNK_PAGES], indexes[CHUNK_PAGES - 1 :: CHUNK_PAGES]
    if (firsts & CHUNK_MASK).any() or (lasts - firsts != CHUNK_PAGES - 1).any():
        return False
    rows = pfns.reshape(-1, CHUNK_PAGES)
    chunk_nos = (firsts >> CHUNK_SHIFT).tolist()
    row = 0
    for (_, _, inode), n_rows in zip(with_pages, (counts // CHUNK_PAGES).tolist(), strict=True):
        pages = inode.pages
        assert pages is not None
        for _ in range(n_rows):
            pages.adopt_chunk(chunk_nos[row], rows[row], False, CHUNK_PAGES)
            row += 1
    return True


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
