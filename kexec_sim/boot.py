"""Early boot: what a new kernel does before anything can allocate (reserve handed-over pages).

It works on the new boot's owner map before the map is published, so no process of the new
boot can ever see, let alone allocate, a preserved page as free. With ``pkram=<pfn>`` on the
command line it reads the super block there and the preserved-pages table it names (both
untrusted), checks that every listed pfn is usable RAM that is free at boot, and then marks
them PRESERVED; the table's own pages are consumed (FREE again) and the super block page
becomes this boot's HANDOVER page, rewritten for the new generation with the node list head
kept. If anything fails, nothing is reserved: the boot warns and goes on as without
``pkram=``, allocating a fresh, empty super block.
"""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kexec_sim.allocator import find_free
from kexec_sim.cmdline import PKRAM_PARAM, pkram_pfn
from kexec_sim.errors import CorruptHandover, InvalidRequest, OutOfMemory
from kexec_sim.owners import FREE, HANDOVER, PRESERVED, owner_name
from kexec_sim.preserved_pages import walk_table
from kexec_sim.ram import Ram
from kexec_sim.super_block import SuperBlock, read_super_block, write_super_block


@dataclass(frozen=True)
class EarlyBoot:
    """What early boot did: the super block it exports, what it reserved, what went wrong."""

    super_block_pfn: int
    preserved_pages: int
    """Pages reserved as PRESERVED (the handed-over data, without the table and super block)."""
    table_pages: int
    """Pages of the preserved-pages table, consumed (free again)."""
    warnings: tuple[str, ...]
    log: tuple[str, ...]


def early_boot(
    ram: Ram, owner_map: npt.NDArray[np.int32], cmdline: str, generation: int
) -> EarlyBoot:
    """Reserve what ``pkram=`` on *cmdline* hands over and set up this boot's super block.

    *owner_map* is the new boot's fresh map (FREE = usable and free), changed in place. Never
    raises for bad handover data (it warns instead); raises OutOfMemory only when RAM has no
    free page at all for a super block.
    """
    log = [f"generation {generation}: command line {cmdline!r}"]
    warnings: list[str] = []
    try:
        pfn = pkram_pfn(cmdline, ram.nr_pages)
    except InvalidRequest as exc:
        warnings.append(f"{exc}; preserved memory not reserved")
        pfn = None
    if pfn is not None:
        try:
            preserved, table = _reserve(ram, owner_map, pfn, generation)
        except CorruptHandover as exc:
            reason = str(exc).removeprefix(f"{PKRAM_PARAM}={pfn}: ")
            warnings.append(f"{PKRAM_PARAM}={pfn}: {reason}; preserved memory not reserved")
        else:
            log.append(
                f"{PKRAM_PARAM}={pfn}: reserved {preserved} preserved pages, consumed a table "
                f"of {table} pages, super block kept at pfn {pfn}"
            )
            return EarlyBoot(pfn, preserved, table, tuple(warnings), _logged(log, warnings))
    found = find_free(owner_map, 1, 0)
    if found is None:
        raise OutOfMemory("no free page of RAM for the PKRAM super block")
    sb_pfn = int(found[0])
    owner_map[sb_pfn] = HANDOVER
    write_super_block(ram, sb_pfn, SuperBlock(generation, ram.nr_pages, 0, 0))
    log.append(f"new empty super block at pfn {sb_pfn}")
    return EarlyBoot(sb_pfn, 0, 0, tuple(warnings), _logged(log, warnings))


def _logged(log: list[str], warnings: list[str]) -> tuple[str, ...]:
    return tuple(log + [f"warning: {w}" for w in warnings])


def _reserve(
    ram: Ram, owner_map: npt.NDArray[np.int32], sb_pfn: int, generation: int
) -> tuple[int, int]:
    """Reserve the pages the super block at *sb_pfn* hands over; return (preserved, table).

    Raises CorruptHandover, changing nothing, when the handover fails validation.
    """
    sb = read_super_block(ram, sb_pfn)
    if sb.table_root_pfn == 0:
        raise CorruptHandover("the super block names no preserved-pages table (not handed over)")
    marked, table = walk_table(ram, sb.table_root_pfn)  # a bool per pfn
    if not marked[sb_pfn]:
        raise CorruptHandover(f"the super block page {sb_pfn} is not in its own table")
    taken = np.flatnonzero(marked & (owner_map != FREE))
    if taken.size:
        first = int(taken[0])
        raise CorruptHandover(
            f"{taken.size} listed pfns are not free usable RAM at boot, e.g. pfn "
            f"{first} ({owner_name(int(owner_map[first]))})"
        )
    np.copyto(owner_map, np.int32(PRESERVED), where=marked)
    owner_map[table] = FREE
    owner_map[sb_pfn] = HANDOVER
    write_super_block(ram, sb_pfn, SuperBlock(generation, ram.nr_pages, 0, sb.node_list_pfn))
    return int(np.count_nonzero(marked)) - table.size - 1, table.size
