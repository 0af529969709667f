"""The PKRAM handover end to end: real mounts, remount,preserve, kexec-sim load/exec, restore.

Every kexec here scrubs with poison (KEXEC_SIM_SCRUB=poison from the machine fixture), so a
restore that read any page that was not preserved would return poison, not the data.
"""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.machine import Machine
from kexec_sim.owners import OwnerRegistry
from kexec_sim.ownership import PRESERVED
from pkramfs import control
from pkramfs.checker import check_machine

from .conftest import Mounts, wait_exit
from .util import (
    BIN,
    OVER_FIRST_PAGES,
    contents,
    ctl,
    ctl_status,
    kexec,
    kexec_sim,
    load_next_kernel,
    make_tree,
    md5,
    preserve,
    run,
    snapshot,
    write_over_first_pages,
)


def test_the_user_flow_at_small_size(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mountpoint()
    mounts.track(mnt)
    opts = f"pkram=mytmpfs,machine={machine.path}"
    assert run("mount", "-t", "fuse.pkramfs", "-o", opts, "none", str(mnt)).returncode == 0
    (mnt / "testfile").write_bytes(os.urandom(24 << 20))
    before = md5(mnt / "testfile")
    preserve(mnt)
    mounted = Path("/proc/mounts").read_text().splitlines()
    options = next(line.split()[3] for line in mounted if line.split()[1] == str(mnt))
    assert options.split(",")[0] == "ro"
    with pytest.raises(OSError) as raised:
        (mnt / "other").write_bytes(b"x")
    assert raised.value.errno == errno.EROFS
    status = ctl_status(mnt)
    assert status["preserved_node"] and status["read_only"]
    kexec(machine)
    assert not os.path.ismount(mnt)  # exec stopped the old daemon
    mounts.mount("pkram=mytmpfs", mnt)
    assert md5(mnt / "testfile") == before


def test_full_tree_round_trip(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mount("pkram=tree")
    make_tree(mnt)
    huge = mounts.mount("pkram=hugetree,huge=always,size=64M")
    (huge / "h").write_bytes(os.urandom(9 << 20))
    (huge / "small").write_bytes(b"tiny")
    before = {m: (contents(m), snapshot(m)) for m in (mnt, huge)}
    huge_blocks = os.stat(huge / "h").st_blocks
    preserve(mnt)
    preserve(huge)
    kexec(machine)
    for m, name in ((mnt, "tree"), (huge, "hugetree")):
        mounts.mount(f"pkram={name}", m)
        after_meta = snapshot(m)
        assert after_meta == before[m][1]
        assert contents(m) == before[m][0]
    status = ctl_status(huge)
    assert status["huge"] == "always"  # the mount's options came back with the tree
    assert status["restored"]["entries"] < 20  # the 9 MiB file's huge pages are one entry each
    assert os.stat(huge / "h").st_blocks == huge_blocks
    with open(mnt / "sparse", "rb") as f:
        f.seek(5 << 30)
        assert f.read() == b"far away"
    assert (mnt / "dir/sub/deeper/file").stat().st_mode & 0o7777 == 0o4751


def test_removed_files_the_kernel_still_knows_hold_nothing_and_are_not_preserved(
    machine: Machine, mounts: Mounts
) -> None:
    """A removed directory that is a process's cwd (the kernel keeps its inode: no FORGET)
    and a file unlinked a moment ago hold no page and no inode of nr_inodes, and the checker
    agrees. The kernel refuses remount,ro while the directory is in use; once it is not,
    preserve (its FORGET maybe still in flight) keeps the linked tree only."""
    mnt = mounts.mount("pkram=removed,size=4M")
    (mnt / "keep").write_bytes(b"k" * 100_000)
    (mnt / "cwd").mkdir()
    holder = subprocess.Popen(["sleep", "300"], cwd=mnt / "cwd")
    try:
        os.rmdir(mnt / "cwd")
        (mnt / "gone").write_bytes(b"g" * (3 << 20))
        os.unlink(mnt / "gone")
        status = ctl_status(mnt)
        assert status["inodes"] == 2 and status["used_pages"] == 25  # root and keep
        assert check_machine(machine) == []
        assert run("mount", "-o", "remount,preserve,ro", str(mnt)).returncode == 32  # busy
    finally:
        holder.kill()
        holder.wait()
    before = snapshot(mnt)
    preserve(mnt)
    kexec(machine)
    mounts.mount("pkram=removed", mnt)
    assert snapshot(mnt) == before and list(before) == ["keep"]
    assert (mnt / "keep").read_bytes() == b"k" * 100_000


def wait_quiet(mnt: Path, inodes: int) -> None:
    """Wait until the prepare phase has made *inodes* inodes of *mnt* quiet (polling its
    status, which takes no inode out of the columns)."""
    for _ in range(2000):
        if control.query_status(str(mnt))["quiet_inodes"] >= inodes:
            return
        time.sleep(0.01)
    raise AssertionError(f"{mnt}: not {inodes} quiet inodes after 20 s")


def test_inodes_frozen_while_the_mount_serves_keep_their_state(
    machine: Machine, mounts: Mounts
) -> None:
    """The prepare phase freezes settled inodes into columns while the mount serves; the
    kernel still knows them. They answer, change and go as objects would: a removed
    directory that is a process's cwd still answers (nlink 0, not ENOENT: its lookup count
    came back with it), and preserve records the same tree as without the columns."""
    mnt = mounts.mount("pkram=quiet")
    make_tree(mnt)
    for i in range(300):
        (mnt / "dir" / f"small-{i}").write_bytes(bytes([i % 256]) * (i * 37))
    (mnt / "cwd").mkdir()
    holder = subprocess.Popen(["sleep", "300"], cwd=mnt / "cwd")
    try:
        linked = ctl_status(mnt)["inodes"] - 1  # all but the root
        wait_quiet(mnt, linked)
        os.rmdir(mnt / "cwd")
        assert os.stat(f"/proc/{holder.pid}/cwd").st_nlink == 0
        assert ctl_status(mnt)["inodes"] == linked  # the removed directory counts no more
        os.rename(mnt / "dir/small-7", mnt / "moved")
        os.unlink(mnt / "dir/hardlink-to-big")
        with open(mnt / "dir/small-9", "ab") as f:
            f.write(b"appended")
        changed = (contents(mnt), snapshot(mnt))
        wait_quiet(mnt, linked - 1)
        assert (contents(mnt), snapshot(mnt)) == changed
    finally:
        holder.kill()
        holder.wait()
    before = snapshot(mnt)
    wait_quiet(mnt, linked - 1)
    preserve(mnt)
    kexec(machine)
    mounts.mount("pkram=quiet", mnt)
    assert snapshot(mnt) == before
    assert (mnt / "moved").read_bytes() == bytes([7]) * 7 * 37
    assert (mnt / "dir/small-9").read_bytes() == bytes([9]) * 9 * 37 + b"appended"


def test_two_mounts_restore_independently_and_an_unpreserved_one_is_lost(
    machine: Machine, mounts: Mounts
) -> None:
    a, b, c = mounts.mount("pkram=a"), mounts.mount("pkram=b"), mounts.mount()
    for m, text in ((a, b"alpha"), (b, b"beta"), (c, b"gone")):
        (m / "f").write_bytes(text * 10_000)
    preserve(a)
    preserve(b)
    result = kexec(machine)
    assert str(c) in result.stderr  # warned: the unpreserved mount loses its data
    b2 = mounts.mount("pkram=b", b)
    assert (b2 / "f").read_bytes() == b"beta" * 10_000
    mounts.mount("pkram=nothing-here", c)
    assert list(c.iterdir()) == []  # a name with no node: an empty fs
    mounts.mount("pkram=a", a)
    assert (a / "f").read_bytes() == b"alpha" * 10_000


def test_cancel_by_remount_rw_then_preserve_again(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mount("pkram=cancel")
    (mnt / "one").write_bytes(b"1" * 100_000)
    preserve(mnt)
    assert "cancel" in ctl(machine, "nodes").stdout
    assert run("mount", "-o", "remount,rw", str(mnt)).returncode == 0
    assert "cancel" not in ctl(machine, "nodes").stdout  # the node is discarded
    (mnt / "two").write_bytes(b"2" * 100_000)  # writable again, pages are the mount's
    (mnt / "one").write_bytes(b"3" * 5)
    assert check_machine(machine) == []
    preserve(mnt)
    kexec(machine)
    mounts.mount("pkram=cancel", mnt)
    assert (mnt / "one").read_bytes() == b"33333"
    assert (mnt / "two").read_bytes() == b"2" * 100_000


def test_preserve_refuses_a_writer_and_a_mount_without_pkram(
    machine: Machine, mounts: Mounts
) -> None:
    mnt = mounts.mount("pkram=busy")
    with open(mnt / "open-for-writing", "wb") as writer:
        writer.write(b"data")
        result = run("mount", "-o", "remount,preserve,ro", str(mnt))
        assert result.returncode == 32 and "open for writing" in result.stderr
    (mnt / "still-writable").write_bytes(b"yes")
    plain = mounts.mount()
    result = run("mount", "-o", "remount,preserve,ro", str(plain))
    assert result.returncode == 32 and "pkram=NAME" in result.stderr
    (plain / "still-writable").write_bytes(b"yes")
    assert ctl(machine, "nodes").stdout.count("\n") == 1  # the header line only


def preserved_pfns(machine: Machine) -> list[int]:
    with machine.page_ownership() as ownership:
        return [int(p) for p in ownership.pages_of(PRESERVED)]


def test_load_addr_conflict_and_relocation_out_of_the_load_range(
    machine: Machine, mounts: Mounts
) -> None:
    mnt = mounts.mount("pkram=reloc")
    data = write_over_first_pages(mnt)
    load_next_kernel(machine, OVER_FIRST_PAGES)  # before preserving
    preserve(mnt)
    status = ctl_status(mnt)
    assert status["last_preserve"]["relocated_pages"] > 0
    pfns = preserved_pfns(machine)
    assert not any((2 << 20) // PAGE_SIZE <= p < (6 << 20) // PAGE_SIZE for p in pfns)
    conflict = kexec_sim(machine, "load", "--addr", hex(pfns[len(pfns) // 2] * PAGE_SIZE))
    assert conflict.returncode == 2 and "preserved" in conflict.stderr
    assert "Traceback" not in conflict.stderr
    # Loading the first range again (a conflict-free one) and exec: the data survives.
    kexec(machine, OVER_FIRST_PAGES)
    mounts.mount("pkram=reloc", mnt)
    assert (mnt / "f").read_bytes() == data


def test_chained_cycles(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mountpoint()
    expected: dict[str, bytes] = {}
    for cycle in range(4):
        mounts.mount("pkram=chain", mnt)
        assert {p.name: p.read_bytes() for p in mnt.iterdir()} == expected
        payload = os.urandom(100_000 + cycle)
        (mnt / f"cycle-{cycle}").write_bytes(payload)
        expected[f"cycle-{cycle}"] = payload
        if cycle:
            (mnt / "cycle-0").write_bytes(payload[:10])
            expected["cycle-0"] = payload[:10]
        preserve(mnt)
        assert check_machine(machine) == []
        kexec(machine)
        assert check_machine(machine) == []
    mounts.mount("pkram=chain", mnt)
    assert {p.name: p.read_bytes() for p in mnt.iterdir()} == expected


def corrupt_node_metadata(machine: Machine, name: str) -> None:
    nodes = json.loads(ctl(machine, "nodes", "--json").stdout)["nodes"]
    pfn = next(n["pfn"] for n in nodes if n["name"] == name)
    with open(machine.path / "RAM", "r+b") as ram:
        ram.seek(pfn * PAGE_SIZE + 48)  # the metadata stream's first pfn: point it elsewhere
        ram.write((12345).to_bytes(8, "little"))


def test_corrupted_node_is_refused_and_left_reserved_while_others_restore(
    machine: Machine, mounts: Mounts
) -> None:
    good, bad = mounts.mount("pkram=good"), mounts.mount("pkram=bad")
    (good / "f").write_bytes(b"good" * 1000)
    (bad / "f").write_bytes(b"bad" * 1000)
    preserve(good)
    preserve(bad)
    kexec(machine)
    corrupt_node_metadata(machine, "bad")
    reserved = preserved_pfns(machine)
    result = run(str(BIN / "pkramfs"), "none", str(bad), "-o", f"pkram=bad,machine={machine.path}")
    assert result.returncode == 32
    assert (
        "'bad'" in result.stderr
        and "checksum" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not os.path.ismount(bad)
    assert preserved_pfns(machine) == reserved  # nothing freed, nothing taken
    listing = ctl(machine, "nodes")
    assert listing.returncode == 1 and "checksum" in listing.stdout
    mounts.mount("pkram=good", good)
    assert (good / "f").read_bytes() == b"good" * 1000
    discarded = ctl(machine, "discard", "bad")
    assert discarded.returncode == 0, discarded.stderr
    assert preserved_pfns(machine) == []
    assert check_machine(machine) == []


@pytest.mark.parametrize(
    "fault, restored",
    [
        ("PKRAMFS_FAULT=preserve:written", False),  # the tree died with its daemon
        ("PKRAMFS_FAULT=preserve:linked", False),  # its pages were still the dead daemon's
        ("KEXEC_SIM_FAULT=transfer-midway", True),  # the journal completes the transfer
        ("PKRAMFS_FAULT=preserve:transferred", True),  # whole and handed over: made COMPLETE
        ("PKRAMFS_FAULT=preserve:complete", True),
    ],
)
def test_a_daemon_killed_during_preserve_leaves_a_consistent_state(
    machine: Machine, mounts: Mounts, monkeypatch: pytest.MonkeyPatch, fault: str, restored: bool
) -> None:
    key, value = fault.split("=")
    mnt = mounts.mountpoint()
    mounts.track(mnt)
    env = {**os.environ, key: value}
    opts = f"pkram=victim,machine={machine.path}"
    assert run(str(BIN / "pkramfs"), "none", str(mnt), "-o", opts, env=env).returncode == 0
    for i in range(50):
        (mnt / f"f{i}").write_bytes(os.urandom(50_000))
    expected = contents(mnt)
    result = run("mount", "-o", "remount,preserve,ro", str(mnt))
    assert result.returncode == 32  # the daemon died under the request
    run("umount", "-l", str(mnt))
    assert check_machine(machine) == []  # dead remains cleaned, dead owner reclaimed
    kexec(machine)
    assert check_machine(machine) == []
    mounts.mount("pkram=victim", mnt)
    assert contents(mnt) == (expected if restored else {})


def test_a_daemon_the_exec_stops_leaves_its_pages_to_the_exec(
    machine: Machine, mounts: Mounts
) -> None:
    """Stopped by exec (or reboot, power off), a daemon exits without giving its pages back:
    exec scrubs or hands over every page of the boot and drops its owners. Seen while a process
    that ignores SIGTERM holds the exec in its stop phase: the daemon has exited, still the
    registered owner of its file's pages."""
    mnt = mounts.mount("pkram=leaving")
    (mnt / "f").write_bytes(os.urandom(4 << 20))
    status = ctl_status(mnt)
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(1000)"
    )
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None
    try:
        assert stubborn.stdout.readline() == "ready\n"
        with machine.page_ownership() as po:
            po.register_owner("stubborn", stubborn.pid)
        load_next_kernel(machine)
        exec_ = subprocess.Popen(
            [str(BIN / "kexec-sim"), "exec", "--stop-timeout", "60", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert wait_exit(status["pid"], timeout_s=60)
        registry = OwnerRegistry.load(machine.path / "boot" / "owners.json")
        with machine.page_ownership() as po:
            left = po.count_by_owner().get(status["owner_id"], 0)
    finally:
        stubborn.kill()
        stubborn.wait()
        stubborn.stdout.close()
    out, err = exec_.communicate(timeout=60)
    assert exec_.returncode == 0, err
    assert status["owner_id"] in registry.owners
    assert left >= (4 << 20) // PAGE_SIZE
    assert f"{left} pages not preserved, lost" in err
    assert {s["name"]: s["how"] for s in json.loads(out)["stopped"]}["stubborn"] == "term"
    assert not os.path.ismount(mnt)


def test_one_live_mount_per_name_and_discard_refused_while_it_runs(
    machine: Machine, mounts: Mounts
) -> None:
    mnt = mounts.mount("pkram=solo")
    (mnt / "f").write_bytes(b"x" * 10_000)
    other = mounts.mountpoint()
    result = run(
        str(BIN / "pkramfs"), "none", str(other), "-o", f"pkram=solo,machine={machine.path}"
    )
    assert result.returncode == 32 and "in use by the mount at" in result.stderr
    assert not os.path.ismount(other)
    preserve(mnt)
    refused = ctl(machine, "discard", "solo")
    assert refused.returncode == 1 and "running mount" in refused.stderr
    assert (mnt / "f").read_bytes() == b"x" * 10_000  # still served from its preserved pages
