"""Warm starts (kexec_sim.warm_start): ``kexec-sim exec`` run by the agent ``kexec-sim load``
started, the next boot's ``pkramfs`` mount run by the standby a pkram mount started. Each runs
as the cold command would (its streams, environment, directory, exit code, signals), and the
warm processes end once nothing is left for them to run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kexec_sim.machine import Machine

from .conftest import Mounts
from .util import BIN, ctl_status, load_next_kernel, preserve, run

WAIT_S = 20.0
TIMEOUT_S = 60.0


def warm_processes(module: str, machine: Machine) -> dict[int, int]:
    """The live processes ``python -m MODULE MACHINE_DIR GENERATION`` but the machine's
    daemons (a daemon the standby forked has its command line): pid -> generation."""
    daemons = {owner.pid for owner in machine.live_owners()}
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")[:-1]
            with open(f"/proc/{entry}/stat", "rb") as file:
                zombie = file.read().rpartition(b")")[2].split()[0] == b"Z"
        except OSError:
            continue
        ours = argv[1:4] == [b"-m", module.encode(), os.fsencode(machine.path)]
        if ours and not zombie and int(entry) not in daemons:
            found[int(entry)] = int(argv[4])
    return found


def eventually(predicate: Callable[[], bool]) -> bool:
    """Whether *predicate* holds within WAIT_S (warm processes look every 0.25 s)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kexec_sim(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real ``kexec-sim`` (on the machine the environment names, unless told)."""
    return run(str(BIN / "kexec-sim"), *argv, env=env, cwd=cwd)


# -- the exec agent -------------------------------------------------------------------------


def test_exec_runs_in_the_agent_load_started(machine: Machine) -> None:
    """The agent is the process that dies at an exec's fault point; the command says so and
    dies the same way, and the machine then recovers as from any killed exec."""
    assert kexec_sim("load").returncode == 0
    agents = warm_processes("kexec_sim.exec_agent", machine)
    assert list(agents.values()) == [machine.generation]
    killed = kexec_sim("exec", env={**os.environ, "KEXEC_SIM_FAULT": "exec:image"})
    assert killed.returncode == -signal.SIGKILL
    assert f"process running this command (pid {next(iter(agents))}) was killed" in killed.stderr
    status = kexec_sim("status")
    assert status.returncode == 0, status.stderr
    assert "finished" in status.stderr and machine.generation == 2


def test_the_agent_runs_exec_as_the_command_would(machine: Machine, tmp_path: Path) -> None:
    """The command's environment (the scrub mode), working directory (a relative --machine),
    streams and exit code are the exec's; the agent runs one command, the next runs cold."""
    env_punch = {**os.environ, "KEXEC_SIM_SCRUB": "punch"}
    assert kexec_sim("load", env=env_punch).returncode == 0
    refused = kexec_sim("exec", "--scrub", "bogus")
    assert refused.returncode == 2 and refused.stderr.startswith("kexec-sim: error: ")
    assert eventually(lambda: not warm_processes("kexec_sim.exec_agent", machine))
    assert kexec_sim("load", env=env_punch).returncode == 0
    assert eventually(lambda: bool(warm_processes("kexec_sim.exec_agent", machine)))
    relative = os.path.relpath(machine.path, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "KEXEC_SIM_MACHINE"}
    done = kexec_sim(
        "--machine", relative, "exec", env={**env, "KEXEC_SIM_SCRUB": "poison"}, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "pages (poison)" in done.stdout
    assert machine.generation == 2
    assert eventually(lambda: not warm_processes("kexec_sim.exec_agent", machine))


def test_ctrl_c_reaches_the_exec_the_agent_runs(machine: Machine) -> None:
    """SIGINT to the command interrupts the exec in the agent: exit 130, nothing changed."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('term', flush=True))\n"
        "print('ready', flush=True)\n"
        "time.sleep(1000)\n"
    )
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    exec_ = None
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        with machine.page_ownership() as po:
            po.register_owner("stubborn", stubborn.pid)
        assert kexec_sim("load").returncode == 0
        exec_ = subprocess.Popen(
            [str(BIN / "kexec-sim"), "exec", "--stop-timeout", "600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not a bg job's
        )
        assert stubborn.stdout.readline() == "term\n"  # the exec waits on it now
        exec_.send_signal(signal.SIGINT)
        out, err = exec_.communicate(timeout=TIMEOUT_S)
    finally:
        for process in (exec_, stubborn):
            if process is not None:
                process.kill()
                process.communicate(timeout=TIMEOUT_S)
    assert exec_.returncode == 130, (out, err)
    assert err.strip().endswith("kexec-sim: error: interrupted")
    assert machine.generation == 1


def test_the_agent_ends_when_nothing_is_left_to_exec(machine: Machine) -> None:
    for end in (("unload",), ("reboot",)):
        assert kexec_sim("load").returncode == 0
        assert warm_processes("kexec_sim.exec_agent", machine)
        assert kexec_sim(*end).returncode == 0
        assert eventually(lambda: not warm_processes("kexec_sim.exec_agent", machine)), end
    assert kexec_sim("load").returncode == 0
    assert warm_processes("kexec_sim.exec_agent", machine)
    shutil.rmtree(machine.path)
    assert eventually(lambda: not warm_processes("kexec_sim.exec_agent", machine))


def test_without_an_agent_exec_runs_cold(machine: Machine) -> None:
    """A load that started no agent (the library's) leaves exec to run as always."""
    from kexec_sim import kernel_image

    kernel_image.load(machine, "quiet")
    assert not warm_processes("kexec_sim.exec_agent", machine)
    done = kexec_sim("exec")
    assert done.returncode == 0, done.stderr
    assert machine.generation == 2


# -- the pkramfs standby --------------------------------------------------------------------


def forked_by_standby(mnt: Path) -> bool:
    """Whether the daemon serving *mnt* was forked by a standby (it has its command line)."""
    with open(f"/proc/{ctl_status(mnt)['pid']}/cmdline", "rb") as cmdline:
        return b"pkramfs.standby" in cmdline.read()


def test_the_next_boots_mounts_run_in_the_standby(mounts: Mounts) -> None:
    """Each mount of the boot the standby waited for runs in a child it forks; the standby
    stays for the next one, and the first restored daemon starts one for the boot after."""
    machine = mounts.machine
    first, second = mounts.mount("pkram=warm"), mounts.mount("pkram=other")
    (first / "file").write_bytes(b"kept" * 1000)
    # Each mount started one; the second ends at once (one standby per machine and boot).
    assert eventually(lambda: len(warm_processes("pkramfs.standby", machine)) == 1)
    ((standby, target),) = warm_processes("pkramfs.standby", machine).items()
    assert target == machine.generation + 1
    preserve(first)
    preserve(second)
    load_next_kernel(machine)
    assert kexec_sim("exec").returncode == 0
    assert machine.generation == target
    mounts.mount("pkram=warm", first)
    assert (first / "file").read_bytes() == b"kept" * 1000
    assert forked_by_standby(first)
    assert standby in warm_processes("pkramfs.standby", machine)
    mounts.mount("pkram=other", second)
    assert forked_by_standby(second)
    assert eventually(
        lambda: sorted(warm_processes("pkramfs.standby", machine).values()) == [target, target + 1]
    )


def test_a_warm_mount_fails_as_a_cold_one(mounts: Mounts) -> None:
    """A bad option gets the same one line and exit code from the standby as from a cold
    start (the second try, once the standby is gone)."""
    machine = mounts.machine
    mnt = mounts.mount("pkram=warm")
    preserve(mnt)
    load_next_kernel(machine)
    assert kexec_sim("exec").returncode == 0
    bad = ["none", str(mounts.mountpoint()), "-o", f"machine={machine.path},size=bogus"]
    assert eventually(lambda: bool(warm_processes("pkramfs.standby", machine)))
    warm = run(str(BIN / "pkramfs"), *bad)
    for standby in warm_processes("pkramfs.standby", machine):
        os.kill(standby, signal.SIGTERM)
    assert eventually(lambda: not warm_processes("pkramfs.standby", machine))
    cold = run(str(BIN / "pkramfs"), *bad)
    assert (warm.returncode, warm.stdout, warm.stderr) == (1, "", cold.stderr)
    assert cold.returncode == 1 and cold.stderr.count("\n") == 1


def test_the_standby_ends_with_the_machines_last_daemon(mounts: Mounts) -> None:
    machine = mounts.machine
    mnt = mounts.mount("pkram=warm")
    assert eventually(lambda: bool(warm_processes("pkramfs.standby", machine)))
    assert mounts.unmount(mnt)
    assert eventually(lambda: not warm_processes("pkramfs.standby", machine))


def test_the_standby_of_a_boot_ends_once_its_mounts_are_gone(mounts: Mounts) -> None:
    """A standby that ran the restoring mount of its boot ends when that daemon ends (as after
    the demo's last umount), not IDLE_S later."""
    machine = mounts.machine
    mnt = mounts.mount("pkram=warm")
    assert eventually(lambda: bool(warm_processes("pkramfs.standby", machine)))
    preserve(mnt)
    load_next_kernel(machine)
    assert kexec_sim("exec").returncode == 0
    mounts.mount("pkram=warm", mnt)
    assert forked_by_standby(mnt)
    assert mounts.unmount(mnt)
    assert eventually(lambda: not warm_processes("pkramfs.standby", machine))
