"""The RAM file: page access, shared mapping, hole punching."""

from pathlib import Path

import numpy as np
import pytest

import kexec_sim.ram
from kexec_sim import PAGE_SIZE, CorruptMachine, InvalidRequest, Machine, MachineError, Ram

from .util import SMALL_RAM_BYTES


def test_pages_are_shared_between_mappings(small_machine: Machine) -> None:
    with small_machine.ram() as ram, small_machine.ram() as other:
        assert (
            ram.pages.shape == (small_machine.nr_pages, PAGE_SIZE)
            and len(ram.buffer) == SMALL_RAM_BYTES
        )
        ram.write_page(7, bytes(range(256)) * 16)
        assert other.read_page(7) == bytes(range(256)) * 16
        assert bytes(other.pages[7, :4]) == b"\x00\x01\x02\x03"
        other.buffer[8 * PAGE_SIZE] = 0xAB
        assert ram.pages[8, 0] == 0xAB


def test_page_access_is_checked(small_machine: Machine) -> None:
    with small_machine.ram() as ram:
        with pytest.raises(MachineError, match="outside"):
            ram.read_page(small_machine.nr_pages)
        with pytest.raises(MachineError, match="outside"):
            ram.write_page(-1, bytes(PAGE_SIZE))
        with pytest.raises(MachineError, match="needs 4096 bytes"):
            ram.write_page(0, b"short")
        with pytest.raises(MachineError, match="outside"):
            ram.fill([small_machine.nr_pages], 0)
        with pytest.raises(InvalidRequest):
            ram.fill([0], 256)


def test_fill_and_punch_holes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a disk filesystem: reading a hole of a tmpfs file through the mapping allocates it
    # again, so its st_blocks would not show the punch.
    machine = Machine.create(tmp_path / "machine", SMALL_RAM_BYTES)
    calls: list[tuple[int, int]] = []
    real = kexec_sim.ram._fallocate

    def counting(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((offset // PAGE_SIZE, length // PAGE_SIZE))
        return int(real(fd, mode, offset, length))

    monkeypatch.setattr(kexec_sim.ram, "_fallocate", counting)
    pfns = np.array([12, 10, 11, 20, 30, 31, 13])
    with machine.ram() as ram:
        ram.fill(np.arange(10, 40), 0x5A)
        assert (ram.pages[10:40] == 0x5A).all() and not ram.pages[40].any()
        blocks_before = (machine.path / "RAM").stat().st_blocks
        ram.punch_holes(pfns)
        assert calls == [(10, 4), (20, 1), (30, 2)]  # one call per run of consecutive pfns
        assert not ram.pages[pfns].any()
        assert (ram.pages[[14, 19, 21, 29, 32]] == 0x5A).all()
        assert (machine.path / "RAM").stat().st_blocks < blocks_before
        assert (machine.path / "RAM").stat().st_size == SMALL_RAM_BYTES
        ram.punch_holes(np.array([], dtype=np.int64))
        assert len(calls) == 3


def test_a_ram_file_of_the_wrong_size_is_corrupt(small_machine: Machine) -> None:
    with pytest.raises(CorruptMachine, match="expected"):
        Ram(small_machine.path / "RAM", small_machine.nr_pages + 1)


def test_close_is_idempotent(small_machine: Machine) -> None:
    ram = small_machine.ram()
    pages = ram.pages  # a view kept past close must not make close fail
    ram.close()
    ram.close()
    del pages
