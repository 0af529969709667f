"""The machine directory: resolution, creation, validation, boots."""

import json
import os
import stat
from pathlib import Path

import pytest

from kexec_sim import (
    DEFAULT_MACHINE_DIR,
    DEFAULT_RAM_BYTES,
    MACHINE_ENV,
    CorruptMachine,
    InvalidRequest,
    Machine,
    MachineError,
    MachineExists,
    MemoryMap,
    resolve_machine_dir,
)
from kexec_sim.mounts import MountInfo, read_mountinfo

from .util import SMALL_RAM_BYTES


def test_resolution_prefers_argument_then_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(MACHINE_ENV, raising=False)
    assert resolve_machine_dir(None) == DEFAULT_MACHINE_DIR == Path("/dev/shm/kexec-sim/default")
    monkeypatch.setenv(MACHINE_ENV, str(tmp_path / "env"))
    assert resolve_machine_dir(None) == tmp_path / "env"
    assert resolve_machine_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_machine_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.setenv(MACHINE_ENV, "")
    assert resolve_machine_dir(None) == DEFAULT_MACHINE_DIR


def test_create_lays_out_the_directory(small_machine: Machine) -> None:
    root = small_machine.path
    files = [
        "machine.json",
        "RAM",
        "boot.json",
        "cmdline",
        "boot/page-owners",
        "boot/owners.json",
        "boot/lock",
        "sys/kernel/pkram",
        "logs/boot-1.log",
    ]
    for name in files:
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    for name in ["", "sys", "sys/kernel", "boot", "logs"]:
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o700, name
    assert sorted(p.name for p in root.parent.iterdir()) == ["machine"]  # no staging left
    config = json.loads((root / "machine.json").read_text())
    assert (
        config["format"] == 1
        and config["ram_bytes"] == SMALL_RAM_BYTES
        and config["page_size"] == 4096
    )
    assert (
        MemoryMap.from_dict(config["memory_map"], small_machine.nr_pages)
        == small_machine.memory_map
    )
    assert (root / "RAM").stat().st_size == SMALL_RAM_BYTES
    assert (root / "RAM").stat().st_blocks * 512 <= 4096  # sparse: the super block only
    assert (root / "sys/kernel/pkram").read_text() == "256\n"  # the first usable page
    assert small_machine.super_block_pfn == 256
    assert "new empty super block at pfn 256" in (root / "logs/boot-1.log").read_text()
    assert (small_machine.generation, small_machine.cmdline) == (1, "")
    assert (root / "cmdline").read_text() == "\n"
    assert small_machine.nr_pages == SMALL_RAM_BYTES // 4096
    assert small_machine.memory_map == MemoryMap.default_for(small_machine.nr_pages)


def test_create_refuses_an_existing_machine_unless_forced(small_machine: Machine) -> None:
    with small_machine.page_ownership() as po:
        po.allocate(po.register_owner("old", os.getpid()), 10)
    with pytest.raises(MachineExists, match="already exists"):
        Machine.create(small_machine.path, SMALL_RAM_BYTES)
    fresh = Machine.create(small_machine.path, 2 * SMALL_RAM_BYTES, force=True)
    assert fresh.ram_bytes == 2 * SMALL_RAM_BYTES
    with fresh.page_ownership() as po:
        assert po.owners() == {}
    assert sorted(p.name for p in small_machine.path.parent.iterdir()) == ["machine"]


def test_create_never_wipes_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data").write_text("keep me")
    with pytest.raises(MachineError, match="not a machine directory"):
        Machine.create(tmp_path / "precious", SMALL_RAM_BYTES, force=True)
    assert (tmp_path / "precious" / "data").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(MachineError, match="not a directory"):
        Machine.create(tmp_path / "file", SMALL_RAM_BYTES)


def test_create_fills_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert Machine.create(tmp_path / "empty", SMALL_RAM_BYTES).generation == 1


@pytest.mark.parametrize("ram_bytes", [0, 4096, (4 << 20) - 4096, SMALL_RAM_BYTES + 1, 1 << 41])
def test_create_rejects_bad_sizes(tmp_path: Path, ram_bytes: int) -> None:
    with pytest.raises(InvalidRequest, match="multiple of 4096"):
        Machine.create(tmp_path / "m", ram_bytes)
    assert not (tmp_path / "m").exists()


def test_open_creates_a_default_machine_or_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MachineError, match="no machine at"):
        Machine.open(tmp_path / "m", create=False)
    monkeypatch.setenv(MACHINE_ENV, str(tmp_path / "m"))
    machine = Machine.open()
    assert machine.path == tmp_path / "m" and machine.ram_bytes == DEFAULT_RAM_BYTES
    assert Machine.open(create=False).ram_bytes == DEFAULT_RAM_BYTES


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": 2}, "unsupported format"),
        ({"page_size": 8192}, "page_size"),
        ({"ram_bytes": "64M"}, "ram_bytes"),
        ({"ram_bytes": SMALL_RAM_BYTES + 4096}, "RAM: .* bytes, machine.json says"),
        ({"ram_bytes": 12345}, "multiple of 4096"),
        ({"created_ns": None}, "created_ns"),
        (
            {
                "memory_map": {
                    "regions": [{"start_pfn": 0, "end_pfn_exclusive": 1 << 30, "type": "usable"}]
                }
            },
            "beyond",
        ),
    ],
)
def test_open_rejects_a_corrupt_machine_json(
    small_machine: Machine, changes: dict[str, object], message: str
) -> None:
    edit_json(small_machine.path / "machine.json", **changes)
    with pytest.raises(CorruptMachine, match=message):
        Machine.open(small_machine.path)


def test_open_rejects_garbage_files(small_machine: Machine) -> None:
    (small_machine.path / "boot.json").write_text(
        '{"generation": 0, "cmdline": "", "booted_ns": 1}'
    )
    with pytest.raises(CorruptMachine, match="generation"):
        Machine.open(small_machine.path)
    (small_machine.path / "boot.json").unlink()
    with pytest.raises(CorruptMachine, match=r"boot\.json: missing"):
        Machine.open(small_machine.path)
    (small_machine.path / "machine.json").write_bytes(b"\xff\x00")
    with pytest.raises(CorruptMachine, match="not valid JSON"):
        Machine.open(small_machine.path)
    (small_machine.path / "machine.json").write_text("[1]")
    with pytest.raises(CorruptMachine, match="expected a JSON object"):
        Machine.open(small_machine.path)


def test_start_boot_moves_to_the_next_generation(small_machine: Machine) -> None:
    with small_machine.page_ownership() as po:
        po.allocate(po.register_owner("old", os.getpid()), 10)
    (small_machine.boot_dir / "leftover").write_text("from the old boot")
    small_machine.start_boot("pkram=4242 quiet")
    assert (small_machine.generation, small_machine.cmdline) == (2, "pkram=4242 quiet")
    assert (small_machine.path / "cmdline").read_text() == "pkram=4242 quiet\n"
    assert sorted(p.name for p in small_machine.boot_dir.iterdir()) == [
        "lock",
        "owners.json",
        "page-owners",
    ]
    with small_machine.page_ownership() as po:
        assert po.owners() == {} and po.check({}, small_machine.boot_record()) == []
    assert Machine.open(small_machine.path).generation == 2
    with pytest.raises(InvalidRequest, match="one line"):
        small_machine.start_boot("a\nb")
    assert small_machine.generation == 2


def test_mountinfo_lines_give_the_device_and_both_sets_of_flags(tmp_path: Path) -> None:
    """A bind remount sets the mount's flag, not the superblock's: mountinfo tells them apart
    (optional fields or none before the ``-``; escapes undone in the mountpoint)."""
    table = tmp_path / "mountinfo"
    table.write_text(
        "36 25 0:45 / /mnt/a\\040b ro,relatime shared:7 - fuse.pkramfs pkram:x rw,user_id=0\n"
        "37 25 0:46 / /mnt/c rw,nosuid - tmpfs tmpfs ro,size=1k\n"
        "garbage line\n"
    )
    assert read_mountinfo(str(table)) == [
        MountInfo("0:45", "/mnt/a b", ("ro", "relatime"), ("rw", "user_id=0")),
        MountInfo("0:46", "/mnt/c", ("rw", "nosuid"), ("ro", "size=1k")),
    ]
