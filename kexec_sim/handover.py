"""The PKRAM handover at exec and hibernate: deciding what is handed over, writing the
preserved-pages table and the super block naming it, dropping a table that was not used, and
the super block as a transition records it (so a repeated boot reads what the first read)."""

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from kexec_sim.allocator import PfnRange, find_free
from kexec_sim.cmdline import PKRAM_PARAM
from kexec_sim.errors import CorruptHandover, CorruptMachine, MachineError, OutOfMemory
from kexec_sim.kernel_image import LoadedImage
from kexec_sim.owners import FREE, HANDOVER, PRESERVED
from kexec_sim.ownership import PageOwnership
from kexec_sim.pages import PfnArray
from kexec_sim.preserved_pages import write_table
from kexec_sim.ram import Ram
from kexec_sim.super_block import SuperBlock, read_super_block, write_super_block
from kexec_sim.transition import fact_int


def refuse_preserved_in(owner_map: npt.NDArray[np.int32], image: LoadedImage) -> None:
    chunk = owner_map[image.start_pfn : image.end_pfn]
    hits = np.flatnonzero((chunk == PRESERVED) | (chunk == HANDOVER))
    if hits.size:
        raise MachineError(
            f"preserved pfn {image.start_pfn + int(hits[0])} ({hits.size} preserved pages) lies "
            f"in the loaded image's range {image.start_pfn}..{image.end_pfn - 1}: load again "
            "(the load address avoids preserved pages)"
        )


def handover_plan(
    ram: Ram, po: PageOwnership, sb_pfn: int, wanted: int | None, force: bool
) -> tuple[SuperBlock | None, list[str]]:
    """Decide whether exec hands the preserved pages over: (the current super block, warnings).

    Raises MachineError, unless *force*, when the super block is damaged.
    """
    preserved = int(np.count_nonzero(po.owner_map == PRESERVED))
    lost = f"{preserved} preserved pages are not handed over"
    if wanted is None:
        reason = f"no {PKRAM_PARAM}= on the command line"
        return None, [f"{lost} ({reason}): scrubbed"] if preserved else []
    if wanted != sb_pfn:
        reason = f"{PKRAM_PARAM}={wanted} is not this boot's super block, pfn {sb_pfn}; --force"
        return None, [f"{lost} ({reason}): scrubbed"]
    try:
        return read_super_block(ram, sb_pfn), []
    except CorruptHandover as exc:
        if not force:
            raise MachineError(
                f"this boot's super block is damaged ({exc}): nothing can be handed over "
                "(exec --force scrubs the preserved pages)"
            ) from None
        return None, [f"{lost} (the super block is damaged: {exc}; --force): scrubbed"]


def drop_stale_table(ram: Ram, po: PageOwnership, sb_pfn: int) -> None:
    """Free a preserved-pages table an interrupted hibernate left (HANDOVER pages but the
    super block) and clear the super block's table root. The caller holds the lock."""
    stale = np.flatnonzero(po.owner_map == HANDOVER)
    stale = stale[stale != sb_pfn]
    if stale.size:
        po.free(HANDOVER, stale)
    sb = read_super_block(ram, sb_pfn)
    if sb.table_root_pfn:
        write_super_block(ram, sb_pfn, SuperBlock(sb.generation, ram.nr_pages, 0, sb.node_list_pfn))


def write_handover(
    ram: Ram,
    po: PageOwnership,
    sb_pfn: int,
    sb: SuperBlock,
    avoid: PfnRange | None,
    generation: int,
) -> PfnArray:
    """Write the table of the PRESERVED and HANDOVER pages and the super block naming it.

    The caller holds the lock. The table's pages come from free pages outside *avoid* (they
    become HANDOVER); the super block gets *generation*, the one handing over. Returns the
    table's pages. Raises OutOfMemory.
    """
    keep = po.owner_map == PRESERVED
    keep |= po.owner_map == HANDOVER

    def allocate(n_pages: int) -> PfnArray:
        found = find_free(po.owner_map, n_pages, po.cursor_pfn, avoid)  # not from pfn 0:
        # past the preserved files' pages, not a scan over them
        if found is None:
            raise OutOfMemory(f"no {n_pages} free pages for the preserved-pages table")
        po.transfer(found, FREE, HANDOVER)
        return found

    def release(unused: PfnArray) -> None:
        if unused.size:
            po.free(HANDOVER, unused)

    root, table = write_table(ram, keep, allocate, release)
    write_super_block(ram, sb_pfn, SuperBlock(generation, ram.nr_pages, root, sb.node_list_pfn))
    return table


def super_block_facts(ram: Ram, sb_pfn: int) -> dict[str, int]:
    """The super block at *sb_pfn* as a handover leaves it, for the record: a boot that runs
    again must read what the first attempt read (its early boot rewrites the page)."""
    sb = read_super_block(ram, sb_pfn)
    return {
        "super_block_pfn": sb_pfn,
        "generation": sb.generation,
        "table_root_pfn": sb.table_root_pfn,
        "node_list_pfn": sb.node_list_pfn,
    }


def rewrite_super_block(ram: Ram, facts: Mapping[str, object], key: str = "super_block") -> None:
    """Write back the super block recorded in *facts* under *key* (None: nothing to write)."""
    saved = facts.get(key)
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise CorruptMachine(f"transition record: {key!r} is not an object")
    sb = SuperBlock(
        fact_int(saved, "generation"),
        ram.nr_pages,
        fact_int(saved, "table_root_pfn", below=ram.nr_pages),
        fact_int(saved, "node_list_pfn", below=ram.nr_pages),
    )
    pfn = fact_int(saved, "super_block_pfn", below=ram.nr_pages)
    if pfn == 0:
        raise CorruptMachine("transition record: super block pfn 0")
    write_super_block(ram, pfn, sb)
