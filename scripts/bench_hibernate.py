"""The hibernation image benchmark behind scripts/bench-hibernate: image I/O against dd.

For each size (default 4 GiB) and kind of data, one RAM file in /dev/shm is filled once and its
pages (runs of consecutive pfns with small holes between them, keys zero) go through, --repeat
times (default 3):

* dd: ``dd if=/dev/zero bs=4M conv=fsync`` writing the size's bytes to --dir (buffered + fsync,
  as the image is written) and ``dd of=/dev/null bs=4M`` reading them back after the page cache
  was dropped: the disk's speed, measured right before the image of that run;
* write: ``kexec_sim.hibernation.writer.write_image`` to --dir, which fsyncs the data, then the
  header, then the directory: an honest durable write;
* resume: RAM punched as power off leaves it (the default scrub), the page cache dropped, then
  what ``kexec-sim resume`` does with the image's pages (kexec_sim/hibernation/resume.py):
  ``open_image`` (header, pfn list, length), then ``Chain.restore`` (one pass: every chunk read
  once, checked, its pages stored; what they overwrite kept by a RamUndo; the keys); then a
  sample of pages is compared with what RAM held before.

Kinds: random (incompressible, PCG64 output); text (the Python standard library's sources tiled
over the pages; lz4 stores about 0.4 of it); halfzero (every other page all zeros, flagged in
the pfn list with no data; the rest random).

MB/s: the page set's bytes (zero pages included) per second. "% dd": a run's MB/s over the dd
of the same run (write over dd write, resume over dd read). Every figure is the median of the
runs with their min-max: this machine is shared, and runs of the same case vary. The goal
(issue #11): resume at >= 90% of dd's read for random data, and faster than dd (> 100%) for
compressible data (text, halfzero); the same is shown for the write.
"""

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import numpy as np
import numpy.typing as npt

from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation import writer
from kexec_sim.hibernation.format import COMPRESSIONS
from kexec_sim.hibernation.reader import open_image
from kexec_sim.hibernation.resume import Chain
from kexec_sim.hibernation.undo import RamUndo
from kexec_sim.hibernation.writer import write_image
from kexec_sim.ram import Ram

MIB = 1 << 20
GIB = 1 << 30
DD_BLOCK = 4 * MIB
FILL_BLOCK = 64 * MIB
KINDS = ("random", "text", "halfzero")
GOAL = {"random": 90.0, "text": 100.0, "halfzero": 100.0}
"""Percent of dd's speed each kind must reach (random) or beat (the compressible ones)."""
MAX_RUN, MAX_HOLE = 1024, 16  # page-set layout: runs of 1..MAX_RUN pages, holes of 1..MAX_HOLE
SAMPLE_PAGES = 512
MACHINE_ID = b"bench-hibernate!"
MEMORY_MARGIN = 1 * GIB
"""Available memory wanted beyond the RAM file and the image's page cache."""


@dataclass
class Run:
    """One run of one case: seconds of each step and the dd of the same run (MB/s)."""

    write_mbs: float
    resume_mbs: float
    dd_write_mbs: float
    dd_read_mbs: float
    front_s: float
    restore_s: float
    resume_cpu_s: float
    """CPU seconds (user + system, all threads) the resume took."""
    dd_read_cpu_s: float
    ratio: float
    verified: bool


@dataclass
class Case:
    size: int
    kind: str
    compression: str
    threads: int
    runs: list[Run] = field(default_factory=list)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([MG]?)", text.strip().upper())
    if not match:
        raise SystemExit(f"bench-hibernate: bad size {text!r} (e.g. 256M, 1G, 4)")
    scale = {"M": MIB, "G": GIB, "": GIB}[match.group(2)]
    size = int(match.group(1)) * scale
    if size == 0 or size % DD_BLOCK:
        raise SystemExit(f"bench-hibernate: size {text!r} is not a positive multiple of 4 MiB")
    return size


def size_name(size: int) -> str:
    return f"{size // GIB}G" if size % GIB == 0 else f"{size // MIB}M"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def layout(size: int, rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], int]:
    """The page set: *size* bytes of pages in runs of consecutive pfns, with holes between.

    Returns (pfns ascending, RAM pages needed)."""
    want = size // PAGE_SIZE
    parts: list[npt.NDArray[np.int64]] = []
    pfn = taken = 0
    while taken < want:
        run = min(int(rng.integers(1, MAX_RUN + 1)), want - taken)
        parts.append(np.arange(pfn, pfn + run, dtype=np.int64))
        taken += run
        pfn += run + int(rng.integers(1, MAX_HOLE + 1))
    return np.concatenate(parts), pfn


def text_corpus(limit: int = 32 * MIB) -> npt.NDArray[np.uint8]:
    """The standard library's .py sources back to back (sorted, so every run is the same)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue  # test data holds odd, very compressible or binary-like blobs
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    corpus = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return np.concatenate((corpus, corpus))  # any window of len(corpus) // 2 is contiguous


def fill(ram: Ram, kind: str, corpus: npt.NDArray[np.uint8], seed: int) -> None:
    """Fill all of *ram* with data of *kind*, FILL_BLOCK bytes at a time."""
    flat = ram.pages.reshape(-1)
    rng = np.random.Generator(np.random.PCG64(seed))
    period = corpus.size // 2
    offset = 0
    for start in range(0, flat.size, FILL_BLOCK):
        block = flat[start : start + FILL_BLOCK]
        if kind == "text":
            n = block.size
            done = 0
            while done < n:  # tile the corpus, windows of at most one period
                step = min(n - done, period)
                block[done : done + step] = corpus[offset : offset + step]
                offset = (offset + step) % period
                done += step
        else:
            words = -(-block.size // 8)
            block[:] = rng.bit_generator.random_raw(words).view(np.uint8)[: block.size]
    if kind == "halfzero":
        ram.pages[::2] = 0


def cpu_s(who: int) -> float:
    """User + system CPU seconds of resource.getrusage(*who*)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def dd(*args: str) -> tuple[float, float]:
    """Run dd; its own elapsed seconds (wall time if its summary cannot be parsed) and its CPU
    seconds."""
    start, cpu = time.perf_counter(), cpu_s(resource.RUSAGE_CHILDREN)
    result = subprocess.run(["dd", *args], capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - start, cpu_s(resource.RUSAGE_CHILDREN) - cpu
    if result.returncode != 0:
        raise SystemExit(f"bench-hibernate: dd {' '.join(args)} failed: {result.stderr.strip()}")
    match = re.search(r"copied, ([\d.]+) s", result.stderr)
    return (float(match.group(1)) if match else wall), cpu


def dd_run(work: Path, size: int) -> tuple[float, float, float]:
    """One dd write (buffered + fsync) and one cold dd read of *size* bytes in *work*: MB/s of
    each, and the read's CPU seconds."""
    target = work / "dd.bin"
    try:
        os.sync()
        written, _ = dd("if=/dev/zero", f"of={target}", "bs=4M", f"count={size // DD_BLOCK}",
                        "conv=fsync")  # fmt: skip
        drop_caches()
        read, read_cpu = dd(f"if={target}", "of=/dev/null", "bs=4M")
    finally:
        target.unlink(missing_ok=True)
    return size / written / 1e6, size / read / 1e6, read_cpu


def one_run(
    work: Path,
    ram: Ram,
    pfns: npt.NDArray[np.int64],
    sample: npt.NDArray[np.int64],
    expected: npt.NDArray[np.uint8],
    case: Case,
) -> Run:
    """dd, then the image written from *ram* and resumed into it (punched first)."""
    dd_write, dd_read, dd_read_cpu = dd_run(work, case.size)
    path = work / "image"
    os.sync()  # nothing of an earlier step left to write back
    start = time.perf_counter()
    stats = write_image(
        path, ram.pages, pfns, np.zeros(pfns.size, dtype=np.uint8), machine_id=MACHINE_ID,
        nr_ram_pages=ram.nr_pages, generation=1, epoch_ns=time.time_ns(),
        compression=case.compression, threads=case.threads,
    )  # fmt: skip
    write_s = time.perf_counter() - start
    try:
        ram.punch_range(0, ram.nr_pages)  # as power off's default scrub leaves RAM
        ram.keys.clear()
        drop_caches()
        start, cpu = time.perf_counter(), cpu_s(resource.RUSAGE_SELF)
        image = open_image(path, machine_id=MACHINE_ID, nr_ram_pages=ram.nr_pages)
        opened = time.perf_counter()
        Chain.of([image]).restore(ram, RamUndo(ram), threads=case.threads)
        end, cpu = time.perf_counter(), cpu_s(resource.RUSAGE_SELF) - cpu
    finally:
        path.unlink(missing_ok=True)
    return Run(
        write_mbs=case.size / write_s / 1e6,
        resume_mbs=case.size / (end - start) / 1e6,
        dd_write_mbs=dd_write,
        dd_read_mbs=dd_read,
        front_s=opened - start,
        restore_s=end - opened,
        resume_cpu_s=cpu,
        dd_read_cpu_s=dd_read_cpu,
        ratio=stats.ratio if stats.data_bytes else 0.0,
        verified=bool(np.array_equal(ram.pages[sample], expected)),
    )


def make_ram(parent: Path, nr_pages: int) -> Ram:
    directory = parent / "machine"
    directory.mkdir()
    path = directory / "RAM"
    with open(path, "wb") as f:
        f.truncate(nr_pages * PAGE_SIZE)
    return Ram(path, nr_pages)


def spread(values: list[float], digits: int = 0) -> str:
    """``median (min-max)`` of *values*."""
    med, low, high = statistics.median(values), min(values), max(values)
    return f"{med:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def met(kind: str, percent: float) -> bool:
    return percent >= GOAL[kind] if kind == "random" else percent > GOAL[kind]


def goal_text(kind: str) -> str:
    return f"{'>=' if kind == 'random' else '>'}{GOAL[kind]:.0f}%"


def print_table(cases: list[Case]) -> None:
    columns = ("size", "kind", "comp", "thr", "ratio", "dd write MB/s", "write MB/s", "w % dd",
               "dd read MB/s", "resume MB/s", "r % dd", "goal", "met w/r", "ok")  # fmt: skip
    rows = []
    for c in cases:
        runs = c.runs
        w_pct = [100 * r.write_mbs / r.dd_write_mbs for r in runs]
        r_pct = [100 * r.resume_mbs / r.dd_read_mbs for r in runs]
        w_met = met(c.kind, statistics.median(w_pct))
        r_met = met(c.kind, statistics.median(r_pct))
        rows.append((
            size_name(c.size), c.kind, c.compression, str(c.threads),
            f"{statistics.median(r.ratio for r in runs):.2f}",
            spread([r.dd_write_mbs for r in runs]), spread([r.write_mbs for r in runs]),
            spread(w_pct), spread([r.dd_read_mbs for r in runs]),
            spread([r.resume_mbs for r in runs]), spread(r_pct), goal_text(c.kind),
            f"{'yes' if w_met else 'no'}/{'yes' if r_met else 'no'}",
            "yes" if all(r.verified for r in runs) else "NO",
        ))  # fmt: skip
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(columns)]
    print()
    print("| " + " | ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")
    repeats = sorted({len(c.runs) for c in cases})
    print(
        f"Median (min-max) of {'/'.join(map(str, repeats))} runs. MB/s: the page set's bytes (zero "
        "pages included) per second. % dd: each run over the dd measured in the same run (write "
        "over dd write, resume over dd read). ratio: stored / data bytes. goal: random >= 90% of "
        "dd, text and halfzero faster than dd. ok: resumed pages match (a sample)."
    )


def print_phases(cases: list[Case]) -> None:
    print()
    print("Resume's phases (median s): front = open_image (header, pfn list, length); restore = "
          "the one pass (read, check, store) and the keys. CPU: seconds of CPU per GiB of pages "
          "(user + system, every thread) of the resume and of the dd read, medians.")  # fmt: skip
    for c in cases:
        front = statistics.median(r.front_s for r in c.runs)
        restore = statistics.median(r.restore_s for r in c.runs)
        cpu = statistics.median(r.resume_cpu_s for r in c.runs) * GIB / c.size
        dd_cpu = statistics.median(r.dd_read_cpu_s for r in c.runs) * GIB / c.size
        print(f"  {size_name(c.size):>4} {c.kind:8} {c.compression:4} {c.threads} thr: "
              f"front {front:.3f} + restore {restore:.2f}; CPU s/GiB: resume {cpu:.2f}, dd "
              f"read {dd_cpu:.2f}")  # fmt: skip


def terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # clean up as on Ctrl-C


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench-hibernate", description=__doc__.split("\n")[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--sizes", default="4G", help="page set sizes (default 4G; 1 = 1G)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="default random,text,halfzero")
    parser.add_argument("--compressions", default="lz4", help="default lz4 (hibernate's)")
    parser.add_argument("--threads", default=str(cores), help=f"default {cores} (the cores)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument(
        "--dir", type=Path, default=Path("/var/tmp/pkramfs-bench"), help="where images go"
    )
    parser.add_argument("--quick", action="store_true", help="--sizes 1G --repeat 3")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in ("1G" if args.quick else args.sizes).split(",") if s]
    repeat = 3 if args.quick else args.repeat
    kinds = [k for k in args.kinds.split(",") if k]
    compressions = [c for c in args.compressions.split(",") if c]
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    if bad := [k for k in kinds if k not in KINDS]:
        raise SystemExit(f"bench-hibernate: unknown kinds {bad} (one of {', '.join(KINDS)})")
    if bad := [c for c in compressions if c not in COMPRESSIONS]:
        raise SystemExit(f"bench-hibernate: unknown compressions {bad}")
    if repeat < 1 or not thread_counts or min(thread_counts) < 1:
        raise SystemExit("bench-hibernate: --repeat and --threads must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("bench-hibernate: run as root (it drops the page cache)")
    wanted = int(max(sizes) * 1.05) + max(sizes) + MEMORY_MARGIN  # RAM file, image's cache
    if available_bytes() < wanted:
        raise SystemExit(f"bench-hibernate: needs about {wanted / GIB:.1f} GiB of available "
                         f"memory, {available_bytes() / GIB:.1f} GiB are available")  # fmt: skip
    signal.signal(signal.SIGTERM, terminate)

    made_dir = not args.dir.exists()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir))
    shm = Path(tempfile.mkdtemp(prefix="bench-hibernate-", dir="/dev/shm"))
    print(
        f"bench-hibernate: {', '.join(size_name(s) for s in sizes)} x {', '.join(kinds)} x "
        f"{', '.join(compressions)} x threads {args.threads}, {repeat} runs each; images and dd "
        f"in {work}, RAM in {shm}; {cores} CPUs, load average {os.getloadavg()[0]:.1f} (a "
        f"shared machine: other work moves these figures); image code "
        f"{Path(writer.__file__).parent}",
        flush=True,
    )
    cases: list[Case] = []
    corpus = text_corpus()
    ram: Ram | None = None
    try:
        for size in sizes:
            rng = np.random.default_rng(size)
            pfns, nr_pages = layout(size, rng)
            sample = np.sort(rng.choice(pfns, min(SAMPLE_PAGES, pfns.size), replace=False))
            ram = make_ram(shm, nr_pages)
            for kind in kinds:
                fill(ram, kind, corpus, seed=size)
                expected = ram.pages[sample].copy()
                for compression in compressions:
                    for threads in thread_counts:
                        case = Case(size, kind, compression, threads)
                        cases.append(case)
                        for _ in range(repeat):
                            r = one_run(work, ram, pfns, sample, expected, case)
                            case.runs.append(r)
                            print(
                                f"  {size_name(size)} {kind:8} {compression:4} {threads} thr: "
                                f"write {r.write_mbs:,.0f} MB/s (dd {r.dd_write_mbs:,.0f}), "
                                f"resume {r.resume_mbs:,.0f} MB/s (dd {r.dd_read_mbs:,.0f}; "
                                f"front {r.front_s:.3f} s + restore {r.restore_s:.2f} s, "
                                f"CPU {r.resume_cpu_s:.2f} s, dd's {r.dd_read_cpu_s:.2f} s)"
                                f"{'' if r.verified else ' MISMATCH'}",
                                flush=True,
                            )
            ram.close()
            ram = None
            shutil.rmtree(shm / "machine")
    except KeyboardInterrupt:
        print("bench-hibernate: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        if ram is not None:
            ram.close()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if made_dir:
            with contextlib.suppress(OSError):  # something else was put there meanwhile
                args.dir.rmdir()
    print_table(cases)
    print_phases(cases)
    return 0 if all(r.verified for c in cases for r in c.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
