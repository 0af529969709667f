"""The kexec-sim command line: commands, output, one-line errors and exit codes."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kexec_sim import MACHINE_ENV, Machine
from kexec_sim import cli as kexec_sim_cli
from kexec_sim.cli import main
from kexec_sim.ownership import HEADER_BYTES, MAP_FILE

from .util import BIN, REPO, run


@pytest.fixture
def machine_dir(tmp_path: Path) -> Path:
    return tmp_path / "machine"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``kexec-sim ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, text: str) -> None:
    assert err.count("\n") == 1 and err.startswith("kexec-sim: error: "), err
    assert text in err
    assert "Traceback" not in err


def test_init_then_status(capsys: pytest.CaptureFixture[str], machine_dir: Path) -> None:
    code, out, err = cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")
    assert (code, err) == (0, "")
    assert "64.0 MiB RAM, 16384 pages, generation 1" in out
    code, out, err = cli(capsys, "--machine", str(machine_dir), "status")
    assert (code, err) == (0, "")
    assert f"machine:     {machine_dir}" in out
    assert "generation:  1" in out
    for line in ["free:", "firmware:", "kernel:", "nosave:", "preserved:", "owned:", "handover:"]:
        assert line in out
    assert (
        "powered:     on" in out and "super block: pfn 256" in out and "loaded:      nothing" in out
    )


def test_status_json_counts_pages_per_owner(
    capsys: pytest.CaptureFixture[str], machine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli(capsys, "--machine", str(machine_dir), "init", "--ram", "1GiB")[0] == 0
    machine = Machine.open(machine_dir, create=False)
    with machine.page_ownership() as po:
        owner = po.register_owner("mytmpfs", os.getpid(), mountpoint="/mnt/my tmpfs")
        po.allocate(owner, 1000)
    monkeypatch.setenv(MACHINE_ENV, str(machine_dir))  # no --machine: the environment decides
    code, out, err = cli(capsys, "status", "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["machine"] == str(machine_dir)
    assert (report["generation"], report["cmdline"], report["powered"]) == (1, "", True)
    assert report["super_block_pfn"] == 256 and report["loaded"] is None
    pages = report["pages"]
    assert pages["total"] == 1 << 18
    assert (pages["firmware"], pages["kernel"], pages["nosave"]) == (256, 8192, 256)
    assert pages["reserved"] == 256 + 8192 + 256
    assert (pages["owned"], pages["handover"], pages["preserved"]) == (1000, 1, 0)
    assert pages["free"] == pages["total"] - 256 - 8192 - 256 - 1000 - 1
    assert report["bytes"] == {kind: n * 4096 for kind, n in pages.items()}
    me = {"id": owner, "name": "mytmpfs", "pid": os.getpid(), "alive": True, "pages": 1000}
    assert report["owners"] == [{**me, "mountpoint": "/mnt/my tmpfs"}]
    assert report["mounts"] == [{**me, "mountpoint": "/mnt/my tmpfs"}]


def test_check_reclaims_dead_owners(capsys: pytest.CaptureFixture[str], machine_dir: Path) -> None:
    assert cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")[0] == 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Machine.open(machine_dir).page_ownership() as po:
            po.allocate(po.register_owner("short-lived", child.pid), 10)
    finally:
        child.kill()
        child.wait()
    code, out, err = cli(capsys, "--machine", str(machine_dir), "check")
    assert (code, err) == (0, "")
    assert "reclaimed 1 dead owners: 1" in out
    assert "0 problems" in out


def test_check_reports_a_damaged_map(capsys: pytest.CaptureFixture[str], machine_dir: Path) -> None:
    assert cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")[0] == 0
    fd = os.open(machine_dir / "boot" / MAP_FILE, os.O_WRONLY)
    os.pwrite(fd, np.int32(42).tobytes(), HEADER_BYTES + 4 * 300)
    os.close(fd)
    code, out, _ = cli(capsys, "--machine", str(machine_dir), "check")
    assert code == 1
    assert "problem: 1 pfns are owned by unregistered owner 42, e.g. 300" in out


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (["init", "--ram", "lots"], 2, "--ram: not a size: 'lots'"),
        (["init", "--ram", "1M"], 2, "--ram: RAM size 1048576 bytes"),
        (["init", "--ram", "12345"], 2, "multiple of 4096"),
        (["bogus"], 2, "invalid choice: 'bogus'"),
        ([], 2, "required: COMMAND"),
        (["status", "--verbose"], 2, "unrecognized arguments: --verbose"),
        (["status"], 1, "no machine at"),
        (["check"], 1, "no machine at"),
    ],
)
def test_user_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], machine_dir: Path, argv: list[str], code: int, text: str
) -> None:
    got, out, err = cli(capsys, "--machine", str(machine_dir), *argv)
    assert got == code and out == ""
    assert_one_line_error(err, text)
    assert not machine_dir.exists()


def test_init_twice_needs_force(capsys: pytest.CaptureFixture[str], machine_dir: Path) -> None:
    assert cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")[0] == 0
    code, _, err = cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")
    assert code == 1
    assert_one_line_error(err, "already exists")
    assert "--force" in err
    code, out, _ = cli(capsys, "--machine", str(machine_dir), "init", "--ram", "128M", "--force")
    assert code == 0 and "128.0 MiB" in out


def test_corrupt_machine_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], machine_dir: Path
) -> None:
    assert cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")[0] == 0
    (machine_dir / "machine.json").write_text("{")
    code, _, err = cli(capsys, "--machine", str(machine_dir), "status")
    assert code == 1
    assert_one_line_error(err, "not valid JSON")


def test_host_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    code, _, err = cli(
        capsys, "--machine", str(tmp_path / "file" / "machine"), "init", "--ram", "64M"
    )
    assert code == 1
    assert_one_line_error(err, "file")


def test_runs_as_a_program(machine_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = run(
        sys.executable, "-m", "kexec_sim.cli", "--machine", str(machine_dir), "status", env=env
    )
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line_error(done.stderr, "no machine at")


@pytest.mark.parametrize(
    "command",
    [
        ["kexec-sim", "status"],
        ["kexec-sim", "check"],
        ["kexec-sim", "load"],
        ["kexec-sim", "exec"],
        ["kexec-sim", "hibernate", "--image", "IMAGE"],
        ["kexec-sim", "resume", "--image", "IMAGE"],
        ["pkramfs-ctl", "nodes"],
        ["pkramfs-ctl", "check"],
    ],
)
def test_a_machine_not_made_yet_is_one_line_saying_how(tmp_path: Path, command: list[str]) -> None:
    """The first run as a new user meets it: nothing made yet, one line saying what makes it."""
    missing = tmp_path / "not-yet"
    argv = [a.replace("IMAGE", str(tmp_path / "img")) for a in command]
    done = run(str(BIN / argv[0]), *argv[1:], env={**os.environ, MACHINE_ENV: str(missing)})
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "the first pkramfs mount makes it, or 'kexec-sim init'" in done.stderr
    assert not missing.exists()


@pytest.mark.parametrize("bug", [ZeroDivisionError("boom"), ValueError("a numpy bug")])
def test_an_unexpected_exception_is_one_line_and_a_log(
    capsys: pytest.CaptureFixture[str],
    machine_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    bug: Exception,
) -> None:
    """A bug is not a user mistake: exit 70, one line naming it and the traceback's file."""
    assert cli(capsys, "--machine", str(machine_dir), "init", "--ram", "64M")[0] == 0

    def broken(args: object) -> int:
        raise bug

    monkeypatch.setitem(
        kexec_sim_cli.COMMANDS, "status", replace(kexec_sim_cli.COMMANDS["status"], run=broken)
    )
    code, out, err = cli(capsys, "--machine", str(machine_dir), "status")
    assert code == 70 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"kexec-sim: internal error: {type(bug).__name__}: {bug}" in err
    log = Path(err.rsplit("(traceback in ", 1)[1].removesuffix(")\n"))
    assert log.parent == machine_dir / "logs"
    assert "Traceback" in log.read_text() and "in broken" in log.read_text()


def test_a_bad_request_from_the_library_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], machine_dir: Path
) -> None:
    code, _, err = cli(capsys, "--machine", str(machine_dir), "init", "--ram", "12Q")
    assert code == 2
    assert_one_line_error(err, "--ram: not a size")
    code, _, err = cli(capsys, "--machine", str(machine_dir), "init", "--ram", "1M")
    assert code == 2
    assert_one_line_error(err, "must be a multiple of 4096 between")
