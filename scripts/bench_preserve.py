"""The handover benchmark behind scripts/bench-preserve: preserve and restore cost per GiB.

For one file of each size (4 KiB pages and huge=always) and for a tree of many small files, on
a private machine: the time ``remount,preserve`` spends recording the tree (the daemon's own
measure, and the wall time of the mount(8) command around it), ``kexec-sim exec``, the restore
at mount (daemon's measure and command wall time), and the end-to-end blackout from
``remount,preserve`` to the first byte readable after the kexec. Printed beside PKRAM's
published figures, per GiB. Every restored file is checked (md5 of a sample of it).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20
# PKRAM's published figures (the PKRAM RFC patch series by Anthony Yznaga, Oracle, as quoted in
# the tracker's issue #3 and DESIGN.md section 6): one 100 GB tmpfs file, 16 CPUs, optimized:
# save 232-311 ms / load 516-518 ms with 4 KiB pages, 13-22 ms / 101-105 ms with huge pages.
PKRAM_MS_PER_GIB = {
    "4k": {"save": (2.32, 3.11), "restore": (5.16, 5.18)},
    "huge": {"save": (0.13, 0.22), "restore": (1.01, 1.05)},
}


@dataclass
class Result:
    case: str
    data_bytes: int
    entries: int
    preserve_ms: float
    preserve_cmd_ms: float
    exec_ms: float
    restore_ms: float
    restore_cmd_ms: float
    blackout_ms: float
    verified: bool
    preserve_phases: dict[str, float]
    restore_phases: dict[str, float]


def sh(*cmd: str, env: dict[str, str]) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench-preserve: {' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout


def timed(*cmd: str, env: dict[str, str]) -> tuple[str, float]:
    start = time.perf_counter()
    out = sh(*cmd, env=env)
    return out, (time.perf_counter() - start) * 1e3


def status(mnt: Path, env: dict[str, str]) -> dict[str, object]:
    state: dict[str, object] = json.loads(sh("pkramfs-ctl", "status", str(mnt), "--json", env=env))
    return state


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
    payload = os.urandom(4096)
    for d in range(count // 1000 + 1):
        (root / f"d{d}").mkdir()
    for i in range(count):
        with open(root / f"d{i // 1000}" / f"f{i}", "wb", buffering=0) as f:
            f.write(payload[: 100 + i % 3000])
    return count


def one_case(
    machine: Path, mnt: Path, case: str, options: str, size: int, small: int, env: dict[str, str]
) -> Result:
    sh("pkramfs", "none", str(mnt), "-o", f"pkram=bench,{options},machine={machine}", env=env)
    target = mnt / "file"
    if small:
        fill_small_files(mnt, small)
        data_bytes = small * 1600
        check_path, check_size = mnt / "d7" / "f7000", 100 + 7000 % 3000
    else:
        fill_file(target, size)
        data_bytes = size
        check_path, check_size = target, size
    expected = sample_md5(check_path, check_size)
    start = time.perf_counter()
    _, preserve_cmd_ms = timed("mount", "-o", "remount,preserve,ro", str(mnt), env=env)
    saved = status(mnt, env)["last_preserve"]
    assert isinstance(saved, dict)
    sb = (machine / "sys/kernel/pkram").read_text().strip()
    sh("kexec-sim", "load", "--append", f"pkram={sb}", env=env)
    _, exec_ms = timed("kexec-sim", "exec", env=env)
    _, restore_cmd_ms = timed(
        "pkramfs", "none", str(mnt), "-o", f"pkram=bench,machine={machine}", env=env
    )
    with open(check_path, "rb") as f:
        f.read(1)
    blackout_ms = (time.perf_counter() - start) * 1e3
    restored = status(mnt, env)["restored"]
    assert isinstance(restored, dict)
    verified = sample_md5(check_path, check_size) == expected
    sh("umount", str(mnt), env=env)
    time.sleep(0.3)  # the daemon gives its pages back as it exits
    return Result(
        case,
        data_bytes,
        int(saved["entries"]),
        float(saved["seconds"]) * 1e3,
        preserve_cmd_ms,
        exec_ms,
        float(restored["seconds"]) * 1e3,
        restore_cmd_ms,
        blackout_ms,
        verified,
        dict(saved.get("phases_ms", {})),
        dict(restored.get("phases_ms", {})),
    )


def print_table(results: list[Result]) -> None:
    print()
    print(
        "Preserve and restore (daemon's own time, best of the runs; per GiB beside PKRAM's "
        "published per-GiB figures)"
    )
    header = (
        f"{'case':<22} {'entries':>9} {'preserve':>9} {'ms/GiB':>7} {'PKRAM':>10} "
        f"{'restore':>9} {'ms/GiB':>7} {'PKRAM':>10} {'remount':>8} {'exec':>7} {'mount':>7} "
        f"{'blackout':>9} {'ok':>3}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        gib = r.data_bytes / GIB
        kind = "huge" if "huge" in r.case else "4k"
        ref = PKRAM_MS_PER_GIB[kind]
        per_save = f"{r.preserve_ms / gib:7.2f}" if "files" not in r.case else f"{'-':>7}"
        per_rest = f"{r.restore_ms / gib:7.2f}" if "files" not in r.case else f"{'-':>7}"
        ref_save = f"{ref['save'][0]:.2f}-{ref['save'][1]:.2f}" if "files" not in r.case else "-"
        ref_rest = (
            f"{ref['restore'][0]:.2f}-{ref['restore'][1]:.2f}" if "files" not in r.case else "-"
        )
        print(
            f"{r.case:<22} {r.entries:>9} {r.preserve_ms:8.1f}m {per_save} {ref_save:>10} "
            f"{r.restore_ms:8.1f}m {per_rest} {ref_rest:>10} {r.preserve_cmd_ms:7.0f}m "
            f"{r.exec_ms:6.0f}m {r.restore_cmd_ms:6.0f}m {r.blackout_ms:8.0f}m "
            f"{'yes' if r.verified else 'NO':>3}"
        )
    print(
        "m = milliseconds. preserve/restore: the daemon's time for the tree (from its status); "
        "remount/exec/mount: wall time of `mount -o remount,preserve,ro`, `kexec-sim exec` and "
        "the restoring mount command; blackout: remount,preserve until the first byte is "
        "readable after the kexec (includes load, exec and the daemon start)."
    )


def report(case: str, result: Result) -> None:
    def phases(times: dict[str, float]) -> str:
        return ", ".join(f"{name} {ms:.1f}" for name, ms in times.items())

    print(
        f"  {case}: preserve {result.preserve_ms:.1f} ms ({phases(result.preserve_phases)}), "
        f"restore {result.restore_ms:.1f} ms ({phases(result.restore_phases)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench-preserve", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8", help="file sizes in GiB (default 1,2,4,8)")
    parser.add_argument("--small-files", type=int, default=100_000)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per file case; the best is shown (default 2)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ram_gib = max([*sizes, 1]) + 4
    machine = Path(tempfile.mkdtemp(prefix="bench-preserve-", dir="/dev/shm"))
    mnt = Path(tempfile.mkdtemp(prefix="pkramfs-bench-"))
    env = {**os.environ, "KEXEC_SIM_MACHINE": str(machine)}
    results = []
    try:
        shutil.rmtree(machine)
        sh("kexec-sim", "--machine", str(machine), "init", "--ram", f"{ram_gib}G", env=env)
        print(f"bench-preserve: machine {machine} with {ram_gib} GiB RAM, {os.cpu_count()} CPUs")
        for size in sizes:
            for kind, options in (("4 KiB pages", "huge=never"), ("huge=always", "huge=always")):
                case = f"{size} GiB file, {kind}"
                runs = []
                for _ in range(max(1, args.repeat)):
                    opts = f"{options},size=95%"
                    runs.append(one_case(machine, mnt, case, opts, size * GIB, 0, env))
                    report(case, runs[-1])
                results.append(min(runs, key=lambda r: r.preserve_ms + r.restore_ms))
        if args.small_files:
            case = f"{args.small_files // 1000}k small files"
            result = one_case(machine, mnt, case, "huge=never", 0, args.small_files, env)
            results.append(result)
            report(case, result)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        mnt.rmdir()
        time.sleep(0.5)
        shutil.rmtree(machine, ignore_errors=True)
    print_table(results)
    return 0 if all(r.verified for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
