"""Operations-level tests: the Tree model over a real machine's RAM, no FUSE in between."""

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kexec_sim.geometry import HUGE_PAGES, PAGE_SIZE
from kexec_sim.machine import Machine
from pkramfs import preserve, tree_record
from pkramfs.errors import FsError
from pkramfs.inode import ROOT_INO
from pkramfs.page_pool import PagePool
from pkramfs.quiet_inodes import QuietInodes
from pkramfs.relocation import relocate_out_of
from pkramfs.tree import RENAME_EXCHANGE, RENAME_NOREPLACE, Tree

R = ROOT_INO


@pytest.fixture
def tree(machine: Machine) -> Iterator[Tree]:
    """A Tree with 16 MiB of size= on the test machine; the ownership check runs afterwards."""
    ownership = machine.page_ownership()
    owner = ownership.register_owner("ops-test", os.getpid())
    ram = machine.ram()
    pool = PagePool(ownership, ram, owner, limit_pages=4096)
    t = Tree(ram, pool, root_mode=0o1777, root_uid=0, root_gid=0, max_inodes=64, huge=False)
    yield t
    problems = ownership.check({owner: t.owned_pfns()}, machine.boot_record())
    assert problems == []
    ownership.unregister_owner(owner)
    assert ownership.count_by_owner().get(owner, 0) == 0


@pytest.fixture
def poisoned_tree(tree: Tree) -> Tree:
    """The tree, with every page its pool will hand out full of 0xAA: stale bytes show."""
    pages = tree.pool.take(tree.pool.limit_pages)
    tree.ram.pages[pages] = 0xAA
    tree.pool.give_back(pages)
    return tree


def errno_of(fn: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(FsError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.errno


def new_file(tree: Tree, name: bytes, parent: int = R) -> tuple[int, int]:
    fh, inode = tree.create(parent, name, 0o644, os.O_RDWR, 0, 0)
    return fh, inode.ino


def test_write_read_across_pages_and_holes(tree: Tree) -> None:
    fh, ino = new_file(tree, b"f")
    tree.write(fh, 4090, b"x" * 20)
    tree.write(fh, 5 * PAGE_SIZE + 1, b"tail")
    data = bytes(tree.read(fh, 0, 10 * PAGE_SIZE))
    assert len(data) == 5 * PAGE_SIZE + 5
    assert data[4090:4110] == b"x" * 20
    assert data[:4090] == bytes(4090)
    assert data[4110 : 5 * PAGE_SIZE + 1] == bytes(5 * PAGE_SIZE + 1 - 4110)
    assert data[-4:] == b"tail"
    assert tree.get(ino).blocks_512 == 3 * 8  # pages 0, 1 and 5 only: the rest are holes


def test_sparse_truncate_costs_nothing(tree: Tree) -> None:
    fh, ino = new_file(tree, b"big")
    tree.setattr(ino, size=999_999_999_999_999)
    inode = tree.get(ino)
    assert inode.size_bytes == 999_999_999_999_999
    assert inode.blocks_512 == 0
    assert bytes(tree.read(fh, 999_999_999_999_990, 100)) == bytes(9)
    tree.write(fh, 999_999_999_999_000, b"end")
    assert inode.blocks_512 == 8


def test_truncate_down_then_up_reads_zeros(tree: Tree) -> None:
    fh, ino = new_file(tree, b"f")
    tree.write(fh, 0, b"a" * 10000)
    tree.setattr(ino, size=5000)
    tree.setattr(ino, size=12000)
    data = bytes(tree.read(fh, 0, 20000))
    assert data == b"a" * 5000 + bytes(7000)
    tree.write(fh, 11000, b"b")
    assert bytes(tree.read(fh, 10990, 20)) == bytes(10) + b"b" + bytes(999)[:9]


def test_write_beyond_eof_lands_at_its_offset(tree: Tree) -> None:
    fh, _ = new_file(tree, b"f")
    tree.write(fh, 0, b"abc")
    tree.write(fh, 100_000, b"xyz")
    data = bytes(tree.read(fh, 0, 200_000))
    assert len(data) == 100_003
    assert data[:3] == b"abc" and data[-3:] == b"xyz" and data[3:100_000] == bytes(99_997)


def test_scattered_pages_round_trip(tree: Tree, machine: Machine) -> None:
    """Pages allocated out of order (many runs) still read back right (numpy path)."""
    fhs = [new_file(tree, f"f{i}".encode())[0] for i in range(4)]
    payload: dict[int, list[bytes]] = {}
    for page in range(40):  # interleave allocations so no file has consecutive pfns
        for i, fh in enumerate(fhs):
            chunk = bytes([i * 40 + page]) * PAGE_SIZE
            tree.write(fh, page * PAGE_SIZE, chunk)
            payload.setdefault(i, []).append(chunk)
    for i, fh in enumerate(fhs):
        assert bytes(tree.read(fh, 100, 40 * PAGE_SIZE)) == b"".join(payload[i])[100:]
        tree.write(fh, 50, b"Z" * (38 * PAGE_SIZE))
        expect = bytearray(b"".join(payload[i]))
        expect[50 : 50 + 38 * PAGE_SIZE] = b"Z" * (38 * PAGE_SIZE)
        assert bytes(tree.read(fh, 0, 40 * PAGE_SIZE)) == bytes(expect)


def test_enospc_takes_nothing(tree: Tree) -> None:
    fh, ino = new_file(tree, b"f")
    tree.write(fh, 0, b"1" * (4000 * PAGE_SIZE))
    used = tree.pool.used_pages
    assert errno_of(tree.write, fh, 4000 * PAGE_SIZE, b"2" * (200 * PAGE_SIZE)) == errno.ENOSPC
    assert tree.pool.used_pages == used
    assert tree.get(ino).size_bytes == 4000 * PAGE_SIZE
    tree.setattr(ino, size=0)
    tree.write(fh, 0, b"3" * (200 * PAGE_SIZE))  # space came back
    assert bytes(tree.read(fh, 0, 10)) == b"3" * 10


def test_directory_link_counts_and_sizes(tree: Tree) -> None:
    d = tree.mkdir(R, b"d", 0o755, 0, 0)
    tree.mkdir(d.ino, b"e", 0o755, 0, 0)
    assert tree.get(R).nlink == 3
    assert d.nlink == 3
    assert d.reported_size == 60  # tmpfs: 20 bytes per entry, . and .. included
    assert errno_of(tree.rmdir, R, b"d") == errno.ENOTEMPTY
    tree.rmdir(d.ino, b"e")
    tree.rmdir(R, b"d")
    assert tree.get(R).nlink == 2
    assert errno_of(tree.unlink, R, b"d") == errno.ENOENT


def test_rename_semantics(tree: Tree) -> None:
    a = tree.mkdir(R, b"a", 0o755, 0, 0)
    b = tree.mkdir(R, b"b", 0o755, 0, 0)
    tree.mkdir(a.ino, b"sub", 0o755, 0, 0)
    assert errno_of(tree.rename, R, b"a", a.ino, b"x") == errno.EINVAL  # into itself
    _, f = new_file(tree, b"f")
    assert errno_of(tree.rename, R, b"f", R, b"a") == errno.EISDIR
    assert errno_of(tree.rename, R, b"b", R, b"f") == errno.ENOTDIR
    assert errno_of(tree.rename, R, b"b", R, b"a") == errno.ENOTEMPTY
    tree.rename(R, b"a", R, b"b")  # over an empty dir
    assert tree.child(R, b"b").ino == a.ino
    assert tree.get(R).nlink == 3
    assert errno_of(tree.rename, R, b"f", R, b"b", RENAME_NOREPLACE) == errno.EEXIST
    tree.rename(R, b"f", R, b"b", RENAME_EXCHANGE)
    assert tree.child(R, b"f").ino == a.ino and tree.child(R, b"b").ino == f
    assert errno_of(tree.rename, R, b"f", a.ino, b"moved") == errno.EINVAL  # 'f' is a now
    assert b.nlink == 0


def test_rename_exchange_fixes_link_counts(tree: Tree) -> None:
    d1 = tree.mkdir(R, b"d1", 0o755, 0, 0)
    d2 = tree.mkdir(R, b"d2", 0o755, 0, 0)
    tree.mkdir(d1.ino, b"sub", 0o755, 0, 0)
    new_file(tree, b"file", d2.ino)
    tree.rename(d1.ino, b"sub", d2.ino, b"file", RENAME_EXCHANGE)
    assert d1.nlink == 2 and d2.nlink == 3
    assert tree.child(d2.ino, b"file").is_dir
    assert tree.child(d2.ino, b"file").parent_ino == d2.ino


def test_hard_links_keep_data_until_last_name_and_handle(tree: Tree) -> None:
    fh, ino = new_file(tree, b"f")
    tree.write(fh, 0, b"data")
    tree.link(ino, R, b"g")
    assert tree.get(ino).nlink == 2
    tree.unlink(R, b"f")
    tree.unlink(R, b"g")
    assert ino in tree.inodes  # open and looked up still
    assert bytes(tree.read(fh, 0, 4)) == b"data"
    tree.release(fh)
    tree.forget(ino, tree.get(ino).lookups)
    assert ino not in tree.inodes


def test_a_removed_file_frees_its_content_at_once_and_its_number_at_forget(tree: Tree) -> None:
    """No name and no handle left: pages, xattr space and the place under nr_inodes come back
    at once (as tmpfs evicts then); the kernel's lookups only keep the number until FORGET."""
    fh, a = new_file(tree, b"a")
    tree.write(fh, 0, b"a" * 5 * PAGE_SIZE)
    tree.setxattr(a, b"user.x", b"1" * 100)
    fh_b, b = new_file(tree, b"b")
    tree.write(fh_b, 0, b"b" * 3 * PAGE_SIZE)
    tree.unlink(R, b"a")
    assert tree.pool.used_pages == 8 and tree.stats().free_inodes == 64 - 3  # a is open
    tree.release(fh)
    assert tree.pool.used_pages == 3 and tree.xattr_bytes == 0
    assert tree.stats().free_inodes == 64 - 2
    assert tree.get(a).lookups == 1 and tree.get(a).nlink == 0  # still known to the kernel
    assert errno_of(tree.open, a, os.O_RDONLY) == errno.ENOENT
    tree.release(new_file(tree, b"c")[0])
    tree.rename(R, b"c", R, b"b")  # over b, whose handle is still open
    assert tree.pool.used_pages == 3
    tree.release(fh_b)
    assert tree.pool.used_pages == 0 and tree.stats().free_inodes == 64 - 2
    tree.forget(a, 1)
    tree.forget(b, 1)
    assert a not in tree.inodes and b not in tree.inodes and not tree.removed
    for _ in range(100):  # never forgotten: nr_inodes=64 is not used up by removed files
        tree.release(new_file(tree, b"n")[0])
        tree.unlink(R, b"n")
    assert tree.stats().free_inodes == 64 - 2
    d = tree.mkdir(R, b"d", 0o755, 0, 0)
    tree.rmdir(R, b"d")
    assert d.ino in tree.removed and tree.stats().free_inodes == 64 - 2


def test_a_removed_secret_file_gives_its_pages_back_mapped(tree: Tree) -> None:
    tree.secret = True
    fh, ino = new_file(tree, b"s")
    tree.write(fh, 0, b"s" * 4 * PAGE_SIZE)
    assert tree.ram.unmapped_pages == 4
    tree.release(fh)
    tree.unlink(R, b"s")  # the kernel still holds its lookup
    assert tree.ram.unmapped_pages == 0 and tree.pool.used_pages == 0
    assert ino in tree.inodes
    tree.forget(ino, 1)
    assert ino not in tree.inodes


def test_special_files_and_symlinks(tree: Tree) -> None:
    fifo = tree.mknod(R, b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    dev = tree.mknod(R, b"c", stat.S_IFCHR | 0o600, os.makedev(1, 3), 0, 0)
    link = tree.symlink(R, b"l", b"target/path", 0, 0)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_ISCHR(dev.mode)
    assert dev.rdev == os.makedev(1, 3)
    assert link.target == b"target/path" and link.size_bytes == 11
    assert errno_of(tree.symlink, R, b"long", b"x" * 4096, 0, 0) == errno.ENAMETOOLONG


def test_xattrs(tree: Tree) -> None:
    _, ino = new_file(tree, b"f")
    tree.setxattr(ino, b"user.a", b"1")
    tree.setxattr(ino, b"trusted.b", b"2")
    tree.setxattr(ino, b"security.c", b"")
    assert sorted(tree.listxattr(ino)) == [b"security.c", b"trusted.b", b"user.a"]
    assert tree.getxattr(ino, b"user.a") == b"1"
    assert errno_of(tree.getxattr, ino, b"user.none") == errno.ENODATA
    assert errno_of(tree.setxattr, ino, b"os2.x", b"v") == errno.EOPNOTSUPP
    assert errno_of(tree.setxattr, ino, b"user.big", b"v" * 65537) == errno.E2BIG
    tree.removexattr(ino, b"user.a")
    assert errno_of(tree.removexattr, ino, b"user.a") == errno.ENODATA


def test_xattr_space_is_bounded_like_tmpfs_ispace(tree: Tree) -> None:
    """nr_inodes=64 gives the mount 64 KiB of xattr space, freed with the xattr or inode."""
    _, a = new_file(tree, b"a")
    _, b = new_file(tree, b"b")
    tree.setxattr(a, b"user.big", b"x" * 60_000)
    assert errno_of(tree.setxattr, b, b"user.big", b"y" * 10_000) == errno.ENOSPC
    tree.removexattr(a, b"user.big")
    tree.setxattr(b, b"user.big", b"y" * 60_000)
    tree.unlink(R, b"b")
    tree.forget(b, tree.get(b).lookups)
    tree.release(next(fh for fh, h in tree.handles.items() if h.ino == b))
    assert tree.xattr_bytes == 0


def test_limits(tree: Tree) -> None:
    assert errno_of(tree.mkdir, R, b"n" * 256, 0o755, 0, 0) == errno.ENAMETOOLONG
    for i in range(62):  # root + 63 more reach nr_inodes=64
        new_file(tree, f"f{i}".encode())
    new_file(tree, b"last")
    assert errno_of(new_file, tree, b"one-too-many") == errno.ENOSPC


def test_setgid_directory_inheritance(tree: Tree) -> None:
    d = tree.mkdir(R, b"d", 0o2775, 0, 50)
    sub = tree.mkdir(d.ino, b"sub", 0o755, 7, 7)
    _, f = tree.create(d.ino, b"f", 0o644, os.O_WRONLY, 7, 7)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    assert f.gid == 50


def test_times_follow_tmpfs(tree: Tree) -> None:
    """Each change stamps the times tmpfs stamps (set to 1 ns first, so a miss is visible)."""
    fh, ino = new_file(tree, b"f")
    inode, root = tree.get(ino), tree.get(R)

    def reset() -> None:
        for i in (inode, root):
            i.atime_ns = i.mtime_ns = i.ctime_ns = 1

    reset()
    tree.write(fh, 0, b"x")
    assert inode.mtime_ns > 1 and inode.ctime_ns > 1 and inode.atime_ns == 1
    tree.setattr(ino, atime_ns=123, mtime_ns=456_000_000_789)
    assert (inode.atime_ns, inode.mtime_ns) == (123, 456_000_000_789) and inode.ctime_ns > 1
    reset()
    tree.setxattr(ino, b"user.t", b"")
    assert inode.ctime_ns > 1 and inode.mtime_ns == 1
    reset()
    tree.release(tree.open(ino, os.O_WRONLY | os.O_TRUNC))  # O_TRUNC stamps even when empty
    tree.release(tree.open(ino, os.O_WRONLY | os.O_TRUNC))
    assert inode.mtime_ns > 1 and inode.ctime_ns > 1
    reset()
    tree.link(ino, R, b"g")
    assert inode.ctime_ns > 1 and root.mtime_ns > 1 and inode.mtime_ns == 1
    reset()
    tree.rename(R, b"g", R, b"h")
    assert inode.ctime_ns > 1 and root.mtime_ns > 1 and root.ctime_ns > 1
    reset()
    tree.unlink(R, b"f")
    assert root.mtime_ns > 1 and root.ctime_ns > 1 and inode.ctime_ns > 1


def test_truncate_and_empty_setattr_times_follow_shmem_setattr(tree: Tree) -> None:
    """Issue #9.5. To the same size: ftruncate (the request carries the handle) stamps mtime
    and ctime, truncate(2) only when the file holds pages; a chown to -1, -1 (no field)
    stamps ctime. Times are set to 1 ns first, so a miss is visible."""
    fh, ino = new_file(tree, b"f")
    inode = tree.get(ino)

    def times_after(**change: Any) -> tuple[bool, bool]:
        inode.mtime_ns = inode.ctime_ns = 1
        tree.setattr(ino, **change)
        return inode.mtime_ns > 1, inode.ctime_ns > 1

    assert times_after(size=0) == (False, False)  # empty: nothing to truncate
    assert times_after(size=0, from_handle=True) == (True, True)
    assert times_after(size=5000) == (True, True)  # sparse, new size
    assert times_after(size=5000) == (False, False)
    tree.write(fh, 0, b"data")
    assert times_after(size=5000) == (True, True)  # holds a page: truncated again
    assert times_after(size=5000, from_handle=True) == (True, True)
    assert times_after() == (False, True)  # chown(path, -1, -1)
    assert times_after(mode=0o644) == (False, True)
    tree.release(fh)


def test_chown_write_and_truncate_drop_privileges(tree: Tree) -> None:
    """As the VFS: chown drops set-id bits for anyone; writes and truncates by non-root do;
    file capabilities go on any of them."""
    fh, ino = new_file(tree, b"f")
    inode = tree.get(ino)

    def arm() -> None:
        inode.mode = stat.S_IFREG | 0o6755
        tree.setxattr(ino, b"security.capability", b"caps")

    arm()
    tree.write(fh, 0, b"root keeps set-id")
    assert inode.mode & 0o7777 == 0o6755 and b"security.capability" not in inode.xattrs
    arm()
    tree.setattr(ino, uid=1000, caller_uid=0)
    assert inode.mode & 0o7777 == 0o0755
    arm()
    user_fh = tree.open(ino, os.O_WRONLY, caller_uid=1000)
    tree.write(user_fh, 0, b"user")
    assert inode.mode & 0o7777 == 0o0755
    arm()
    tree.setattr(ino, size=1, caller_uid=1000)
    assert inode.mode & 0o7777 == 0o0755 and b"security.capability" not in inode.xattrs
    inode.mode = stat.S_IFREG | 0o2745  # set-gid without group-exec is mandatory locking: kept
    tree.setattr(ino, gid=5, caller_uid=0)
    assert inode.mode & 0o7777 == 0o2745
    assert tree.xattr_bytes == 0
    tree.release(user_fh)


def test_read_only_refuses_changes(tree: Tree) -> None:
    fh, ino = new_file(tree, b"f")
    tree.read_only = True
    assert errno_of(tree.write, fh, 0, b"x") == errno.EROFS
    assert errno_of(tree.mkdir, R, b"d", 0o755, 0, 0) == errno.EROFS
    assert errno_of(tree.open, ino, os.O_WRONLY) == errno.EROFS
    tree.open(ino, os.O_RDONLY)


def test_huge_pages_fall_back_and_enospc_takes_nothing(machine: Machine) -> None:
    """Near size= a huge page no longer fits: small pages serve; ENOSPC undoes huge pages."""
    ownership = machine.page_ownership()
    owner = ownership.register_owner("huge-limit", os.getpid())
    ram = machine.ram()
    pool = PagePool(ownership, ram, owner, limit_pages=HUGE_PAGES + 100)
    tree = Tree(ram, pool, root_mode=0o755, root_uid=0, root_gid=0, max_inodes=0, huge=True)
    try:
        fh, ino = new_file(tree, b"h")
        tree.write(fh, 0, b"a")  # one huge page
        tree.write(fh, HUGE_PAGES * PAGE_SIZE, b"b")  # no room for a second: a small page
        pages = tree.get(ino).pages
        assert pages is not None and pages.huge_chunks() == [0]
        assert tree.pool.used_pages == HUGE_PAGES + 1
        fh2, ino2 = new_file(tree, b"g")
        tree.pool.limit_pages = 2 * HUGE_PAGES + 10  # room for a huge page, not for the rest
        big = b"c" * ((HUGE_PAGES + 20) * PAGE_SIZE)
        assert errno_of(tree.write, fh2, 0, big) == errno.ENOSPC
        assert tree.get(ino2).blocks_512 == 0 and tree.pool.used_pages == HUGE_PAGES + 1
        assert bytes(tree.read(fh, 0, 2)) == b"a\0"
        assert ownership.check({owner: tree.owned_pfns()}, machine.boot_record()) == []
    finally:
        ownership.unregister_owner(owner)


def test_huge_pages_are_aligned_runs(machine: Machine) -> None:
    ownership = machine.page_ownership()
    owner = ownership.register_owner("huge-test", os.getpid())
    ram = machine.ram()
    pool = PagePool(ownership, ram, owner, limit_pages=0)
    tree = Tree(ram, pool, root_mode=0o755, root_uid=0, root_gid=0, max_inodes=0, huge=True)
    try:
        fh, ino = new_file(tree, b"h")
        data = os.urandom(3 * HUGE_PAGES * PAGE_SIZE + 5)
        tree.write(fh, 10, data)
        pages = tree.get(ino).pages
        assert pages is not None
        assert pages.huge_chunks() == [0, 1, 2, 3]
        _, pfns = pages.entries()
        assert (pfns.reshape(-1, HUGE_PAGES)[:, 0] % HUGE_PAGES == 0).all()
        assert np.all(np.diff(pfns.reshape(-1, HUGE_PAGES), axis=1) == 1)
        assert bytes(tree.read(fh, 0, len(data) + 10)) == bytes(10) + data
        assert ownership.check({owner: tree.owned_pfns()}, machine.boot_record()) == []
    finally:
        ownership.unregister_owner(owner)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["write", "truncate", "read"]),
            st.integers(0, 70 * PAGE_SIZE),
            st.integers(0, 40 * PAGE_SIZE),
        ),
        max_size=25,
    )
)
def test_data_path_matches_a_bytearray(
    poisoned_tree: Tree, steps: list[tuple[str, int, int]]
) -> None:
    """Writes, truncates and reads of every size (small-request and numpy paths, holes,
    scattered pages, recycled pages full of garbage) agree with a plain bytearray."""
    tree = poisoned_tree
    name = f"model-{len(tree.inodes)}-{os.urandom(4).hex()}".encode()
    fh, ino = new_file(tree, name)
    other, _ = new_file(tree, name + b"-interleave")  # makes this file's pages scattered
    model = bytearray()
    try:
        for i, (kind, off, length) in enumerate(steps):
            if kind == "write":
                data = bytes([i % 251 + 1]) * length
                tree.write(fh, off, data)
                tree.write(other, off, b"x" * min(length, PAGE_SIZE))
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + length] = data
            elif kind == "truncate":
                tree.setattr(ino, size=off)
                del model[off:]
                model.extend(bytes(off - len(model)))
            else:
                assert bytes(tree.read(fh, off, length)) == bytes(model[off : off + length])
        assert bytes(tree.read(fh, 0, len(model) + 10)) == bytes(model)
    finally:
        for handle, n in ((fh, name), (other, name + b"-interleave")):
            tree.release(handle)
            tree.unlink(R, n)
            child = [i for i in tree.inodes.values() if i.lookups and i.nlink == 0]
            for inode in child:
                tree.forget(inode.ino, inode.lookups)


def test_a_restored_tree_is_used_without_making_every_inode(tree: Tree) -> None:
    """Restore keeps inodes as columns; lookups, relocation, unlink and the next record work
    on a tree whose inodes are partly objects, partly columns."""
    settings = tree_record.MountSettings(0, 0, False, False)
    d = tree.mkdir(R, b"d", 0o755, 0, 0).ino
    written = {}
    for i in range(20):
        fh, ino = new_file(tree, f"f{i}".encode(), d)
        written[ino] = bytes([i]) * (100 + 5000 * i)
        tree.write(fh, 0, written[ino])
        tree.release(fh)
    tree.setxattr(d, b"user.k", b"v")
    snap = tree_record.snapshot(preserve.record_parts(tree), tree.next_ino, settings)
    rebuilt = tree_record.rebuild(snap.meta, snap.pfns, snap.orders, snap.indexes, "t")
    owned = np.sort(tree.owned_pfns())
    fresh = Tree(tree.ram, tree.pool, root_mode=0, root_uid=0, root_gid=0, max_inodes=0, huge=False)
    tree.pool.used_pages = 0  # the pages change hands: they are the restored tree's now
    fresh.install(QuietInodes.restored(rebuilt.inodes, rebuilt.pages), rebuilt.next_ino)
    tree.inodes, tree.next_ino, tree.xattr_bytes = fresh.inodes, fresh.next_ino, fresh.xattr_bytes
    assert dict.__len__(tree.inodes) == 1 and tree.inodes_in_use() == 22  # the root alone
    assert np.array_equal(np.sort(tree.owned_pfns()), owned)
    assert tree.xattr_bytes == len(b"user.k") + 1 and tree.pool.used_pages > 0
    victim = tree.child(d, b"f7")
    start = int(victim.pages.all_pfns()[0])  # type: ignore[union-attr]
    assert relocate_out_of(tree, start, start + 1) == 1  # one file made an object, one page moved
    assert dict.__len__(tree.inodes) == 3  # root, d and f7
    tree.unlink(d, b"f3")
    again = tree_record.snapshot(preserve.record_parts(tree), tree.next_ino, settings)
    rebuilt = tree_record.rebuild(again.meta, again.pfns, again.orders, again.indexes, "t")
    assert again.nr_objects == 21 and len(rebuilt.inodes) == 21
    for name, ino in tree.list_dir(d):
        fh = tree.open(ino, os.O_RDONLY)
        assert bytes(tree.read(fh, 0, 1 << 20)) == written[ino], name
        tree.release(fh)


SETTINGS = tree_record.MountSettings(0, 0, False, False)


def freeze_settled(tree: Tree) -> int:
    """What the prepare phase does in one pass once the tree is idle: age, then freeze every
    settled inode. Return how many went quiet."""
    tree.inodes.age()
    return tree.inodes.freeze(1 << 20)


def record_of(tree: Tree) -> tuple[bytes, list[int], list[int], list[int]]:
    snap = tree_record.snapshot(preserve.record_parts(tree), tree.next_ino, SETTINGS)
    return snap.meta, snap.pfns.tolist(), snap.orders.tolist(), snap.indexes.tolist()


def state_of(inode: Any) -> tuple[Any, ...]:
    """Everything an inode holds, the kernel's lookups included."""
    pages = None if inode.pages is None else [a.tolist() for a in inode.pages.entries()]
    fields = ("ino", "mode", "uid", "gid", "nlink", "rdev", "size_bytes", "lookups", "target")
    times = (inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.parent_ino)
    return (
        *(getattr(inode, f) for f in fields),
        *times,
        dict(inode.entries or {}),
        dict(inode.xattrs),
        pages,
        inode.open_handles,
    )


def test_quiet_inodes_keep_every_state_and_the_record(tree: Tree) -> None:
    """Freezing turns the settled objects into columns and back on use, losing nothing: the
    record is the same bytes, every inode comes back as it was (the kernel's lookups too),
    and an open file, a removed file the kernel still knows and the root stay objects."""
    d = tree.mkdir(R, b"d", 0o2755, 7, 8).ino
    fh, data = new_file(tree, b"data", d)
    tree.write(fh, 5 * PAGE_SIZE + 3, b"past a hole")
    tree.write(fh, 0, b"head")
    tree.release(fh)
    tree.link(data, R, b"second-name")
    tree.setxattr(data, b"user.color", b"blue")
    fh, secret = new_file(tree, b"secret")
    tree.setxattr(secret, b"user.pkramfs.secret", b"1")
    tree.write(fh, 0, b"s" * 3 * PAGE_SIZE)
    tree.release(fh)
    tree.symlink(d, b"link", b"../data", 0, 0)
    tree.mknod(R, b"dev", stat.S_IFCHR | 0o600, os.makedev(1, 3), 0, 0)
    tree.setattr(data, atime_ns=-(10**19), mtime_ns=32_503_680_000 * 10**9 + 7)  # not int64 ns
    still_open, kept_open = new_file(tree, b"open")
    tree.release(new_file(tree, b"gone")[0])
    found = tree.lookup(R, b"gone")
    assert found is not None
    gone = found.ino
    tree.unlink(R, b"gone")  # the kernel still holds 2 lookups
    before = {inode.ino: state_of(inode) for inode in tree.inodes.in_use()}
    record = record_of(tree)
    owned = np.sort(tree.owned_pfns())
    assert freeze_settled(tree) == 5
    assert sorted(dict.keys(tree.inodes)) == sorted([R, kept_open, gone])
    assert len(tree.inodes.quiet) == 5 and tree.inodes_in_use() == 7
    assert record_of(tree) == record
    assert np.array_equal(np.sort(tree.owned_pfns()), owned)
    assert tree.ram.unmapped_pages == 3  # the secret file's pages stay out of the map
    for ino, state in before.items():
        assert state_of(tree.get(ino)) == state, ino
    fh = tree.open(data, os.O_RDONLY)
    assert bytes(tree.read(fh, 0, 8)) == b"head" + bytes(4)
    tree.release(fh)
    fh = tree.open(secret, os.O_RDONLY)
    assert bytes(tree.read(fh, PAGE_SIZE, 2)) == b"ss"
    tree.release(fh)
    tree.release(still_open)


def test_a_quiet_inode_keeps_the_kernels_lookups(tree: Tree) -> None:
    """FORGET of a quiet inode counts down its column; unlinked later, the inode stays
    known (removed) until the kernel forgets its last lookup."""
    fh, ino = new_file(tree, b"f")
    tree.write(fh, 0, b"x" * 5000)
    tree.release(fh)
    tree.lookup(R, b"f")
    tree.lookup(R, b"f")
    assert freeze_settled(tree) == 1
    tree.forget(ino, 1)
    assert not dict.__contains__(tree.inodes, ino) and ino in tree.inodes.quiet  # still quiet
    tree.unlink(R, b"f")
    assert tree.get(ino).nlink == 0 and tree.get(ino).lookups == 2
    assert ino in tree.removed and tree.pool.used_pages == 0
    tree.forget(ino, 1)
    assert ino in tree.inodes
    tree.forget(ino, 1)
    assert ino not in tree.inodes and not tree.removed


def test_only_settled_closed_linked_inodes_go_quiet(tree: Tree) -> None:
    """An inode goes quiet once it has been an object since before the last `age`, and is
    neither open nor unlinked; an open one waits for the next pass after its close."""
    fh, ino = new_file(tree, b"open")
    tree.inodes.age()
    late = tree.mkdir(R, b"late", 0o755, 0, 0).ino  # made after the age
    assert tree.inodes.freeze(100) == 0  # open is open, late too young, the root stays
    tree.release(fh)
    assert tree.inodes.freeze(100) == 0 and tree.inodes.settled == 0
    assert freeze_settled(tree) == 2
    assert sorted(tree.inodes.quiet.inos()) == sorted([ino, late])
    assert list(dict.keys(tree.inodes)) == [R]


def test_freezing_one_at_a_time_keeps_few_segments(tree: Tree) -> None:
    """Each freeze adds a segment and merges the newest ones of like size: 50 freezes of one
    inode leave a handful of segments, rows taken meanwhile are dropped as they merge, and
    the record stays the tree's."""
    for i in range(50):
        fh, _ = new_file(tree, f"f{i}".encode())
        tree.write(fh, 0, bytes([i]) * (i * 300))
        tree.release(fh)
        if i % 7 == 3:
            tree.rename(R, f"f{i - 2}".encode(), R, f"moved{i}".encode())  # takes it back
        assert freeze_settled(tree) == 1 + (i % 7 == 3)
        assert tree.inodes.quiet.segments <= (i + 1).bit_length() + 1
    assert len(tree.inodes.quiet) == 50 and dict.__len__(tree.inodes) == 1
    record = record_of(tree)
    tree.inodes.take_all()
    assert record_of(tree) == record


def test_a_table_nobody_ages_keeps_a_bounded_list(tree: Tree) -> None:
    """Without a prepare phase (a mount without pkram=), the list of recent objects drops
    the numbers of inodes gone instead of growing with every file ever made."""
    for _ in range(6000):
        tree.release(new_file(tree, b"churn")[0])
        tree.unlink(R, b"churn")
        tree.forget(tree.next_ino - 1, 1)
    assert dict.__len__(tree.inodes) == 1
    assert len(tree.inodes._recent) <= 2 + 4096


NAMES = [b"a", b"b"]
FREEZE_OPS = [
    "create", "write", "truncate", "mkdir", "rmdir", "unlink", "rename", "link", "symlink",
    "setxattr", "lookup", "forget", "open", "close",
]  # fmt: skip


def apply_op(tree: Tree, op: str, x: int, y: int, held: list[int]) -> None:
    """One operation on names in the root and in directory ``d`` (x and y, 0-3, pick one)."""
    d = tree.child(R, b"d").ino
    here, there = (R, d)[x // 2], (R, d)[y // 2]
    name, other = NAMES[x % 2], NAMES[y % 2]
    if op == "create":
        tree.release(tree.create(here, name, 0o644, os.O_RDWR, 0, 0)[0])
    elif op == "write":
        fh = tree.open(tree.child(here, name).ino, os.O_WRONLY)
        tree.write(fh, y * 3000, bytes([x + 1]) * 5000)
        tree.release(fh)
    elif op == "truncate":
        tree.setattr(tree.child(here, name).ino, size=y * 2000)
    elif op == "mkdir":
        tree.mkdir(here, name, 0o755, 0, 0)
    elif op == "rmdir":
        tree.rmdir(here, name)
    elif op == "unlink":
        tree.unlink(here, name)
    elif op == "rename":
        tree.rename(here, name, there, other)
    elif op == "link":
        tree.link(tree.child(here, name).ino, there, other)
    elif op == "symlink":
        tree.symlink(here, name, other * 3, 0, 0)
    elif op == "setxattr":
        tree.setxattr(tree.child(here, name).ino, b"user." + other, name * y)
    elif op == "lookup":
        tree.lookup(here, name)
    elif op == "forget":
        tree.forget(tree.child(here, name).ino, 1)
    elif op == "open":
        held.append(tree.open(tree.child(here, name).ino, os.O_RDONLY))
    elif held:
        tree.release(held.pop(0))


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(FREEZE_OPS), st.integers(0, 3), st.integers(0, 3), st.booleans()),
        min_size=5,
        max_size=40,
    )
)
def test_freezing_between_any_operations_changes_nothing(
    small_machine: Machine, steps: list[tuple[str, int, int, bool]]
) -> None:
    """Operations with a freeze (age, freeze every settled inode) after any of them: each
    freeze leaves the record and every inode's state (the kernel's lookups, open handles)
    as they were, and the final record passes restore's checks. Each example has its own
    owner on the machine, which gives every page back at the end."""
    ownership = small_machine.page_ownership()
    owner = ownership.register_owner("freeze-test", os.getpid())
    ram = small_machine.ram()
    pool = PagePool(ownership, ram, owner, limit_pages=2048)
    tree = Tree(ram, pool, root_mode=0o755, root_uid=0, root_gid=0, max_inodes=0, huge=False)
    tree.mkdir(R, b"d", 0o755, 0, 0)
    held: list[int] = []
    for x in range(4):
        apply_op(tree, "create", x, 0, held)
        apply_op(tree, "write", x, x, held)
    try:
        for op, x, y, freeze in steps:
            with contextlib.suppress(FsError):
                apply_op(tree, op, x, y, held)
            if freeze:
                objects = {inode.ino: state_of(inode) for inode in tree.inodes.in_use()}
                record = record_of(tree)
                freeze_settled(tree)
                assert record_of(tree) == record
                assert {ino: state_of(tree.inodes[ino]) for ino in objects} == objects
        snap = tree_record.snapshot(preserve.record_parts(tree), tree.next_ino, SETTINGS)
        tree_record.rebuild(snap.meta, snap.pfns, snap.orders, snap.indexes, "t")
        problems = ownership.check({owner: tree.owned_pfns()}, small_machine.boot_record())
        assert problems == []
    finally:
        ownership.unregister_owner(owner)
        ram.close()


def test_an_inode_changed_since_the_pass_began_waits(tree: Tree) -> None:
    """With a time given, inodes whose ctime is after it (up to now) stay objects for the
    next pass: a directory being filled is not frozen and taken back at every pass."""
    d = tree.mkdir(R, b"d", 0o755, 0, 0)
    fh, ino = new_file(tree, b"f", d.ino)
    tree.release(fh)
    f = tree.get(ino)
    f.ctime_ns = d.ctime_ns - 10
    tree.inodes.age()
    assert tree.inodes.freeze(100, changed_since_ns=f.ctime_ns - 1) == 0  # both changed since
    tree.inodes.age()
    assert tree.inodes.freeze(100, changed_since_ns=f.ctime_ns) == 1  # d changed after f
    assert list(dict.keys(tree.inodes)) == [R, d.ino]
    d.ctime_ns = time.time_ns() + 10**12  # ahead of the clock: that does not hold d back
    tree.inodes.age()
    assert tree.inodes.freeze(100, changed_since_ns=0) == 1
