"""Power: reboot, power off and power on, each a transition (kexec_sim.transition), and the
scrub mode they lose RAM with. ``reboot`` stops every process, scrubs all RAM but firmware and
boots afresh; ``poweroff`` loses all of RAM and the storage keys; ``power_on`` (``kexec-sim
boot``) starts an off machine afresh.
"""

import os

import numpy as np

from kexec_sim import scrub as scrubbing
from kexec_sim.allocator import PfnRange
from kexec_sim.boot import EarlyBoot
from kexec_sim.cmdline import PKRAM_PARAM, without_param
from kexec_sim.errors import InvalidRequest, MachineError
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.hibernation.last_image import forget_last_image
from kexec_sim.kernel_image import default_kernel_range, write_synthetic_image
from kexec_sim.machine import Machine
from kexec_sim.owners import FIRMWARE, PRESERVED, boot_owner_map
from kexec_sim.ownership import PageOwnership
from kexec_sim.ram import Ram
from kexec_sim.report import ExecReport, Phases, boot_report
from kexec_sim.shutdown import DEFAULT_STOP_TIMEOUT_S, StoppedOwner, stop_everyone
from kexec_sim.transition import STOP_PHASE, Transition, fact_range, fact_str, give_up

SCRUB_ENV = "KEXEC_SIM_SCRUB"
"""The scrub mode the CLI uses when none is given (``punch`` or ``poison``)."""

DEFAULT_SCRUB = "punch"


def check_scrub(mode: str) -> None:
    if mode not in scrubbing.SCRUB_MODES:
        raise InvalidRequest(
            f"scrub mode must be one of {', '.join(scrubbing.SCRUB_MODES)}, got {mode!r}"
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


def stop_phase(
    transition: Transition, po: PageOwnership, phases: Phases, stop_timeout_s: float
) -> tuple[list[StoppedOwner], list[str]]:
    """A transition's ``stop`` phase: recorded, then every process of the boot stopped;
    (what was stopped, warnings: the mounts that lose data, the processes that survived)."""
    warnings: list[str] = []
    transition.record(STOP_PHASE)
    with phases("stop"):
        stopped = stop_everyone(po, stop_timeout_s, warnings)
    return stopped, warnings


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
    check_scrub(scrub)
    phases = Phases()
    record = machine.boot_record()
    cmdline = without_param(record.cmdline, PKRAM_PARAM)
    kernel = default_kernel_range(machine)
    transition = begin_transition(machine, "reboot", record.generation)
    try:
        with machine.page_ownership() as po, machine.ram() as ram:
            stopped, warnings = stop_phase(transition, po, phases, stop_timeout_s)
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
    return boot_report(
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
    check_scrub(scrub)
    phases = Phases()
    record = machine.boot_record()
    own = transition is None
    if transition is None:
        transition = begin_transition(machine, "poweroff", record.generation)
    try:
        with machine.page_ownership() as po, machine.ram() as ram:
            with po.locked():
                preserved = int(np.count_nonzero(po.owner_map == PRESERVED))
            stopped, warnings = stop_phase(transition, po, phases, stop_timeout_s)
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
    return boot_report(
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
    return boot_report(
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


def _write_default_image(ram: Ram, kernel: PfnRange, cmdline: str, generation: int) -> None:
    size_bytes = (kernel[1] - kernel[0]) * PAGE_SIZE
    write_synthetic_image(ram, kernel[0], cmdline, generation, size_bytes)
