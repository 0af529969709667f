"""kexec -e: ending the current boot and booting the staged kernel, handing preserved pages over.

``exec_`` stops every process of the current boot (kexec_sim.shutdown), then, holding the
ownership lock to the end, writes the preserved-pages table and the super block (when the
staged command line hands them over with ``pkram=``: kexec_sim.handover), scrubs every page that
is neither handed over nor firmware (kexec_sim.scrub), writes the staged image over its range
(kexec_sim.kernel_image) and boots the next generation, whose early boot (kexec_sim.boot)
reserves the handed-over pages before anything can allocate. It runs as a transition
(kexec_sim.transition) whose point of no return is the scrub. Reboot and power are in
kexec_sim.power.

Refusals happen before anything changes: nothing staged, a ``pkram=`` that is not this boot's
super block (a usage error, unless forced), a damaged super block (unless forced), a preserved
page inside the staged image's range.
"""

from collections.abc import Mapping

from kexec_sim import scrub as scrubbing
from kexec_sim.boot import EarlyBoot
from kexec_sim.cmdline import PKRAM_PARAM, pkram_pfn
from kexec_sim.errors import CorruptMachine, InvalidRequest, MachineError
from kexec_sim.handover import (
    drop_stale_table,
    handover_plan,
    refuse_preserved_in,
    rewrite_super_block,
    super_block_facts,
    write_handover,
)
from kexec_sim.kernel_image import LoadedImage, loaded_image, write_image
from kexec_sim.machine import Machine
from kexec_sim.owners import FIRMWARE, HANDOVER, PRESERVED
from kexec_sim.ownership import PageOwnership
from kexec_sim.power import DEFAULT_SCRUB, begin_transition, check_scrub, stop_phase
from kexec_sim.ram import Ram
from kexec_sim.report import ExecReport, Phases
from kexec_sim.shutdown import DEFAULT_STOP_TIMEOUT_S
from kexec_sim.transition import Transition, fact_range, fact_str, give_up

__all__ = ["ExecReport", "HandoverRefused", "exec_", "finish_exec", "undo_exec"]


class HandoverRefused(InvalidRequest):
    """exec refuses the staged ``pkram=``: it is not this boot's super block (a usage error)."""


def exec_(
    machine: Machine,
    *,
    scrub: str = DEFAULT_SCRUB,
    force: bool = False,
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> ExecReport:
    """Boot the staged image (``kexec -e``); return what happened.

    *scrub* is ``punch`` or ``poison`` (kexec_sim.scrub); *stop_timeout_s* the grace period
    between SIGTERM and SIGKILL. Raises MachineError when nothing is staged, a preserved page
    lies in the staged range, or (unless *force*) the super block is damaged;
    HandoverRefused (an InvalidRequest) when, unless *force*, the staged ``pkram=`` is not this
    boot's super block; InvalidRequest for a bad *scrub*. Nothing changes when it raises.
    """
    check_scrub(scrub)
    sb_pfn = machine.super_block_pfn
    image = loaded_image(machine)
    if image is None:
        raise MachineError("nothing loaded: run kexec-sim load first")
    wanted = pkram_pfn(image.cmdline, machine.nr_pages)
    if wanted is not None and wanted != sb_pfn and not force:
        raise HandoverRefused(
            f"the loaded command line's {PKRAM_PARAM}={wanted} is not this boot's super block "
            f"(pfn {sb_pfn}, sys/kernel/{PKRAM_PARAM}): load again with {PKRAM_PARAM}={sb_pfn}, "
            "or exec --force to hand nothing over"
        )
    phases = Phases()
    generation = machine.generation + 1
    transition = begin_transition(machine, "exec", generation - 1)
    try:
        with machine.page_ownership() as po, machine.ram() as ram:
            with po.locked():  # refuse before stopping anything
                refuse_preserved_in(po.owner_map, image)
                handover_plan(ram, po, sb_pfn, wanted, force)
            stopped, warnings = stop_phase(transition, po, phases, stop_timeout_s)
            with po.locked():
                po.reclaim_dead_owners()
                refuse_preserved_in(po.owner_map, image)
                sb, plan_warnings = handover_plan(ram, po, sb_pfn, wanted, force)
                warnings += plan_warnings
                before = super_block_facts(ram, sb_pfn) if sb is not None else None
                transition.record("handover", super_block_before=before)
                with phases("table"):
                    if sb is not None:
                        drop_stale_table(ram, po, sb_pfn)
                        write_handover(ram, po, sb_pfn, sb, image.pfn_range, generation - 1)
                transition.record(
                    "scrub",
                    scrub=scrub,
                    cmdline=image.cmdline,
                    kernel_image=list(image.pfn_range),
                    super_block=None if sb is None else super_block_facts(ram, sb_pfn),
                )
                scrubbed, booted = _exec_from_scrub(machine, ram, po, transition, image, phases)
    except BaseException:
        give_up(transition, lambda: undo_exec(machine, transition.facts))
        raise
    transition.end()
    return ExecReport(
        action="exec",
        generation=generation,
        cmdline=image.cmdline,
        image_range=image.pfn_range,
        scrub=scrub,
        super_block_pfn=booted.super_block_pfn,
        preserved_pages=booted.preserved_pages,
        table_pages=booted.table_pages,
        scrubbed_pages=scrubbed,
        stopped=tuple(stopped),
        warnings=tuple(warnings + list(booted.warnings)),
        durations_s=phases.durations_s,
    )


def undo_exec(machine: Machine, facts: Mapping[str, object]) -> None:
    """Drop what an exec that had not begun scrubbing left: the super block as it was before
    the handover (a write of it may have been cut), and the table it wrote. This boot goes
    on, its preserved nodes as they were."""
    with machine.page_ownership() as po, machine.ram() as ram, po.locked():
        rewrite_super_block(ram, facts, "super_block_before")
        drop_stale_table(ram, po, machine.super_block_pfn)


def finish_exec(machine: Machine, transition: Transition) -> None:
    """Finish an exec a dead process took past its point of no return (the scrub): scrub
    again what is not handed over, write the kernel, boot. Early boot reads the super block
    as the handover left it (the facts), so a boot cut short runs again the same."""
    if machine.generation > transition.generation:
        return  # it had booted: only the record was left
    facts = transition.facts
    if transition.phase == "boot":  # the kernel is written; the boot state may be half made
        with machine.ram() as ram:
            rewrite_super_block(ram, facts)
        cmdline = fact_str(facts, "cmdline")
        machine.start_boot(cmdline, kernel_image=fact_range(facts, machine.nr_pages))
        return
    image = loaded_image(machine)
    if image is None:
        raise CorruptMachine("the kernel the exec was booting is no longer staged")
    with machine.page_ownership() as po, machine.ram() as ram, po.locked():
        _exec_from_scrub(machine, ram, po, transition, image, Phases())


def _exec_from_scrub(
    machine: Machine,
    ram: Ram,
    po: PageOwnership,
    transition: Transition,
    image: LoadedImage,
    phases: Phases,
) -> tuple[int, EarlyBoot]:
    """exec from its point of no return (the lock held): scrub every page but firmware and
    what is handed over, write the staged kernel, boot with it; (scrubbed, early boot)."""
    facts = transition.facts
    scrub = fact_str(facts, "scrub", scrubbing.SCRUB_MODES)
    keep = po.owner_map == FIRMWARE
    if facts.get("super_block") is not None:  # handed over: the table marks these
        keep |= (po.owner_map == PRESERVED) | (po.owner_map == HANDOVER)
    # The image is written over its range next: scrubbing it first would only have the host
    # free that memory and fault it back in (~20 ms per 16 MiB). Its pages are the image's
    # whole, the last one's tail zeroed (write_image).
    keep[image.start_pfn : image.end_pfn] = True
    with phases("scrub"):
        scrubbed = scrubbing.scrub(ram, keep, scrub)
    transition.record("image")
    with phases("image"):
        write_image(ram, machine, image, transition.generation + 1)
    transition.record("boot")
    with phases("boot"):
        rewrite_super_block(ram, facts)  # as handed over: a repeated boot reads the same
        booted = machine.start_boot(image.cmdline, kernel_image=image.pfn_range, held=po)
    return scrubbed, booted
