"""Power-state transitions made crash-consistent: the machine writes where it is going first.

exec, reboot, poweroff, hibernate and resume each run as one *transition*: they hold
``power.lock`` (flock, so a dead process holds nothing) for their whole run, and before their
first step that changes anything they write ``transition.json`` in the machine directory: the
action, the generation it leaves, its phase and the facts that finishing it needs. Each phase
is recorded before it starts; the record goes once the new state is committed.

Each action has one point of no return, its first destructive write to RAM (the scrub; for
resume, RAM restored from the images): the phases before it are *reversible* (stopped there,
the machine is still the previous state, plus remains that can be dropped), the phases from it
on are *committed* (they can only be finished, from the facts recorded). kexec_sim.recovery
reads a record whose process died and undoes or finishes the transition. While a record
exists nothing may register as an owner of the boot or move preserved nodes (`refuse_changes`),
so no mount can slip in between a transition's decisions and its work.

Layout: ``{"format": 1, "action", "phase", "generation", "pid", "pid_start_time",
"started_ns", "facts"}``.

Tests kill a transition at a phase with ``KEXEC_SIM_FAULT=<action>:<phase>``: the process
SIGKILLs itself right after recording that phase (before doing its work); ``<action>:end``
kills it with the new state committed but the record not yet dropped.
"""

import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from kexec_sim.errors import CorruptMachine, MachineBusy, MachineError
from kexec_sim.geometry import PfnRange
from kexec_sim.jsonfile import get_int, get_str, read_json_object, write_json_atomic
from kexec_sim.machine_dir import TRANSITION_FILE
from kexec_sim.process import is_alive, process_start_time

POWER_LOCK_FILE = "power.lock"
FORMAT = 1
FAULT_ENV = "KEXEC_SIM_FAULT"

COMMITTED_PHASES: Mapping[str, frozenset[str]] = {
    "exec": frozenset({"scrub", "image", "boot"}),
    "reboot": frozenset({"scrub"}),
    "poweroff": frozenset({"scrub"}),
    "hibernate": frozenset({"scrub"}),  # its power off's scrub: the image is the state by then
    "resume": frozenset({"restored"}),
}
"""Per action, the phases from its point of no return on (the others can be undone)."""
PRESERVING = frozenset({("hibernate", "preserve")})
"""(action, phase) during which mounts may preserve themselves: hibernate preserving them."""
STOP_PHASE = "stop"
"""The phase in which exec, reboot and power off (hibernate's too) stop the boot's processes."""


def is_committed(action: str, phase: str | None) -> bool:
    """Whether *phase* of *action* is past its point of no return (COMMITTED_PHASES)."""
    return phase in COMMITTED_PHASES.get(action, frozenset())


@dataclass(frozen=True)
class TransitionRecord:
    """What ``transition.json`` says."""

    action: str
    phase: str
    generation: int
    """The generation the transition leaves (for resume: the powered-off one)."""
    pid: int
    pid_start_time: int | None
    started_ns: int
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Whether the process that wrote the record still runs (else it was interrupted)."""
        return self.pid_start_time is not None and is_alive(self.pid, self.pid_start_time)

    @property
    def committed(self) -> bool:
        """Whether the transition is past its point of no return (it can only be finished)."""
        return is_committed(self.action, self.phase)

    def describe(self) -> str:
        """One line: which transition stopped where."""
        return (
            f"{self.action} of generation {self.generation} (pid {self.pid}), phase {self.phase!r}"
        )


def read_record(machine_dir: Path) -> TransitionRecord | None:
    """The transition recorded in *machine_dir*, None if there is none.

    Raises CorruptMachine when the record is unreadable.
    """
    path = machine_dir / TRANSITION_FILE
    where = str(path)
    try:
        data = read_json_object(path)
    except FileNotFoundError:
        return None
    if data.get("format") != FORMAT:
        raise CorruptMachine(f"{where}: unsupported format {data.get('format')!r}")
    action = get_str(data, "action", where)
    if action not in COMMITTED_PHASES:
        raise CorruptMachine(f"{where}: unknown action {action!r}")
    facts = data.get("facts", {})
    if not isinstance(facts, dict):
        raise CorruptMachine(f"{where}: 'facts' must be an object")
    return TransitionRecord(
        action=action,
        phase=get_str(data, "phase", where),
        generation=get_int(data, "generation", where, minimum=1),
        pid=get_int(data, "pid", where),
        pid_start_time=get_int(data, "pid_start_time", where)
        if data.get("pid_start_time") is not None
        else None,
        started_ns=get_int(data, "started_ns", where),
        facts=facts,
    )


class PowerLock:
    """``power.lock`` of a machine, held by whoever changes its power state (flock)."""

    def __init__(self, machine_dir: Path) -> None:
        self._fd = os.open(
            machine_dir / POWER_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False when another process holds it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True

    def acquire(self) -> None:
        """Take the lock, waiting for its holder."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        """Release the lock and close its file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def busy(machine_dir: Path, record: TransitionRecord | None) -> MachineBusy:
    """The error for a machine another process is changing."""
    doing = record.describe() if record is not None else "a power-state change"
    return MachineBusy(f"machine {machine_dir} is busy: {doing} is running; try again after it")


def boot_stopping(machine_dir: Path) -> bool:
    """Whether a running transition is stopping the boot's processes (its STOP_PHASE).

    A process stopping then may leave its pages as they are: the transition scrubs or hands
    over every page of the boot (an unreadable record counts as no).
    """
    try:
        record = read_record(machine_dir)
    except CorruptMachine:
        return False
    return record is not None and record.phase == STOP_PHASE and record.running


def refuse_changes(
    machine_dir: Path, what: str, *, allowed_during: Collection[tuple[str, str]] = ()
) -> None:
    """MachineBusy when a transition is recorded (running, or interrupted and not yet
    recovered), but in an (action, phase) of *allowed_during*: *what* (registering a mount,
    moving a preserved node) must wait for it. Call it under the boot's ownership lock, where
    those changes happen."""
    record = read_record(machine_dir)
    if record is None or (record.action, record.phase) in allowed_during:
        return
    if record.running:
        raise MachineBusy(f"{what}: machine {machine_dir} is going through {record.describe()}")
    raise MachineBusy(
        f"{what}: machine {machine_dir} has an interrupted {record.describe()}: any "
        "'kexec-sim' command (e.g. 'kexec-sim status') recovers it first"
    )


class Transition:
    """One running transition: the power lock held, the record kept up to date."""

    def __init__(self, machine_dir: Path, action: str, generation: int, lock: PowerLock) -> None:
        self.machine_dir = machine_dir
        self.action = action
        self.generation = generation
        self.facts: dict[str, object] = {}
        self.phase: str | None = None
        self._lock = lock
        self._started_ns = time.time_ns()

    @property
    def committed(self) -> bool:
        """Whether the recorded phase is past the point of no return."""
        return is_committed(self.action, self.phase)

    @classmethod
    def begin(cls, machine_dir: Path, action: str, generation: int) -> "Transition":
        """Take the power lock for *action* leaving *generation*; nothing is recorded yet.

        Raises MachineBusy when another process holds the lock or left a transition that
        was not recovered (kexec_sim.recovery runs first in every command).
        """
        lock = PowerLock(machine_dir)
        if not lock.try_acquire():
            lock.release()
            raise busy(machine_dir, read_record(machine_dir))
        left = read_record(machine_dir)
        if left is not None:
            lock.release()
            raise MachineError(
                f"machine {machine_dir}: an interrupted {left.describe()} was not recovered"
            )
        return cls(machine_dir, action, generation, lock)

    @classmethod
    def adopt(cls, machine_dir: Path, record: TransitionRecord, lock: PowerLock) -> "Transition":
        """Carry on the recorded transition of a dead process (the caller holds *lock*)."""
        transition = cls(machine_dir, record.action, record.generation, lock)
        transition.facts = dict(record.facts)
        transition.phase = record.phase
        return transition

    def record(self, phase: str, **facts: object) -> None:
        """Record that the transition enters *phase* (adding *facts*), before its work.

        A committed transition never goes back to a phase that could be undone.
        """
        if self.committed and not is_committed(self.action, phase):
            raise MachineError(f"{self.action}: phase {phase!r} after committed {self.phase!r}")
        self.phase = phase
        self.facts.update(facts)
        write_json_atomic(
            self.machine_dir / TRANSITION_FILE,
            {
                "format": FORMAT,
                "action": self.action,
                "phase": phase,
                "generation": self.generation,
                "pid": os.getpid(),
                "pid_start_time": process_start_time(os.getpid()),
                "started_ns": self._started_ns,
                "facts": self.facts,
            },
        )
        fault_point(f"{self.action}:{phase}")

    def end(self) -> None:
        """The new state is committed (or nothing was changed): drop the record, the lock."""
        if self.phase is not None:
            fault_point(f"{self.action}:end")
        clear_record(self.machine_dir)
        self._lock.release()

    def abandon(self) -> None:
        """Release the lock keeping the record (the caller failed past the point of no
        return: recovery finishes the transition)."""
        self._lock.release()


def give_up(transition: Transition, undo: Callable[[], None] | None = None) -> None:
    """The transition failed in this process: *undo* it while it can be undone and end it,
    else (committed, or the undo failed) leave its record for kexec_sim.recovery."""
    if transition.phase is not None and transition.committed:
        transition.abandon()
        return
    if transition.phase is not None and undo is not None:
        try:
            undo()
        except Exception:
            transition.abandon()
            return
    transition.end()


def clear_record(machine_dir: Path) -> None:
    """Remove ``transition.json`` (the caller holds the power lock)."""
    with suppress(FileNotFoundError):
        (machine_dir / TRANSITION_FILE).unlink()


def fact_int(facts: Mapping[str, object], key: str, below: int | None = None) -> int:
    """A non-negative integer fact (under *below*); CorruptMachine if the record lacks it."""
    value = facts.get(key)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < 0
        or (below is not None and value >= below)
    ):
        raise CorruptMachine(f"transition record: {key!r} is not a fitting count: {value!r}")
    return value


def fact_str(facts: Mapping[str, object], key: str, choices: Collection[str] = ()) -> str:
    """A text fact (one of *choices*, when given); CorruptMachine if the record lacks it."""
    value = facts.get(key)
    if not isinstance(value, str) or (choices and value not in choices):
        raise CorruptMachine(f"transition record: {key!r} is not fitting text: {value!r}")
    return value


def fact_range(facts: Mapping[str, object], nr_pages: int) -> PfnRange:
    """The ``kernel_image`` pfn range fact, inside a RAM of *nr_pages*; CorruptMachine if the
    record lacks it."""
    value = facts.get("kernel_image")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1] <= nr_pages
    ):
        raise CorruptMachine(f"transition record: 'kernel_image' is not a pfn range: {value!r}")
    return (value[0], value[1])


def fault_point(name: str) -> None:
    """Die here (SIGKILL) if the tests asked to: ``KEXEC_SIM_FAULT=<name>``."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
