"""Operations-level tests: the pyfuse3 handlers over a PkramFilesystem, awaited in this process
with a stand-in request context, no FUSE mount: the control file and its commands, remount
option errors, and the kernel's lookup counts that readdir and forget keep."""

import errno
import os
import stat
from collections.abc import Callable
from typing import Any, cast

import msgpack
import numpy as np
import pyfuse3
import pytest

from pkramfs import control
from pkramfs.operations import Operations

from .conftest import InProcessMounts
from .util import ROOT, caller

R = pyfuse3.ROOT_INODE
NOBODY = caller(65534)
TOO_LARGE = [  # values the mount could not report (test_boundary refuses them through mount(8))
    "size=18446744073709547521",  # 2^64 bytes less one page, and a byte
    "size=100000000000000%",  # of the 64 MiB machine: past 2^64 bytes
    "nr_inodes=18014398509481984",  # 2^54
]


async def errno_of(call: Callable[..., Any], *args: object) -> int:
    """The errno a handler answers (it must fail)."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call(*args)
    return int(info.value.errno)


async def new_file(ops: Operations, name: bytes, data: bytes = b"", parent: int = R) -> int:
    """Create, write and release a file as the kernel would; return its inode number."""
    info, attrs = await ops.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    if data:
        assert await ops.write(info.fh, 0, data) == len(data)
    await ops.release(info.fh)
    return int(attrs.st_ino)


async def status(ops: Operations) -> dict[str, Any]:
    packed = await ops.getxattr(control.CONTROL_INO, control.STATUS_XATTR, ROOT)
    unpacked: dict[str, Any] = msgpack.unpackb(packed, raw=False)
    return unpacked


async def command(ops: Operations, value: object, ctx: pyfuse3.RequestContext = ROOT) -> None:
    """Send *value* (msgpack-packed) as a control command."""
    packed = msgpack.packb(value, use_bin_type=True)
    await ops.setxattr(control.CONTROL_INO, control.COMMAND_XATTR, packed, ctx)


async def remount(ops: Operations, *options: str) -> None:
    await command(ops, {"cmd": "remount", "options": list(options)})


async def refused(ops: Operations, value: object, ctx: pyfuse3.RequestContext = ROOT) -> int:
    """The errno a command answers (it must fail)."""
    return await errno_of(command, ops, value, ctx)


async def last_error(ops: Operations) -> str:
    error = await ops.getxattr(control.CONTROL_INO, control.ERROR_XATTR, ROOT)
    return error.decode()


async def limits(ops: Operations) -> tuple[int, int, bool]:
    """(size in pages, inode limit, read-only) as statfs and the status tell them."""
    figures = await ops.statfs(ROOT)
    return figures.f_blocks, figures.f_files, (await status(ops))["read_only"]


# --- the control file -----------------------------------------------------------------------


async def test_the_control_file_is_looked_up_at_the_root_only_and_listed_nowhere(
    in_process: InProcessMounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = in_process.start()
    for attrs in (
        await ops.lookup(R, control.CONTROL_NAME, ROOT),
        await ops.getattr(control.CONTROL_INO, ROOT),
    ):
        assert attrs.st_ino == control.CONTROL_INO
        assert attrs.st_mode == stat.S_IFREG | 0o600
        assert (attrs.st_uid, attrs.st_gid, attrs.st_nlink, attrs.st_size) == (0, 0, 1, 0)
        assert attrs.entry_timeout == attrs.attr_timeout == 0  # never cached by the kernel
        assert attrs.st_mtime_ns == ops.fs.started_ns
    directory = await ops.mkdir(R, b"sub", 0o755, ROOT)
    no_entry = await ops.lookup(directory.st_ino, control.CONTROL_NAME, ROOT)
    assert no_entry.st_ino == 0  # a negative entry: there is no such name there
    await ops.forget([(control.CONTROL_INO, 5)])  # the kernel forgets it like any inode
    assert await ops.listxattr(control.CONTROL_INO, ROOT) == []
    assert [name for name, _ in await read_all(ops, R, monkeypatch)] == [b".", b"..", b"sub"]
    assert (await status(ops))["inodes"] == 2  # root and sub: the control file is no inode


async def test_the_control_file_refuses_every_file_operation(in_process: InProcessMounts) -> None:
    ops = in_process.start()
    name, ino = control.CONTROL_NAME, control.CONTROL_INO
    attrs, fields = pyfuse3.EntryAttributes(), pyfuse3.SetattrFields()
    calls: list[tuple[Callable[..., Any], tuple[object, ...]]] = [
        (ops.open, (ino, os.O_RDONLY, ROOT)),
        (ops.setattr, (ino, attrs, fields, None, ROOT)),
        (ops.link, (ino, R, b"alias", ROOT)),
        (ops.removexattr, (ino, control.COMMAND_XATTR, ROOT)),
        (ops.unlink, (R, name, ROOT)),
        (ops.rmdir, (R, name, ROOT)),
        (ops.rename, (R, name, R, b"other", 0, ROOT)),
        (ops.create, (R, name, 0o644, os.O_WRONLY, ROOT)),
    ]
    for call, args in calls:
        assert await errno_of(call, *args) == errno.EPERM, call.__name__
    await new_file(ops, b"f")
    assert await errno_of(ops.rename, R, b"f", R, name, 0, ROOT) == errno.EPERM
    assert (await ops.lookup(R, b"f", ROOT)).st_size == 0  # still there, under its own name


async def test_status_and_claims_answer_what_the_mount_holds(in_process: InProcessMounts) -> None:
    ops = in_process.start("pkram=ops,size=4M")
    await new_file(ops, b"f", os.urandom(5 * 4096 + 1))
    now = await status(ops)
    assert now["pid"] == os.getpid() and now["owner_id"] == ops.fs.owner_id
    assert (now["pkram"], now["size_pages"], now["inodes"]) == ("ops", 1024, 2)
    assert now["read_only"] is False and now["preserved_node"] is None
    assert now["requests"]["write"] == 1 and now["used_pages"] >= 6
    path = (await ops.getxattr(control.CONTROL_INO, control.CLAIMS_XATTR, ROOT)).decode()
    claimed = np.load(path, allow_pickle=False)
    os.unlink(path)
    assert np.array_equal(np.sort(claimed), np.sort(ops.fs.owned_pfns()))
    with ops.fs.machine.page_ownership() as ownership:
        owned = np.asarray(ownership.pages_of(ops.fs.owner_id))
    assert np.array_equal(np.sort(claimed), np.sort(owned))
    assert await last_error(ops) == ""
    unknown = b"user.pkramfs.nonsense"
    assert await errno_of(ops.getxattr, control.CONTROL_INO, unknown, ROOT) == pyfuse3.ENOATTR


async def test_a_claims_query_the_machine_directory_cannot_answer_is_eio_and_logged(
    in_process: InProcessMounts,
) -> None:
    ops = in_process.start()
    blocker = ops.fs.machine.boot_dir / f"claims-{ops.fs.owner_id}.npy"
    (blocker / "in-the-way").mkdir(parents=True)  # os.replace onto a non-empty directory fails
    in_process.expect_log_error(r"control query b'user\.pkramfs\.claims' failed")
    query = ops.getxattr
    assert await errno_of(query, control.CONTROL_INO, control.CLAIMS_XATTR, ROOT) == errno.EIO
    assert (await status(ops))["inodes"] == 1  # the mount serves on


async def test_remount_commands_change_ro_rw_size_and_inodes(in_process: InProcessMounts) -> None:
    ops = in_process.start("size=8M,nr_inodes=100")
    await new_file(ops, b"kept", b"x" * 10_000)
    assert await limits(ops) == (2048, 100, False)
    await remount(ops, "ro")
    assert await limits(ops) == (2048, 100, True)
    assert await errno_of(ops.create, R, b"new", 0o644, os.O_WRONLY, ROOT) == errno.EROFS
    assert await ops.getxattr(control.CONTROL_INO, control.STATUS_XATTR, ROOT)  # queries work
    await remount(ops, "rw", "size=1M", "nr_inodes=10")
    assert await limits(ops) == (256, 10, False)
    assert await new_file(ops, b"new") > 0
    await remount(ops, "size=50%")  # of the machine's 64 MiB
    assert await limits(ops) == (8192, 10, False)
    await remount(ops, "size=0", "nr_inodes=0")  # unlimited, as tmpfs
    assert (await status(ops))["size_pages"] == 0 and (await status(ops))["max_inodes"] == 0
    assert await last_error(ops) == ""


async def test_remount_errors_name_the_option_and_change_nothing(
    in_process: InProcessMounts,
) -> None:
    ops = in_process.start("pkram=keep,size=1M,nr_inodes=10")
    await new_file(ops, b"f", os.urandom(600_000))
    before = await limits(ops)
    for options, errno_code, reason in [
        (["bogus"], errno.EINVAL, "unknown mount option 'bogus'"),
        (["size=xyz"], errno.EINVAL, "bad value for mount option 'size'"),
        (["huge=maybe"], errno.EINVAL, "bad value for mount option 'huge'"),
        (["mode"], errno.EINVAL, "mount option 'mode' needs a value"),
        (["ro=1"], errno.EINVAL, "mount option 'ro' takes no value"),
        (["pkram=other"], errno.EINVAL, "pkram= cannot change on remount"),
        (["machine=/elsewhere"], errno.EINVAL, "machine= cannot change on remount"),
        (["secret"], errno.EINVAL, "secret cannot be added on remount"),
        (["ro", "size=100k"], errno.EINVAL, "size= is smaller than what the files already use"),
        (["nr_inodes=1"], errno.EINVAL, "nr_inodes= is smaller than the inodes in use"),
        (["size=2M", "nr_inodes=1"], errno.EINVAL, "nr_inodes= is smaller than the inodes"),
        *[([option], errno.EINVAL, option.split("=")[0]) for option in TOO_LARGE],
    ]:
        assert await refused(ops, {"cmd": "remount", "options": options}) == errno_code, options
        assert reason in await last_error(ops), options
        assert await limits(ops) == before, options
    await remount(ops, "pkram=keep", f"machine={ops.fs.machine.path}")  # the same: accepted
    assert await last_error(ops) == ""


async def test_remount_refusals_that_depend_on_the_mount_state(
    in_process: InProcessMounts,
) -> None:
    unnamed = in_process.start()
    assert await refused(unnamed, {"cmd": "remount", "options": ["preserve"]}) == errno.EINVAL
    assert "needs a mount made with -o pkram=NAME" in await last_error(unnamed)
    ops = in_process.start("pkram=busy")
    info, _ = await ops.create(R, b"open", 0o644, os.O_WRONLY, ROOT)
    for options in (["ro"], ["preserve"]):
        assert await refused(ops, {"cmd": "remount", "options": options}) == errno.EBUSY
        assert await last_error(ops) == "a file is open for writing"
        assert (await status(ops))["read_only"] is False
    await ops.release(info.fh)
    await remount(ops, "preserve")
    assert (await status(ops))["read_only"] is True
    assert (await status(ops))["preserved_node"] is not None
    await remount(ops, "rw")  # cancels: the node is discarded, the pages are the mount's again
    assert (await status(ops))["preserved_node"] is None


async def test_bad_commands_and_other_callers_are_refused(in_process: InProcessMounts) -> None:
    ops = in_process.start()
    ro = {"cmd": "remount", "options": ["ro"]}
    assert await refused(ops, ro, NOBODY) == errno.EPERM  # the kernel's 0600 aside
    assert await refused(ops, ro, caller(1000, 0)) == errno.EPERM  # group root is not root
    assert (await status(ops))["read_only"] is False
    packed = msgpack.packb(ro, use_bin_type=True)
    other = b"user.pkramfs.other"
    assert await errno_of(ops.setxattr, control.CONTROL_INO, other, packed, ROOT) == (
        errno.EOPNOTSUPP
    )
    for raw, reason in [
        (b"\xc1", "undecodable command"),
        (msgpack.packb([1, 2]), "a command is a map with a 'cmd' string"),
        (msgpack.packb({"cmd": 7}), "a command is a map with a 'cmd' string"),
        (msgpack.packb({"cmd": "reboot"}), "unknown command 'reboot'"),
        (msgpack.packb({"cmd": "remount"}), "remount needs a list of option strings"),
        (msgpack.packb({"cmd": "remount", "options": "ro"}), "remount needs a list of option"),
        (msgpack.packb({"cmd": "remount", "options": [1]}), "remount needs a list of option"),
        (b"\x90" * (control.MAX_REQUEST_BYTES + 1), "command too long"),
    ]:
        code = await errno_of(ops.setxattr, control.CONTROL_INO, control.COMMAND_XATTR, raw, ROOT)
        assert code == errno.EINVAL, reason
        assert reason in await last_error(ops), reason
    assert (await status(ops))["read_only"] is False
    await remount(ops, "ro")  # root may, and a success clears the last error
    assert await last_error(ops) == "" and (await status(ops))["read_only"] is True


# --- lookup counts: readdir and forget ------------------------------------------------------


class ReplyBuffer:
    """The kernel's buffer for one readdir reply, holding at most *room* entries: stands in
    for the ReaddirToken that pyfuse3.readdir_reply (patched by `read_dir`) writes into."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.entries: list[tuple[bytes, int, int]] = []  # name, inode, next id


def _reply(token: ReplyBuffer, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
    if len(token.entries) == token.room:
        return False
    token.entries.append((name, attrs.st_ino, next_id))
    return True


async def read_dir(
    ops: Operations, fh: int, start_id: int, room: int, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[bytes, int, int]]:
    """One readdir request from *start_id* with room for *room* entries; what it replied."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", _reply)
    buffer = ReplyBuffer(room)
    await ops.readdir(fh, start_id, cast(pyfuse3.ReaddirToken, buffer))
    return buffer.entries


async def read_all(
    ops: Operations, ino: int, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[bytes, int]]:
    """opendir, readdir until the end, releasedir: (name, inode) of every entry."""
    fh = await ops.opendir(ino, ROOT)
    entries, start = [], 0
    while batch := await read_dir(ops, fh, start, 2, monkeypatch):
        entries.extend(batch)
        start = batch[-1][2]
    await ops.releasedir(fh)
    return [(name, entry_ino) for name, entry_ino, _ in entries]


def lookups(ops: Operations, *inos: int) -> list[int]:
    return [ops.tree.inodes[ino].lookups for ino in inos]


async def test_readdir_counts_a_lookup_for_each_entry_it_replies_but_dot_and_dotdot(
    in_process: InProcessMounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = in_process.start()
    sub = (await ops.mkdir(R, b"sub", 0o755, ROOT)).st_ino
    a, b = await new_file(ops, b"a", parent=sub), await new_file(ops, b"b", parent=sub)
    await ops.forget([(sub, 1), (a, 1), (b, 1)])  # the kernel drops what creating them gave
    assert lookups(ops, R, sub, a, b) == [1, 0, 0, 0]
    fh = await ops.opendir(sub, ROOT)
    first = await read_dir(ops, fh, 0, 3, monkeypatch)  # room for '.', '..' and one more
    assert first == [(b".", sub, 1), (b"..", R, 2), (b"a", a, 3)]
    assert lookups(ops, R, sub, a, b) == [1, 0, 1, 0]
    rest = await read_dir(ops, fh, 3, 3, monkeypatch)
    assert rest == [(b"b", b, 4)]
    assert lookups(ops, R, sub, a, b) == [1, 0, 1, 1]
    assert await read_dir(ops, fh, 4, 3, monkeypatch) == []
    assert await read_dir(ops, fh, 2, 1, monkeypatch) == [(b"a", a, 3)]  # a re-read counts again
    assert lookups(ops, a, b) == [2, 1]
    await ops.releasedir(fh)
    assert await errno_of(read_dir, ops, fh, 0, 3, monkeypatch) == errno.EBADF
    await ops.forget([(a, 2), (b, 1)])
    assert lookups(ops, a, b) == [0, 0]


async def test_readdir_skips_what_was_removed_since_opendir_without_counting_it(
    in_process: InProcessMounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = in_process.start()
    a, b = await new_file(ops, b"a"), await new_file(ops, b"b")
    fh = await ops.opendir(R, ROOT)
    await ops.unlink(R, b"a", ROOT)
    assert [name for name, _, _ in await read_dir(ops, fh, 0, 10, monkeypatch)] == [
        b".",
        b"..",
        b"b",
    ]
    assert lookups(ops, a, b) == [1, 2]  # a: create's only; b: create's and readdir's
    await ops.releasedir(fh)


async def test_a_removed_file_keeps_its_number_until_the_kernel_forgets_it(
    in_process: InProcessMounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = in_process.start()
    f = await new_file(ops, b"f", b"data" * 5000)
    await ops.forget([(f, 1)])
    await read_all(ops, R, monkeypatch)
    await read_all(ops, R, monkeypatch)
    assert lookups(ops, f) == [2]  # two listings
    used = (await status(ops))["used_pages"]
    await ops.unlink(R, b"f", ROOT)
    after = await status(ops)
    assert after["used_pages"] < used and after["inodes"] == 1  # content and inode go at once
    assert f in ops.tree.inodes  # the number stays while the kernel holds it
    await ops.forget([(f, 1)])
    assert f in ops.tree.inodes
    await ops.forget([(f, 1)])
    assert f not in ops.tree.inodes
    assert await errno_of(ops.getattr, f, ROOT) == errno.ENOENT
    await ops.forget([(f, 1)])  # a stale forget changes nothing
    assert (await status(ops))["inodes"] == 1 and f not in ops.tree.inodes


async def test_lookup_counts_one_and_forget_takes_any_number(in_process: InProcessMounts) -> None:
    ops = in_process.start()
    f = await new_file(ops, b"f")
    for _ in range(3):
        assert (await ops.lookup(R, b"f", ROOT)).st_ino == f
    assert lookups(ops, f) == [4]
    await ops.forget([(f, 3)])
    assert lookups(ops, f) == [1]
    await ops.forget([(f, 7)])  # more than it holds: none left, never negative
    assert lookups(ops, f) == [0]
    assert (await ops.getattr(f, ROOT)).st_ino == f  # a named file stays with no lookups


async def test_a_second_filesystem_restores_what_the_first_preserved(
    in_process: InProcessMounts,
) -> None:
    first = in_process.start("pkram=again,size=2M")
    data = os.urandom(50_000)
    f = await new_file(first, b"f", data)
    await remount(first, "preserve")
    in_process.stop(first)  # unmounting a preserved mount keeps the node
    second = in_process.start("pkram=again")
    assert (await status(second))["size_pages"] == 512  # the saved size= came back
    info = await second.open(f, os.O_RDONLY, ROOT)
    assert bytes(await second.read(info.fh, 0, len(data) + 10)) == data
    await second.release(info.fh)
