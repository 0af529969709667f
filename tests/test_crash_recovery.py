"""The fault matrix: every step of restore, exec, hibernate and resume killed (SIGKILL) at each
phase boundary, then what a user would do next.

After each kill the first thing tried is the mount (``pkram=victim``): it must either serve
the tree exactly as preserved or fail; it never exits 0 with another tree (an empty one
included). The machine must be in the previous state or the next one, and the interrupted
transition is named in one line by the first command that finds it. Then the documented
recovery (docs/KEXEC-SIM.md, "Interrupted commands") brings the tree back, md5- and
metadata-identical. The ownership checker runs after each case (the mounts fixture).
"""

import errno
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kexec_sim.errors import MachineError
from kexec_sim.machine import Machine
from kexec_sim.machine_dir import TRANSITION_FILE
from kexec_sim.transition import PowerLock, Transition

from .conftest import Mounts
from .util import (
    BIN,
    Snapshot,
    contents,
    ctl_status,
    kexec,
    kexec_sim,
    make_tree,
    preserve,
    run,
    snapshot,
)

NAME = "victim"
KILLED = -9


@dataclass(frozen=True)
class Case:
    """One kill: where, what the first mount after it does, and how the user recovers."""

    fault: str
    """``VARIABLE=value`` for the killed command."""
    first_mount: str
    """``identical``: the mount after the kill serves the tree; else it fails, with this in
    its message (``in use``: the old mount still runs; ``powered off``)."""
    note: str | None
    """What the first command after the kill says it did (``undone``, ``finished``)."""
    generation_step: int
    """The machine's generation after the first command, relative to before the kill."""
    recovery: tuple[str, ...] = ()
    """The commands the user runs next (``exec``, ``hibernate``, ``resume``), in order."""


IN_USE = "is in use by the mount"
OFF = "is powered off"
RESTORE_CASES = {
    f"restore:{step}": Case(f"PKRAMFS_FAULT=restore:{step}", "identical", None, 0)
    for step in ("read", "mounted", "ready", "taken")
}
EXEC_CASES = {
    # Killed before stopping the daemons: the preserved mount still runs, holding its name.
    "exec:stop": Case("KEXEC_SIM_FAULT=exec:stop", IN_USE, "undone", 0, ("exec",)),
    "exec:handover": Case("KEXEC_SIM_FAULT=exec:handover", "identical", "undone", 0),
    **{  # from the scrub on, the exec is finished: the next boot restores the tree
        f"exec:{phase}": Case(f"KEXEC_SIM_FAULT=exec:{phase}", "identical", "finished", 1)
        for phase in ("scrub", "image", "boot", "end")
    },
}
HIBERNATE_CASES = {
    **{  # before its power off scrubs, a hibernate is undone: the mounts stay preserved
        f"hibernate:{phase}": Case(
            f"KEXEC_SIM_FAULT=hibernate:{phase}", IN_USE, "undone", 0, ("hibernate", "resume")
        )
        for phase in ("preserve", "handover", "write", "image-complete", "stop")
    },
    **{
        f"hibernate:{phase}": Case(
            f"KEXEC_SIM_FAULT=hibernate:{phase}", OFF, "finished", 0, ("resume",)
        )
        for phase in ("scrub", "end")
    },
}
RESUME_CASES = {
    **{
        f"resume:{phase}": Case(f"KEXEC_SIM_FAULT=resume:{phase}", OFF, "undone", 0, ("resume",))
        for phase in ("restore", "data")
    },
    **{
        f"resume:{phase}": Case(f"KEXEC_SIM_FAULT=resume:{phase}", "identical", "finished", 1)
        for phase in ("restored", "invalidated", "end")
    },
}


@dataclass
class Scene:
    """The machine, the mounted victim and what its tree must look like."""

    machine: Machine
    mounts: Mounts
    mnt: Path
    image: Path
    expected: tuple[Snapshot, dict[str, str]]

    def command(self, fault: str, *args: str) -> subprocess.CompletedProcess[str]:
        key, value = fault.split("=")
        return run(
            str(BIN / "kexec-sim"), "--machine", str(self.machine.path), *args,
            env={**os.environ, key: value},
        )  # fmt: skip

    def mount(
        self, env: dict[str, str] | None = None
    ) -> tuple[Path, "subprocess.CompletedProcess[str]"]:
        """Mount pkram=victim on a fresh directory; (where, the mount command's result)."""
        mnt = self.mounts.mountpoint()
        self.mounts.track(mnt)
        opts = f"pkram={NAME},machine={self.machine.path}"
        return mnt, run(str(BIN / "pkramfs"), "none", str(mnt), "-o", opts, env=env)

    def assert_identical(self, mnt: Path) -> None:
        metadata = snapshot(mnt)  # before reading the files: reads change atime
        assert (metadata, contents(mnt)) == self.expected


@pytest.fixture
def scene(machine: Machine, mounts: Mounts, work_root: Path) -> Scene:
    mnt = mounts.mount(f"pkram={NAME}")
    make_tree(mnt)
    (mnt / "data").write_bytes(os.urandom(5 << 20))
    image = work_root / f"{machine.path.name}.img"
    data = contents(mnt)
    return Scene(machine, mounts, mnt, image, (snapshot(mnt), data))


def _generation(machine: Machine) -> int:
    return machine.boot_record().generation


def _recover_and_check(scene: Scene, case: Case, before: int) -> None:
    """The first mount after the kill, then the case's recovery, then the final mount."""
    mnt, first = scene.mount()
    if case.first_mount == "identical":
        assert first.returncode == 0, first.stderr
        scene.assert_identical(mnt)
    else:
        assert first.returncode == 32, "a mount succeeded where it must not"
        assert case.first_mount in first.stderr.splitlines()[-1], first.stderr
    if case.note is None:
        assert "interrupted" not in first.stderr
    else:
        assert f"was {case.note}" in first.stderr and case.fault.split("=")[1].split(":")[0] in (
            first.stderr
        ), first.stderr
    assert _generation(scene.machine) == before + case.generation_step
    for step in case.recovery:
        if step == "exec":
            result = kexec_sim(scene.machine, "exec")
        elif step == "hibernate":
            result = kexec_sim(scene.machine, "hibernate", "--image", str(scene.image))
        else:
            result = kexec_sim(scene.machine, "resume", "--image", str(scene.image))
        assert result.returncode == 0, f"{step}: {result.stderr}"
    if case.first_mount != "identical":
        final, result = scene.mount()
        assert result.returncode == 0, result.stderr
        scene.assert_identical(final)
    assert kexec_sim(scene.machine, "check").returncode == 0


@pytest.mark.parametrize("name", sorted(RESTORE_CASES))
def test_a_killed_restore_leaves_the_node(scene: Scene, name: str) -> None:
    case = RESTORE_CASES[name]
    preserve(scene.mnt)
    kexec(scene.machine)
    before = _generation(scene.machine)
    key, value = case.fault.split("=")
    mnt, killed = scene.mount(env={**os.environ, key: value})
    if value in ("restore:read", "restore:mounted"):  # killed before it said it was mounted
        assert killed.returncode == 32 and "died" in killed.stderr, killed.stderr
        assert not os.path.ismount(mnt)  # a daemon that died after mounting: detached
    else:  # mounted, then killed before taking the node: a dead mount, the node intact
        assert killed.returncode == 0, killed.stderr
        _wait_dead(mnt)
        assert run("umount", "-l", str(mnt)).returncode == 0
    _recover_and_check(scene, case, before)


def _wait_dead(mnt: Path) -> None:
    """Wait for the mount at *mnt* to answer ENOTCONN (its daemon gone)."""
    for _ in range(500):
        try:
            os.stat(mnt)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, exc
            return
        time.sleep(0.02)
    raise AssertionError(f"{mnt} still answers")


@pytest.mark.parametrize("name", sorted(EXEC_CASES))
def test_a_killed_exec_is_undone_or_finished(scene: Scene, name: str) -> None:
    case = EXEC_CASES[name]
    preserve(scene.mnt)
    sb = (scene.machine.path / "sys/kernel/pkram").read_text().strip()
    assert kexec_sim(scene.machine, "load", "--append", f"pkram={sb}").returncode == 0
    before = _generation(scene.machine)
    assert scene.command(case.fault, "exec").returncode == KILLED
    _recover_and_check(scene, case, before)


@pytest.mark.parametrize("name", sorted(HIBERNATE_CASES))
def test_a_killed_hibernate_is_undone_or_finished(scene: Scene, name: str) -> None:
    case = HIBERNATE_CASES[name]
    before = _generation(scene.machine)
    killed = scene.command(case.fault, "hibernate", "--image", str(scene.image))
    assert killed.returncode == KILLED, killed.stderr
    _recover_and_check(scene, case, before)


@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_a_killed_resume_is_undone_or_finished(scene: Scene, name: str) -> None:
    case = RESUME_CASES[name]
    hibernated = kexec_sim(scene.machine, "hibernate", "--image", str(scene.image))
    assert hibernated.returncode == 0, hibernated.stderr
    before = _generation(scene.machine)
    killed = scene.command(case.fault, "resume", "--image", str(scene.image))
    assert killed.returncode == KILLED, killed.stderr
    _recover_and_check(scene, case, before)


def _super_block_pfn(machine: Machine) -> int:
    return int((machine.path / "sys/kernel/pkram").read_text())


def _edit_page(machine: Machine, pfn: int, edit: str) -> bytes:
    """Damage page *pfn* (``zero`` it, or ``flip`` byte 20); return what it held."""
    with machine.ram() as ram:
        page = ram.pages[pfn]
        saved = bytes(page)
        if edit == "zero":
            page[:] = 0
        else:
            page[20] ^= 0xFF
    return saved


def _put_page(machine: Machine, pfn: int, data: bytes) -> None:
    with machine.ram() as ram:
        ram.pages[pfn][:] = memoryview(data)


@pytest.mark.parametrize("edit", ["zero", "flip"])
def test_a_mount_never_serves_an_empty_tree_behind_a_bad_super_block(
    scene: Scene, edit: str
) -> None:
    preserve(scene.mnt)
    kexec(scene.machine)
    sb_pfn = _super_block_pfn(scene.machine)
    saved = _edit_page(scene.machine, sb_pfn, edit)
    mnt, refused = scene.mount()
    assert refused.returncode == 32 and not os.path.ismount(mnt)
    assert f"super block (pfn {sb_pfn}" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    checked = kexec_sim(scene.machine, "check")
    assert checked.returncode == 1 and f"super block, pfn {sb_pfn}" in checked.stdout
    listed = run(str(BIN / "pkramfs-ctl"), "nodes", "--machine", str(scene.machine.path))
    assert listed.returncode == 1 and "super block" in listed.stderr
    _put_page(scene.machine, sb_pfn, saved)  # the node was never touched: it restores
    mnt, restored = scene.mount()
    assert restored.returncode == 0, restored.stderr
    scene.assert_identical(mnt)


def test_a_mount_refuses_a_name_beyond_a_broken_node_list(scene: Scene) -> None:
    other = scene.mounts.mount("pkram=other")
    (other / "f").write_bytes(b"other")
    preserve(scene.mnt)
    preserve(other)  # the list is now: other -> victim
    kexec(scene.machine)
    listed = run(str(BIN / "pkramfs-ctl"), "nodes", "--json", "--machine", str(scene.machine.path))
    head = next(n["pfn"] for n in json.loads(listed.stdout)["nodes"] if n["name"] == "other")
    saved = _edit_page(scene.machine, head, "zero")
    mnt, refused = scene.mount()
    assert refused.returncode == 32 and "node list is damaged" in refused.stderr, refused.stderr
    _put_page(scene.machine, head, saved)
    mnt, restored = scene.mount()
    assert restored.returncode == 0, restored.stderr
    scene.assert_identical(mnt)
    scene.mounts.mount("pkram=other")


def test_preserving_a_preserved_mount_again_does_nothing(scene: Scene) -> None:
    preserve(scene.mnt)
    status = ctl_status(scene.mnt)
    preserve(scene.mnt)  # exit 0, checked by preserve()
    helper = run(str(BIN / "pkramfs"), "none", str(scene.mnt), "-o", "remount,preserve,ro")
    assert helper.returncode == 0, helper.stderr  # what mount(8) runs for fuse.pkramfs
    again = ctl_status(scene.mnt)
    assert again["preserved_node"] == status["preserved_node"] and again["read_only"]
    # A read-only mount still takes other remount options (size=), and stays read-only.
    assert run("mount", "-o", "remount,size=64M", str(scene.mnt)).returncode == 0
    assert bool(os.statvfs(scene.mnt).f_flag & os.ST_RDONLY)
    kexec(scene.machine)
    mnt, restored = scene.mount()
    assert restored.returncode == 0, restored.stderr
    scene.assert_identical(mnt)


def test_check_names_a_damaged_super_block_exec_refuses(scene: Scene) -> None:
    sb_pfn = _super_block_pfn(scene.machine)
    saved = _edit_page(scene.machine, sb_pfn, "flip")
    checked = kexec_sim(scene.machine, "check")
    assert checked.returncode == 1, checked.stdout
    assert f"this boot's super block, pfn {sb_pfn}: super block checksum mismatch" in (
        checked.stdout
    )
    ctl_check = run(str(BIN / "pkramfs-ctl"), "check", "--machine", str(scene.machine.path))
    assert ctl_check.returncode == 1 and "checksum mismatch" in ctl_check.stdout
    _put_page(scene.machine, sb_pfn, saved)
    assert kexec_sim(scene.machine, "check").returncode == 0


@pytest.mark.parametrize(
    "fault, note, powered, step",
    [
        ("reboot:stop", "undone", True, 0),
        ("reboot:scrub", "finished", True, 1),
        ("reboot:end", "finished", True, 1),
        ("poweroff:stop", "undone", True, 0),
        ("poweroff:scrub", "finished", False, 0),
        ("poweroff:end", "finished", False, 0),
    ],
)
def test_a_killed_reboot_or_poweroff_is_undone_or_finished(
    scene: Scene, fault: str, note: str, powered: bool, step: int
) -> None:
    before = _generation(scene.machine)
    action = fault.split(":")[0]
    assert scene.command(f"KEXEC_SIM_FAULT={fault}", action).returncode == KILLED
    status = kexec_sim(scene.machine, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert f"an interrupted {action} of generation {before}" in status.stderr
    assert f"was {note}" in status.stderr
    assert (json.loads(status.stdout)["powered"], _generation(scene.machine)) == (
        powered,
        before + step,
    )
    if powered:
        assert kexec_sim(scene.machine, "check").returncode == 0
    else:  # the machine is off for good: it boots afresh
        assert kexec_sim(scene.machine, "boot").returncode == 0


def test_an_exec_handing_nothing_over_killed_after_its_scrub_is_finished(scene: Scene) -> None:
    """Nothing handed over: the scrub takes the super block too; the exec must still end in
    a healthy next boot (not a machine every command refuses)."""
    preserve(scene.mnt)
    assert kexec_sim(scene.machine, "load").returncode == 0  # no pkram=: nothing handed over
    before = _generation(scene.machine)
    assert scene.command("KEXEC_SIM_FAULT=exec:image", "exec").returncode == KILLED
    checked = kexec_sim(scene.machine, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "was finished" in checked.stderr and _generation(scene.machine) == before + 1
    mnt, fresh = scene.mount()
    assert fresh.returncode == 0 and list(mnt.iterdir()) == []  # preserved, not handed over


def test_an_undone_hibernate_leaves_the_next_increment_whole(scene: Scene) -> None:
    """Pages written after an image count as changed until an image really replaces RAM:
    an increment after a hibernate that was undone must still carry them."""
    base = scene.image
    assert kexec_sim(scene.machine, "hibernate", "--image", str(base)).returncode == 0
    assert kexec_sim(scene.machine, "resume", "--image", str(base)).returncode == 0
    mnt, result = scene.mount()
    assert result.returncode == 0, result.stderr
    with open(mnt / "data", "r+b") as f:  # rewritten in place: the same pages, new bytes
        f.write(os.urandom(1 << 20))
    expected = contents(mnt)
    undone = base.with_name("undone.img")
    killed = scene.command(
        "KEXEC_SIM_FAULT=hibernate:image-complete", "hibernate", "--image", str(undone)
    )
    assert killed.returncode == KILLED
    increment = base.with_name("increment.img")
    made = kexec_sim(
        scene.machine, "hibernate", "--image", str(increment), "--incremental", "--base", str(base)
    )
    assert made.returncode == 0, made.stderr
    assert "was undone" in made.stderr
    resumed = kexec_sim(scene.machine, "resume", "--image", str(base), "--image", str(increment))
    assert resumed.returncode == 0, resumed.stderr
    mnt, result = scene.mount()
    assert result.returncode == 0, result.stderr
    assert contents(mnt) == expected


def test_writes_after_an_interrupted_hibernate_are_kept(scene: Scene) -> None:
    """Killed with its image complete, a hibernate is undone by the next command (the image
    invalidated): a mount made writable again keeps what is written to it."""
    killed = scene.command(
        "KEXEC_SIM_FAULT=hibernate:image-complete", "hibernate", "--image", str(scene.image)
    )
    assert killed.returncode == KILLED
    made_rw = run("mount", "-o", "remount,rw", str(scene.mnt))
    assert made_rw.returncode == 0, made_rw.stderr
    (scene.mnt / "after").write_bytes(b"written after the interrupted hibernate")
    listed = run(str(BIN / "pkramfs-ctl"), "nodes", "--machine", str(scene.machine.path))
    assert listed.returncode == 0 and "interrupted" not in listed.stderr
    resumed = kexec_sim(scene.machine, "resume", "--image", str(scene.image))
    assert resumed.returncode != 0  # the machine runs on; its image was invalidated
    assert (scene.mnt / "after").read_bytes() == b"written after the interrupted hibernate"
    assert kexec_sim(scene.machine, "check").returncode == 0


def test_nothing_registers_or_moves_a_node_while_a_transition_runs(scene: Scene) -> None:
    """A mount or a preserve that slipped in between an exec's decisions and its work would
    lose its tree: while a transition is recorded and its process runs, both are refused."""
    lock = PowerLock(scene.machine.path)
    assert lock.try_acquire()
    transition = Transition(scene.machine.path, "exec", _generation(scene.machine), lock)
    transition.record("stop")  # this process stands for a running exec
    try:
        _, refused = scene.mount()
        assert refused.returncode == 32 and "exec of generation" in refused.stderr
        preserving = run("mount", "-o", "remount,preserve,ro", str(scene.mnt))
        assert preserving.returncode != 0 and "going through exec" in preserving.stderr
        assert ctl_status(scene.mnt)["preserved_node"] is None
    finally:
        transition.end()
    preserve(scene.mnt)


def test_a_committed_transition_never_records_an_undoable_phase(machine: Machine) -> None:
    lock = PowerLock(machine.path)
    assert lock.try_acquire()
    transition = Transition(machine.path, "poweroff", 1, lock)
    try:
        transition.record("stop")
        transition.record("scrub")
        with pytest.raises(MachineError, match="after committed"):
            transition.record("stop")
    finally:
        transition.end()


@pytest.mark.parametrize(
    "facts",
    [
        {"scrub": "shred", "cmdline": ""},  # not a scrub mode
        {"scrub": "poison", "cmdline": "", "kernel_image": [0, 1 << 40]},  # outside RAM
    ],
)
def test_a_record_that_cannot_be_trusted_has_a_way_out(
    machine: Machine, facts: dict[str, object]
) -> None:
    """Read back from disk, a record is checked before it is acted on; a recovery that
    fails names the way out, and that way out works."""
    record = {
        "format": 1,
        "action": "reboot",
        "phase": "scrub",
        "generation": _generation(machine),
        "pid": 1 << 22,  # no such process: interrupted
        "pid_start_time": 1,
        "started_ns": 0,
        "facts": facts,
    }
    (machine.path / TRANSITION_FILE).write_text(json.dumps(record))
    failed = kexec_sim(machine, "status")
    assert failed.returncode == 1 and "kexec-sim reboot --force" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1
    forced = kexec_sim(machine, "reboot", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "discarded, not recovered" in forced.stderr
    assert kexec_sim(machine, "check").returncode == 0


def test_init_force_never_wipes_a_machine_mid_transition(machine: Machine) -> None:
    lock = PowerLock(machine.path)
    assert lock.try_acquire()  # this process stands for a running exec
    try:
        refused = kexec_sim(machine, "init", "--force", "--ram", "64M")
        assert refused.returncode == 1 and "is busy" in refused.stderr, refused.stderr
        assert machine.boot_record().generation == 1 and machine.ram_bytes != 64 << 20
    finally:
        lock.release()
    assert kexec_sim(machine, "init", "--force", "--ram", "64M").returncode == 0
