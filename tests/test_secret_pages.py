"""Secret files (memfd_secret-like): their pages are out of the daemon's direct map of RAM."""

import errno
import faulthandler
import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kexec_sim.geometry import HUGE_PAGES, PAGE_SIZE
from kexec_sim.machine import Machine
from kexec_sim.storage_keys import CHANGED, SINCE_IMAGE

from .conftest import Mounts
from .util import (
    OVER_FIRST_PAGES,
    ctl_status,
    fallocate,
    kexec,
    kexec_sim,
    load_next_kernel,
    make_ram,
    md5,
    preserve,
    write_over_first_pages,
)

SECRET = "user.pkramfs.secret"


def child_reads(ram_pages: np.ndarray, pfn: int) -> int:
    """Read page *pfn* through the main mapping in a forked child; return its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: only reads, then leaves without cleanup
        faulthandler.disable()  # a fault is expected: no traceback
        int(ram_pages[pfn].sum())
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_a_page_out_of_the_direct_map_faults_and_a_temporary_mapping_reaches_it(
    tmp_path: Path,
) -> None:
    with make_ram(tmp_path, 64) as ram:
        ram.write_page(9, bytes(range(256)) * 16)
        ram.remove_from_direct_map(9, 1)
        status = child_reads(ram.pages, 9)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert os.WIFEXITED(child_reads(ram.pages, 10))  # its neighbours are mapped
        with ram.temporary_mapping(9, 1) as window:
            assert window.shape == (1, PAGE_SIZE)
            assert bytes(window[0]) == bytes(range(256)) * 16
            window[0, :4] = 7
        assert ram.unmapped_pages == 1 and ram.unmapped_runs()[0].tolist() == [9]
        ram.restore_direct_map(9, 1)
        status = child_reads(ram.pages, 9)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert bytes(ram.pages[9, :5]) == b"\x07\x07\x07\x07\x04"
        assert ram.unmapped_pages == 0


def unmapped_pfns(machine: Machine, mnt: Path) -> list[int]:
    """The pfns the daemon of *mnt* has mapped PROT_NONE (``---s``) in its mapping of RAM."""
    pid = ctl_status(mnt)["pid"]
    ram_path = os.path.realpath(machine.path / "RAM")
    regions = []
    with open(f"/proc/{pid}/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 6 and fields[5] == ram_path:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                regions.append((lo, hi, fields[1], int(fields[2], 16)))
    base = next(lo for lo, _, _, offset in regions if offset == 0)  # the mapping's start
    pfns: list[int] = []
    for lo, hi, perms, offset in regions:
        assert lo - base == offset  # one mapping, split by mprotect (no temporary one left)
        if perms == "---s":
            pfns.extend(range((lo - base) // PAGE_SIZE, (hi - base) // PAGE_SIZE))
        else:
            assert perms == "rw-s"
    return pfns


def page_digests(data: bytes) -> list[bytes]:
    padded = data + bytes(-len(data) % PAGE_SIZE)
    return sorted(
        hashlib.md5(padded[i : i + PAGE_SIZE]).digest() for i in range(0, len(padded), PAGE_SIZE)
    )


def assert_hidden_exactly(machine: Machine, mnt: Path, *files: bytes) -> list[int]:
    """The daemon's ``---s`` pages are exactly the pages holding *files* (by content)."""
    pfns = unmapped_pfns(machine, mnt)
    with open(machine.path / "RAM", "rb") as ram:
        held = []
        for pfn in pfns:
            ram.seek(pfn * PAGE_SIZE)
            held.append(hashlib.md5(ram.read(PAGE_SIZE)).digest())
    assert sorted(held) == sorted(d for data in files for d in page_digests(data))
    assert ctl_status(mnt)["secret_pages"] == len(pfns)
    return pfns


def test_a_secret_mount_hides_its_file_pages_and_serves_them(
    machine: Machine, mounts: Mounts
) -> None:
    mnt = mounts.mount("secret,pkram=sec")
    data = bytearray(os.urandom((3 << 20) + 1234))
    (mnt / "f").write_bytes(data)
    with open(mnt / "f", "r+b") as f:  # partial pages: read-modify-write through the window
        os.pwrite(f.fileno(), b"z" * 10_000, 5000)
        data[5000:15_000] = b"z" * 10_000
        os.pwrite(f.fileno(), b"tail", len(data) + 3)
        data += bytes(3) + b"tail"
    assert md5(mnt / "f") == hashlib.md5(data).hexdigest()
    state = ctl_status(mnt)
    ranges = state["unmapped_ranges"]
    assert state["secret"] is True and isinstance(ranges, int) and ranges >= 1
    pfns = assert_hidden_exactly(machine, mnt, bytes(data))
    with machine.page_ownership() as ownership:
        owned: set[int] = set(ownership.pages_of(int(str(state["owner_id"]))).tolist())
    assert set(pfns) <= owned
    with machine.ram() as ram:  # stores through temporary mappings mark the keys too
        assert (ram.keys.array[pfns] & CHANGED != 0).all()


def test_the_secret_xattr_makes_one_file_secret_for_good(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mount()
    plain, hidden = os.urandom(200_000), bytearray(os.urandom(300_000))
    (mnt / "plain").write_bytes(plain)
    (mnt / "hidden").write_bytes(hidden)
    assert unmapped_pfns(machine, mnt) == []
    os.setxattr(mnt / "hidden", SECRET, b"1")
    assert_hidden_exactly(machine, mnt, bytes(hidden))
    with open(mnt / "hidden", "ab") as f:
        f.write(b"more" * 5000)
    hidden += b"more" * 5000
    assert_hidden_exactly(machine, mnt, bytes(hidden))
    assert md5(mnt / "hidden") == hashlib.md5(hidden).hexdigest()
    assert md5(mnt / "plain") == hashlib.md5(plain).hexdigest()
    with pytest.raises(OSError) as refused:
        os.removexattr(mnt / "hidden", SECRET)
    assert refused.value.errno == errno.EPERM
    with pytest.raises(OSError) as refused:
        os.setxattr(mnt / "hidden", SECRET, b"0")
    assert refused.value.errno == errno.EPERM
    assert os.getxattr(mnt / "hidden", SECRET) == b"1"
    with pytest.raises(OSError) as refused:
        os.setxattr(mnt / "plain", SECRET, b"yes")
    assert refused.value.errno == errno.EPERM


@dataclass(frozen=True)
class SecretMounts:
    """A mount made with ``-o secret`` holding file *a*, and one holding a file *b* made secret
    by its xattr beside a plain file *c*; both with ``pkram=``, to be preserved."""

    names: tuple[str, str]
    whole: Path
    one: Path
    a: bytes
    b: bytes
    c: bytes

    def assert_back(self, machine: Machine, mounts: Mounts) -> None:
        """Mount both again by name alone: every file is back and exactly the secret ones
        are hidden (the ``secret`` option came back with the node, the xattr with the file)."""
        mounts.mount(f"pkram={self.names[0]}", self.whole)
        mounts.mount(f"pkram={self.names[1]}", self.one)
        assert ctl_status(self.whole)["secret"] is True
        assert md5(self.whole / "a") == hashlib.md5(self.a).hexdigest()
        assert md5(self.one / "b") == hashlib.md5(self.b).hexdigest()
        assert md5(self.one / "c") == hashlib.md5(self.c).hexdigest()
        assert os.getxattr(self.one / "b", SECRET) == b"1"
        assert_hidden_exactly(machine, self.whole, self.a)
        assert_hidden_exactly(machine, self.one, self.b)


def write_secret_mounts(mounts: Mounts, prefix: str, sizes: tuple[int, int, int]) -> SecretMounts:
    """Mount `SecretMounts` named *prefix*whole and *prefix*one, files *sizes* bytes long."""
    names = (f"{prefix}whole", f"{prefix}one")
    whole, one = mounts.mount(f"secret,pkram={names[0]}"), mounts.mount(f"pkram={names[1]}")
    a, b, c = (os.urandom(size) for size in sizes)
    (whole / "a").write_bytes(a)
    (one / "b").write_bytes(b)
    (one / "c").write_bytes(c)
    os.setxattr(one / "b", SECRET, b"1")
    return SecretMounts(names, whole, one, a, b, c)


def test_secret_files_survive_kexec_and_are_hidden_again(machine: Machine, mounts: Mounts) -> None:
    pair = write_secret_mounts(mounts, "", (2 << 20, 700_000, 50_000))
    preserve(pair.whole)
    preserve(pair.one)
    kexec(machine)
    pair.assert_back(machine, mounts)
    (pair.whole / "new").write_bytes(b"n" * 9000)
    assert_hidden_exactly(machine, pair.whole, pair.a, b"n" * 9000)


def test_pages_leaving_a_secret_file_are_mapped_again(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mount("secret,huge=always,size=64M")
    data = os.urandom(5 << 20)
    (mnt / "f").write_bytes(data)
    (mnt / "g").write_bytes(data[:100_000])
    g_huge = data[:100_000] + bytes((2 << 20) - 100_000)  # a whole huge page, zero past EOF
    pfns = assert_hidden_exactly(machine, mnt, data + bytes(1 << 20), g_huge)
    huge_bases = [p for p in pfns if p % HUGE_PAGES == 0 and p + HUGE_PAGES - 1 in pfns]
    assert len(huge_bases) == 4  # each huge page is hidden whole, 2 MiB at once
    os.truncate(mnt / "f", 1_000_000)
    assert_hidden_exactly(machine, mnt, data[:1_000_000], g_huge)
    assert md5(mnt / "f") == hashlib.md5(data[:1_000_000]).hexdigest()
    os.unlink(mnt / "f")
    assert_hidden_exactly(machine, mnt, g_huge)
    assert (mnt / "g").read_bytes() == data[:100_000]
    os.unlink(mnt / "g")
    assert unmapped_pfns(machine, mnt) == []
    assert ctl_status(mnt)["unmapped_ranges"] == 0


def test_fallocated_secret_pages_are_hidden_and_punched_ones_mapped_again(
    machine: Machine, mounts: Mounts
) -> None:
    mnt = mounts.mount("secret,huge=always,size=64M")
    fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, 3 << 20)  # two huge pages, zeroed, out of the direct map
        assert_hidden_exactly(machine, mnt, bytes(4 << 20))
        os.pwrite(fd, b"x" * 10, 5000)
        # Punch [1 MiB, 3 MiB): the first huge page loses its second half, the second one
        # all of it (its second half lies past EOF: dropped by the split, as on tmpfs, which
        # shows 256 pages left); the pages are mapped again before they are reused.
        fallocate(fd, 3, 1 << 20, 2 << 20)
    finally:
        os.close(fd)
    first = bytes(5000) + b"x" * 10 + bytes((1 << 20) - 5010)
    assert_hidden_exactly(machine, mnt, first)
    assert md5(mnt / "f") == hashlib.md5(first + bytes(2 << 20)).hexdigest()
    os.unlink(mnt / "f")
    assert unmapped_pfns(machine, mnt) == []


def test_relocation_copies_secret_pages_through_temporary_mappings(
    machine: Machine, mounts: Mounts
) -> None:
    mnt = mounts.mount("secret,pkram=moved")
    data = write_over_first_pages(mnt)
    before = set(unmapped_pfns(machine, mnt))
    load_next_kernel(machine, OVER_FIRST_PAGES)
    with machine.ram() as ram:
        ram.keys.image_completed()
        preserve(mnt)
        since_image = ram.keys.array & SINCE_IMAGE != 0
    last = ctl_status(mnt)["last_preserve"]
    assert isinstance(last, dict) and last["relocated_pages"] > 0
    after = assert_hidden_exactly(machine, mnt, data)  # the copies are hidden, the old back
    moved = sorted(set(after) - before)
    assert len(moved) == last["relocated_pages"] and since_image[moved].all()
    kexec(machine, OVER_FIRST_PAGES)
    mounts.mount("pkram=moved", mnt)
    assert md5(mnt / "f") == hashlib.md5(data).hexdigest()
    assert_hidden_exactly(machine, mnt, data)


def test_secret_files_survive_hibernation_and_the_writer_maps_them_temporarily(
    machine: Machine, mounts: Mounts, tmp_path: Path
) -> None:
    pair = write_secret_mounts(mounts, "hib-", (1 << 20, 300_000, 70_000))
    hidden = len(unmapped_pfns(machine, pair.whole)) + len(unmapped_pfns(machine, pair.one))
    image = tmp_path / "secret.img"
    result = kexec_sim(machine, "hibernate", "--image", str(image), "--json")
    assert result.returncode == 0, result.stderr
    # The writer read exactly the hidden pages through temporary mappings, not its own map.
    assert json.loads(result.stdout)["fetch_protected_pages"] == hidden
    result = kexec_sim(machine, "resume", "--image", str(image))
    assert result.returncode == 0, result.stderr
    pair.assert_back(machine, mounts)
