"""The page-ownership map: allocation, free/transfer checks, dead owners, concurrency, checker."""

import json
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

import kexec_sim.process
from kexec_sim import (
    FIRMWARE,
    FREE,
    HANDOVER,
    HUGE_PAGES,
    KERNEL,
    NOSAVE,
    PRESERVED,
    CorruptMachine,
    InvalidRequest,
    Machine,
    MachineError,
    OutOfMemory,
    PageOwnership,
    PfnArray,
    RegionType,
)
from kexec_sim.owners import OwnerRegistry
from kexec_sim.ownership import FAULT_ENV, HEADER_BYTES, MAP_FILE
from kexec_sim.transfer_journal import JOURNAL_FILE, write_journal

from .util import REPO, SMALL_RAM_BYTES, run

NR_PAGES = SMALL_RAM_BYTES // 4096
SUPER_BLOCK_PFN = 256  # the boot's super block: the first usable page (HANDOVER)
USABLE_PAGES = 30 * 256 - 1  # 1..16 MiB and 49..64 MiB of the default map, but the super block
HUGE_RUNS = 14  # aligned 2 MiB runs inside 1..16 MiB (7) and 49..64 MiB (7)
TIMEOUT_S = 60


@pytest.fixture
def po(small_machine: Machine) -> Iterator[PageOwnership]:
    with small_machine.page_ownership() as ownership:
        yield ownership


@pytest.fixture
def owner(po: PageOwnership) -> int:
    return po.register_owner("test", os.getpid())


def snapshot(po: PageOwnership) -> np.ndarray:
    with po.locked():
        return po.owner_map.copy()


def check(po: PageOwnership, claims: Mapping[int, PfnArray]) -> list[str]:
    """The checker's problems for *claims* and the facts of the boot *po* belongs to."""
    return po.check(claims, Machine.open(po.boot_dir.parent, create=False).boot_record())


def poke(machine: Machine, pfn: int, owner_id: int) -> None:
    """Corrupt the map behind the API's back, like a buggy process would."""
    fd = os.open(machine.boot_dir / MAP_FILE, os.O_WRONLY)
    try:
        os.pwrite(fd, np.int32(owner_id).tobytes(), HEADER_BYTES + 4 * pfn)
    finally:
        os.close(fd)


# -- a fresh boot -------------------------------------------------------------------------


def test_fresh_map_follows_memory_map(small_machine: Machine, po: PageOwnership) -> None:
    assert po.count_by_owner() == {
        FREE: USABLE_PAGES,
        HANDOVER: 1,
        FIRMWARE: small_machine.memory_map.pages_of_type(RegionType.FIRMWARE),
        KERNEL: small_machine.memory_map.pages_of_type(RegionType.KERNEL),
        NOSAVE: small_machine.memory_map.pages_of_type(RegionType.NOSAVE),
    }
    assert po.free_pages() == USABLE_PAGES
    free = po.pages_of(FREE)
    usable = np.flatnonzero(small_machine.memory_map.usable_mask(NR_PAGES))
    assert np.array_equal(free, usable[usable != SUPER_BLOCK_PFN])
    assert po.pages_of(HANDOVER).tolist() == [SUPER_BLOCK_PFN]
    assert small_machine.super_block_pfn == SUPER_BLOCK_PFN
    assert small_machine.boot_record().kernel_image is None
    assert po.owners() == {}
    assert check(po, {}) == []


def test_bad_header_is_corrupt(small_machine: Machine) -> None:
    path = small_machine.boot_dir / MAP_FILE
    with path.open("r+b") as file:
        file.write(b"XXXXXXXX")
    with pytest.raises(CorruptMachine, match="magic"):
        small_machine.page_ownership()


def test_truncated_map_is_corrupt(small_machine: Machine) -> None:
    os.truncate(small_machine.boot_dir / MAP_FILE, HEADER_BYTES + 4 * (NR_PAGES - 1))
    with pytest.raises(CorruptMachine, match="expected a map"):
        small_machine.page_ownership()


# -- owners -------------------------------------------------------------------------------


def test_register_and_unregister(po: PageOwnership) -> None:
    first = po.register_owner("one", os.getpid())
    second = po.register_owner("two", os.getpid())
    assert second > first > 0
    info = po.owners()[first]
    assert (info.owner_id, info.name, info.pid) == (first, "one", os.getpid())
    pfns = po.allocate(first, 10)
    po.unregister_owner(first)
    assert first not in po.owners()
    assert (po.pages_of(FREE)[:, None] == pfns).any(axis=0).all()
    third = po.register_owner("three", os.getpid())
    assert third > second  # ids are never reused within a boot
    with pytest.raises(MachineError, match="not a registered owner"):
        po.unregister_owner(first)


def test_register_rejects_bad_input(po: PageOwnership) -> None:
    with pytest.raises(InvalidRequest, match="printable"):
        po.register_owner("", os.getpid())
    with pytest.raises(InvalidRequest, match="printable"):
        po.register_owner("a\nb", os.getpid())
    with pytest.raises(MachineError, match="no running process"):
        po.register_owner("ghost", 2**31 - 1)


def test_registry_is_shared_between_handles(small_machine: Machine, po: PageOwnership) -> None:
    with small_machine.page_ownership() as other:
        owner_id = other.register_owner("other", os.getpid())
        assert owner_id in po.owners()
        pfns = po.allocate(owner_id, 5)
        assert np.array_equal(other.pages_of(owner_id), np.sort(pfns))


# -- allocation ---------------------------------------------------------------------------


def test_allocate_gives_distinct_free_usable_pages(
    small_machine: Machine, po: PageOwnership, owner: int
) -> None:
    pfns = po.allocate(owner, 1000)
    assert pfns.dtype == np.int64 and pfns.size == 1000
    assert np.unique(pfns).size == 1000
    assert small_machine.memory_map.usable_mask(NR_PAGES)[pfns].all()
    assert np.array_equal(po.pages_of(owner), np.sort(pfns))
    assert po.free_pages() == USABLE_PAGES - 1000
    assert check(po, {owner: pfns}) == []


def test_allocate_is_next_fit_and_wraps(po: PageOwnership, owner: int) -> None:
    first = po.allocate(owner, 100)
    second = po.allocate(owner, 100)
    assert second[0] == first[-1] + 1  # continues where the last allocation stopped
    tail = po.allocate(owner, po.free_pages() - 30)  # to the end of RAM
    assert (np.diff(tail) > 0).all()
    po.free(owner, first[:50])
    wrapped = po.allocate(owner, 60)  # the 50 freed pages first, then on from there
    assert np.array_equal(wrapped[:50], first[:50])
    assert (np.diff(wrapped) > 0).all()
    assert check(po, {owner: np.concatenate([first[50:], second, tail, wrapped])}) == []


def test_freed_pages_are_reused_first(po: PageOwnership, owner: int) -> None:
    """Pages just freed are warm in the host: the allocator hands them out before fresh ones."""
    first = po.allocate(owner, 2048)
    po.allocate(owner, 2048)
    po.free(owner, first)
    again = po.allocate(owner, 2048)
    assert np.array_equal(np.sort(again), np.sort(first))


def test_allocate_is_all_or_nothing(po: PageOwnership, owner: int) -> None:
    po.allocate(owner, 100)
    before = snapshot(po)
    with pytest.raises(OutOfMemory, match=f"{USABLE_PAGES - 100} pages free"):
        po.allocate(owner, USABLE_PAGES - 99)
    assert np.array_equal(snapshot(po), before)
    everything = po.allocate(owner, USABLE_PAGES - 100)
    assert po.free_pages() == 0
    with pytest.raises(OutOfMemory):
        po.allocate(owner, 1)
    assert po.allocate(owner, 0).size == 0
    assert check(po, {owner: po.pages_of(owner)}) == []
    assert everything.size == USABLE_PAGES - 100


def test_allocate_rejects_unregistered_owner_and_bad_counts(po: PageOwnership, owner: int) -> None:
    with pytest.raises(MachineError, match="not a registered owner"):
        po.allocate(owner + 1, 1)
    with pytest.raises(MachineError, match="not a registered owner"):
        po.allocate(KERNEL, 1)
    with pytest.raises(InvalidRequest):
        po.allocate(owner, -1)


def test_allocate_huge_gives_aligned_free_runs(po: PageOwnership, owner: int) -> None:
    small = np.array([2 * HUGE_PAGES + 5])
    po.transfer(small, FREE, owner)  # the run at 2 * HUGE_PAGES is no longer entirely free
    bases = po.allocate_huge(owner, 3)
    assert bases.tolist() == [1 * HUGE_PAGES, 3 * HUGE_PAGES, 4 * HUGE_PAGES]
    pages = (bases[:, None] + np.arange(HUGE_PAGES)).ravel()
    assert np.array_equal(po.pages_of(owner), np.sort(np.concatenate([small, pages])))
    assert check(po, {owner: np.concatenate([small, pages])}) == []


def test_allocate_huge_is_all_or_nothing(po: PageOwnership, owner: int) -> None:
    po.transfer([26 * HUGE_PAGES + 100], FREE, owner)  # breaks one of the HUGE_RUNS runs
    before = snapshot(po)
    with pytest.raises(OutOfMemory, match="huge pages"):
        po.allocate_huge(owner, HUGE_RUNS)
    assert np.array_equal(snapshot(po), before)
    bases = po.allocate_huge(owner, HUGE_RUNS - 1)
    assert np.unique(bases).size == HUGE_RUNS - 1
    with pytest.raises(OutOfMemory):
        po.allocate_huge(owner, 1)
    assert po.allocate(owner, 10).size == 10  # small pages are still there


def test_allocate_huge_on_ram_that_is_not_whole_huge_pages(tmp_path: Path) -> None:
    machine = Machine.create(tmp_path / "odd", SMALL_RAM_BYTES + 3 * 4096)
    with machine.page_ownership() as po:
        owner = po.register_owner("test", os.getpid())
        bases = po.allocate_huge(owner, HUGE_RUNS)
        assert (bases + HUGE_PAGES <= machine.nr_pages).all()
        with pytest.raises(OutOfMemory):
            po.allocate_huge(owner, 1)
        assert po.allocate(owner, 3).size == 3  # the tail pages are still usable
        assert check(po, {owner: po.pages_of(owner)}) == []


def test_map_header_matches_the_documented_layout(
    small_machine: Machine, po: PageOwnership, owner: int
) -> None:
    pfns = po.allocate(owner, 10)
    header = (small_machine.boot_dir / MAP_FILE).read_bytes()[:HEADER_BYTES]
    fields = struct.unpack_from("<8sIIQQQ", header)
    magic, version, header_bytes, nr_pages, cursor, serial = fields
    assert (magic, version, header_bytes, nr_pages) == (b"KSIMOWN\0", 1, 4096, NR_PAGES)
    assert cursor == pfns[-1] + 1
    assert serial == 1  # one registry write: the registration
    assert header[40:] == bytes(HEADER_BYTES - 40)  # boot facts live in boot.json


# -- free and transfer --------------------------------------------------------------------


def test_free_checks_every_pfn(po: PageOwnership, owner: int) -> None:
    other = po.register_owner("other", os.getpid())
    mine = po.allocate(owner, 10)
    theirs = po.allocate(other, 10)
    before = snapshot(po)
    with pytest.raises(MachineError, match=r"1 of 11 pfns are not owned"):
        po.free(owner, np.append(mine, theirs[0]))
    with pytest.raises(MachineError, match="listed more than once"):
        po.free(owner, np.append(mine, mine[0]))
    with pytest.raises(MachineError, match="outside the machine's RAM"):
        po.free(owner, [NR_PAGES])
    with pytest.raises(MachineError, match="outside the machine's RAM"):
        po.free(owner, [-1])
    with pytest.raises(MachineError, match="not owned"):
        po.free(owner, po.pages_of(FREE)[:1])
    with pytest.raises(MachineError, match="not a registered owner"):
        po.free(KERNEL, po.pages_of(KERNEL)[:1])
    assert np.array_equal(snapshot(po), before)
    po.free(owner, mine[::-1])
    assert po.pages_of(owner).size == 0
    assert check(po, {owner: mine[:0], other: theirs}) == []


def test_transfer_moves_pages_and_checks_them(po: PageOwnership, owner: int) -> None:
    other = po.register_owner("other", os.getpid())
    pfns = po.allocate(owner, 20)
    po.transfer(pfns[:5], owner, PRESERVED)
    assert np.array_equal(po.pages_of(PRESERVED), np.sort(pfns[:5]))
    po.transfer(pfns[:5], PRESERVED, other)
    before = snapshot(po)
    with pytest.raises(MachineError, match="not owned by owner"):
        po.transfer(pfns[:6], owner, other)  # the first five are other's now
    with pytest.raises(MachineError, match="not a registered owner"):
        po.transfer(pfns[5:], owner, FIRMWARE)
    with pytest.raises(MachineError, match="not a registered owner"):
        po.transfer(pfns[5:], owner, 999)
    assert np.array_equal(snapshot(po), before)
    claimed = po.pages_of(FREE)[:3]  # FREE -> owner claims specific free pages
    po.transfer(claimed, FREE, owner)
    assert check(po, {owner: np.concatenate([pfns[5:], claimed]), other: pfns[:5]}) == []


# -- lock and boots -----------------------------------------------------------------------


def test_lock_is_reentrant(po: PageOwnership, owner: int) -> None:
    with po.locked(), po.locked():
        pfns = po.allocate(owner, 3)
        po.free(owner, pfns)
    assert po.free_pages() == USABLE_PAGES


def test_a_new_boot_makes_old_handles_stale(
    small_machine: Machine, po: PageOwnership, owner: int
) -> None:
    po.allocate(owner, 10)
    small_machine.start_boot("pkram=123")
    with pytest.raises(MachineError, match="booted again"):
        po.allocate(owner, 1)
    with small_machine.page_ownership() as fresh:
        assert fresh.owners() == {}
        assert fresh.free_pages() == USABLE_PAGES
        assert fresh.register_owner("next", os.getpid()) == 1


# -- other processes ----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from kexec_sim import Machine
    machine_dir, name, batch, batches, out = sys.argv[1:6]
    with Machine.open(machine_dir, create=False).page_ownership() as po:
        owner_id = po.register_owner(name, os.getpid())
        print(owner_id, flush=True)
        sys.stdin.readline()  # go
        got = [po.allocate(owner_id, int(batch)) for _ in range(int(batches))]
        np.save(out, np.concatenate(got))
        print("done", flush=True)
        sys.stdin.readline()  # the parent has looked: exit
    """
)


def start_child(
    machine: Machine, name: str, batch: int, batches: int, out: Path
) -> "subprocess.Popen[str]":
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        "-c",
        CHILD,
        str(machine.path),
        name,
        str(batch),
        str(batches),
        str(out),
    ]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_line(child: "subprocess.Popen[str]") -> str:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], TIMEOUT_S)
    assert ready, "child did not answer"
    return child.stdout.readline().strip()


def say(child: "subprocess.Popen[str]", line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def finish(child: "subprocess.Popen[str]") -> int:
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()
    return child.wait(TIMEOUT_S)


def test_dead_owner_is_reclaimed(small_machine: Machine, po: PageOwnership, tmp_path: Path) -> None:
    child = start_child(small_machine, "doomed", 100, 3, tmp_path / "doomed.npy")
    try:
        owner_id = int(read_line(child))
        say(child, "go")
        assert read_line(child) == "done"
        assert po.pages_of(owner_id).size == 300
        assert po.reclaim_dead_owners() == []  # alive: nothing to reclaim
        child.send_signal(signal.SIGKILL)
    finally:
        finish(child)
    assert po.reclaim_dead_owners() == [owner_id]
    assert owner_id not in po.owners()
    assert po.free_pages() == USABLE_PAGES
    assert check(po, {}) == []


def test_allocation_reclaims_dead_owners_before_giving_up(
    small_machine: Machine, po: PageOwnership, owner: int, tmp_path: Path
) -> None:
    child = start_child(small_machine, "hog", USABLE_PAGES, 1, tmp_path / "hog.npy")
    try:
        hog = int(read_line(child))
        say(child, "go")
        assert read_line(child) == "done"
        assert po.free_pages() == 0
        child.kill()
    finally:
        finish(child)
    pfns = po.allocate(owner, 10)  # succeeds only by reclaiming the killed child's pages
    assert hog not in po.owners()
    assert check(po, {owner: pfns}) == []


def test_reused_pid_does_not_keep_an_owner_alive(
    po: PageOwnership, owner: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = kexec_sim.process.process_start_time
    monkeypatch.setattr("kexec_sim.ownership.process_start_time", lambda pid: (real(pid) or 0) - 1)
    impostor = po.register_owner("previous holder of this pid", os.getpid())
    monkeypatch.undo()
    po.allocate(impostor, 5)
    assert po.reclaim_dead_owners() == [impostor]  # same pid, different start time
    assert owner in po.owners()


def test_concurrent_allocations_never_share_a_page(
    small_machine: Machine, po: PageOwnership, tmp_path: Path
) -> None:
    outs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    children = [start_child(small_machine, f"c{i}", 7, 400, out) for i, out in enumerate(outs)]
    try:
        ids = [int(read_line(child)) for child in children]
        for child in children:
            say(child, "go")
        assert [read_line(child) for child in children] == ["done", "done"]
        got = [np.load(out) for out in outs]
        assert all(g.size == 7 * 400 for g in got)
        assert np.intersect1d(got[0], got[1]).size == 0
        assert check(po, dict(zip(ids, got, strict=True))) == []
    finally:
        codes = [finish(child) for child in children]
    assert codes == [0, 0]


def test_lock_excludes_other_processes(small_machine: Machine, po: PageOwnership) -> None:
    code = (
        "import sys\nfrom kexec_sim import Machine\n"
        "with Machine.open(sys.argv[1], create=False).page_ownership() as po, po.locked():\n"
        "    print('locked', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with po.locked():
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(small_machine.path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], 1.0)
            assert not ready  # blocked on our lock
        except BaseException:
            child.kill()
            finish(child)
            raise
    assert read_line(child) == "locked"
    assert finish(child) == 0


# -- the checker --------------------------------------------------------------------------


Two = tuple[int, PfnArray, int, PfnArray]


@pytest.fixture
def two(po: PageOwnership) -> Two:
    a = po.register_owner("a", os.getpid())
    b = po.register_owner("b", os.getpid())
    return a, po.allocate(a, 50), b, po.allocate(b, 50)


def test_checker_is_clean_for_exact_claims(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    assert check(po, {a: pa, b: pb}) == []
    assert check(po, {a: pa}) == []  # owners without claims are not checked for leaks


def test_checker_finds_a_pfn_claimed_twice_by_one_owner(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = check(po, {a: np.concatenate([pa, pa[:3]]), b: pb})
    assert problems == [
        f"owner {a} claims 3 pfns more than once, e.g. {', '.join(map(str, np.sort(pa[:3])))}"
    ]


def test_checker_finds_a_pfn_claimed_by_two_owners(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = check(po, {a: pa, b: np.append(pb, pa[0])})
    assert any(
        "claimed by more than one owner" in p and f"pfn {pa[0]} by owner {a}, owner {b}" in p
        for p in problems
    )
    assert any(f"owner {b} claims 1 pfns the map gives to someone else" in p for p in problems)


def test_checker_finds_a_claim_the_map_does_not_back(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    free_pfn = int(po.pages_of(FREE)[0])
    problems = check(po, {a: np.append(pa, free_pfn), b: pb})
    assert problems == [
        f"owner {a} claims 1 pfns the map gives to someone else, e.g. {free_pfn} (owned by free)"
    ]


def test_checker_finds_a_leak(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = check(po, {a: pa[1:], b: pb})
    assert problems == [
        f"owner {a} owns 1 pfns in the map that it does not claim (leaked), e.g. {pa[0]}"
    ]


def test_checker_finds_pages_of_an_unregistered_owner(
    small_machine: Machine, po: PageOwnership, two: Two
) -> None:
    a, pa, b, pb = two
    free_pfn = int(po.pages_of(FREE)[0])
    poke(small_machine, free_pfn, 77)
    assert check(po, {a: pa, b: pb}) == [
        f"1 pfns are owned by unregistered owner 77, e.g. {free_pfn}"
    ]
    poke(small_machine, free_pfn, -9)
    assert check(po, {}) == [f"1 pfns are owned by unregistered owner -9, e.g. {free_pfn}"]


def test_checker_finds_claims_of_an_unregistered_owner(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = check(po, {a: pa, b: pb, 99: np.array([], dtype=np.int64)})
    assert problems == ["claims given for owner 99, which is not a registered owner"]


def test_checker_finds_claims_outside_ram(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = check(po, {a: np.append(pa, [NR_PAGES, -5]), b: pb})
    assert problems == [
        f"owner {a} claims 2 pfns outside RAM (0..{NR_PAGES - 1}), e.g. {NR_PAGES}, -5"
    ]


def test_checker_finds_reserved_regions_off_the_memory_map(
    small_machine: Machine, po: PageOwnership
) -> None:
    kernel_pfn = int(po.pages_of(KERNEL)[0])
    usable_pfn = int(po.pages_of(FREE)[0])
    poke(small_machine, kernel_pfn, FREE)
    poke(small_machine, usable_pfn, FIRMWARE)
    assert check(po, {}) == [
        f"1 pfns of the memory map's kernel regions are not owned by kernel, e.g. {kernel_pfn}",
        f"1 usable pfns are owned by a reserved owner (firmware), e.g. {usable_pfn}",
    ]


# -- crash-atomic transfers -----------------------------------------------------------------

MIDWAY_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from kexec_sim import PRESERVED, Machine
    with Machine.open(sys.argv[1], create=False).page_ownership() as po:
        owner_id = po.register_owner("preserver", os.getpid())
        pfns = po.allocate(owner_id, 1000)
        np.save(sys.argv[2], pfns)
        po.transfer(pfns, owner_id, PRESERVED)  # KEXEC_SIM_FAULT kills us half way
    print("not killed", flush=True)
    """
)


def raw_map(machine: Machine) -> np.ndarray:
    """The ownership map as a process sees it without the lock (no journal replayed)."""
    return np.fromfile(machine.boot_dir / MAP_FILE, dtype="<i4", offset=HEADER_BYTES)


def test_a_transfer_killed_midway_is_finished_by_the_next_lock_holder(
    small_machine: Machine, po: PageOwnership, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), FAULT_ENV: "transfer-midway"}
    out = tmp_path / "pfns.npy"
    child = run(
        sys.executable,
        "-c",
        MIDWAY_CHILD,
        str(small_machine.path),
        str(out),
        env=env,
        timeout=TIMEOUT_S,
    )
    assert child.returncode == -signal.SIGKILL and "not killed" not in child.stdout
    pfns = np.sort(np.load(out))
    before = raw_map(small_machine)[pfns]
    assert np.count_nonzero(before == PRESERVED) == 500  # the map was left half done
    assert (small_machine.boot_dir / JOURNAL_FILE).exists()
    # The owner is dead: reclaiming it first would free the 500 pages not yet moved. The
    # journal is replayed before anything else, so all 1000 are preserved and none freed.
    (dead,) = po.reclaim_dead_owners()
    assert np.array_equal(po.pages_of(PRESERVED), pfns)
    assert po.pages_of(dead).size == 0 and dead not in po.owners()
    assert not (small_machine.boot_dir / JOURNAL_FILE).exists()
    assert check(po, {}) == []


def test_replaying_a_journal_is_idempotent(
    small_machine: Machine, po: PageOwnership, owner: int
) -> None:
    pfns = po.allocate(owner, 10)
    po.transfer(pfns[:4], owner, PRESERVED)  # as if a killed transfer had done 4 of 10
    write_journal(small_machine.boot_dir, pfns, owner, PRESERVED)
    with po.locked():
        assert np.array_equal(po.pages_of(PRESERVED), np.sort(pfns))
    write_journal(small_machine.boot_dir, pfns, owner, PRESERVED)  # replayed again: no change
    assert np.array_equal(po.pages_of(PRESERVED), np.sort(pfns))
    assert check(po, {owner: pfns[:0]}) == []


def test_a_tampered_journal_is_a_corrupt_machine(
    small_machine: Machine, po: PageOwnership, owner: int
) -> None:
    pfns = po.allocate(owner, 10)
    write_journal(small_machine.boot_dir, pfns, owner, PRESERVED)
    path = small_machine.boot_dir / JOURNAL_FILE
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptMachine, match="transfer-journal"):
        po.free_pages()


def test_transfers_to_and_from_handover(po: PageOwnership, owner: int) -> None:
    pfns = po.allocate(owner, 3)
    po.transfer(pfns, owner, HANDOVER)
    po.transfer(pfns[:1], HANDOVER, PRESERVED)
    po.free(HANDOVER, pfns[1:])
    assert po.pages_of(PRESERVED).tolist() == [pfns[0]]
    assert po.pages_of(HANDOVER).tolist() == [SUPER_BLOCK_PFN]


# -- allocation around a range --------------------------------------------------------------


def test_allocate_avoids_a_range(po: PageOwnership, owner: int) -> None:
    avoid = (300, 4000)
    pfns = po.allocate(owner, 1000, avoid=avoid)
    assert not ((pfns >= avoid[0]) & (pfns < avoid[1])).any()
    assert pfns[:43].tolist() == list(range(257, 300))  # then on after the range
    assert pfns[43] == avoid[1]
    everything = po.allocate(owner, po.free_pages() - (avoid[1] - 300), avoid=avoid)
    with pytest.raises(OutOfMemory):
        po.allocate(owner, 1, avoid=avoid)  # only the avoided range is left
    assert po.allocate(owner, 1).tolist() == [300]
    assert check(po, {owner: np.concatenate([pfns, everything, [300]])}) == []


def test_allocate_huge_avoids_runs_overlapping_a_range(po: PageOwnership, owner: int) -> None:
    avoid = (HUGE_PAGES + 1, 3 * HUGE_PAGES + 1)  # touches the runs at 1, 2 and 3
    bases = po.allocate_huge(owner, 3, avoid=avoid)
    assert bases.tolist() == [4 * HUGE_PAGES, 5 * HUGE_PAGES, 6 * HUGE_PAGES]
    assert po.allocate_huge(owner, 1).tolist() == [7 * HUGE_PAGES]  # next fit, not avoided
    assert po.allocate_huge(owner, 1, avoid=(0, 0)).tolist()[0] != 2 * HUGE_PAGES + 5


# -- owners with mountpoints ----------------------------------------------------------------


def test_owner_mountpoint_is_registered(small_machine: Machine, po: PageOwnership) -> None:
    owner_id = po.register_owner("pkramfs:x:/mnt/x", os.getpid(), mountpoint="/mnt/a b")
    assert po.owners()[owner_id].mountpoint == "/mnt/a b"
    plain = po.register_owner("plain", os.getpid())
    assert po.owners()[plain].mountpoint is None
    with pytest.raises(InvalidRequest, match="mountpoint"):
        po.register_owner("bad", os.getpid(), mountpoint="relative/path")
    registry = json.loads((small_machine.boot_dir / "owners.json").read_text())
    del registry["owners"][str(owner_id)]["mountpoint"]  # as written before mountpoints
    (small_machine.boot_dir / "owners.json").write_text(json.dumps(registry))
    assert (
        OwnerRegistry.load(small_machine.boot_dir / "owners.json").owners[owner_id].mountpoint
        is None
    )


# -- the checker and HANDOVER ---------------------------------------------------------------


def test_checker_wants_handover_to_own_the_super_block_only(
    small_machine: Machine, po: PageOwnership
) -> None:
    free_pfn = int(po.pages_of(FREE)[0])
    poke(small_machine, free_pfn, HANDOVER)
    assert check(po, {}) == [
        f"1 pfns are owned by handover but are not this boot's super block (pfn "
        f"{SUPER_BLOCK_PFN}), e.g. {free_pfn}"
    ]
    poke(small_machine, free_pfn, FREE)
    poke(small_machine, SUPER_BLOCK_PFN, FREE)
    assert check(po, {}) == [
        f"this boot's super block, pfn {SUPER_BLOCK_PFN}, is owned by free, not handover"
    ]


def test_checker_accepts_the_kernel_image_outside_the_kernel_region(small_machine: Machine) -> None:
    image = (600, 700)  # usable pages where a kexec put the kernel
    small_machine.start_boot("", kernel_image=image)
    with small_machine.page_ownership() as po:
        assert small_machine.boot_record().kernel_image == image
        assert np.array_equal(po.pages_of(KERNEL)[:100], np.arange(*image))
        assert check(po, {}) == []
        poke(small_machine, 650, FREE)
        assert check(po, {}) == [
            "1 usable pfns of the kernel image (600..699) are not owned by kernel, e.g. 650"
        ]


def test_run_based_transfer_refuses_nested_repeats_and_foreign_pages(
    po: PageOwnership, owner: int
) -> None:
    pages = np.sort(po.allocate(owner, 1000))
    before = snapshot(po)
    nested = np.concatenate([pages[:500], pages[100:110], pages[600:700]])  # few runs, a repeat
    with pytest.raises(MachineError, match="listed more than once"):
        po.transfer(nested, owner, PRESERVED)
    other = po.register_owner("other", os.getpid())
    foreign = np.concatenate([pages[:500], po.allocate(other, 100)])
    before = snapshot(po)
    with pytest.raises(MachineError, match="not owned"):
        po.transfer(foreign, owner, PRESERVED)
    assert (snapshot(po) == before).all()  # nothing moved
    po.transfer(pages, owner, PRESERVED)
    assert (po.pages_of(PRESERVED) == pages).all()
