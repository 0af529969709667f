"""Command lines and early boot: what pkram= reserves, and how a bad handover is refused."""

import os

import numpy as np
import pytest

from kexec_sim import HANDOVER, PRESERVED, InvalidRequest, Machine, MachineError
from kexec_sim.cmdline import join_cmdline, parse_pfn, pkram_pfn, without_param
from kexec_sim.owners import FREE
from kexec_sim.preserved_pages import write_table
from kexec_sim.super_block import SuperBlock, read_super_block, write_super_block

from .util import SMALL_RAM_BYTES

NR_PAGES = SMALL_RAM_BYTES // 4096


@pytest.mark.parametrize(("text", "pfn"), [("256", 256), ("0x100", 256), ("0X1f", 31), ("007", 7)])
def test_parse_pfn(text: str, pfn: int) -> None:
    assert parse_pfn(text) == pfn


@pytest.mark.parametrize("text", ["", "0x", "-1", "+5", "1_000", "12a", "0xg", " 5", "٣"])
def test_parse_pfn_refuses(text: str) -> None:
    with pytest.raises(InvalidRequest, match="not a pfn"):
        parse_pfn(text)


def test_pkram_param() -> None:
    assert pkram_pfn("quiet", NR_PAGES) is None
    assert pkram_pfn("quiet pkram=0x100 ro", NR_PAGES) == 256
    for cmdline, reason in [
        ("pkram=1 pkram=2", "given 2 times"),
        ("pkram=abc", "not a pfn"),
        ("pkram", "not a pfn"),
        ("pkram=0", "not a page of this RAM"),
        (f"pkram={NR_PAGES}", "not a page of this RAM"),
    ]:
        with pytest.raises(InvalidRequest, match=reason):
            pkram_pfn(cmdline, NR_PAGES)
    assert without_param("a pkram=5 b=1 pkram c", "pkram") == "a b=1 c"
    assert join_cmdline(" quiet ", "", "pkram=5") == "quiet pkram=5"


def keep(pfns: np.ndarray) -> np.ndarray:
    """The bitmap write_table takes: a bool per page of RAM, True at *pfns*."""
    mask = np.zeros(NR_PAGES, dtype=bool)
    mask[pfns] = True
    return mask


def owner_map_of(machine: Machine) -> np.ndarray:
    with machine.page_ownership() as po, po.locked():
        return po.owner_map.copy()


def test_a_handover_is_reserved_before_anything_allocates(small_machine: Machine) -> None:
    """Hand-made handover (as exec writes it): early boot reserves exactly the listed pages."""
    data = np.arange(300, 400, dtype=np.int64)
    with small_machine.ram() as ram:
        ram.fill(data, 0x5A)
        spare = iter(range(13000, 13100))  # usable pages (49..64 MiB) for the table
        root, table = write_table(
            ram,
            keep(np.append(data, 256)),
            lambda n: np.array([next(spare) for _ in range(n)], dtype=np.int64),
            lambda unused: None,
        )
        set_head = 4321
        write_super_block(ram, 256, SuperBlock(1, NR_PAGES, root, set_head))
    small_machine.start_boot("pkram=256")
    owners = owner_map_of(small_machine)
    assert np.array_equal(np.flatnonzero(owners == PRESERVED), data)
    assert np.flatnonzero(owners == HANDOVER).tolist() == [256]
    assert (owners[table] == FREE).all()  # the table is consumed
    with small_machine.ram() as ram:
        assert read_super_block(ram, 256) == SuperBlock(2, NR_PAGES, 0, set_head)
        assert (ram.pages[data] == 0x5A).all()
    assert small_machine.super_block_pfn == 256
    log = (small_machine.path / "logs/boot-2.log").read_text()
    assert f"reserved 100 preserved pages, consumed a table of {table.size} pages" in log
    with small_machine.page_ownership() as po:
        assert po.check({}, small_machine.boot_record()) == []


@pytest.mark.parametrize(
    ("cmdline", "reason"),
    [
        ("pkram=abc", "pkram=abc: not a pfn"),
        ("pkram=300", "pkram=300: no super block there"),
        ("pkram=256", "pkram=256: the super block names no preserved-pages table"),
    ],
)
def test_a_bad_handover_reserves_nothing_and_warns(
    small_machine: Machine, cmdline: str, reason: str
) -> None:
    booted = small_machine.start_boot(cmdline)
    (warning,) = booted.warnings
    assert warning.startswith(reason) and warning.endswith("preserved memory not reserved")
    assert f"warning: {warning}" in (small_machine.path / "logs/boot-2.log").read_text()
    owners = owner_map_of(small_machine)
    assert not (owners == PRESERVED).any()
    assert np.flatnonzero(owners == HANDOVER).tolist() == [booted.super_block_pfn]
    with small_machine.ram() as ram:
        assert read_super_block(ram, booted.super_block_pfn) == SuperBlock(2, NR_PAGES, 0, 0)


def test_a_table_listing_reserved_memory_is_refused(small_machine: Machine) -> None:
    kernel_pfn = 16 << 8  # the memory map's KERNEL region: never free at boot
    with small_machine.ram() as ram:
        spare = iter(range(13000, 13100))  # usable pages (49..64 MiB) for the table
        root, _ = write_table(
            ram,
            keep(np.array([256, 300, kernel_pfn], dtype=np.int64)),
            lambda n: np.array([next(spare) for _ in range(n)], dtype=np.int64),
            lambda unused: None,
        )
        write_super_block(ram, 256, SuperBlock(1, NR_PAGES, root, 0))
    (warning,) = small_machine.start_boot("pkram=256").warnings
    assert f"1 listed pfns are not free usable RAM at boot, e.g. pfn {kernel_pfn} (kernel)" in (
        warning
    )
    assert not (owner_map_of(small_machine) == PRESERVED).any()


def test_power_off_state_is_refused_clearly(small_machine: Machine) -> None:
    with small_machine.page_ownership() as po:
        po.register_owner("x", os.getpid())
        small_machine.record_power_off(held=po)
        with pytest.raises(MachineError, match="stale"):
            po.free_pages()
    assert not small_machine.powered
    with pytest.raises(MachineError, match="powered off: run 'kexec-sim boot'"):
        small_machine.page_ownership()
    with pytest.raises(MachineError, match="powered off"):
        _ = small_machine.super_block_pfn
    small_machine.start_boot("")
    assert small_machine.powered and small_machine.generation == 2
    with small_machine.page_ownership() as po:
        assert po.owners() == {} and po.check({}, small_machine.boot_record()) == []
