"""The hibernation image benchmark behind scripts/bench-hibernate: image I/O against the disk.

For each size (default 1 and 4 GiB) and kind of data, a RAM file in /dev/shm is filled and its
pages (runs of consecutive pfns with small holes between them, keys zero) are written with
``kexec_sim.hibernation.writer.write_image`` to a directory on the real disk (--dir,
/var/tmp), for each compression (none, lz4, zstd) and thread count (1..cores). Kinds:

* random: incompressible (PCG64 output);
* text: Python standard library sources tiled over the pages (lz4 stores about 0.4 of it);
* halfzero: every other page all zeros (flagged in the pfn list, no data), the rest random.

write MB/s: the page set's bytes (zero pages included) over the wall time of ``write_image``,
which fsyncs the data, then the header, then the directory: an honest durable write.
resume MB/s: the same bytes over the two steps a resume makes (kexec_sim/hibernation/resume.py),
from a cold page cache (synced and dropped first): ``check_image`` reads the image, checking
everything, then resume's own ``Chain.restore`` reads it again from the page cache into a
second RAM (each chunk checked again), zero pages punched out.
The target RAM is populated beforehand
(this VM's first touch of fresh memory is not the image's cost); a sample of pages is compared
with the source afterwards.

Beside them, the physical limit: ``dd if=/dev/zero bs=4M conv=fsync`` writing the same number
of bytes to the same directory (buffered + fsync, as the image is written) and ``dd of=/dev/null``
reading it back after dropping the cache; best of --dd-repeat runs. The target: with random
data at least 90% of dd's speed, with compressible data (text, halfzero) more than 100%.
Columns "w %dd" and "r %dd" are the image's speed as a percentage of dd's write and read.
"""

import argparse
import contextlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

from kexec_sim.hibernation import writer
from kexec_sim.hibernation.format import COMPRESSIONS
from kexec_sim.hibernation.reader import check_image
from kexec_sim.hibernation.resume import Chain
from kexec_sim.hibernation.writer import write_image
from kexec_sim.pages import PAGE_SIZE
from kexec_sim.ram import Ram

MIB = 1 << 20
GIB = 1 << 30
DD_BLOCK = 4 * MIB
FILL_BLOCK = 64 * MIB
KINDS = ("random", "text", "halfzero")
TARGET = {"random": 90.0, "text": 100.0, "halfzero": 100.0}
"""Percent of dd's speed each kind must reach (random) or beat (the compressible ones)."""
MAX_RUN, MAX_HOLE = 1024, 16  # page-set layout: runs of 1..MAX_RUN pages, holes of 1..MAX_HOLE
SAMPLE_PAGES = 512
REPO = Path(__file__).resolve().parent.parent


@dataclass
class DdResult:
    write_mbs: float
    read_mbs: float


@dataclass
class Result:
    size: int
    kind: str
    compression: str
    threads: int
    ratio: float
    write_mbs: float
    resume_mbs: float
    verify_s: float
    load_s: float
    verified: bool


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([MG]?)", text.strip().upper())
    if not match:
        raise SystemExit(f"bench-hibernate: bad size {text!r} (e.g. 256M, 1G)")
    scale = {"M": MIB, "G": GIB, "": GIB}[match.group(2)]
    size = int(match.group(1)) * scale
    if size % DD_BLOCK:
        raise SystemExit(f"bench-hibernate: size {text!r} is not a multiple of 4 MiB")
    return size


def size_name(size: int) -> str:
    return f"{size // GIB}G" if size % GIB == 0 else f"{size // MIB}M"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


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


def dd(*args: str) -> float:
    """Run dd; its own elapsed seconds (wall time if its summary cannot be parsed)."""
    start = time.perf_counter()
    result = subprocess.run(["dd", *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"bench-hibernate: dd {' '.join(args)} failed: {result.stderr.strip()}")
    match = re.search(r"copied, ([\d.]+) s", result.stderr)
    return float(match.group(1)) if match else wall


def dd_reference(work: Path, size: int, repeat: int) -> DdResult:
    """Best of *repeat* dd writes (buffered + fsync) and cold reads of *size* bytes in *work*."""
    target = work / "dd.bin"
    count = size // DD_BLOCK
    writes, reads = [], []
    try:
        for _ in range(max(1, repeat)):
            target.unlink(missing_ok=True)
            os.sync()
            seconds = dd("if=/dev/zero", f"of={target}", "bs=4M", f"count={count}", "conv=fsync")
            writes.append(size / seconds / 1e6)
            drop_caches()
            reads.append(size / dd(f"if={target}", "of=/dev/null", "bs=4M") / 1e6)
    finally:
        target.unlink(missing_ok=True)
    return DdResult(max(writes), max(reads))


def resume(path: Path, target: Ram, machine_id: bytes, threads: int) -> tuple[float, float, int]:
    """The two steps of a resume from a cold cache, as kexec_sim/hibernation/resume.py takes
    them: check the image, then restore its chain into RAM (check seconds, restore seconds,
    pages)."""
    drop_caches()
    start = time.perf_counter()
    checked = check_image(
        path, machine_id=machine_id, nr_ram_pages=target.nr_pages, threads=threads
    )
    verified = time.perf_counter()
    Chain.of([checked]).restore(target, threads=threads)
    end = time.perf_counter()
    return verified - start, end - verified, int(checked.pfn_list.pfns.size)


def one_config(
    work: Path,
    source: Ram,
    target: Ram,
    pfns: npt.NDArray[np.int64],
    sample: npt.NDArray[np.int64],
    size: int,
    kind: str,
    compression: str,
    threads: int,
) -> Result:
    machine_id = os.urandom(16)
    path = work / "image"
    keys = np.zeros(pfns.size, dtype=np.uint8)
    os.sync()  # nothing of an earlier case left to write back
    start = time.perf_counter()
    stats = write_image(
        path,
        source.pages,
        pfns,
        keys,
        machine_id=machine_id,
        nr_ram_pages=source.nr_pages,
        generation=1,
        epoch_ns=time.time_ns(),
        compression=compression,
        threads=threads,
    )
    write_s = time.perf_counter() - start
    try:
        target.pages[sample] = 0xA5  # a stale copy from an earlier case must not pass the check
        verify_s, load_s, loaded = resume(path, target, machine_id, threads)
    finally:
        path.unlink(missing_ok=True)
    verified = loaded == pfns.size and bool(
        np.array_equal(target.pages[sample], source.pages[sample])
    )
    return Result(
        size, kind, compression, threads, stats.ratio if stats.data_bytes else 0.0,
        size / write_s / 1e6, size / (verify_s + load_s) / 1e6, verify_s, load_s, verified,
    )  # fmt: skip


def best(runs: list[Result]) -> Result:
    """The best write and the best resume of the runs of one case (a shared VM is noisy)."""
    top = max(runs, key=lambda r: r.resume_mbs)
    top.write_mbs = max(r.write_mbs for r in runs)
    top.verified = all(r.verified for r in runs)
    return top


def make_ram(parent: Path, name: str, nr_pages: int) -> Ram:
    directory = parent / name
    directory.mkdir()
    path = directory / "RAM"
    with open(path, "wb") as f:
        f.truncate(nr_pages * PAGE_SIZE)
    return Ram(path, nr_pages)


def met(kind: str, percent: float) -> bool:
    return percent >= TARGET[kind] if kind == "random" else percent > TARGET[kind]


def print_table(results: list[Result], refs: dict[int, DdResult]) -> None:
    header = (
        f"| {'size':>4} | {'kind':8} | {'comp':4} | {'thr':>3} | {'ratio':>5} | "
        f"{'write MB/s':>10} | {'w %dd':>6} | {'resume MB/s':>11} | {'r %dd':>6} | "
        f"{'(check+copy s)':>15} | {'target w/r':>10} | {'ok':>3} |"
    )
    rule = "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
    for size in refs:
        ref = refs[size]
        print()
        print(
            f"{size_name(size)}: dd write {ref.write_mbs:,.0f} MB/s (buffered + fsync), "
            f"dd read {ref.read_mbs:,.0f} MB/s (cold)"
        )
        print(header)
        print(rule)
        for r in (r for r in results if r.size == size):
            wp, rp = 100 * r.write_mbs / ref.write_mbs, 100 * r.resume_mbs / ref.read_mbs
            target = f"{'yes' if met(r.kind, wp) else 'no'}/{'yes' if met(r.kind, rp) else 'no'}"
            phases = f"{r.verify_s:.2f}+{r.load_s:.2f}"
            print(
                f"| {size_name(r.size):>4} | {r.kind:8} | {r.compression:4} | {r.threads:>3} | "
                f"{r.ratio:5.2f} | {r.write_mbs:10,.0f} | {wp:5.0f}% | {r.resume_mbs:11,.0f} | "
                f"{rp:5.0f}% | {phases:>15} | {target:>10} | {'yes' if r.verified else 'NO':>3} |"
            )
    print(
        "ratio: stored bytes / data bytes (zero pages excluded from both). MB/s: the page set's "
        "bytes (zero pages included) per second. target: random >= 90% of dd, text and halfzero "
        "> 100% of dd (write/resume). ok: resumed pages match the source (a sample)."
    )


def print_distance(results: list[Result], refs: dict[int, DdResult]) -> None:
    """For each kind, the best configuration's distance to the target, per size."""
    print()
    print("Distance to target (best configuration of each kind; + is above the target):")
    for size in refs:
        ref = refs[size]
        for kind in KINDS:
            mine = [r for r in results if r.size == size and r.kind == kind]
            if not mine:
                continue
            goal = TARGET[kind]
            w = max(mine, key=lambda r: r.write_mbs)
            rs = max(mine, key=lambda r: r.resume_mbs)
            wp, rp = 100 * w.write_mbs / ref.write_mbs, 100 * rs.resume_mbs / ref.read_mbs
            print(
                f"  {size_name(size):>4} {kind:8} (goal {'>=' if kind == 'random' else '>'}"
                f"{goal:.0f}%): write {wp:.0f}% ({wp - goal:+.0f} pts, {w.compression}, "
                f"{w.threads} thr), resume {rp:.0f}% ({rp - goal:+.0f} pts, {rs.compression}, "
                f"{rs.threads} thr)"
            )


def plot(results: list[Result], refs: dict[int, DdResult], out: Path) -> None:
    """Grouped bars of MB/s per case, dd as a dashed line; skipped without matplotlib."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print(f"bench-hibernate: matplotlib is not installed: no plot ({out})")
        return
    sizes = list(refs)
    threads = sorted({r.threads for r in results})
    fig, axes = plt.subplots(len(sizes), 2, figsize=(14, 4.5 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        mine = [r for r in results if r.size == size]
        cases = list(dict.fromkeys((r.kind, r.compression) for r in mine))
        width = 0.8 / len(threads)
        for col, (what, ref) in enumerate(
            (("write", refs[size].write_mbs), ("resume", refs[size].read_mbs))
        ):
            ax = axes[row][col]
            for i, thr in enumerate(threads):
                values = [
                    next(
                        (getattr(r, f"{what}_mbs") for r in mine if (r.kind, r.compression) == c
                         and r.threads == thr),
                        0.0,
                    )
                    for c in cases
                ]  # fmt: skip
                xs = [x + (i - (len(threads) - 1) / 2) * width for x in range(len(cases))]
                ax.bar(xs, values, width, label=f"{thr} thread{'s' if thr > 1 else ''}")
            ax.axhline(ref, color="black", linestyle="--", label=f"dd {ref:,.0f} MB/s")
            ax.axhline(0.9 * ref, color="grey", linestyle=":", label="90% of dd")
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{k}\n{c}" for k, c in cases], fontsize=8)
            ax.set_ylabel("MB/s")
            ax.set_title(f"{size_name(size)}: image {what} (dd {'write' if col == 0 else 'read'})")
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"bench-hibernate: plot written to {out}")


def terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # clean up as on Ctrl-C


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench-hibernate", description=__doc__.split("\n")[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--sizes", default="1G,4G", help="page set sizes (default 1G,4G)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="default random,text,halfzero")
    parser.add_argument("--compressions", default="none,lz4,zstd")
    parser.add_argument(
        "--threads", default=",".join(str(t) for t in range(1, cores + 1)), help="default 1..cores"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the best counts")
    parser.add_argument("--dd-repeat", type=int, default=2, help="dd runs; the best counts")
    parser.add_argument(
        "--dir", type=Path, default=Path("/var/tmp/pkramfs-bench"), help="where images go"
    )
    parser.add_argument("--plot", type=Path, default=REPO / "bench-results" / "bench-hibernate.png")
    parser.add_argument("--quick", action="store_true", help="smoke run: one size of 256M")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in ("256M" if args.quick else args.sizes).split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    compressions = [c for c in args.compressions.split(",") if c]
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    if bad := [k for k in kinds if k not in KINDS]:
        raise SystemExit(f"bench-hibernate: unknown kinds {bad} (one of {', '.join(KINDS)})")
    if bad := [c for c in compressions if c not in COMPRESSIONS]:
        raise SystemExit(f"bench-hibernate: unknown compressions {bad}")
    if os.geteuid() != 0:
        raise SystemExit("bench-hibernate: run as root (it drops the page cache)")
    signal.signal(signal.SIGTERM, terminate)

    made_dir = not args.dir.exists()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir))
    shm = Path(tempfile.mkdtemp(prefix="bench-hibernate-", dir="/dev/shm"))
    print(
        f"bench-hibernate: {', '.join(size_name(s) for s in sizes)} x {', '.join(kinds)} x "
        f"{', '.join(compressions)} x threads {args.threads}; images in {work}, RAM in {shm}; "
        f"{cores} CPUs; image code {Path(writer.__file__).parent}",
        flush=True,
    )
    results: list[Result] = []
    refs: dict[int, DdResult] = {}
    corpus = text_corpus()
    rams: list[Ram] = []
    try:
        for size in sizes:
            rng = np.random.default_rng(size)
            pfns, nr_pages = layout(size, rng)
            sample = np.sort(rng.choice(pfns, min(SAMPLE_PAGES, pfns.size), replace=False))
            refs[size] = dd_reference(work, size, args.dd_repeat)
            print(
                f"{size_name(size)}: {pfns.size} pages in {nr_pages} pages of RAM; dd write "
                f"{refs[size].write_mbs:,.0f} MB/s, read {refs[size].read_mbs:,.0f} MB/s",
                flush=True,
            )
            source = make_ram(shm, "source", nr_pages)
            rams.append(source)
            target = make_ram(shm, "target", nr_pages)
            rams.append(target)
            target.populate(np.arange(nr_pages, dtype=np.int64))
            for kind in kinds:
                fill(source, kind, corpus, seed=size)
                for compression in compressions:
                    for threads in thread_counts:
                        runs = [
                            one_config(work, source, target, pfns, sample, size, kind,
                                       compression, threads)
                            for _ in range(max(1, args.repeat))
                        ]  # fmt: skip
                        r = best(runs)
                        results.append(r)
                        print(
                            f"  {size_name(size)} {kind:8} {compression:4} {threads} thr: ratio "
                            f"{r.ratio:.2f}, write {r.write_mbs:,.0f} MB/s, resume "
                            f"{r.resume_mbs:,.0f} MB/s (check {r.verify_s:.2f} s + copy "
                            f"{r.load_s:.2f} s){'' if r.verified else ' MISMATCH'}",
                            flush=True,
                        )
            for ram in rams:
                ram.close()
            rams.clear()
            shutil.rmtree(shm / "source")
            shutil.rmtree(shm / "target")
    except KeyboardInterrupt:
        print("bench-hibernate: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        for ram in rams:
            ram.close()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if made_dir:
            with contextlib.suppress(OSError):  # something else was put there meanwhile
                args.dir.rmdir()
    print_table(results, refs)
    print_distance(results, refs)
    plot(results, refs, args.plot)
    return 0 if all(r.verified for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
