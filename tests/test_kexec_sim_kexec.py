"""kexec-sim load / exec / reboot / poweroff / boot through the command line.

The end-to-end handover runs the real ``kexec-sim`` in subprocesses; error paths call the CLI's
``main`` in-process (same code, no interpreter start-up). Machines are 64 MiB: FIRMWARE 0-1 MiB,
usable 1-16 MiB, KERNEL 16-48 MiB (the preferred load address), NOSAVE 48-49 MiB, usable
49-64 MiB; the first boot's super block is pfn 256.
"""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kexec_sim import FIRMWARE, FREE, HANDOVER, KERNEL, PRESERVED, Machine, MachineError
from kexec_sim.cli import main
from kexec_sim.geometry import HUGE_PAGES, PAGE_SIZE
from kexec_sim.kernel_image import IMAGE_MAGIC
from kexec_sim.pages import PfnArray
from kexec_sim.scrub import POISON_BYTE
from kexec_sim.super_block import SuperBlock, read_super_block

from .conftest import Mounts
from .util import ctl_status, kexec_sim

NR_PAGES = 16384
SB_PFN = 256
KERNEL_PFN = 16 * 256  # the preferred load address, 16 MiB
DEFAULT_IMAGE_PAGES = 4096  # 16 MiB
MIB = 256  # pages
TIMEOUT_S = 60

CliResult = tuple[int, str, str]


@pytest.fixture
def cli(small_machine: Machine, capsys: pytest.CaptureFixture[str]) -> "Cli":
    return Cli(small_machine, capsys)


class Cli:
    """``kexec-sim --machine M ...`` in this process; returns (exit code, stdout, stderr)."""

    def __init__(self, machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
        self.machine = machine
        self.capsys = capsys

    def __call__(self, *argv: str) -> CliResult:
        code = main(["--machine", str(self.machine.path), *argv])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def error(self, code: int, *argv: str) -> str:
        got, out, err = self(*argv)
        assert got == code, (got, out, err)
        assert err.startswith("kexec-sim: error: ") and err.count("\n") == 1, err
        return err


def kexec_sim_poison(machine: Machine, *argv: str) -> subprocess.CompletedProcess[str]:
    """The real ``kexec-sim`` in a subprocess, scrubbing with poison."""
    return kexec_sim(machine, *argv, env={**os.environ, "KEXEC_SIM_SCRUB": "poison"})


@pytest.fixture
def children() -> Iterator[list["subprocess.Popen[str]"]]:
    """Processes a test starts (to register as owners); killed and reaped at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        child.kill()
        child.wait(TIMEOUT_S)
        if child.stdout is not None:
            child.stdout.close()


def sleeper(children: list["subprocess.Popen[str]"], ignore_term: bool = False) -> int:
    """Start a process that sleeps; return its pid (once it ignores SIGTERM, if asked)."""
    if not ignore_term:
        children.append(subprocess.Popen(["sleep", "1000"], text=True))
        return children[-1].pid
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(1000)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    children.append(child)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child.pid


def preserve(machine: Machine, pid: int, pfns: PfnArray | None = None, n: int = 0) -> PfnArray:
    """Give *pid* an owner holding pages, fill them with a known pattern, make them PRESERVED."""
    with machine.page_ownership() as po, machine.ram() as ram:
        owner = po.register_owner(f"keeper-{pid}", pid)
        if pfns is None:
            pfns = po.allocate(owner, n)
        else:
            po.transfer(pfns, FREE, owner)
        ram.pages[pfns] = pattern(pfns)
        po.transfer(pfns, owner, PRESERVED)
    return pfns


def pattern(pfns: PfnArray) -> np.ndarray:
    """A page content unique to each pfn."""
    return ((pfns[:, None] * 7 + np.arange(PAGE_SIZE)) % 251).astype(np.uint8)


def owner_map(machine: Machine) -> np.ndarray:
    with machine.page_ownership() as po, po.locked():
        return po.owner_map.copy()


def sys_pkram(machine: Machine) -> int:
    return int((machine.path / "sys/kernel/pkram").read_text())


# -- the handover, end to end ---------------------------------------------------------------


def test_exec_hands_over_preserved_pages_intact(
    small_machine: Machine, children: list["subprocess.Popen[str]"], work_root: Path
) -> None:
    daemon = sleeper(children)
    kept = preserve(small_machine, sleeper(children), n=300)
    with small_machine.page_ownership() as po:  # a mount's pages that are not preserved: lost
        owner = po.register_owner("pkramfs:x", daemon, mountpoint=str(work_root / "unmounted"))
        lost = po.allocate(owner, 100)
    loaded = kexec_sim_poison(
        small_machine, "load", "--append", f"quiet pkram={sys_pkram(small_machine)}"
    )
    assert loaded.returncode == 0 and loaded.stderr == "", loaded.stderr
    assert f"at {KERNEL_PFN * PAGE_SIZE:#x}" in loaded.stdout
    done = kexec_sim_poison(small_machine, "exec", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"kexec-sim: warning: {work_root / 'unmounted'} (owner 2): 100 pages not preserved, lost\n"
    )
    report = json.loads(done.stdout)
    assert (report["generation"], report["cmdline"], report["scrub"]) == (
        2,
        "quiet pkram=256",
        "poison",
    )
    assert report["preserved_pages"] == 300 and report["table_pages"] >= 2
    assert sorted(s["how"] for s in report["stopped"]) == ["term", "term"]
    assert set(report["durations_s"]) == {"stop", "table", "scrub", "image", "boot"}
    assert [child.wait(TIMEOUT_S) for child in children] == [-signal.SIGTERM] * 2

    owners = owner_map(small_machine)
    assert np.array_equal(np.flatnonzero(owners == PRESERVED), np.sort(kept))
    assert np.flatnonzero(owners == HANDOVER).tolist() == [SB_PFN] == [sys_pkram(small_machine)]
    image = np.arange(KERNEL_PFN, KERNEL_PFN + DEFAULT_IMAGE_PAGES)
    with small_machine.ram() as ram:
        pages = ram.pages
        assert np.array_equal(pages[kept], pattern(kept))  # the preserved data, intact
        assert read_super_block(ram, SB_PFN) == SuperBlock(2, NR_PAGES, 0, 0)
        header = pages[KERNEL_PFN, :100].tobytes()
        assert header.startswith(IMAGE_MAGIC + b"generation 2\ncmdline quiet pkram=256\n")
        assert (pages[KERNEL_PFN + 5].view("<u8") == 5).all()  # the image's filler
        # Every other page but firmware is poison (the lost ones too), except the consumed
        # table's pages (allocated at exec, maybe where the stopped daemon's pages were).
        other = np.ones(NR_PAGES, dtype=bool)
        other[kept] = other[image] = other[SB_PFN] = False
        other[owners == FIRMWARE] = False
        unpoisoned = np.flatnonzero(other)[~(pages[other] == POISON_BYTE).all(axis=1)]
    assert unpoisoned.size == report["table_pages"]
    assert np.setdiff1d(lost, unpoisoned).size >= lost.size - unpoisoned.size
    assert (owners[unpoisoned] == FREE).all()
    assert (owners[image] == KERNEL).all()
    with small_machine.page_ownership() as po:
        assert po.owners() == {} and po.check({}, small_machine.boot_record()) == []
    assert small_machine.boot_record().kernel_image == (
        KERNEL_PFN,
        KERNEL_PFN + DEFAULT_IMAGE_PAGES,
    )
    assert "reserved 300 preserved pages" in (small_machine.path / "logs/boot-2.log").read_text()
    assert not (small_machine.boot_dir / "kexec-load.json").exists()


def test_handover_twice_keeps_the_same_pages(
    small_machine: Machine,
    cli: Cli,
    children: list["subprocess.Popen[str]"],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEXEC_SIM_SCRUB", "poison")
    kept = preserve(small_machine, sleeper(children), n=50)
    for generation in (2, 3):
        cli.ok("load", "--reuse-cmdline", "--append", f"pkram={sys_pkram(small_machine)}")
        assert "scrubbed" in cli.ok("exec")
        assert small_machine.cmdline == "pkram=256"  # --reuse-cmdline dropped the old pkram=
        assert small_machine.generation == generation
    assert np.array_equal(np.flatnonzero(owner_map(small_machine) == PRESERVED), np.sort(kept))
    with small_machine.ram() as ram:
        assert np.array_equal(ram.pages[kept], pattern(kept))


def test_without_pkram_preserved_pages_are_scrubbed_with_a_warning(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    kept = preserve(small_machine, sleeper(children), n=40)
    code, _, err = cli("load")
    assert code == 0 and "40 pages are preserved but the command line has no pkram=" in err
    code, out, err = cli("exec", "--scrub", "poison")
    assert code == 0
    assert "kexec-sim: warning: 40 preserved pages are not handed over (no pkram= on the " in err
    assert "handed over: 0 preserved pages" in out
    assert not (owner_map(small_machine) == PRESERVED).any()
    with small_machine.ram() as ram:
        assert (ram.pages[kept] == POISON_BYTE).all()


def test_punch_scrub_gives_memory_back(small_machine: Machine, cli: Cli) -> None:
    with small_machine.ram() as ram:
        ram.fill(np.arange(300, 2000), 0x11)
    cli.ok("load")
    scrubbed = 16128 - DEFAULT_IMAGE_PAGES  # all but firmware; the image's range is overwritten
    assert f"scrubbed:    {scrubbed} pages (punch)" in cli.ok("exec", "--scrub", "punch")
    # What the host still holds: the image (16 MiB) and the new super block, nothing else.
    assert (small_machine.path / "RAM").stat().st_blocks * 512 == (
        DEFAULT_IMAGE_PAGES + 1
    ) * PAGE_SIZE
    with small_machine.ram() as ram:
        assert not ram.pages[300:2000].any()


# -- refusals -------------------------------------------------------------------------------


def test_exec_without_load(cli: Cli) -> None:
    err = cli.error(1, "exec")
    assert "nothing loaded: run kexec-sim load first" in err


def test_a_mismatching_pkram_is_refused_unless_forced(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    preserve(small_machine, sleeper(children), n=10)
    code, _, err = cli("load", "--append", "pkram=300")
    assert code == 0 and "pkram=300 is not this boot's super block (pfn 256" in err
    err = cli.error(2, "exec")
    assert "pkram=300 is not this boot's super block (pfn 256" in err and "--force" in err
    assert small_machine.generation == 1 and children[0].poll() is None  # nothing happened
    code, _, err = cli("exec", "--force", "--scrub", "poison")
    assert code == 0
    assert "10 preserved pages are not handed over (pkram=300 is not this boot's" in err
    assert "pkram=300: no super block there" in err and "preserved memory not reserved" in err
    owners = owner_map(small_machine)
    assert not (owners == PRESERVED).any() and np.count_nonzero(owners == HANDOVER) == 1
    with small_machine.page_ownership() as po:
        assert po.check({}, small_machine.boot_record()) == []


def test_a_damaged_super_block_is_refused_unless_forced(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    preserve(small_machine, sleeper(children), n=10)
    with small_machine.ram() as ram:
        ram.buffer[SB_PFN * PAGE_SIZE + 100] = 1
    cli.ok("load", "--append", "pkram=256")
    err = cli.error(1, "exec")
    assert "super block is damaged" in err and "checksum" in err
    assert small_machine.generation == 1 and children[0].poll() is None
    code, _, err = cli("exec", "--force", "--stop-timeout", "2")
    assert code == 0 and "the super block is damaged" in err
    assert "pkram=256: no super block there" in err  # scrubbed: the next boot finds nothing
    assert small_machine.generation == 2 and not (owner_map(small_machine) == PRESERVED).any()


def test_preserved_pages_in_the_loaded_range_stop_exec(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    cli.ok("load", "--addr", hex(2 << 20), "--image-size", "1M", "--append", "pkram=256")
    preserve(small_machine, sleeper(children), pfns=np.array([2 * MIB + 10]))
    err = cli.error(1, "exec")
    assert f"preserved pfn {2 * MIB + 10} (1 preserved pages) lies in the loaded image" in err
    assert small_machine.generation == 1


# -- where the image goes -------------------------------------------------------------------


def test_load_prefers_the_kernel_region_then_the_lowest_clean_range(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    assert f"at {KERNEL_PFN * PAGE_SIZE:#x}" in cli.ok("load", "--image-size", "40M")
    preserve(small_machine, sleeper(children), pfns=np.array([50 * MIB]))  # inside 16 + 40 MiB
    out = cli.ok("load", "--image-size", "40M")
    assert f"at {2 << 20:#x}, pfns {2 * MIB}..{2 * MIB + 40 * MIB - 1}" in out
    status = json.loads(cli.ok("status", "--json"))
    assert status["loaded"]["address"] == 2 << 20
    assert status["loaded"]["nr_pages"] == 40 * MIB and not status["loaded"]["kaslr"]
    assert "no 2 MiB-aligned range" in cli.error(1, "load", "--image-size", "60M")


def test_load_addr_over_preserved_or_firmware_pages_is_refused(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    preserve(small_machine, sleeper(children), pfns=np.array([3 * MIB + 7]))
    err = cli.error(2, "load", "--addr", hex(3 << 20))
    assert f"overlap 1 preserved pages, the first at pfn {3 * MIB + 7} (preserved)" in err
    err = cli.error(2, "load", "--addr", str(SB_PFN * PAGE_SIZE), "--image-size", "8K")
    assert f"pfn {SB_PFN} (handover)" in err
    assert "pfn 0 (firmware)" in cli.error(2, "load", "--addr", "0", "--image-size", "4K")
    assert "beyond RAM" in cli.error(2, "load", "--addr", hex(60 << 20))
    assert "multiple of the page size" in cli.error(2, "load", "--addr", "0x1001")
    assert "not an address" in cli.error(2, "load", "--addr", "16M")
    assert cli.ok("load", "--addr", hex(4 << 20), "--image-size", "4M").startswith(
        f"loaded 1024 pages (4.0 MiB) at {4 << 20:#x}"
    )


def test_kaslr_avoids_preserved_pages(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    # One preserved page in every 2 MiB range of usable RAM but the one at 10 MiB.
    ranges = [r for r in range(1, 32) if not 8 <= r <= 24 and r != 5]
    preserved = preserve(
        small_machine, sleeper(children), pfns=np.array([r * HUGE_PAGES + 3 for r in ranges])
    )
    starts = set()
    for _ in range(12):
        cli.ok("load", "--kaslr", "--image-size", "2M")
        status = json.loads(cli.ok("status", "--json"))["loaded"]
        start = status["start_pfn"]
        assert status["kaslr"] and start % HUGE_PAGES == 0
        assert not ((preserved >= start) & (preserved < start + HUGE_PAGES)).any()
        assert start != 0  # firmware
        starts.add(start)
    assert len(starts) > 1  # random: 18 clean ranges to choose from (KERNEL, NOSAVE, 10 MiB)


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--kaslr", "--addr", "0x200000"], "not allowed with argument"),
        (["--reuse-cmdline", "--command-line", "x"], "not allowed with argument"),
        (["--append", "a\nb"], "one line of at most 4096 bytes"),
        (["--append", "x" * 4097], "one line of at most 4096 bytes"),
        (["--append", "pkram=abc"], "pkram=abc: not a pfn"),
        (["--append", "pkram=0"], "not a page of this RAM"),
        (["--append", "pkram=1 pkram=2"], "given 2 times"),
        (["--image-size", "lots"], "--image-size: not a size"),
        (["--image-size", "0"], "image size 0 bytes"),
        (["/nonexistent/vmlinuz"], "No such file"),
    ],
)
def test_load_usage_errors(cli: Cli, argv: list[str], text: str) -> None:
    assert text in cli.error(2, "load", *argv)


def test_load_a_kernel_file(small_machine: Machine, cli: Cli, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    data = os.urandom(10_000)
    kernel.write_bytes(data)
    assert "not allowed with a KERNEL file" in cli.error(
        2, "load", str(kernel), "--image-size", "1M"
    )
    out = cli.ok("load", str(kernel), "--command-line", "root=/dev/x", "--append", "quiet")
    assert "loaded 3 pages (9.8 KiB)" in out and "'root=/dev/x quiet'" in out
    kernel.write_bytes(b"changed after load")  # kexec -l copies the kernel at load time
    cli.ok("exec")
    with small_machine.ram() as ram:
        assert ram.buffer[KERNEL_PFN * PAGE_SIZE : KERNEL_PFN * PAGE_SIZE + 10_000] == data
    assert small_machine.cmdline == "root=/dev/x quiet"
    assert small_machine.boot_record().kernel_image == (KERNEL_PFN, KERNEL_PFN + 3)


def test_a_kernel_file_leaves_nothing_of_the_old_boot_in_its_last_page(
    small_machine: Machine, cli: Cli, tmp_path: Path
) -> None:
    """exec does not scrub the image's range before writing the image over it: the bytes
    after a kernel file's end, in its last page, are zeroed, not what the old boot had."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"K" * (PAGE_SIZE + 100))
    cli.ok("load", str(kernel))
    with small_machine.ram() as ram:
        ram.fill(np.arange(KERNEL_PFN, KERNEL_PFN + 3), 0x11)
    cli.ok("exec", "--scrub", "poison")
    with small_machine.ram() as ram:
        last = bytes(ram.pages[KERNEL_PFN + 1])
        after = bytes(ram.pages[KERNEL_PFN + 2])
    assert last == b"K" * 100 + bytes(PAGE_SIZE - 100)
    assert after == bytes([POISON_BYTE]) * PAGE_SIZE


def test_unload(cli: Cli) -> None:
    assert cli.ok("unload") == "nothing was loaded\n"
    cli.ok("load")
    assert cli.ok("unload") == "unloaded\n"
    cli.error(1, "exec")


# -- stopping the current boot's processes --------------------------------------------------


def test_exec_stops_daemons_with_sigterm_then_sigkill(
    small_machine: Machine, children: list["subprocess.Popen[str]"]
) -> None:
    polite, stubborn = sleeper(children), sleeper(children, ignore_term=True)
    with small_machine.page_ownership() as po:
        po.register_owner("polite", polite)
        po.allocate(po.register_owner("stubborn", stubborn), 10)
    assert kexec_sim_poison(small_machine, "load").returncode == 0
    done = kexec_sim_poison(small_machine, "exec", "--stop-timeout", "0.3")
    assert done.returncode == 0, done.stderr
    assert "stubborn (owner 2): 10 pages not preserved, lost" in done.stderr
    assert (
        "stopped:     2 processes (0 gone once unmounted, 1 by SIGTERM, 1 by SIGKILL)"
        in done.stdout
    )
    assert [child.wait(TIMEOUT_S) for child in children] == [-signal.SIGTERM, -signal.SIGKILL]


def test_a_process_the_host_kernel_is_tearing_down_counts_as_stopped(
    small_machine: Machine, mounts: Mounts, children: list["subprocess.Popen[str]"]
) -> None:
    """A process whose every thread is exiting runs nothing of its own again: exec goes on
    (reporting it stopped by SIGTERM) without waiting for the host to finish its exit. Here
    the exit cannot finish: the process's last close of a file on a FUSE mount waits for a
    daemon that is stopped (SIGSTOP), and SIGKILL does nothing to an exiting process."""
    other = mounts.mount()  # on another machine: this exec does not stop its daemon
    code = (
        "import sys, time; f = open(sys.argv[1], 'w'); print('ready', flush=True); time.sleep(1000)"
    )
    children.append(
        subprocess.Popen(
            [sys.executable, "-c", code, str(other / "held")], stdout=subprocess.PIPE, text=True
        )
    )
    child = children[-1]
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    with small_machine.page_ownership() as po:
        po.register_owner("exiting", child.pid)
    daemon = ctl_status(other)["pid"]
    assert kexec_sim_poison(small_machine, "load").returncode == 0
    os.kill(daemon, signal.SIGSTOP)
    try:
        done = kexec_sim_poison(small_machine, "exec", "--stop-timeout", "0.3", "--json")
        exited = child.poll()  # not before the stopped daemon answers its close
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    assert exited is None
    assert [s["how"] for s in json.loads(done.stdout)["stopped"]] == ["term"]
    assert "survived SIGKILL" not in done.stderr
    assert child.wait(TIMEOUT_S) == -signal.SIGTERM  # its exit ends once the daemon answers


# -- reboot, power off, boot ----------------------------------------------------------------


def test_reboot_scrubs_everything_and_drops_pkram(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    kept = preserve(small_machine, sleeper(children), n=20)
    cli.ok("load", "--append", "quiet pkram=256")
    cli.ok("exec", "--scrub", "poison")
    assert small_machine.cmdline == "quiet pkram=256"
    code, out, err = cli("reboot", "--scrub", "poison")
    assert code == 0 and "20 preserved pages are scrubbed (a reboot hands over nothing)" in err
    assert "reboot: generation 3 booted, command line 'quiet'" in out
    assert small_machine.cmdline == "quiet" and not (owner_map(small_machine) == PRESERVED).any()
    with small_machine.ram() as ram:
        assert (ram.pages[kept] == POISON_BYTE).all()
        assert ram.pages[KERNEL_PFN].tobytes().startswith(IMAGE_MAGIC + b"generation 3\n")


def test_poweroff_and_boot(
    small_machine: Machine, cli: Cli, children: list["subprocess.Popen[str]"]
) -> None:
    kept = preserve(small_machine, sleeper(children), n=20)
    cli.ok("load", "--append", "pkram=256")
    code, out, err = cli("poweroff")
    assert code == 0 and "20 preserved pages are lost (power off)" in err
    assert "poweroff: generation 1 is off, RAM lost" in out
    assert children[0].wait(TIMEOUT_S) == -signal.SIGTERM
    assert (small_machine.path / "RAM").stat().st_blocks == 0
    status = json.loads(cli.ok("status", "--json"))
    assert (status["powered"], status["pages"], status["loaded"]) == (False, None, None)
    assert "powered:     off (run 'kexec-sim boot')" in cli.ok("status")
    for argv in (["exec"], ["load"], ["reboot"], ["poweroff"], ["check"], ["unload"]):
        assert "is powered off: run 'kexec-sim boot'" in cli.error(1, *argv)
    with pytest.raises(MachineError, match="powered off"):
        small_machine.page_ownership()
    assert "boot: generation 2 booted, command line ''" in cli.ok("boot")
    assert "is running already" in cli.error(1, "boot")
    status = json.loads(cli.ok("status", "--json"))
    assert status["powered"] and status["pages"]["preserved"] == 0
    assert status["super_block_pfn"] == SB_PFN
    with small_machine.ram() as ram:
        assert not ram.pages[kept].any()
        assert ram.pages[KERNEL_PFN].tobytes().startswith(IMAGE_MAGIC)


def test_scrub_mode_from_the_environment(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.ok("load")
    monkeypatch.setenv("KEXEC_SIM_SCRUB", "bleach")
    assert "$KEXEC_SIM_SCRUB='bleach'" in cli.error(2, "exec")
    assert "invalid choice: 'bleach'" in cli.error(2, "exec", "--scrub", "bleach")
    assert "--stop-timeout" in cli.error(2, "exec", "--scrub", "punch", "--stop-timeout", "-1")


def test_a_boot_record_without_a_super_block(small_machine: Machine, cli: Cli) -> None:
    boot_file = small_machine.path / "boot.json"
    record = json.loads(boot_file.read_text())
    del record["super_block_pfn"]  # a machine booted by an older kexec-sim
    boot_file.write_text(json.dumps(record))
    (small_machine.path / "sys/kernel/pkram").unlink()
    status = json.loads(cli.ok("status", "--json"))
    assert status["super_block_pfn"] is None and "no super block" in status["super_block_error"]
    assert "'kexec-sim reboot' makes one" in cli.ok("status")
    cli.ok("load")
    assert "boot.json: no super block" in cli.error(1, "exec")
    cli.ok("reboot")
    assert json.loads(cli.ok("status", "--json"))["super_block_pfn"] == SB_PFN
    assert (small_machine.path / "sys/kernel/pkram").read_text() == f"{SB_PFN}\n"


def test_the_super_block_export_is_only_an_export(small_machine: Machine, cli: Cli) -> None:
    (small_machine.path / "sys/kernel/pkram").write_text("7\n")  # what a user may scribble
    assert json.loads(cli.ok("status", "--json"))["super_block_pfn"] == SB_PFN
    assert cli.ok("check").endswith("0 problems\n")
