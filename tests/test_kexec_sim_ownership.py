"""The page-ownership map: allocation, free/transfer checks, dead owners, concurrency, checker."""

import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import kexec_sim.process
from kexec_sim import (
    FIRMWARE,
    FREE,
    HUGE_PAGES,
    KERNEL,
    NOSAVE,
    PRESERVED,
    CorruptMachine,
    Machine,
    MachineError,
    OutOfMemory,
    PageOwnership,
    PfnArray,
    RegionType,
)
from kexec_sim.ownership import HEADER_BYTES, MAP_FILE

REPO = Path(__file__).resolve().parents[1]
RAM_BYTES = 64 << 20
NR_PAGES = RAM_BYTES // 4096
USABLE_PAGES = 30 * 256  # 1..16 MiB and 49..64 MiB of the default map
HUGE_RUNS = 14  # aligned 2 MiB runs inside 1..16 MiB (7) and 49..64 MiB (7)
TIMEOUT_S = 60


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine.create(tmp_path / "machine", RAM_BYTES)


@pytest.fixture
def po(machine: Machine) -> Iterator[PageOwnership]:
    with machine.page_ownership() as ownership:
        yield ownership


@pytest.fixture
def owner(po: PageOwnership) -> int:
    return po.register_owner("test", os.getpid())


def snapshot(po: PageOwnership) -> np.ndarray:
    with po.locked():
        return po.owner_map.copy()


def poke(machine: Machine, pfn: int, owner_id: int) -> None:
    """Corrupt the map behind the API's back, like a buggy process would."""
    fd = os.open(machine.boot_dir / MAP_FILE, os.O_WRONLY)
    try:
        os.pwrite(fd, np.int32(owner_id).tobytes(), HEADER_BYTES + 4 * pfn)
    finally:
        os.close(fd)


# -- a fresh boot -------------------------------------------------------------------------


def test_fresh_map_follows_memory_map(machine: Machine, po: PageOwnership) -> None:
    assert po.count_by_owner() == {
        FREE: USABLE_PAGES,
        FIRMWARE: machine.memory_map.pages_of_type(RegionType.FIRMWARE),
        KERNEL: machine.memory_map.pages_of_type(RegionType.KERNEL),
        NOSAVE: machine.memory_map.pages_of_type(RegionType.NOSAVE),
    }
    assert po.free_pages() == USABLE_PAGES
    free = po.pages_of(FREE)
    assert np.array_equal(free, np.flatnonzero(machine.memory_map.usable_mask(NR_PAGES)))
    assert po.owners() == {}
    assert po.check({}) == []


def test_bad_header_is_corrupt(machine: Machine) -> None:
    path = machine.boot_dir / MAP_FILE
    with path.open("r+b") as file:
        file.write(b"XXXXXXXX")
    with pytest.raises(CorruptMachine, match="magic"):
        machine.page_ownership()


def test_truncated_map_is_corrupt(machine: Machine) -> None:
    os.truncate(machine.boot_dir / MAP_FILE, HEADER_BYTES + 4 * (NR_PAGES - 1))
    with pytest.raises(CorruptMachine, match="expected a map"):
        machine.page_ownership()


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
    with pytest.raises(ValueError, match="printable"):
        po.register_owner("", os.getpid())
    with pytest.raises(ValueError, match="printable"):
        po.register_owner("a\nb", os.getpid())
    with pytest.raises(MachineError, match="no running process"):
        po.register_owner("ghost", 2**31 - 1)


def test_registry_is_shared_between_handles(machine: Machine, po: PageOwnership) -> None:
    with machine.page_ownership() as other:
        owner_id = other.register_owner("other", os.getpid())
        assert owner_id in po.owners()
        pfns = po.allocate(owner_id, 5)
        assert np.array_equal(other.pages_of(owner_id), np.sort(pfns))


# -- allocation ---------------------------------------------------------------------------


def test_allocate_gives_distinct_free_usable_pages(
    machine: Machine, po: PageOwnership, owner: int
) -> None:
    pfns = po.allocate(owner, 1000)
    assert pfns.dtype == np.int64 and pfns.size == 1000
    assert np.unique(pfns).size == 1000
    assert machine.memory_map.usable_mask(NR_PAGES)[pfns].all()
    assert np.array_equal(po.pages_of(owner), np.sort(pfns))
    assert po.free_pages() == USABLE_PAGES - 1000
    assert po.check({owner: pfns}) == []


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
    assert po.check({owner: np.concatenate([first[50:], second, tail, wrapped])}) == []


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
    assert po.check({owner: po.pages_of(owner)}) == []
    assert everything.size == USABLE_PAGES - 100


def test_allocate_rejects_unregistered_owner_and_bad_counts(po: PageOwnership, owner: int) -> None:
    with pytest.raises(MachineError, match="not a registered owner"):
        po.allocate(owner + 1, 1)
    with pytest.raises(MachineError, match="not a registered owner"):
        po.allocate(KERNEL, 1)
    with pytest.raises(ValueError):
        po.allocate(owner, -1)


def test_allocate_huge_gives_aligned_free_runs(po: PageOwnership, owner: int) -> None:
    small = np.array([2 * HUGE_PAGES + 5])
    po.transfer(small, FREE, owner)  # the run at 2 * HUGE_PAGES is no longer entirely free
    bases = po.allocate_huge(owner, 3)
    assert bases.tolist() == [1 * HUGE_PAGES, 3 * HUGE_PAGES, 4 * HUGE_PAGES]
    pages = (bases[:, None] + np.arange(HUGE_PAGES)).ravel()
    assert np.array_equal(po.pages_of(owner), np.sort(np.concatenate([small, pages])))
    assert po.check({owner: np.concatenate([small, pages])}) == []


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
    machine = Machine.create(tmp_path / "odd", RAM_BYTES + 3 * 4096)
    with machine.page_ownership() as po:
        owner = po.register_owner("test", os.getpid())
        bases = po.allocate_huge(owner, HUGE_RUNS)
        assert (bases + HUGE_PAGES <= machine.nr_pages).all()
        with pytest.raises(OutOfMemory):
            po.allocate_huge(owner, 1)
        assert po.allocate(owner, 3).size == 3  # the tail pages are still usable
        assert po.check({owner: po.pages_of(owner)}) == []


def test_map_header_matches_the_documented_layout(
    machine: Machine, po: PageOwnership, owner: int
) -> None:
    pfns = po.allocate(owner, 10)
    header = (machine.boot_dir / MAP_FILE).read_bytes()[:HEADER_BYTES]
    magic, version, header_bytes, nr_pages, cursor, serial = struct.unpack_from("<8sIIQQQ", header)
    assert (magic, version, header_bytes, nr_pages) == (b"KSIMOWN\0", 1, 4096, NR_PAGES)
    assert cursor == pfns[-1] + 1
    assert serial == 1  # one registry write: the registration
    assert header[40:] == bytes(HEADER_BYTES - 40)


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
    assert po.check({owner: mine[:0], other: theirs}) == []


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
    assert po.check({owner: np.concatenate([pfns[5:], claimed]), other: pfns[:5]}) == []


# -- lock and boots -----------------------------------------------------------------------


def test_lock_is_reentrant(po: PageOwnership, owner: int) -> None:
    with po.locked(), po.locked():
        pfns = po.allocate(owner, 3)
        po.free(owner, pfns)
    assert po.free_pages() == USABLE_PAGES


def test_a_new_boot_makes_old_handles_stale(
    machine: Machine, po: PageOwnership, owner: int
) -> None:
    po.allocate(owner, 10)
    machine.start_boot("pkram=123")
    with pytest.raises(MachineError, match="booted again"):
        po.allocate(owner, 1)
    with machine.page_ownership() as fresh:
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


def test_dead_owner_is_reclaimed(machine: Machine, po: PageOwnership, tmp_path: Path) -> None:
    child = start_child(machine, "doomed", 100, 3, tmp_path / "doomed.npy")
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
    assert po.check({}) == []


def test_allocation_reclaims_dead_owners_before_giving_up(
    machine: Machine, po: PageOwnership, owner: int, tmp_path: Path
) -> None:
    child = start_child(machine, "hog", USABLE_PAGES // 2, 2, tmp_path / "hog.npy")
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
    assert po.check({owner: pfns}) == []


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
    machine: Machine, po: PageOwnership, tmp_path: Path
) -> None:
    outs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    children = [start_child(machine, f"c{i}", 7, 400, out) for i, out in enumerate(outs)]
    try:
        ids = [int(read_line(child)) for child in children]
        for child in children:
            say(child, "go")
        assert [read_line(child) for child in children] == ["done", "done"]
        got = [np.load(out) for out in outs]
        assert all(g.size == 7 * 400 for g in got)
        assert np.intersect1d(got[0], got[1]).size == 0
        assert po.check(dict(zip(ids, got, strict=True))) == []
    finally:
        codes = [finish(child) for child in children]
    assert codes == [0, 0]


def test_lock_excludes_other_processes(machine: Machine, po: PageOwnership) -> None:
    code = (
        "import sys\nfrom kexec_sim import Machine\n"
        "with Machine.open(sys.argv[1], create=False).page_ownership() as po, po.locked():\n"
        "    print('locked', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with po.locked():
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(machine.path)],
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
    assert po.check({a: pa, b: pb}) == []
    assert po.check({a: pa}) == []  # owners without claims are not checked for leaks


def test_checker_finds_a_pfn_claimed_twice_by_one_owner(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = po.check({a: np.concatenate([pa, pa[:3]]), b: pb})
    assert problems == [
        f"owner {a} claims 3 pfns more than once, e.g. {', '.join(map(str, np.sort(pa[:3])))}"
    ]


def test_checker_finds_a_pfn_claimed_by_two_owners(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = po.check({a: pa, b: np.append(pb, pa[0])})
    assert any(
        "claimed by more than one owner" in p and f"pfn {pa[0]} by owner {a}, owner {b}" in p
        for p in problems
    )
    assert any(f"owner {b} claims 1 pfns the map gives to someone else" in p for p in problems)


def test_checker_finds_a_claim_the_map_does_not_back(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    free_pfn = int(po.pages_of(FREE)[0])
    problems = po.check({a: np.append(pa, free_pfn), b: pb})
    assert problems == [
        f"owner {a} claims 1 pfns the map gives to someone else, e.g. {free_pfn} (owned by free)"
    ]


def test_checker_finds_a_leak(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = po.check({a: pa[1:], b: pb})
    assert problems == [
        f"owner {a} owns 1 pfns in the map that it does not claim (leaked), e.g. {pa[0]}"
    ]


def test_checker_finds_pages_of_an_unregistered_owner(
    machine: Machine, po: PageOwnership, two: Two
) -> None:
    a, pa, b, pb = two
    free_pfn = int(po.pages_of(FREE)[0])
    poke(machine, free_pfn, 77)
    assert po.check({a: pa, b: pb}) == [
        f"1 pfns are owned by unregistered owner 77, e.g. {free_pfn}"
    ]
    poke(machine, free_pfn, -9)
    assert po.check({}) == [f"1 pfns are owned by unregistered owner -9, e.g. {free_pfn}"]


def test_checker_finds_claims_of_an_unregistered_owner(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = po.check({a: pa, b: pb, 99: np.array([], dtype=np.int64)})
    assert problems == ["claims given for owner 99, which is not a registered owner"]


def test_checker_finds_claims_outside_ram(po: PageOwnership, two: Two) -> None:
    a, pa, b, pb = two
    problems = po.check({a: np.append(pa, [NR_PAGES, -5]), b: pb})
    assert problems == [
        f"owner {a} claims 2 pfns outside RAM (0..{NR_PAGES - 1}), e.g. {NR_PAGES}, -5"
    ]


def test_checker_finds_reserved_regions_off_the_memory_map(
    machine: Machine, po: PageOwnership
) -> None:
    kernel_pfn = int(po.pages_of(KERNEL)[0])
    usable_pfn = int(po.pages_of(FREE)[0])
    poke(machine, kernel_pfn, FREE)
    poke(machine, usable_pfn, FIRMWARE)
    assert po.check({}) == [
        f"1 pfns of the memory map's kernel regions are not owned by kernel, e.g. {kernel_pfn}",
        f"1 usable pfns are owned by a reserved owner (firmware), e.g. {usable_pfn}",
    ]
