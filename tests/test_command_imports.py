"""The commands on a handover's critical path import only what they use: their start-up is
part of the blackout. Each command runs for real in a fresh interpreter, which then lists the
modules it imported (no timing: which modules, not how long)."""

import json
import os
import subprocess
import sys

from kexec_sim.machine import Machine
from kexec_sim.warm_start import wait_ready

from .conftest import Mounts
from .util import ctl_status, run

HIBERNATION_IMAGE_CODE = (
    *(f"kexec_sim.hibernation.{name}" for name in ("hibernate", "resume", "reader", "writer")),
    *(f"kexec_sim.hibernation.{name}" for name in ("crypto", "chunks", "cli")),
    *("lz4", "zstandard", "cryptography"),
)
"""What only hibernate and resume need: the image's reader, writer, ciphers and codecs."""


def imported_by(module: str, *argv: str) -> tuple[int, list[str], str]:
    """Run ``main(argv)`` of *module* in a fresh interpreter; (exit code, the modules it
    imported, what it printed to stderr)."""
    probe = (
        "import json, sys\n"
        f"from {module} import main\n"
        f"code = main({list(argv)!r})\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    done = run(sys.executable, "-c", probe)
    code, modules = json.loads(done.stdout.splitlines()[-1])
    return code, modules, done.stderr


def among(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of *modules* that are one of *packages* or inside one."""
    return [m for m in modules if m in packages or m.startswith(tuple(f"{p}." for p in packages))]


def test_the_remount_helper_imports_no_numpy_and_no_hibernation(mounts: Mounts) -> None:
    """``mount -o remount,...`` runs ``pkramfs`` as its helper: it sends the daemon a command
    and sets the kernel's ro flag, with no use for numpy, FUSE or the hibernation code, nor
    for opening the machine (the daemon's status has its RAM size) when no transition is
    recorded."""
    mnt = mounts.mount("pkram=imports")
    (mnt / "file").write_bytes(b"data")
    for options, preserved in (("remount,preserve,ro", True), ("remount,rw", False)):
        code, modules, err = imported_by("pkramfs.mount_cli", "none", str(mnt), "-o", options)
        assert code == 0, err
        assert (ctl_status(mnt)["preserved_node"] is not None) is preserved
        assert among(modules, ("numpy", "kexec_sim.hibernation", "pyfuse3", "trio")) == []
        assert among(modules, ("kexec_sim.machine", "kexec_sim.recovery", "logging")) == []
        assert among(modules, ("kexec_sim.warm_start", "pathlib")) == []


def test_kexec_sim_load_imports_neither_exec_nor_hibernation(small_machine: Machine) -> None:
    code, modules, err = imported_by(
        "kexec_sim.cli", "--machine", str(small_machine.path), "load", "--append", "quiet"
    )
    assert code == 0, err
    assert among(modules, ("kexec_sim.kexec", "kexec_sim.power", "kexec_sim.hibernation")) == []


def test_kexec_sim_exec_imports_no_hibernation_image_code(small_machine: Machine) -> None:
    machine = ["--machine", str(small_machine.path)]
    assert imported_by("kexec_sim.cli", *machine, "load")[0] == 0
    code, modules, err = imported_by("kexec_sim.cli", *machine, "exec")
    assert code == 0, err
    assert among(modules, HIBERNATION_IMAGE_CODE) == []


def test_importing_numpy_through_kexec_sim_starts_no_thread() -> None:
    """numpy's OpenBLAS would start a thread per CPU as it is imported (~50 ms of start-up)."""
    probe = "import os, kexec_sim, numpy; print(len(os.listdir('/proc/self/task')))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.strip() == "1"


def test_the_package_imports_nothing_until_a_name_is_used() -> None:
    probe = "import sys, kexec_sim; print(sorted(m for m in sys.modules if 'kexec_sim' in m))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['kexec_sim']"


def test_a_warm_exec_imports_neither_numpy_nor_the_machine(small_machine: Machine) -> None:
    """``kexec-sim exec`` with the agent waiting hands itself over with the standard library's
    lightest modules: the exec's code is the agent's."""
    machine = ["--machine", str(small_machine.path)]
    assert imported_by("kexec_sim.cli", *machine, "load")[0] == 0
    assert wait_ready("exec", str(small_machine.path), small_machine.generation, 20)
    code, modules, err = imported_by("kexec_sim.entry", *machine, "exec")
    assert code == 0, err
    assert small_machine.generation == 2
    assert among(modules, ("numpy", "msgpack", "kexec_sim.machine", "dataclasses")) == []
