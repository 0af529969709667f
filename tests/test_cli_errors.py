"""The pkramfs CLIs' errors: a host refusal is one line; a bug is one line, a log and its own
exit code (pkramfs-ctl 70, the mount helper 4, mount(8)'s "internal mount bug")."""

import tempfile
from pathlib import Path

import pytest

from kexec_sim import Machine
from pkramfs import ctl_cli, mount_cli


def _check_raising(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def broken(machine: Machine) -> list[str]:
        raise error

    monkeypatch.setattr(ctl_cli, "check_machine", broken)


def test_a_host_refusal_is_one_line(
    small_machine: Machine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_raising(monkeypatch, PermissionError(13, "Permission denied", "/somewhere"))
    assert ctl_cli.main(["check", "--machine", str(small_machine.path)]) == 1
    err = capsys.readouterr().err
    assert err == "pkramfs-ctl: /somewhere: Permission denied\n"


def test_a_bug_is_one_line_and_a_log(
    small_machine: Machine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_raising(monkeypatch, KeyError("owner"))
    assert ctl_cli.main(["check", "--machine", str(small_machine.path)]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pkramfs-ctl: internal error: KeyError")
    log = Path(err.rsplit("(traceback in ", 1)[1].removesuffix(")\n"))
    assert log.parent == small_machine.path / "logs" and "in broken" in log.read_text()


def test_a_bug_in_the_mount_helper_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(items: list[str], ram_bytes: int) -> object:
        raise RuntimeError("inconceivable")

    monkeypatch.setattr(mount_cli, "parse_options", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no machine yet: the log goes there
    assert mount_cli.main(["none", str(tmp_path), "-o", "size=1M"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pkramfs: internal error: RuntimeError: inconceivable (traceback in ")
    assert len(list(tmp_path.glob("pkramfs-internal-error-*.log"))) == 1
