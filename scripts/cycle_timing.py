"""One timed PKRAM handover cycle, as the benchmarks (bench_preserve, kexec_cycles) run it.

The cycle is the user's, in the designed order: ``kexec-sim load`` first (pkramfs asks at
preserve where the staged kernel will go: docs/KEXEC-SIM.md), then the blackout:

1. ``mount -o remount,preserve,ro MNT`` for each mount: the remount helper starts, the daemon
   records its tree in RAM, the helper flips the kernel's ro flag;
2. ``kexec-sim exec --json``: start-up, then its phases stop (the old daemons), table, scrub,
   image, boot;
3. ``pkramfs none MNT -o pkram=NAME`` for each mount: the command starts, forks the daemon,
   which imports its code, validates and restores the tree, mounts, and takes the node;
4. the first byte: open and read one byte of a file of each mount.

The blackout is the sum of the wall times of those commands, run back to back: it includes
every start-up and the daemons' work, and nothing of the benchmark's own (its status
queries of the daemons, one getxattr each, sit between the commands and are not counted).

mount(8) runs its helper without PATH: ``pkramfs`` from the default shell path, i.e. the
checkout scripts/setup linked into /usr/local/bin. When that is not this checkout's, the
helper is run directly (what mount(8) would run, without mount(8) and mount.fuse3 around it)
and ``remount_via`` says so.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkramfs import control

HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Where the shell that mount(8)'s helper starts finds ``pkramfs`` (it gets no PATH)."""
EXEC_PHASES = ("stop", "table", "scrub", "image", "boot")
PHASES = (
    "helper: the remount helper but the daemon's preserve (start-up, its request, the ro flag); "
    "preserve: the daemon's; exec start-up: kexec-sim exec but its phases; stop (the old "
    "daemons), table, scrub, image, boot: exec's phases; mount: the restoring mount command "
    "but the daemon's restore (start-ups, imports, the FUSE mount); restore: the daemon's; "
    "first byte: open and read one byte"
)
"""What each phase of `Cycle.phases` is."""


def sh(*cmd: str, env: dict[str, str]) -> str:
    """Run *cmd*; its stdout. Exits the benchmark with its stderr when it fails."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"{Path(sys.argv[0]).stem.replace('_', '-')}: {' '.join(cmd)} failed: {result.stderr}"
        )
    return result.stdout


def timed(*cmd: str, env: dict[str, str]) -> tuple[str, float]:
    """Run *cmd*; (its stdout, its wall time in ms)."""
    start = time.perf_counter()
    out = sh(*cmd, env=env)
    return out, (time.perf_counter() - start) * 1e3


def remount_command(mnt: Path, env: dict[str, str]) -> tuple[list[str], str]:
    """The command for ``remount,preserve,ro`` of *mnt* and how it runs (see the docstring)."""
    ours = shutil.which("pkramfs", path=env.get("PATH"))
    helper = shutil.which("pkramfs", path=HELPER_PATH)
    if ours and helper and os.path.realpath(ours) == os.path.realpath(helper):
        return ["mount", "-o", "remount,preserve,ro", str(mnt)], "mount(8)"
    helper_call = ["pkramfs", "none", str(mnt), "-o", "remount,preserve,ro"]
    return helper_call, f"the helper run directly (mount(8) would run {helper})"


@dataclass(frozen=True)
class Mount:
    """A mount of the cycle: its pkram= name, where, and a file to read the first byte of."""

    name: str
    mnt: Path
    first_byte: Path


@dataclass
class Cycle:
    """What one cycle took: the wall time of each command (ms) and the daemons' reports."""

    load_ms: float
    remount_ms: dict[str, float]
    preserved: dict[str, dict[str, Any]]
    """Each mount's ``last_preserve`` (seconds, phases_ms, entries, ...)."""
    exec_ms: float
    exec_phases_ms: dict[str, float]
    mount_ms: dict[str, float]
    restored: dict[str, dict[str, Any]]
    """Each mount's ``restored`` (seconds, phases_ms, ...)."""
    first_byte_ms: float
    remount_via: str = ""

    @property
    def blackout_ms(self) -> float:
        """remount,preserve of every mount to the first byte after the kexec (the docstring)."""
        return (
            sum(self.remount_ms.values())
            + self.exec_ms
            + sum(self.mount_ms.values())
            + self.first_byte_ms
        )

    def preserve_ms(self, name: str) -> float:
        """The daemon's own time to preserve mount *name*."""
        return float(self.preserved[name]["seconds"]) * 1e3

    def restore_ms(self, name: str) -> float:
        """The daemon's own time to restore mount *name*."""
        return float(self.restored[name]["seconds"]) * 1e3

    def phases(self) -> dict[str, float]:
        """The blackout in phases (ms), adding up to it (PHASES says what each is); a phase of
        one mount is suffixed with its name when there are several."""
        names = list(self.remount_ms)
        tags = {name: f" {name}" if len(names) > 1 else "" for name in names}
        out: dict[str, float] = {}
        for name in names:
            out[f"helper{tags[name]}"] = self.remount_ms[name] - self.preserve_ms(name)
            out[f"preserve{tags[name]}"] = self.preserve_ms(name)
        out["exec start-up"] = self.exec_ms - sum(self.exec_phases_ms.values())
        out.update({phase: self.exec_phases_ms.get(phase, 0.0) for phase in EXEC_PHASES})
        for name in names:
            out[f"mount{tags[name]}"] = self.mount_ms[name] - self.restore_ms(name)
            out[f"restore{tags[name]}"] = self.restore_ms(name)
        out["first byte"] = self.first_byte_ms
        return out


def run_cycle(machine: Path, mounts: Sequence[Mount], env: dict[str, str]) -> Cycle:
    """Load, preserve every mount, exec, restore every mount, read a first byte of each:
    one timed cycle (the mounts are mounted with their pkram= name on *machine*)."""
    sb = (machine / "sys/kernel/pkram").read_text().strip()
    _, load_ms = timed("kexec-sim", "load", "--append", f"pkram={sb}", env=env)
    remount_ms, preserved = {}, {}
    via = ""
    for m in mounts:
        command, via = remount_command(m.mnt, env)
        _, remount_ms[m.name] = timed(*command, env=env)
        preserved[m.name] = control.query_status(str(m.mnt))["last_preserve"]
    out, exec_ms = timed("kexec-sim", "exec", "--json", env=env)
    phases = {k: v * 1e3 for k, v in json.loads(out)["durations_s"].items()}
    mount_ms = {}
    for m in mounts:
        _, mount_ms[m.name] = timed(
            "pkramfs", "none", str(m.mnt), "-o", f"pkram={m.name},machine={machine}", env=env
        )
    start = time.perf_counter()
    for m in mounts:
        with open(m.first_byte, "rb") as f:
            f.read(1)
    first_byte_ms = (time.perf_counter() - start) * 1e3
    restored = {m.name: control.query_status(str(m.mnt))["restored"] for m in mounts}
    return Cycle(
        load_ms, remount_ms, preserved, exec_ms, phases, mount_ms, restored, first_byte_ms, via
    )


def summary(values: Sequence[float], digits: int = 0) -> str:
    """``median (min-max)`` of *values*."""
    if not values:
        return "-"
    med, low, high = statistics.median(values), min(values), max(values)
    return f"{med:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def startup_ms(env: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Wall time (ms) of each program of the cycle started alone and cold, *runs* times: the
    interpreter, ``pkramfs`` (``--help``: the remount helper, a mount without a standby),
    ``kexec-sim`` (``--help``: load, an exec without an agent), and the daemon's imports (what
    the standby loads ahead of a restoring mount)."""
    python = sys.executable  # the interpreter the daemon runs on (PATH may have another)
    programs = {
        "python -c pass (the interpreter)": [python, "-c", "pass"],
        "pkramfs --help (remount helper; mount, cold)": ["pkramfs", "--help"],
        "kexec-sim --help (load; exec, cold)": ["kexec-sim", "--help"],
        "the daemon's imports (the standby's, ahead)": [python, "-c", "import pkramfs.daemon"],
    }
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(runs):
        for name, command in programs.items():
            times[name].append(timed(*command, env=env)[1])
    return times


def rss_anon_bytes(pid: int) -> int:
    """The anonymous resident memory of process *pid* (its own, not the RAM it maps)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no RssAnon in /proc/{pid}/status")
