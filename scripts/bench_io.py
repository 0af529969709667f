"""The data-path benchmark behind scripts/bench-io: pkramfs beside kernel tmpfs and libfuse's
C examples, in one run.

Measured on each file system, ``--repeat`` runs interleaved (every target once per round, so
a noisy minute hits all of them): create+write 100 B+close, stat and unlink of many files;
extracting the Python standard library from a tarball, and ``rm -rf`` of it; 4 KiB random
reads and writes, buffered and O_DIRECT (and writes through an O_WRONLY descriptor, which
pkramfs serves with direct I/O); sequential write and cold read of one file in 1 MiB blocks
(cold: the page cache is dropped first). Each cell is the median with min-max. For pkramfs
the FUSE requests each operation cost are counted (``pkramfs-ctl status``).

libfuse's passthrough_ll (C) and passthrough_hp (C++) run over a kernel tmpfs when a libfuse
source tree is given (``--libfuse-src DIR`` or ``LIBFUSE_SRC``): they are built from it with
meson and ninja (installed into this virtualenv with pip when missing). Without one their
columns are left out, with a note: no figure is printed that was not measured in this run.
"""

import argparse
import hashlib
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pkramfs import control

MIB = 1 << 20
BIN = Path(sys.executable).parent
BUILD_ROOT = Path("/var/tmp/pkramfs-bench-libfuse")


@dataclass
class Target:
    """A file system to measure: a directory, and how to count its FUSE requests."""

    name: str
    root: Path
    counted: bool = False  # pkramfs: requests read from its status
    results: dict[str, list[float]] = field(default_factory=dict)
    requests: dict[str, dict[str, int]] = field(default_factory=dict)

    def request_counts(self) -> dict[str, int]:
        if not self.counted:
            return {}
        counts: dict[str, int] = control.query_status(str(self.root))["requests"]
        return counts


@dataclass
class Row:
    key: str
    label: str
    unit: str
    lower_is_better: bool = False


ROWS = [
    Row("metadata", "create+write 100 B+close, stat, unlink", "ops/s"),
    Row("tarball", "extract the stdlib tarball", "s", lower_is_better=True),
    Row("rm", "rm -rf of that tree", "s", lower_is_better=True),
    Row("rand read", "4 KiB random read, buffered", "IOPS"),
    Row("rand read direct", "4 KiB random read, O_DIRECT", "IOPS"),
    Row("rand write", "4 KiB random write, buffered (O_RDWR)", "IOPS"),
    Row("rand write direct", "4 KiB random write, O_DIRECT", "IOPS"),
    Row("rand write wronly", "4 KiB random write, O_WRONLY", "IOPS"),
    Row("seq write", "sequential write, 1 MiB blocks", "MB/s"),
    Row("seq read", "sequential read (cold), 1 MiB blocks", "MB/s"),
]


def run(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, cwd=cwd)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_host_memory(directory: Path, size_mib: int) -> None:
    """Touch and free *size_mib* of memory once, so no file system pays the hypervisor's
    first-touch cost of never-used guest pages (it made fresh writes 3-5x slower)."""
    path = directory / "warm"
    block = bytes(MIB)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(block)
    path.unlink()
    drop_caches()


def metadata(root: Path, files: int) -> tuple[float, int]:
    """create+write 100 B+close, stat, unlink of *files* files: ops/s (3 an file)."""
    d = root / "meta"
    d.mkdir()
    names = [str(d / f"f{i}") for i in range(files)]
    data = b"x" * 100
    start = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    for name in names:
        os.stat(name)
    for name in names:
        os.unlink(name)
    elapsed = time.perf_counter() - start
    d.rmdir()
    return 3 * files / elapsed, 3 * files


def make_stdlib_tarball(out: Path) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    with tarfile.open(out, "w") as tar:
        for dirpath, dirnames, filenames in os.walk(stdlib):
            dirnames[:] = [n for n in dirnames if n != "site-packages"]
            for name in filenames:
                full = Path(dirpath) / name
                tar.add(full, arcname=str(full.relative_to(stdlib.parent)), recursive=False)
                count += 1
    return count


def seq_write(path: Path, size_mib: int) -> float:
    block = os.urandom(MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.perf_counter()
    for _ in range(size_mib):
        os.write(fd, block)
    os.close(fd)
    return size_mib * MIB / (time.perf_counter() - start) / 1e6


def seq_read(path: Path) -> float:
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    start = time.perf_counter()
    while chunk := os.read(fd, MIB):
        total += len(chunk)
    os.close(fd)
    return total / (time.perf_counter() - start) / 1e6


def random_io(path: Path, flags: int, seconds: float, write: bool) -> tuple[float, int]:
    """4 KiB random reads or writes for *seconds*: (IOPS, operations). The buffer is page
    aligned, as O_DIRECT needs."""
    pages = path.stat().st_size // 4096
    rng = random.Random(1)
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    fd = os.open(path, flags)
    ops = 0
    start = time.perf_counter()
    deadline = start + seconds
    try:
        while time.perf_counter() < deadline:
            for _ in range(256):
                off = rng.randrange(pages) * 4096
                if write:
                    os.pwritev(fd, [buf], off)
                else:
                    os.preadv(fd, [buf], off)
            ops += 256
    finally:
        os.close(fd)
    return ops / (time.perf_counter() - start), ops


def timed(*cmd: str) -> float:
    start = time.perf_counter()
    run(*cmd)
    return time.perf_counter() - start


def measure_once(target: Target, args: argparse.Namespace, tarball: Path) -> None:
    """One round of every test on *target*; results and request counts appended."""

    def record(key: str, test: Callable[[], tuple[float, int]]) -> None:
        before = target.request_counts()
        value, ops = test()
        after = target.request_counts()
        target.results.setdefault(key, []).append(value)
        deltas = {name: count - before.get(name, 0) for name, count in after.items()}
        if deltas:
            deltas["getxattr"] -= 1  # the status query itself
        per_op = target.requests.setdefault(key, {})
        for name, count in [*deltas.items(), ("_ops", ops)]:
            if count:
                per_op[name] = per_op.get(name, 0) + count

    big = target.root / "big"
    record("seq write", lambda: (seq_write(big, args.size_mib), args.size_mib))
    record("seq read", lambda: (seq_read(big), args.size_mib))
    drop_caches()
    seconds = args.seconds
    record("rand read", lambda: random_io(big, os.O_RDONLY, seconds, write=False))
    direct = os.O_DIRECT
    record("rand read direct", lambda: random_io(big, os.O_RDONLY | direct, seconds, False))
    record("rand write", lambda: random_io(big, os.O_RDWR, seconds, write=True))
    record("rand write direct", lambda: random_io(big, os.O_RDWR | direct, seconds, True))
    record("rand write wronly", lambda: random_io(big, os.O_WRONLY, seconds, write=True))
    big.unlink()
    record("metadata", lambda: metadata(target.root, args.files))
    tree = target.root / "tar"
    tree.mkdir()
    entries = args.tar_entries
    record("tarball", lambda: (timed("tar", "-xf", str(tarball), "-C", str(tree)), entries))
    record("rm", lambda: (timed("rm", "-rf", str(tree)), entries))


def build_passthroughs(source: Path) -> dict[str, Path]:
    """passthrough_ll and passthrough_hp built from the libfuse tree *source* (cached under
    BUILD_ROOT by the tree's path and meson.build)."""
    if not (source / "meson.build").is_file():
        raise SystemExit(f"bench-io: {source} is not a libfuse source tree (no meson.build)")
    for tool in ("meson", "ninja"):
        if not shutil.which(tool) and not (BIN / tool).exists():
            run(str(BIN / "pip"), "install", "--quiet", tool)
    if not shutil.which("g++"):
        raise SystemExit("bench-io: building passthrough_hp needs g++ (apt-get install g++)")
    tag = hashlib.sha1(
        str(source.resolve()).encode() + (source / "meson.build").read_bytes()
    ).hexdigest()[:12]
    build = BUILD_ROOT / tag
    programs = {name: build / "example" / name for name in ("passthrough_ll", "passthrough_hp")}
    if not all(p.exists() for p in programs.values()):
        meson = shutil.which("meson") or str(BIN / "meson")
        ninja = shutil.which("ninja") or str(BIN / "ninja")
        shutil.rmtree(build, ignore_errors=True)
        options = ["-Dexamples=true", "-Dutils=false", "-Dtests=false"]
        run(meson, "setup", str(build), str(source), *options)
        run(ninja, "-C", str(build), *(f"example/{name}" for name in programs))
    return programs


@contextmanager
def mounted_targets(base: Path, args: argparse.Namespace) -> Iterator[list[Target]]:
    """kernel tmpfs, pkramfs and (with a libfuse tree) the passthroughs over tmpfs."""
    tmpfs = base / "tmpfs"
    tmpfs.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=12G", "tmpfs", str(tmpfs))
    mounts: list[Path] = []
    try:
        warm_host_memory(tmpfs, 3 * args.size_mib + 2048)
        (tmpfs / "self").mkdir()
        targets = [Target("kernel tmpfs", tmpfs / "self")]
        machine, pkram = base / "machine", base / "pkramfs"
        pkram.mkdir()
        run(str(BIN / "kexec-sim"), "--machine", str(machine), "init", "--ram", "4G")
        run(str(BIN / "pkramfs"), "none", str(pkram), "-o", f"machine={machine},size=2G")
        mounts.append(pkram)
        targets.append(Target("pkramfs", pkram, counted=True))
        if args.libfuse_src:
            programs = build_passthroughs(Path(args.libfuse_src))
            for name, program in programs.items():
                source, mnt = tmpfs / name, base / name
                source.mkdir()
                mnt.mkdir()
                if name == "passthrough_ll":
                    run(str(program), "-o", f"source={source}", str(mnt))
                else:
                    run(str(program), str(source), str(mnt))
                mounts.append(mnt)
                targets.append(Target(name, mnt))
        yield targets
    finally:
        for mnt in reversed(mounts):
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(tmpfs)], check=False, capture_output=True)


def cell(values: list[float], unit: str) -> str:
    def fmt(value: float) -> str:
        return f"{value:.2f}" if unit == "s" else f"{value:,.0f}"

    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def requests_cell(counts: dict[str, int]) -> str:
    ops = counts.get("_ops", 0)
    if not ops:
        return "-"
    parts = [
        f"{n} {c / ops:.2f}" for n, c in sorted(counts.items()) if n != "_ops" and c / ops >= 0.005
    ]
    return ", ".join(parts) or "0"


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench-io", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="sequential file size")
    parser.add_argument("--files", type=int, default=10_000, help="files for the metadata test")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of random I/O")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument(
        "--libfuse-src",
        default=os.environ.get("LIBFUSE_SRC"),
        help="a libfuse source tree to build passthrough_ll/_hp from (or $LIBFUSE_SRC)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    tarball = Path(tempfile.gettempdir()) / "pkramfs-bench-stdlib.tar"
    args.tar_entries = make_stdlib_tarball(tarball)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="pkramfs-bench-", dir="/dev/shm") as tmp,
            mounted_targets(Path(tmp), args) as targets,
        ):
            for _ in range(args.repeat):
                for target in targets:
                    measure_once(target, args, tarball)
    finally:
        tarball.unlink(missing_ok=True)
    print_table(targets, args)
    return 0


def print_table(targets: list[Target], args: argparse.Namespace) -> None:
    print(
        f"bench-io: {args.size_mib} MiB file, {args.files} files, tarball of "
        f"{args.tar_entries} files; median (min-max) of {args.repeat} rounds; "
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}"
    )
    names = [t.name for t in targets]
    widths = [38, 5, *[max(24, len(n)) for n in names]]
    header = ["test", "unit", *names]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in ROWS:
        cells = [row.label, row.unit, *[cell(t.results[row.key], row.unit) for t in targets]]
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |")
    if not args.libfuse_src:
        print(
            "passthrough_ll/_hp: not run (no libfuse source tree: --libfuse-src DIR or "
            "LIBFUSE_SRC; git clone https://github.com/libfuse/libfuse)"
        )
    pkramfs = next(t for t in targets if t.counted)
    print("\npkramfs: FUSE requests per operation, by handler (capability_query: the getxattr of")
    print("security.capability the kernel sends before a cached write; counted in getxattr too)")
    for row in ROWS:
        print(f"  {row.label:38} {requests_cell(pkramfs.requests[row.key])}")


if __name__ == "__main__":
    sys.exit(main())
