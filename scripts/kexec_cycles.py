"""N scripted PKRAM handover cycles over a realistic tree, checked in full after every kexec.

On a private machine (removed afterwards) two mounts are made: ``pkram=src`` (huge=never) gets
the Python standard library extracted from a real tarball, a big random file, sparse files,
hard links, xattrs and odd times; ``pkram=big`` (huge=always) gets large files. Each cycle
changes both trees (new files, rewrites, deletions, truncations), records every file's md5 and
metadata, preserves both mounts, kexecs, restores them and compares everything, then runs the
ownership checker. Exit 0 when every cycle matched, 1 otherwise. ``--scrub poison`` fills the
RAM exec loses with 0xAA (a restore reading a page nobody preserved shows it at once; ~0.5 s
per GiB lost, in the blackout); the default is exec's own, ``punch``.

Each cycle is timed as scripts/cycle_timing.py runs it (``kexec-sim load`` first, then the
blackout: remount,preserve of both mounts, exec, both restoring mounts, a first byte of each)
and printed with the blackout in its phases; at the end, each phase's median and range
(min-max) over the cycles.
"""

import argparse
import hashlib
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_io import make_stdlib_tarball
from cycle_timing import PHASES, Cycle, Mount, run_cycle, sh, summary

Record = dict[str, tuple[object, ...]]
GOAL_BLACKOUT_MS = 1000


def md5(path: Path) -> str:
    """The md5 of the file at *path*, as md5sum prints it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def record(root: Path) -> Record:
    """md5 and metadata of everything below *root*. Contents are read first: a read may set
    atime (relatime), and the metadata recorded must be what the preserve saw."""
    digests = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                digests[str(path.relative_to(root))] = md5(path)
    meta: Record = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            xattrs = (
                tuple(sorted((x, os.getxattr(path, x)) for x in os.listxattr(path)))
                if not stat.S_ISLNK(st.st_mode)
                else ()
            )
            key = str(path.relative_to(root))
            meta[key] = (
                st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_rdev, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, xattrs,
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None, digests.get(key),
            )  # fmt: skip
    return meta


def change_tree(root: Path, cycle: int, rng: random.Random, tarball: Path | None) -> None:
    """Make *cycle*'s changes: the first cycle builds the tree, later ones modify it."""
    if tarball is not None:
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(root)], check=True)
        (root / "bigfile").write_bytes(os.urandom(64 << 20))
        with open(root / "sparse", "wb") as f:
            f.seek(3 << 30)
            f.write(b"end")
        os.link(root / "bigfile", root / "bigfile.link")
        os.mkfifo(root / "fifo")
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.symlink("bigfile", root / "bigfile.sym")
    for i in range(20):
        (root / f"cycle{cycle}-{i}").write_bytes(os.urandom(rng.randrange(1, 300_000)))
    os.setxattr(root / "bigfile", f"user.cycle{cycle}", str(cycle).encode())
    with open(root / "bigfile", "r+b") as f:
        f.seek(rng.randrange(0, 60 << 20))
        f.write(os.urandom(1 << 20))
    with open(root / "sparse", "r+b") as f:
        f.seek(rng.randrange(0, 3 << 30))
        f.write(b"x" * 5000)
    if cycle:
        (root / f"cycle{cycle - 1}-3").unlink()
        os.truncate(root / f"cycle{cycle - 1}-4", 1234)
    os.utime(root / "fifo", ns=(cycle * 1_000_000_007, cycle * 2_000_000_011))


def change_huge(root: Path, cycle: int) -> None:
    (root / f"huge{cycle}").write_bytes(os.urandom(40 << 20))
    if cycle:
        with open(root / "huge0", "r+b") as f:
            f.seek(5 << 20)
            f.write(os.urandom(3 << 20))


def print_phases(cycles: list[Cycle]) -> None:
    """Each phase of the blackout (and the commands), median (min-max) over *cycles*."""
    phases = [c.phases() for c in cycles]
    print(f"blackout by phase over {len(cycles)} cycles, ms, median (min-max) ({PHASES}):")
    for key in phases[0]:
        print(f"  {key:<20} {summary([p[key] for p in phases], 1):>24}")
    print(f"  {'blackout':<20} {summary([c.blackout_ms for c in cycles], 1):>24}")
    print(f"  {'(kexec-sim load)':<20} {summary([c.load_ms for c in cycles], 1):>24}")
    print(f"remount by {cycles[0].remount_via}")
    median = statistics.median(c.blackout_ms for c in cycles)
    met = "met" if median <= GOAL_BLACKOUT_MS else f"not met ({median / GOAL_BLACKOUT_MS:.1f}x)"
    print(f"goal (issue #11): blackout <= {GOAL_BLACKOUT_MS} ms per cycle: {median:.0f} ms, {met}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="kexec-cycles", description=__doc__.split("\n")[0])
    parser.add_argument("cycles", type=int, nargs="?", default=5)
    parser.add_argument("--ram", default="4G")
    parser.add_argument("--scrub", choices=("punch", "poison"), default="punch")
    args = parser.parse_args()
    machine = Path(tempfile.mkdtemp(prefix="kexec-cycles-", dir="/dev/shm"))
    mnts = {name: Path(tempfile.mkdtemp(prefix=f"pkramfs-{name}-")) for name in ("src", "big")}
    env = {**os.environ, "KEXEC_SIM_MACHINE": str(machine), "KEXEC_SIM_SCRUB": args.scrub}
    options = {"src": "pkram=src", "big": "pkram=big,huge=always,size=1G"}
    tarball = Path(tempfile.gettempdir()) / "kexec-cycles-stdlib.tar"
    rng = random.Random(42)
    failures = 0
    cycles: list[Cycle] = []
    try:
        shutil.rmtree(machine)
        sh("kexec-sim", "--machine", str(machine), "init", "--ram", args.ram, env=env)
        nfiles = make_stdlib_tarball(tarball)
        print(f"machine {machine}, {args.ram} RAM, scrub {args.scrub}; tarball of {nfiles} files")
        for name, mnt in mnts.items():
            sh("pkramfs", "none", str(mnt), "-o", f"{options[name]},machine={machine}", env=env)
        for cycle in range(args.cycles):
            change_tree(mnts["src"], cycle, rng, tarball if cycle == 0 else None)
            change_huge(mnts["big"], cycle)
            before = {name: record(mnt) for name, mnt in mnts.items()}
            first = {"src": "bigfile", "big": "huge0"}
            timed = run_cycle(
                machine, [Mount(name, mnt, mnt / first[name]) for name, mnt in mnts.items()], env
            )
            cycles.append(timed)
            after = {name: record(mnt) for name, mnt in mnts.items()}
            problems = sh("pkramfs-ctl", "check", "--machine", str(machine), env=env).strip()
            same = after == before
            entries = sum(len(r) for r in after.values())
            phases = ", ".join(f"{key} {ms:.0f}" for key, ms in timed.phases().items())
            print(
                f"cycle {cycle + 1}/{args.cycles}: {entries} entries, "
                f"{'identical' if same else 'DIFFERENT'}; checker: {problems.splitlines()[-1]}; "
                f"blackout {timed.blackout_ms:.0f} ms ({args.scrub} scrub included): {phases}",
                flush=True,
            )
            if not same or not problems.endswith("0 problem(s)"):
                failures += 1
                for name in mnts:
                    for key in sorted(set(before[name]) ^ set(after[name]))[:5]:
                        print(f"  {name}: only on one side: {key}")
                    for key in sorted(set(before[name]) & set(after[name])):
                        if before[name][key] != after[name][key]:
                            print(f"  {name}: {key}: {before[name][key]} != {after[name][key]}")
                            break
    finally:
        for mnt in mnts.values():
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            mnt.rmdir()
        tarball.unlink(missing_ok=True)
        time.sleep(0.5)
        shutil.rmtree(machine, ignore_errors=True)
    if cycles:
        print_phases(cycles)
    print(
        "OK: every cycle restored both trees identically"
        if not failures
        else f"{failures} cycles FAILED"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
