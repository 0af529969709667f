"""A tree as a preserved node holds it (format 2): its inodes as columns, and page-stream entries.

``snapshot`` turns a Tree into the metadata bytes and the entries of its page stream; ``rebuild``
does the reverse from what a node held, trusting nothing: every column is range-checked and the
whole structure (names, links, link counts, reachability, page slices) must be a tree pkramfs
itself could have made, or CorruptNode says what is wrong. Both work a column at a time (numpy,
and msgpack's C code for the names), so an inode costs a few array elements, not Python code.

The metadata is a msgpack map (docs/FORMAT.md): ``format`` (2), ``mount``, ``next_ino``,
``columns`` (one little-endian array per field, an element per inode, inodes in ascending
order), ``directories`` (``[parent_ino, {name: ino}]`` per directory, in inode order),
``symlinks`` (each symlink's target, in inode order), ``xattrs`` (``[ino, {name: value}]``
for the inodes that have any) and ``folios`` (what a file's Folios records, for the files that
have one). Each regular file owns the next ``entries`` page-stream entries.
"""

import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Any, cast

import msgpack
import numpy as np
import numpy.typing as npt

from kexec_sim import HUGE_ORDER, PAGE_SIZE, PageRuns, PfnArray, run_positions

from . import file_pages, xattrs
from .errors import CorruptNode
from .file_pages import FilePages
from .folios import Folios
from .inode import FIRST_FREE_INO, MAX_FILE_BYTES, NAME_MAX, ROOT_INO, Inode
from .options import MAX_NR_INODES, MAX_SIZE_BYTES

RECORD_FORMAT = 2
MAX_SIZE_PAGES = MAX_SIZE_BYTES // PAGE_SIZE
NS_PER_SEC = 10**9
_MAX_KEY_BYTES = 64
_MAX_INDEX = MAX_FILE_BYTES // PAGE_SIZE + 1  # past the last page a file may hold
_IFMT = 0o170000  # the file type bits of a mode
_KINDS = np.array(
    [
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
        stat.S_IFCHR,
        stat.S_IFBLK,
    ]
)
# The columns as written: name -> little-endian dtype.
COLUMNS = {
    "ino": "<u8",
    "mode": "<u4",
    "uid": "<u4",
    "gid": "<u4",
    "nlink": "<u4",
    "rdev": "<u8",
    "size": "<u8",
    "atime_sec": "<i8",
    "atime_nsec": "<u4",
    "mtime_sec": "<i8",
    "mtime_nsec": "<u4",
    "ctime_sec": "<i8",
    "ctime_nsec": "<u4",
    "entries": "<u8",
}
TIMES = ("atime", "mtime", "ctime")

Column = npt.NDArray[Any]


class PackedEntries(bytes):
    """A directory's entries as the record holds them, a msgpack map of name to inode number:
    quiet directories keep theirs packed (quiet_inodes.py), ready for the next record."""

    @classmethod
    def of(cls, entries: "Entries") -> "PackedEntries":
        """*entries* packed (as they are if they are)."""
        if isinstance(entries, PackedEntries):
            return entries
        return cls(msgpack.packb(entries, use_bin_type=True))

    def unpacked(self) -> dict[bytes, int]:
        """The entries as a dict (these bytes were packed here: trusted)."""
        entries: dict[bytes, int] = msgpack.unpackb(self, raw=False, strict_map_key=False)
        return entries


Entries = dict[bytes, int] | PackedEntries
_PAIR = b"\x92"  # a msgpack array of two


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
class InodeColumns:
    """Inodes as columns, one row per inode (ascending inode numbers once sorted).

    ``columns`` holds the ``COLUMNS`` fields (int64, but ``rdev`` uint64); the contents that
    are not numbers are keyed by row: directories' entries (a dict, or PackedEntries) and
    ``parent`` (0 for the rest), symlink targets and xattrs. ``first_entry`` is each row's
    first page-stream entry.
    """

    columns: dict[str, Column]
    parent: Column
    entries: dict[int, Entries]
    targets: dict[int, bytes]
    xattrs: dict[int, dict[bytes, bytes]]
    folios: dict[int, Folios] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["ino"])

    @property
    def first_entry(self) -> Column:
        """Where each row's slice of the page stream starts."""
        counts = self.columns["entries"]
        return np.cumsum(counts) - counts

    def select(self, rows: Column) -> "InodeColumns":
        """The rows *rows* (positions, in the order given), renumbered from 0."""
        inverse = np.full(len(self), -1, dtype=np.int64)
        inverse[rows] = np.arange(len(rows))
        new = inverse.tolist()

        def moved(by_row: dict[int, Any]) -> dict[int, Any]:
            return {new[r]: v for r, v in by_row.items() if new[r] >= 0}

        return InodeColumns(
            {name: column[rows] for name, column in self.columns.items()},
            self.parent[rows],
            moved(self.entries),
            moved(self.targets),
            moved(self.xattrs),
            moved(self.folios),
        )

    @staticmethod
    def concat(parts: Sequence["InodeColumns"]) -> "InodeColumns":
        """The rows of *parts*, one after the other."""
        offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

        def joined(field: str) -> dict[int, Any]:
            pairs = zip(parts, offsets, strict=False)
            return {r + at: v for p, at in pairs for r, v in getattr(p, field).items()}

        return InodeColumns(
            {name: np.concatenate([p.columns[name] for p in parts]) for name in COLUMNS},
            np.concatenate([p.parent for p in parts]),
            joined("entries"),
            joined("targets"),
            joined("xattrs"),
            joined("folios"),
        )


@dataclass
class PageEntries:
    """Page-stream entries: 2**order pages from pfn each, at file page index."""

    pfns: PfnArray
    orders: PfnArray
    indexes: PfnArray

    @staticmethod
    def concat(parts: Sequence["PageEntries"]) -> "PageEntries":
        """The entries of *parts*, one after the other (one part: itself, not a copy)."""
        if len(parts) == 1:
            return parts[0]
        fields = ("pfns", "orders", "indexes")
        return PageEntries(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def gather(self, starts: Column, counts: Column) -> "PageEntries":
        """The slices ``[start, start + count)``, one after the other."""
        at = PageRuns(starts, counts).expand()  # runs of entry positions
        return PageEntries(self.pfns[at], self.orders[at], self.indexes[at])


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
    """What a node's records rebuild: the inodes as columns, their page stream, the next free
    inode number and the mount settings."""

    inodes: InodeColumns
    pages: PageEntries
    next_ino: int
    mount: MountSettings


_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "size_bytes", "atime_ns", "mtime_ns", "ctime_ns")
_NUMBERS = attrgetter(*_FIELDS)


def inode_columns(inodes: list[Inode]) -> tuple[InodeColumns, PageEntries]:
    """The columns of *inodes* (in the order given) and their files' page entries."""
    n = len(inodes)
    numbers = _numbers(inodes).reshape(n, len(_FIELDS))
    columns: dict[str, Column] = {
        name: numbers[:, i].astype(np.int64, copy=False)  # object dtype if a time overflowed
        for i, name in enumerate(("ino", "mode", "uid", "gid", "nlink", "size"))
    }
    columns["rdev"] = np.fromiter(map(attrgetter("rdev"), inodes), np.uint64, count=n)
    for i, name in enumerate(TIMES):
        columns[f"{name}_sec"], columns[f"{name}_nsec"] = _split_times(numbers[:, 6 + i])
    kinds = columns["mode"] & _IFMT
    entries: dict[int, Entries] = _by_row(inodes, kinds == stat.S_IFDIR, "entries")
    targets: dict[int, bytes] = _by_row(inodes, kinds == stat.S_IFLNK, "target")
    all_attrs = list(map(attrgetter("xattrs"), inodes))
    attrs = {r: a for r, a in enumerate(all_attrs) if a}
    files = np.flatnonzero(kinds == stat.S_IFREG)
    indexes_of: list[FilePages] = list(_by_row(inodes, kinds == stat.S_IFREG, "pages").values())
    nr_pages = np.fromiter(map(attrgetter("nr_pages"), indexes_of), np.int64, count=len(files))
    with_pages = files[nr_pages > 0]
    pfns, orders, indexes, per_file = file_pages.page_entries(
        [indexes_of[i] for i in np.flatnonzero(nr_pages).tolist()]
    )
    counts = np.zeros(n, dtype=np.int64)
    counts[with_pages] = per_file
    columns["entries"] = counts
    parent = np.zeros(n, dtype=np.int64)
    parent[list(entries)] = [inodes[r].parent_ino for r in entries]
    pages = PageEntries(pfns, orders, indexes)
    records = np.fromiter(map(attrgetter("folios"), indexes_of), object, count=len(files))
    with_record = np.flatnonzero(records != None)  # noqa: E711 (elementwise, in C)
    folios = dict(zip(files[with_record].tolist(), records[with_record], strict=True))
    return InodeColumns(columns, parent, entries, targets, attrs, folios), pages


def _by_row(inodes: list[Inode], rows: Column, field: str) -> dict[int, Any]:
    """Attribute *field* of the inodes at *rows* (a mask), keyed by row."""
    chosen = np.flatnonzero(rows).tolist()
    return dict(zip(chosen, map(attrgetter(field), map(inodes.__getitem__, chosen)), strict=True))


def _numbers(inodes: list[Inode]) -> Column:
    """The ``_FIELDS`` of *inodes*, one row each, as int64 (times split by the caller).

    A time past 2262 or before 1677 is no int64 of nanoseconds (tmpfs keeps 64-bit seconds):
    then the times go as seconds and nanoseconds the slow way."""
    flat = chain.from_iterable(map(_NUMBERS, inodes))
    try:
        return np.fromiter(flat, np.int64, count=len(_FIELDS) * len(inodes))
    except OverflowError:
        rows = [list(_NUMBERS(inode)) for inode in inodes]
        return np.array(rows, dtype=object)


def _split_times(times_ns: Column) -> tuple[Column, Column]:
    """Seconds and nanoseconds (0..10^9 - 1) of each time."""
    if times_ns.dtype != object:
        sec, nsec = np.divmod(times_ns, NS_PER_SEC)
        return sec, nsec
    pairs = [divmod(t, NS_PER_SEC) for t in times_ns.tolist()]
    return np.array([s for s, _ in pairs], dtype=np.int64), np.array([n for _, n in pairs])


def join_times(sec: int, nsec: int) -> int:
    """A time in nanoseconds from its seconds and nanoseconds."""
    return sec * NS_PER_SEC + nsec


def merge(
    parts: Sequence[tuple[InodeColumns, PageEntries]],
) -> tuple[InodeColumns, PageEntries, Column | None]:
    """The rows of *parts* (each: columns and their page entries) in ascending inode order,
    their page entries in the same order, and the order applied to the rows as they came
    (None if they came in order)."""
    merged = InodeColumns.concat([columns for columns, _ in parts])
    stream = PageEntries.concat([entries for _, entries in parts])
    if (np.diff(merged.columns["ino"]) > 0).all():
        return merged, stream, None
    order = np.argsort(merged.columns["ino"], kind="stable")
    counts = merged.columns["entries"]
    stream = stream.gather(merged.first_entry[order], counts[order])
    return merged.select(order), stream, order


def snapshot(
    parts: Sequence[tuple[InodeColumns, PageEntries]], next_ino: int, mount: MountSettings
) -> TreeSnapshot:
    """Record the inodes of *parts* (each: columns and their page entries) in ascending
    inode order.

    The metadata is packed a piece at a time, as one msgpack map: the columns' bytes and the
    entries packed already (PackedEntries) go in as they are, copied once."""
    ordered, stream, _ = merge(parts)
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    head = {"format": RECORD_FORMAT, "mount": mount.to_record(), "next_ino": next_ino}
    pieces: list[bytes | memoryview] = [packer.pack_map_header(len(head) + 5)]
    for key, value in head.items():
        pieces += [pack(key), pack(value)]
    pieces += [pack("columns"), packer.pack_map_header(len(COLUMNS))]
    for name, wire in COLUMNS.items():
        column = np.ascontiguousarray(ordered.columns[name], dtype=wire)
        pieces += [pack(name), _bin_header(column.nbytes), column.data.cast("B")]
    directories = sorted(ordered.entries.items())
    pieces += [pack("directories"), packer.pack_array_header(len(directories))]
    for row, entries in directories:
        packed = entries if isinstance(entries, PackedEntries) else pack(entries)
        pieces += [_PAIR, pack(int(ordered.parent[row])), packed]
    pieces += [
        pack("symlinks"),
        pack([target for _, target in sorted(ordered.targets.items())]),
        pack("xattrs"),
        pack(
            [[int(ordered.columns["ino"][r]), attrs] for r, attrs in sorted(ordered.xattrs.items())]
        ),
        pack("folios"),
        pack(
            [
                [int(ordered.columns["ino"][r]), *_folios_record(f)]
                for r, f in sorted(ordered.folios.items())
            ]
        ),
    ]
    meta = b"".join(pieces)
    return TreeSnapshot(meta, stream.pfns, stream.orders, stream.indexes, len(ordered))


def _folios_record(folios: Folios) -> tuple[int, bytes, bytes]:
    """A file's Folios as the record holds them: fallocend; the unwritten pages as (first
    index, count) runs; the large folios as (first index, order); u64 pairs, ascending."""
    unwritten = folios.unwritten_indexes()
    at, lengths = run_positions(unwritten)
    runs = np.stack([unwritten[at], lengths], axis=1)
    large = np.stack(folios.large(), axis=1)
    return folios.fallocend, runs.astype("<u8").tobytes(), large.astype("<u8").tobytes()


def _bin_header(nbytes: int) -> bytes:
    """The msgpack header of a bin of *nbytes* (the shortest, as msgpack packs it)."""
    if nbytes < 1 << 8:
        return b"\xc4" + nbytes.to_bytes(1, "big")
    if nbytes < 1 << 16:
        return b"\xc5" + nbytes.to_bytes(2, "big")
    return b"\xc6" + nbytes.to_bytes(4, "big")


def rebuild(
    meta: bytes | memoryview, pfns: PfnArray, orders: PfnArray, indexes: PfnArray, what: str
) -> RebuiltTree:
    """Check a node's metadata and page entries and return them as columns; CorruptNode if
    they are not a tree pkramfs could have made."""
    check = _Checker(what)
    document = check.unpack(meta)
    version = document.get("format")
    check.that(
        version == RECORD_FORMAT,
        f"metadata format {version!r} (this pkramfs reads format {RECORD_FORMAT}; a node "
        "written by an older pkramfs is restored by that version)",
    )
    mount = check.mount_settings(document.get("mount"))
    next_ino = check.integer(document.get("next_ino"), "next_ino", FIRST_FREE_INO, 1 << 62)
    columns = check.columns(document.get("columns"), next_ino)
    n = len(columns["ino"])
    kinds = columns["mode"] & _IFMT
    dir_rows = np.flatnonzero(kinds == stat.S_IFDIR)
    link_rows = np.flatnonzero(kinds == stat.S_IFLNK)
    parent, entries = check.directories(document.get("directories"), dir_rows, n, next_ino)
    targets = check.symlinks(document.get("symlinks"), link_rows)
    attrs = check.xattrs(document.get("xattrs"), columns["ino"])
    held_pages = int((np.int64(1) << orders).sum()) if orders.any() else len(orders)
    folios = check.folios(document.get("folios", []), columns["ino"], kinds, held_pages)
    inodes = InodeColumns(
        columns, parent, cast(dict[int, Entries], entries), targets, attrs, folios
    )
    check.structure(inodes, entries, kinds)
    stream = PageEntries(pfns, orders, indexes)
    check.page_slices(inodes, kinds, stream)
    check.folios_held(inodes, stream)
    return RebuiltTree(inodes, stream, next_ino, mount)


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A msgpack map as a dict; a key twice is a corrupt record (the unpacker would keep one)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise CorruptNode("a map has a key twice")
    return result


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
            type(value) is int and low <= value <= high,
            f"{field} {value!r} out of range",
        )
        assert isinstance(value, int)
        return value

    def unpack(self, meta: bytes | memoryview) -> dict[Any, Any]:
        """The metadata map, unpacked with limits (a length never past what *meta* holds)."""
        try:
            document = msgpack.unpackb(
                meta,
                raw=False,
                strict_map_key=False,
                use_list=True,
                object_pairs_hook=_unique_map,
                max_str_len=_MAX_KEY_BYTES,  # map keys and the huge policy only
                max_bin_len=len(meta),  # names, values, targets, columns
                max_ext_len=0,  # none are written
                max_array_len=len(meta),  # each element takes a byte at least
                max_map_len=len(meta),
            )
        except CorruptNode as exc:
            raise CorruptNode(f"{self.what}: metadata: {exc}") from None
        except Exception as exc:  # msgpack raises many types for bad input
            raise CorruptNode(f"{self.what}: metadata is not msgpack ({exc})") from None
        self.that(isinstance(document, dict), "metadata is not a map")
        assert isinstance(document, dict)
        return document

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

    def columns(self, raw: object, next_ino: int) -> dict[str, Column]:
        """The ``columns`` map as arrays of one length, every value in its range."""
        self.that(isinstance(raw, dict) and set(raw) == set(COLUMNS), "bad inode columns")
        assert isinstance(raw, dict)
        for name, wire in COLUMNS.items():
            data = raw[name]
            self.that(
                isinstance(data, bytes) and len(data) % np.dtype(wire).itemsize == 0,
                f"bad inode column {name}",
            )
        read = {name: np.frombuffer(raw[name], dtype=wire) for name, wire in COLUMNS.items()}
        n = len(read["ino"])
        self.that(
            n > 0 and all(len(c) == n for c in read.values()), "inode columns differ in length"
        )
        ino = read["ino"]
        self.that(bool(ino[0] == ROOT_INO), "no root directory")
        self.that(
            n == 1 or bool((ino[1] >= FIRST_FREE_INO) & (ino[-1] < next_ino)),
            "an inode number out of range",
        )
        self.that(bool((np.diff(ino.astype(np.int64)) > 0).all()), "inode numbers not ascending")
        kinds = read["mode"] & _IFMT
        self.that(
            bool((read["mode"] <= 0o177777).all() & np.isin(kinds, _KINDS).all()),
            "an inode of unknown type",
        )
        self.that(bool((read["nlink"] >= 1).all()), "an inode with no link")
        self.that(bool((read["size"] <= MAX_FILE_BYTES).all()), "a file size out of range")
        for name in TIMES:
            self.that(bool((read[f"{name}_nsec"] < NS_PER_SEC).all()), f"bad {name} nanoseconds")
        columns = {name: c.astype(np.int64) for name, c in read.items() if name != "rdev"}
        columns["rdev"] = read["rdev"].astype(np.uint64)
        return columns

    def directories(
        self, raw: object, dir_rows: Column, n: int, next_ino: int
    ) -> tuple[Column, dict[int, dict[bytes, int]]]:
        """Each directory's parent and entries (names checked), keyed by row."""
        self.that(isinstance(raw, list) and len(raw) == len(dir_rows), "bad directory list")
        assert isinstance(raw, list)
        parent = np.zeros(n, dtype=np.int64)
        entries: dict[int, dict[bytes, int]] = {}
        for row, item in zip(dir_rows.tolist(), raw, strict=True):
            self.that(
                isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict),
                "bad directory",
            )
            parent[row] = self.integer(item[0], "parent", ROOT_INO, next_ino - 1)
            names: dict[bytes, int] = item[1]
            if names:
                self.names(list(names))
                self.that(
                    set(map(type, names.values())) == {int}, "an entry is not an inode number"
                )
            entries[row] = names
        return parent, entries

    def names(self, names: list[Any]) -> None:
        """Fail unless every name is 1..255 bytes, without '/' or NUL, not '.' or '..'."""
        self.that(set(map(type, names)) == {bytes}, "a file name is not bytes")
        joined = b"".join(names)
        self.that(
            min(map(len, names)) > 0
            and max(map(len, names)) <= NAME_MAX
            and b"/" not in joined
            and b"\0" not in joined
            and b"." not in names
            and b".." not in names,
            f"bad file name among {names[:3]!r}",
        )

    def symlinks(self, raw: object, link_rows: Column) -> dict[int, bytes]:
        """Each symlink's target (1..4095 bytes), keyed by row."""
        self.that(isinstance(raw, list) and len(raw) == len(link_rows), "bad symlink list")
        assert isinstance(raw, list)
        self.that(all(isinstance(t, bytes) and 0 < len(t) < PAGE_SIZE for t in raw), "bad symlink")
        return dict(zip(link_rows.tolist(), raw, strict=True))

    def xattrs(self, raw: object, ino: Column) -> dict[int, dict[bytes, bytes]]:
        """The xattrs by row: namespaced names, values up to 64 KiB, inodes ascending."""
        result: dict[int, dict[bytes, bytes]] = {}
        for item, number, row in self._per_inode(raw, ino, 2, "xattrs"):
            attrs = item[1]
            self.that(isinstance(attrs, dict) and len(attrs) > 0, f"inode {number}: bad xattrs")
            for key, value in attrs.items():
                self.that(
                    isinstance(key, bytes)
                    and 0 < len(key) <= xattrs.NAME_MAX
                    and key.startswith(xattrs.NAMESPACES)
                    and isinstance(value, bytes)
                    and len(value) <= xattrs.SIZE_MAX,
                    f"inode {number}: bad xattr {key!r}",
                )
            result[row] = attrs
        return result

    def folios(self, raw: object, ino: Column, kinds: Column, held_pages: int) -> dict[int, Folios]:
        """The Folios by row: regular files, inodes ascending, fallocend within the largest
        file, unwritten runs and large folios ascending and apart, each folio of order 1 to 8
        aligned to its size, no more pages named than the page stream holds (*held_pages*)."""
        result: dict[int, Folios] = {}
        for item, number, row in self._per_inode(raw, ino, 4, "folios"):
            self.that(kinds[row] == stat.S_IFREG, f"folios of inode {number}: no such file")
            folios = Folios()
            folios.fallocend = self.integer(item[1], f"inode {number}: fallocend", 0, _MAX_INDEX)
            starts, counts = self._pairs(item[2], number)
            self.that(
                bool((counts > 0).all() and (starts[1:] > starts[:-1] + counts[:-1]).all())
                and int(counts.sum()) <= held_pages,
                f"inode {number}: unwritten runs out of order or too long",
            )
            folios.add_unwritten(PageRuns(starts, counts).expand())
            heads, orders = self._pairs(item[3], number)
            sizes = np.int64(1) << np.minimum(orders, HUGE_ORDER)
            self.that(
                bool(
                    ((orders >= 1) & (orders < HUGE_ORDER)).all()
                    and not (heads & (sizes - 1)).any()
                    and (heads[1:] >= heads[:-1] + sizes[:-1]).all()
                ),
                f"inode {number}: bad large folios",
            )
            folios.add_large(list(zip(heads.tolist(), orders.tolist(), strict=True)))
            self.that(not folios.is_empty(), f"inode {number}: empty folios")
            result[row] = folios
        return result

    def _per_inode(
        self, raw: object, ino: Column, width: int, what: str
    ) -> Iterator[tuple[list[Any], int, int]]:
        """The items of a per-inode list (each ``[ino, ...]``, *width* long, inodes ascending,
        each one's inode there): (item, inode number, row)."""
        self.that(isinstance(raw, list), f"bad {what} list")
        assert isinstance(raw, list)
        last = -1
        for item in raw:
            self.that(isinstance(item, list) and len(item) == width, f"bad {what}")
            number = self.integer(item[0], f"{what} inode", ROOT_INO, int(ino[-1]))
            row = int(np.searchsorted(ino, number))
            self.that(row > last and ino[row] == number, f"{what} of inode {number}: no such inode")
            yield item, number, row
            last = row

    def _pairs(self, raw: object, number: int) -> tuple[Column, Column]:
        """Two columns from a bin of u64 pairs, each value below _MAX_INDEX."""
        self.that(isinstance(raw, bytes) and len(raw) % 16 == 0, f"inode {number}: bad pairs")
        assert isinstance(raw, bytes)
        pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
        self.that(bool((pairs < _MAX_INDEX).all()), f"inode {number}: pages out of range")
        pairs = pairs.astype(np.int64)
        return pairs[:, 0], pairs[:, 1]

    def folios_held(self, inodes: InodeColumns, stream: PageEntries) -> None:
        """Every unwritten page and every page of a large folio is one its file holds as a
        small page (a large folio) or any page (unwritten)."""
        first_entry = inodes.first_entry
        for row, folios in inodes.folios.items():
            first, count = int(first_entry[row]), int(inodes.columns["entries"][row])
            orders = stream.orders[first : first + count]
            indexes = stream.indexes[first : first + count]
            held = PageRuns(indexes, np.int64(1) << orders).expand()
            small = indexes[orders == 0]
            heads, large_orders = folios.large()
            in_large = PageRuns(heads, np.int64(1) << large_orders).expand()
            self.that(
                bool(np.isin(folios.unwritten_indexes(), held).all())
                and bool(np.isin(in_large, small).all()),
                f"inode {int(inodes.columns['ino'][row])}: folios of pages it does not hold",
            )

    def structure(
        self, inodes: InodeColumns, entries: dict[int, dict[bytes, int]], kinds: Column
    ) -> None:
        """Every inode reachable from the root once per link; link counts and parents right."""
        ino, nlink = inodes.columns["ino"], inodes.columns["nlink"]
        is_dir = kinds == stat.S_IFDIR
        self.that(bool(is_dir[0]) and inodes.parent[0] == ROOT_INO, "no root directory")
        rows = list(entries)
        sizes = np.fromiter(map(len, entries.values()), np.int64, count=len(rows))
        try:
            children = np.fromiter(
                chain.from_iterable(map(dict.values, entries.values())),
                np.int64,
                count=int(sizes.sum()),
            )
        except OverflowError:
            children = np.full(int(sizes.sum()), -1, dtype=np.int64)
        container = np.repeat(np.array(rows, dtype=np.int64), sizes)
        child = np.minimum(np.searchsorted(ino, children), len(ino) - 1)
        missing = ino[child] != children
        if missing.any():
            self.that(False, f"an entry names missing inode {int(children[missing][0])}")
        refs = np.bincount(child, minlength=len(ino))
        subdir = is_dir[child]
        wrong_parent = inodes.parent[child[subdir]] != ino[container[subdir]]
        if wrong_parent.any():
            self.that(False, f"directory {int(ino[child[subdir][wrong_parent][0]])}: wrong parent")
        subdirs = np.bincount(container[subdir], minlength=len(ino))
        expected_refs = np.where(is_dir, 1, nlink)
        expected_refs[0] = 0
        bad = np.flatnonzero(refs != expected_refs)
        if bad.size:
            row = int(bad[0])
            self.that(
                False,
                f"inode {int(ino[row])}: link count {int(nlink[row])}, {int(refs[row])} names",
            )
        bad = np.flatnonzero(is_dir & (nlink != 2 + subdirs))
        self.that(
            not bad.size, f"directory {int(ino[bad[0]]) if bad.size else 0}: wrong link count"
        )
        # Each directory but the root has one name, in its parent: following parents from
        # every directory must reach the root (no cycle of directories off on its own).
        up = np.searchsorted(ino, inodes.parent)
        up[~is_dir] = 0
        for _ in range(max(1, int(is_dir.sum())).bit_length() + 1):
            up = up[up]
        stray = np.flatnonzero(is_dir & (up != 0))
        self.that(
            not stray.size, f"directories unreachable from the root: {ino[stray[:3]].tolist()}"
        )

    def page_slices(self, inodes: InodeColumns, kinds: Column, stream: PageEntries) -> None:
        """Each regular file's entries follow the previous file's, ascending without overlap
        and ending before the end of the file (rounded up to 2 MiB, where a huge page may reach).

        One pass over the entries (a bool each); the rest is per file: ascending without
        overlap, a file's last entry is the one that reaches furthest."""
        counts = inodes.columns["entries"]
        self.that(
            not (counts[kinds != stat.S_IFREG]).any(), "an inode that is not a file has pages"
        )
        self.that(int(counts.sum()) == len(stream.pfns), "page stream entries belong to no file")
        if not len(stream.pfns):
            return
        rows = np.flatnonzero(counts)  # the files with entries, in stream order
        last = np.cumsum(counts[rows]) - 1  # each one's last entry
        indexes, orders = stream.indexes, stream.orders
        has_huge = bool(orders.any())
        if has_huge:
            ends = indexes + (np.int64(1) << orders)
            behind = indexes[1:] < ends[:-1]
        else:
            behind = indexes[1:] <= indexes[:-1]
        behind[last[:-1]] = False  # a file's first entry follows another file's last
        if behind.any():
            row = rows[np.searchsorted(last, int(np.argmax(behind)) + 1)]
            self.that(
                False, f"inode {int(inodes.columns['ino'][row])}: pages overlap or are out of order"
            )
        huge_pages = np.int64(1) << HUGE_ORDER
        size_pages = -(-np.maximum(inodes.columns["size"][rows], 1) // PAGE_SIZE)
        for at in np.flatnonzero(np.isin(rows, list(inodes.folios))).tolist():
            size_pages[at] = max(int(size_pages[at]), inodes.folios[int(rows[at])].fallocend)
        limits = -(-size_pages // huge_pages) * huge_pages
        reach = indexes[last] + ((np.int64(1) << orders[last]) if has_huge else 1)
        past_end = np.flatnonzero(reach > limits)
        if past_end.size:
            row = rows[past_end[0]]
            self.that(
                False, f"inode {int(inodes.columns['ino'][row])}: a page lies past the end of file"
            )
