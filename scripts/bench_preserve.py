"""The handover benchmark behind scripts/bench-preserve: the cost of a cycle, against the goals.

Cases: one file of each size (4 KiB pages, and huge=always) and a tree of many small files.
Each run of a case mounts a fresh pkramfs (``pkram=bench``) on a private machine, fills it,
then runs one timed cycle (scripts/cycle_timing.py): ``kexec-sim load`` (before the blackout,
the designed order), then the blackout, which is exactly

  ``mount -o remount,preserve,ro`` (the helper's start-up, the daemon's preserve, the kernel's
  ro flag) + ``kexec-sim exec`` (its start-up; stop, table, scrub, image, boot) + the
  restoring mount ``pkramfs none MNT -o pkram=bench`` (its start-up, the daemon's start-up,
  restore and mount) + reading the first byte of a file,

the wall times of those commands run back to back. Not in it: load, filling, the checks.
Every restored file case is verified (md5 of a sample), the small-files tree by one file.

Every case runs ``--repeat`` times (default 3) and every figure is printed as the median and
the range (min-max) of the runs, never the best alone: the preserve and restore the daemons
report (per GiB beside PKRAM's published figures), each command of the blackout with the work
inside it, the daemon's memory per small file (growth of its anonymous RSS while filling),
the start-up of each program alone, and the table of the goals (tracker issue #11) against the
medians. A noisy machine (shared cores) widens the ranges: rerun before concluding.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cycle_timing import (
    EXEC_PHASES,
    PHASES,
    Cycle,
    Mount,
    rss_anon_bytes,
    run_cycle,
    sh,
    startup_ms,
    summary,
)

from pkramfs import control

GIB = 1 << 30
MIB = 1 << 20
NAME = "bench"
# PKRAM's published figures (the PKRAM RFC patch series by Anthony Yznaga, Oracle, as quoted in
# the tracker's issue #3 and DESIGN.md section 6): one 100 GB tmpfs file, 16 CPUs, optimized:
# save 232-311 ms / load 516-518 ms with 4 KiB pages, 13-22 ms / 101-105 ms with huge pages.
PKRAM_MS_PER_GIB = {
    "4k": {"save": (2.32, 3.11), "restore": (5.16, 5.18)},
    "huge": {"save": (0.13, 0.22), "restore": (1.01, 1.05)},
}
GOAL_MS_PER_GIB = {"4k": (2.3, 5.2), "huge": (0.22, 1.05)}
"""Issue #11's per-GiB goals (preserve, restore), from PKRAM's figures."""


@dataclass
class Run:
    """One run of a case: its cycle and what the case put in the mount."""

    cycle: Cycle
    data_bytes: int
    files: int
    rss_growth_bytes: int
    verified: bool

    @property
    def entries(self) -> int:
        return int(self.cycle.preserved[NAME]["entries"])

    @property
    def preserve_ms(self) -> float:
        return self.cycle.preserve_ms(NAME)

    @property
    def restore_ms(self) -> float:
        return self.cycle.restore_ms(NAME)

    def per_gib(self, ms: float) -> float:
        return ms / (self.data_bytes / GIB)


@dataclass
class Case:
    name: str
    kind: str  # "4k" or "huge"
    options: str
    size_bytes: int  # one file of this size, or 0
    small_files: int  # or this many small files
    runs: list[Run]


def sample_md5(path: Path, size: int) -> str:
    """md5 of 64 KiB at 64 evenly spread offsets (whole-file md5 of 8 GiB would dominate)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for i in range(64):
            f.seek(size * i // 64)
            digest.update(f.read(64 * 1024))
    return digest.hexdigest()


def fill_file(path: Path, size: int) -> None:
    block = bytearray(os.urandom(MIB))
    with open(path, "wb", buffering=0) as f:
        for i in range(size // MIB):
            block[:8] = i.to_bytes(8, "little")  # every MiB different
            f.write(block)


def fill_small_files(root: Path, count: int) -> int:
    """*count* files of 100 to 3099 bytes, 1000 a directory; return their total size."""
    payload = os.urandom(4096)
    for d in range(count // 1000 + 1):
        (root / f"d{d}").mkdir()
    total = 0
    for i in range(count):
        with open(root / f"d{i // 1000}" / f"f{i}", "wb", buffering=0) as f:
            total += f.write(payload[: 100 + i % 3000])
    return total


def one_run(machine: Path, mnt: Path, case: Case, env: dict[str, str]) -> Run:
    sh("pkramfs", "none", str(mnt), "-o", f"pkram={NAME},{case.options},machine={machine}", env=env)
    pid = int(control.query_status(str(mnt))["pid"])
    rss_before = rss_anon_bytes(pid)
    if case.small_files:
        data_bytes = fill_small_files(mnt, case.small_files)
        check, check_size = mnt / "d7" / "f7000", 100 + 7000 % 3000
        if case.small_files <= 7000:
            check, check_size = mnt / "d0" / "f0", 100
    else:
        fill_file(mnt / "file", case.size_bytes)
        data_bytes = case.size_bytes
        check, check_size = mnt / "file", case.size_bytes
    rss_growth = rss_anon_bytes(pid) - rss_before
    expected = sample_md5(check, check_size)
    cycle = run_cycle(machine, [Mount(NAME, mnt, check)], env)
    verified = sample_md5(check, check_size) == expected
    sh("umount", str(mnt), env=env)
    time.sleep(0.3)  # the daemon gives its pages back as it exits
    return Run(cycle, data_bytes, max(1, case.small_files), rss_growth, verified)


def report(case: Case, run: Run, index: int, repeat: int) -> None:
    def phases(times: dict[str, float]) -> str:
        return ", ".join(f"{name} {ms:.1f}" for name, ms in times.items())

    cycle = run.cycle
    print(
        f"  {case.name} run {index}/{repeat}: blackout {cycle.blackout_ms:.0f} ms; preserve "
        f"{run.preserve_ms:.1f} ms ({phases(cycle.preserved[NAME].get('phases_ms', {}))}), "
        f"restore {run.restore_ms:.1f} ms ({phases(cycle.restored[NAME].get('phases_ms', {}))})"
        f"{'' if run.verified else '; restored data DIFFERENT'}",
        flush=True,
    )


def print_cases(cases: list[Case]) -> None:
    print()
    print(
        "Preserve and restore: the daemon's own time, ms, median (min-max) of the runs; per GiB "
        "beside PKRAM's published per-GiB figures"
    )
    header = (
        f"{'case':<24} {'entries':>8} {'preserve':>18} {'ms/GiB':>18} {'PKRAM':>10} "
        f"{'restore':>18} {'ms/GiB':>18} {'PKRAM':>10} {'blackout':>18} {'ok':>5}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        runs = case.runs
        ref = PKRAM_MS_PER_GIB[case.kind]
        if case.small_files:
            save_per_gib = restore_per_gib_ = ref_save = ref_restore = "-"
        else:
            save_per_gib = summary([preserve_per_gib(r) for r in runs], 2)
            restore_per_gib_ = summary([restore_per_gib(r) for r in runs], 2)
            ref_save = "{:.2f}-{:.2f}".format(*ref["save"])
            ref_restore = "{:.2f}-{:.2f}".format(*ref["restore"])
        print(
            f"{case.name:<24} {runs[0].entries:>8} "
            f"{summary([r.preserve_ms for r in runs], 1):>18} {save_per_gib:>18} {ref_save:>10} "
            f"{summary([r.restore_ms for r in runs], 1):>18} {restore_per_gib_:>18} "
            f"{ref_restore:>10} {summary([r.cycle.blackout_ms for r in runs]):>18} "
            f"{sum(r.verified for r in runs)}/{len(runs)}"
        )


Row = tuple[str, list[float]]


def print_commands(cases: list[Case]) -> None:
    print()
    print(
        "The blackout, command by command: wall ms, median (min-max) of the runs; indented, its "
        f"phases ({PHASES})"
    )
    for case in cases:
        cycles = [r.cycle for r in case.runs]
        phases = [c.phases() for c in cycles]

        def rows(*keys: str, phases: list[dict[str, float]] = phases) -> list[Row]:
            return [(f"  {key}", [p[key] for p in phases]) for key in keys]

        table = [
            ("kexec-sim load (before the blackout)", [c.load_ms for c in cycles]),
            ("mount -o remount,preserve,ro", [c.remount_ms[NAME] for c in cycles]),
            *rows("helper", "preserve"),
            ("kexec-sim exec", [c.exec_ms for c in cycles]),
            *rows("exec start-up", *EXEC_PHASES),
            ("pkramfs none MNT -o pkram=bench (restoring)", [c.mount_ms[NAME] for c in cycles]),
            *rows("mount", "restore"),
            ("first byte", [c.first_byte_ms for c in cycles]),
            ("blackout", [c.blackout_ms for c in cycles]),
        ]
        print(f"{case.name} ({len(cycles)} runs; remount by {cycles[0].remount_via})")
        for label, values in table:
            print(f"  {label:<44} {summary(values, 1):>24}")


def print_startup(times: dict[str, list[float]]) -> None:
    print()
    print("Start-up of each program alone (no work): wall ms, median (min-max)")
    for label, values in times.items():
        print(f"  {label:<52} {summary(values, 1):>22}")


@dataclass(frozen=True)
class Goal:
    label: str
    case: str
    figure: Callable[[Run], float]
    limit: float
    unit: str


def goals(sizes: list[int], small: int) -> list[Goal]:
    """The goal rows of tracker issue #11 for the cases run."""
    many = f"{small // 1000}k small files" if small else ""
    note = "" if small in (0, 100_000) else "*"
    rows = [
        Goal(
            f"blackout, one {size} GiB file", f"{size} GiB file, 4 KiB pages", blackout, limit, "ms"
        )
        for size, limit in ((2, 300), (8, 400))
        if size in sizes
    ]
    if small:
        rows += [
            Goal(f"{many}: preserve (daemon){note}", many, lambda r: r.preserve_ms, 100, "ms"),
            Goal(f"{many}: restore (daemon){note}", many, lambda r: r.restore_ms, 100, "ms"),
            Goal(f"{many}: blackout{note}", many, blackout, 500, "ms"),
            Goal(
                f"{many}: daemon memory per file",
                many,
                lambda r: r.rss_growth_bytes / r.files,
                2048,
                "bytes",
            ),
        ]
    for kind, label in (("4k", "4 KiB pages"), ("huge", "huge=always")):
        for size in sizes:
            case = f"{size} GiB file, {label}"
            save, restore = GOAL_MS_PER_GIB[kind]
            rows += [
                Goal(
                    f"{label}, per GiB ({size} GiB): preserve", case, preserve_per_gib, save, "ms"
                ),
                Goal(
                    f"{label}, per GiB ({size} GiB): restore", case, restore_per_gib, restore, "ms"
                ),
            ]
    return rows


def blackout(run: Run) -> float:
    return run.cycle.blackout_ms


def preserve_per_gib(run: Run) -> float:
    return run.per_gib(run.preserve_ms)


def restore_per_gib(run: Run) -> float:
    return run.per_gib(run.restore_ms)


def print_goals(cases: list[Case], rows: list[Goal]) -> None:
    by_name = {case.name: case for case in cases}
    print()
    print("Goal vs measured: median (min-max) of the runs; met when the median is within it")
    header = f"{'goal':<48} {'goal':>16} {'measured':>24}  met?"
    print(header)
    print("-" * len(header))
    for goal in rows:
        case = by_name.get(goal.case)
        if case is None:
            print(f"{goal.label:<48} {'':>16} {'not run':>24}")
            continue
        values = [goal.figure(r) for r in case.runs]
        digits = 2 if goal.limit < 10 else 0
        median = statistics.median(values)
        met = "yes" if median <= goal.limit else f"no ({median / goal.limit:.1f}x)"
        limit = f"<= {goal.limit:g} {goal.unit}"
        print(f"{goal.label:<48} {limit:>16} {summary(values, digits):>24}  {met}")
    if any(goal.label.endswith("*") for goal in rows):
        print("* the goal is for 100k small files")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench-preserve", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8", help="file sizes in GiB (default 1,2,4,8)")
    parser.add_argument(
        "--small-files", type=int, default=100_000, help="files of the small-files case (0: none)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeat = max(1, args.repeat)
    ram_gib = max([*sizes, 1]) + 4
    machine = Path(tempfile.mkdtemp(prefix="bench-preserve-", dir="/dev/shm"))
    mnt = Path(tempfile.mkdtemp(prefix="pkramfs-bench-"))
    env = {**os.environ, "KEXEC_SIM_MACHINE": str(machine)}
    cases = [
        Case(f"{size} GiB file, {label}", kind, f"{options},size=95%", size * GIB, 0, [])
        for size in sizes
        for kind, label, options in (
            ("4k", "4 KiB pages", "huge=never"),
            ("huge", "huge=always", "huge=always"),
        )
    ]
    if args.small_files:
        name = f"{args.small_files // 1000}k small files"
        cases.append(Case(name, "4k", "huge=never", 0, args.small_files, []))
    try:
        shutil.rmtree(machine)
        sh("kexec-sim", "--machine", str(machine), "init", "--ram", f"{ram_gib}G", env=env)
        print(
            f"bench-preserve: machine {machine} with {ram_gib} GiB RAM, {os.cpu_count()} CPUs, "
            f"{repeat} runs per case"
        )
        for case in cases:
            for index in range(1, repeat + 1):
                case.runs.append(one_run(machine, mnt, case, env))
                report(case, case.runs[-1], index, repeat)
        startup = startup_ms(env, max(5, repeat))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        mnt.rmdir()
        time.sleep(0.5)
        shutil.rmtree(machine, ignore_errors=True)
    print_cases(cases)
    print_commands(cases)
    print_startup(startup)
    print_goals(cases, goals(sizes, args.small_files))
    return 0 if all(r.verified for case in cases for r in case.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
