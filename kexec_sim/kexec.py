"""kexec, reboot and power: ending the current boot and starting the next one.

``exec_`` is ``kexec -e``: it stops every process of the current boot (kexec_sim.shutdown),
then, holding the ownership lock to the end, writes the preserved-pages table and the super
block (when the staged command line hands them over with ``pkram=``), scrubs every page that is
neither handed over nor firmware (kexec_sim.scrub), writes the staged image over its range
(kexec_sim.kernel_image) and boots the next generation, whose early boot (kexec_sim.boot)
reserves the handed-over pages before anything can allocate. ``reboot`` does the same but hands
nothing over; ``poweroff`` loses all of RAM and the storage keys, and ``power_on``
(``kexec-sim boot``) starts afresh.

Refusals happen before anything changes: nothing staged, a ``pkram=`` that is not this boot's
super block (a usage error, unless forced), a damaged super block (unless forced), a preserved
page inside the staged image's range.
"""

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from kexec_sim import scrub as scrubbing
from kexec_sim.allocator import PfnRange, find_free
from kexec_sim.boot import EarlyBoot
from kexec_sim.cmdline import PKRAM_PARAM, pkram_pfn, without_param
from kexec_sim.errors import (
    CorruptHandover,
    CorruptMachine,
    InvalidRequest,
    MachineError,
    OutOfMemory,
)
from kexec_sim.hibernation.last_image import forget_last_image
from kexec_sim.kernel_image import (
    DEFAULT_IMAGE_BYTES,
    LoadedImage,
    default_kernel_range,
    load,
    loaded_image,
    next_kernel_range,
    unload,
    write_image,
    write_synthetic_image,
)
from kexec_sim.machine import Machine
from kexec_sim.owners import FIRMWARE, FREE, HANDOVER, PRESERVED, OwnerInfo, boot_owner_map
from kexec_sim.ownership import PageOwnership
from kexec_sim.pages import PAGE_SIZE, PfnArray
from kexec_sim.preserved_pages import write_table
from kexec_sim.ram import Ram
from kexec_sim.shutdown import DEFAULT_STOP_TIMEOUT_S, StoppedOwner, stop_owners
from kexec_sim.super_block import SuperBlock, read_super_block, write_super_block
from kexec_sim.transition import (
    Transition,
    fact_range,
    fact_str,
    give_up,
    rewrite_super_block,
    super_block_facts,
)

__all__ = [
    "DEFAULT_IMAGE_BYTES",
    "DEFAULT_SCRUB",
    "DEFAULT_STOP_TIMEOUT_S",
    "SCRUB_ENV",
    "ExecReport",
    "HandoverRefused",
    "LoadedImage",
    "StoppedOwner",
    "exec_",
    "load",
    "loaded_image",
    "next_kernel_range",
    "power_on",
    "poweroff",
    "reboot",
    "unload",
]

SCRUB_ENV = "KEXEC_SIM_SCRUB"
"""The scrub mode the CLI uses when none is given (``punch`` or ``poison``)."""
DEFAULT_SCRUB = "punch"


class HandoverRefused(InvalidRequest):
    """exec refuses the staged ``pkram=``: it is not this boot's super block (a usage error)."""


@dataclass(frozen=True)
class ExecReport:
    """What an exec, reboot, boot or poweroff did."""

    action: str
    generation: int
    """The generation booted (for poweroff: the one powered off)."""
    cmdline: str
    image_range: PfnRange | None
    scrub: str
    super_block_pfn: int
    preserved_pages: int
    """Pages the new boot reserved as PRESERVED (the handed-over data)."""
    table_pages: int
    scrubbed_pages: int
    stopped: tuple[StoppedOwner, ...]
    warnings: tuple[str, ...]
    durations_s: Mapping[str, float]

    def stopped_by(self, how: str) -> int:
        """How many processes were stopped *how* (``term``, ``kill``, ...)."""
        return len({s.pid for s in self.stopped if s.how == how})

    def to_dict(self) -> dict[str, object]:
        """The JSON form (``kexec-sim exec --json``)."""
        data = asdict(self)
        data["durations_s"] = dict(self.durations_s)
        data["warnings"] = list(self.warnings)
        data["stopped"] = [asdict(s) for s in self.stopped]
        return data


class Phases:
    """Wall-clock durations of named phases."""

    def __init__(self) -> None:
        self.durations_s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations_s[name] = self.durations_s.get(name, 0.0) + time.perf_counter() - start


def _check_scrub(mode: str) -> None:
    if mode not in scrubbing.SCRUB_MODES:
        raise InvalidRequest(
            f"scrub mode must be one of {', '.join(scrubbing.SCRUB_MODES)}, got {mode!r}"
        )


def _losses(po: PageOwnership, owners: Mapping[int, OwnerInfo]) -> list[str]:
    """One warning per registered owner holding pages: those pages are lost."""
    counts = po.count_by_owner()
    return [
        f"{info.mountpoint or info.name} (owner {owner_id}): {counts[owner_id]} pages not "
        "preserved, lost"
        for owner_id, info in sorted(owners.items())
        if counts.get(owner_id, 0)
    ]


def _stop_everyone(
    po: PageOwnership, phases: Phases, stop_timeout_s: float, warnings: list[str]
) -> list[StoppedOwner]:
    """Stop every registered owner of the boot (daemons), after warning which lose pages.

    Appends to *warnings* the mounts that lose data and the processes that survived SIGKILL.
    """
    with po.locked():
        owners = po.owners()
        warnings += _losses(po, owners)
    with phases("stop"):
        stopped = stop_owners(owners, stop_timeout_s)
    warnings += [f"{s.name} (pid {s.pid}) survived SIGKILL" for s in stopped if s.how == "alive"]
    return stopped


def _refuse_preserved_in(owner_map: npt.NDArray[np.int32], image: LoadedImage) -> None:
    chunk = owner_map[image.start_pfn : image.end_pfn]
    hits = np.flatnonzero((chunk == PRESERVED) | (chunk == HANDOVER))
    if hits.size:
        raise MachineError(
            f"preserved pfn {image.start_pfn + int(hits[0])} ({hits.size} preserved pages) lies "
            f"in the loaded image's range {image.start_pfn}..{image.end_pfn - 1}: load again "
            "(the load address avoids preserved pages)"
        )


def _handover_plan(
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


def begin_transition(machine: Machine, action: str, generation: int) -> Transition:
    """Start *action* on the running *machine* at *generation* (the power lock held).

    Raises MachineBusy, or MachineError when the machine is off or changed since the caller
    looked.
    """
    machine.require_powered()
    transition = Transition.begin(machine.path, action, generation)
    record = machine.boot_record()
    if record.generation != generation or not record.powered:
        transition.end()
        raise MachineError(
            f"machine {machine.path} changed meanwhile (generation {record.generation}, "
            f"{'running' if record.powered else 'off'}): nothing done"
        )
    return transition


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


def finish_reboot(machine: Machine, transition: Transition) -> None:
    """Finish a reboot a dead process took past its scrub's start: scrub, image, boot."""
    if machine.generation > transition.generation:
        return
    facts = transition.facts
    with machine.ram() as ram:
        _reboot_from_scrub(
            machine,
            ram,
            fact_str(facts, "scrub", scrubbing.SCRUB_MODES),
            fact_str(facts, "cmdline"),
            fact_range(facts, machine.nr_pages),
            Phases(),
            None,
        )


def finish_poweroff(machine: Machine, transition: Transition) -> None:
    """Finish a power off (hibernate's too) a dead process took past its scrub's start: lose
    RAM and the keys, record it off. Its daemons were stopped before."""
    if machine.powered:
        scrub = fact_str(transition.facts, "scrub", scrubbing.SCRUB_MODES)
        with machine.ram() as ram:
            _lose_ram(machine, ram, scrub, None)


def _reboot_from_scrub(
    machine: Machine,
    ram: Ram,
    scrub: str,
    cmdline: str,
    kernel: PfnRange,
    phases: Phases,
    held: PageOwnership | None,
) -> tuple[int, EarlyBoot]:
    """Scrub all RAM but firmware, write the default kernel, boot; (scrubbed, early boot)."""
    firmware = boot_owner_map(machine.memory_map, machine.nr_pages) == FIRMWARE
    generation = machine.generation + 1
    with phases("scrub"):
        scrubbed = scrubbing.scrub(ram, firmware, scrub)
    with phases("image"):
        _write_default_image(ram, kernel, cmdline, generation)
    with phases("boot"):
        booted = machine.start_boot(cmdline, kernel_image=kernel, held=held)
    return scrubbed, booted


def _lose_ram(machine: Machine, ram: Ram, scrub: str, held: PageOwnership | None) -> None:
    """Lose all of RAM and the keys, forget the last resumed image, record power off."""
    scrubbing.scrub(ram, np.zeros(ram.nr_pages, dtype=np.bool_), scrub)
    ram.keys.clear()
    forget_last_image(machine.path)
    machine.record_power_off(held=held)


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
) -> tuple[PfnArray, PfnArray]:
    """Write the table of the PRESERVED and HANDOVER pages and the super block naming it.

    The caller holds the lock. The table's pages come from free pages outside *avoid* (they
    become HANDOVER); the super block gets *generation*, the one handing over. Returns
    (the pages handed over but the table, the table's pages). Raises OutOfMemory.
    """
    pfns = np.flatnonzero((po.owner_map == PRESERVED) | (po.owner_map == HANDOVER))

    def allocate(n_pages: int) -> PfnArray:
        found = find_free(po.owner_map, n_pages, 0, avoid)
        if found is None:
            raise OutOfMemory(f"no {n_pages} free pages for the preserved-pages table")
        po.transfer(found, FREE, HANDOVER)
        return found

    def release(unused: PfnArray) -> None:
        if unused.size:
            po.free(HANDOVER, unused)

    root, table = write_table(ram, pfns.astype(np.int64), allocate, release)
    write_super_block(ram, sb_pfn, SuperBlock(generation, ram.nr_pages, root, sb.node_list_pfn))
    return pfns.astype(np.int64), table


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
    _check_scrub(scrub)
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
                _refuse_preserved_in(po.owner_map, image)
                _handover_plan(ram, po, sb_pfn, wanted, force)
            warnings: list[str] = []
            transition.record("stop")
            stopped = _stop_everyone(po, phases, stop_timeout_s, warnings)
            with po.locked():
                po.reclaim_dead_owners()
                _refuse_preserved_in(po.owner_map, image)
                sb, plan_warnings = _handover_plan(ram, po, sb_pfn, wanted, force)
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


def reboot(
    machine: Machine,
    *,
    scrub: str = DEFAULT_SCRUB,
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> ExecReport:
    """Reboot: stop every process, scrub all RAM but firmware, boot the next generation.

    Nothing is handed over; the new command line is the current one without ``pkram=``.
    A staged image is dropped (the firmware boots its kernel at the preferred address).
    Raises MachineError when the machine is powered off, InvalidRequest for a bad *scrub*.
    """
    _check_scrub(scrub)
    phases = Phases()
    record = machine.boot_record()
    cmdline = without_param(record.cmdline, PKRAM_PARAM)
    kernel = default_kernel_range(machine)
    transition = begin_transition(machine, "reboot", record.generation)
    try:
        with machine.page_ownership() as po, machine.ram() as ram:
            warnings: list[str] = []
            transition.record("stop")
            stopped = _stop_everyone(po, phases, stop_timeout_s, warnings)
            with po.locked():
                po.reclaim_dead_owners()
                preserved = int(np.count_nonzero(po.owner_map == PRESERVED))
                if preserved:
                    warnings.append(
                        f"{preserved} preserved pages are scrubbed (a reboot hands over nothing)"
                    )
                transition.record("scrub", scrub=scrub, cmdline=cmdline, kernel_image=list(kernel))
                scrubbed, booted = _reboot_from_scrub(
                    machine, ram, scrub, cmdline, kernel, phases, po
                )
    except BaseException:
        give_up(transition)
        raise
    transition.end()
    return _boot_report(
        "reboot",
        record.generation + 1,
        cmdline,
        kernel,
        scrub,
        scrubbed,
        stopped,
        warnings,
        booted.super_block_pfn,
        booted.warnings,
        phases,
    )


def poweroff(
    machine: Machine,
    *,
    scrub: str = DEFAULT_SCRUB,
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    transition: Transition | None = None,
) -> ExecReport:
    """Power the machine off: stop every process, lose all of RAM and the keys, no boot state.

    RAM content is lost by *scrub*: punched (zeros) or poisoned (what stale RAM looks like
    to a resume that failed to restore a page). *transition* is the caller's running one
    (hibernate's; it records its phases there and ends nothing), else poweroff runs its own.
    Raises MachineError when it is already off, InvalidRequest for a bad *scrub*.
    """
    _check_scrub(scrub)
    phases = Phases()
    record = machine.boot_record()
    own = transition is None
    if transition is None:
        transition = begin_transition(machine, "poweroff", record.generation)
    try:
        with machine.page_ownership() as po, machine.ram() as ram:
            with po.locked():
                preserved = int(np.count_nonzero(po.owner_map == PRESERVED))
            warnings: list[str] = []
            transition.record("stop")
            stopped = _stop_everyone(po, phases, stop_timeout_s, warnings)
            if preserved:
                warnings.append(f"{preserved} preserved pages are lost (power off)")
            with po.locked():
                transition.record("scrub", scrub=scrub)
                with phases("scrub"):
                    _lose_ram(machine, ram, scrub, po)
    except BaseException:
        if own:
            give_up(transition)
        raise
    if own:
        transition.end()
    return _boot_report(
        "poweroff",
        record.generation,
        record.cmdline,
        None,
        scrub,
        machine.nr_pages,
        stopped,
        warnings,
        0,
        (),
        phases,
    )


def power_on(machine: Machine) -> ExecReport:
    """Power a machine on (``kexec-sim boot``): a fresh boot of the next generation.

    The command line is the last one without ``pkram=``. Raises MachineError when the
    machine is running already.
    """
    if machine.powered:
        raise MachineError(
            f"machine {machine.path} is running already: use 'kexec-sim reboot' or 'poweroff'"
        )
    phases = Phases()
    record = machine.boot_record()
    cmdline = without_param(record.cmdline, PKRAM_PARAM)
    kernel = default_kernel_range(machine)
    transition = Transition.begin(machine.path, "boot", record.generation)  # nothing to record:
    try:  # cut short anywhere, the machine is still off (boot.json is written last)
        if machine.boot_record() != record:
            raise MachineError(f"machine {machine.path} changed meanwhile: nothing done")
        with phases("image"), machine.ram() as ram:
            _write_default_image(ram, kernel, cmdline, record.generation + 1)
        with phases("boot"):
            booted = machine.start_boot(cmdline, kernel_image=kernel)
    finally:
        transition.end()
    return _boot_report(
        "boot",
        record.generation + 1,
        cmdline,
        kernel,
        "none",
        0,
        [],
        [],
        booted.super_block_pfn,
        booted.warnings,
        phases,
    )


def _write_default_image(ram: Ram, kernel: PfnRange, cmdline: str, generation: int) -> None:
    size_bytes = (kernel[1] - kernel[0]) * PAGE_SIZE
    write_synthetic_image(ram, kernel[0], cmdline, generation, size_bytes)


def _boot_report(
    action: str,
    generation: int,
    cmdline: str,
    kernel: PfnRange | None,
    scrub_mode: str,
    scrubbed: int,
    stopped: list[StoppedOwner],
    warnings: list[str],
    sb_pfn: int,
    boot_warnings: tuple[str, ...],
    phases: Phases,
) -> ExecReport:
    return ExecReport(
        action=action,
        generation=generation,
        cmdline=cmdline,
        image_range=kernel,
        scrub=scrub_mode,
        super_block_pfn=sb_pfn,
        preserved_pages=0,
        table_pages=0,
        scrubbed_pages=scrubbed,
        stopped=tuple(stopped),
        warnings=tuple(warnings + list(boot_warnings)),
        durations_s=phases.durations_s,
    )


def check_scrub_env() -> str:
    """The scrub mode ``$KEXEC_SIM_SCRUB`` asks for (DEFAULT_SCRUB when unset).

    Raises InvalidRequest when it names no mode.
    """
    mode = os.environ.get(SCRUB_ENV) or DEFAULT_SCRUB
    if mode not in scrubbing.SCRUB_MODES:
        raise InvalidRequest(
            f"${SCRUB_ENV}={mode!r}: scrub mode must be one of {', '.join(scrubbing.SCRUB_MODES)}"
        )
    return mode
