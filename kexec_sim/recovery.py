"""Recovery of interrupted power-state transitions: undo them or finish them, and say which.

Every command that opens a machine for use goes through ``open_machine``. When it finds a
transition record (kexec_sim.transition) whose process died, it takes the power lock and
either undoes the transition (it stopped before its point of no return: the machine goes on
in the state it left, minus the remains) or finishes it (from that point on), then returns
one line saying what it did and what the user can do next. A transition still running is
left alone (MachineBusy); a recovery already under way in another command is waited for.
``discard_transition`` is the way out when a recovery itself keeps failing.

The modules that undo or finish a transition (kexec, power, hibernation) are imported only
when there is one to recover: opening a machine is on every command's path.
"""

from collections.abc import Callable
from pathlib import Path

from kexec_sim.errors import MachineError
from kexec_sim.machine import Machine, resolve_machine_dir
from kexec_sim.machine_dir import TRANSITION_FILE
from kexec_sim.transition import (
    PowerLock,
    Transition,
    TransitionRecord,
    busy,
    clear_record,
    read_record,
)

Notify = Callable[[str], None]


def open_machine(
    path: str | Path | None,
    *,
    create: bool = False,
    notify: Notify | None = None,
    while_running: bool = False,
) -> Machine:
    """Open the machine at *path* (Machine.open), recovering an interrupted transition first.

    *notify* gets the one line saying what recovery did. Raises MachineBusy while another
    process changes the machine's power state (unless *while_running*: a mount's remount,
    which hibernate itself asks for), MachineError when recovery fails.
    """
    target = resolve_machine_dir(path)
    if (target / TRANSITION_FILE).exists():
        message = recover(target, while_running=while_running)
        if message is not None and notify is not None:
            notify(message)
    return Machine.open(target, create=create)


def recover(machine_dir: Path, *, while_running: bool = False) -> str | None:
    """Undo or finish the transition a dead process left in *machine_dir*; return what was
    done (None: there was none). Raises MachineBusy if its process is still running (unless
    *while_running*: then nothing is done)."""
    lock = PowerLock(machine_dir)
    try:
        if not lock.try_acquire():
            record = read_record(machine_dir)
            if record is None or record.running:
                if while_running:
                    return None
                raise busy(machine_dir, record)
            lock.acquire()  # its process died: another command is recovering it, wait
        record = read_record(machine_dir)
        if record is None:
            return None
        machine = Machine.open(machine_dir, create=False)
        transition = Transition.adopt(machine_dir, record, lock)
        try:
            message = _finish(machine, transition) if record.committed else _undo(machine, record)
        except MachineError as exc:
            raise MachineError(
                f"machine {machine_dir}: recovering an interrupted {record.describe()} "
                f"failed: {exc} ('kexec-sim reboot --force' discards it and reboots, losing "
                "what it had preserved)"
            ) from None
        clear_record(machine_dir)
        return message
    finally:
        lock.release()


def discard_transition(machine_dir: Path) -> TransitionRecord | None:
    """Drop the record of an interrupted transition without recovering it (``reboot
    --force``: what follows must not rely on the machine's state); return it. MachineBusy
    while its process runs."""
    lock = PowerLock(machine_dir)
    try:
        if not lock.try_acquire():
            raise busy(machine_dir, read_record(machine_dir))
        record = read_record(machine_dir)
        clear_record(machine_dir)
        return record
    finally:
        lock.release()


def _undo(machine: Machine, record: TransitionRecord) -> str:
    from kexec_sim import kexec
    from kexec_sim.hibernation.hibernate import undo_hibernate
    from kexec_sim.hibernation.resume import undo_resume

    what = f"an interrupted {record.describe()} was undone"
    if record.action == "exec":
        kexec.undo_exec(machine, record.facts)
        return (
            f"{what}: generation {record.generation} goes on with its preserved trees (mount "
            "them again, or 'kexec-sim exec' to run the exec again)"
        )
    if record.action == "hibernate":
        undo_hibernate(machine, record.facts)
        return (
            f"{what}: no image will be resumed (one at the path is invalidated); the mounts "
            "it preserved stay preserved ('kexec-sim hibernate' again; a stopped mount restores "
            "when mounted again; 'mount -o remount,rw' makes a running one writable)"
        )
    if record.action == "resume":
        undo_resume(machine)
        images = " ".join(f"--image {p}" for p in _images(record))
        return f"{what}: the machine is off, its images unused ('kexec-sim resume {images}')"
    return f"{what}: generation {record.generation} goes on ('kexec-sim {record.action}' again)"


def _finish(machine: Machine, transition: Transition) -> str:
    from kexec_sim import kexec, power
    from kexec_sim.hibernation.resume import finish_resume

    action = transition.action
    what = f"an interrupted {action} of generation {transition.generation} was finished"
    if action == "exec":
        kexec.finish_exec(machine, transition)
        return f"{what}: generation {machine.generation} booted (mount to restore the trees)"
    if action == "reboot":
        power.finish_reboot(machine, transition)
        return f"{what}: generation {machine.generation} booted"
    if action == "resume":
        finish_resume(machine, transition)
        return f"{what}: generation {machine.generation} booted (mount to restore the trees)"
    power.finish_poweroff(machine, transition)  # poweroff, or hibernate's
    if action == "hibernate":
        image = transition.facts.get("image")
        return (
            f"{what}: its image was complete and the machine is now off "
            f"('kexec-sim resume --image {image}' brings it back)"
        )
    return f"{what}: the machine is off ('kexec-sim boot' starts it)"


def _images(record: TransitionRecord) -> list[str]:
    images = record.facts.get("images")
    return [i for i in images if isinstance(i, str)] if isinstance(images, list) else []
