"""Storage keys: one shared key byte per pfn, marked by RAM writes, cleared by power off."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kexec_sim import CorruptMachine, Machine
from kexec_sim.power import poweroff
from kexec_sim.storage_keys import (
    ARCHITECTURAL,
    CHANGED,
    FETCH_PROTECT,
    KEYS_FILE,
    REFERENCED,
    SINCE_IMAGE,
    StorageKeys,
)


def test_keys_are_shared_and_private(small_machine: Machine) -> None:
    with small_machine.ram() as ram, small_machine.ram() as other:
        ram.keys.clear()
        ram.keys.mark_referenced([5, 9])
        assert other.keys.read([5, 9, 10]).tolist() == [REFERENCED, REFERENCED, 0]
    mode = os.stat(small_machine.path / KEYS_FILE).st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_boot_marks_what_it_writes(small_machine: Machine) -> None:
    with small_machine.ram() as ram:
        super_block = int((small_machine.path / "sys/kernel/pkram").read_text())
        assert ram.keys.read([super_block])[0] & CHANGED
        assert not ram.keys.read([super_block + 1])[0] & CHANGED


def test_ram_writes_mark_pages_changed(small_machine: Machine) -> None:
    with small_machine.ram() as ram:
        ram.keys.clear()
        ram.write_page(7, bytes(4096))
        ram.fill_range(20, 3, 0xAA)
        ram.punch_range(30, 2)
        ram.fill([40], 1)
        ram.store_word(50, 3, 0x1234)
        ram.store_pages([60, 62], np.ones((2, 4096), dtype=np.uint8))
        ram.writable_run(70, 2)[:] = 5
        changed = np.flatnonzero(ram.keys.array & CHANGED).tolist()
        assert changed == [7, 20, 21, 22, 30, 31, 40, 50, 60, 62, 70, 71]
        assert ram.pages[50].view("<u8")[3] == 0x1234 and ram.pages[62, 0] == 1
        assert (ram.keys.array[changed] & SINCE_IMAGE).all()


def test_restore_sets_architectural_bits_and_image_completion_clears_since_image(
    small_machine: Machine,
) -> None:
    with small_machine.ram() as ram:
        keys = ram.keys
        keys.clear()
        keys.mark_changed([1, 2, 3])
        keys.restore([2, 4], np.array([0xFF, 0x30 | FETCH_PROTECT], dtype=np.uint8))
        assert keys.read([1, 2, 3, 4]).tolist() == [
            REFERENCED | CHANGED | SINCE_IMAGE,
            ARCHITECTURAL,
            REFERENCED | CHANGED | SINCE_IMAGE,
            0x30 | FETCH_PROTECT,
        ]
        keys.image_completed()
        assert not keys.changed_since_image().any()
        assert keys.read([1]).tolist() == [REFERENCED | CHANGED]


def test_power_off_clears_every_key(small_machine: Machine) -> None:
    with small_machine.ram() as ram:
        ram.keys.mark_changed(np.arange(100, 200))
    poweroff(small_machine)
    with small_machine.ram() as ram:
        assert not ram.keys.array.any()


def test_a_key_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEYS_FILE).write_bytes(bytes(10))
    with pytest.raises(CorruptMachine, match="one per page"):
        StorageKeys(tmp_path / KEYS_FILE, 11)
