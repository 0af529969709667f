"""The exceptions of this project: one root, `Error`, and a subclass per domain.

kexec_sim's are here (the machine, its images, its command line); pkramfs's derive from `Error`
too (pkramfs.errors). Anything else that escapes a command is a bug: the CLIs report it as an
internal error with the log holding its traceback (kexec_sim.internal_error).
"""


class Error(Exception):
    """The root of every error pkramfs and kexec_sim raise on purpose."""


class MachineError(Error):
    """Base of every error about the simulated machine (bad state, bad request)."""


class InvalidRequest(MachineError):
    """A request is malformed (a size, command line, address, option or mode that cannot be):
    the caller's mistake, reported by the CLIs as a usage error."""


class MachineBusy(MachineError):
    """Another process is taking the machine through a power-state change (or left one
    interrupted that must be recovered first)."""


class OutOfMemory(MachineError):
    """The machine has fewer free pages than were asked for."""


class CorruptMachine(MachineError):
    """A file of the machine directory failed validation (untrusted bytes)."""


class MachineExists(MachineError):
    """A machine already exists where one was to be created."""


class CorruptHandover(CorruptMachine):
    """Handover data read back from RAM (super block, preserved-pages table) failed validation."""


class CorruptImage(MachineError):
    """A hibernation image failed validation (untrusted bytes), or was already used."""


class ForeignImage(CorruptImage):
    """A valid hibernation image written for another machine (id or RAM size differ)."""


class ImageKeyError(CorruptImage):
    """An encrypted hibernation image read without its key or with a wrong one, or a key given
    for an image that is not encrypted."""


class ImageTooLarge(MachineError):
    """A hibernation image would exceed the size it was allowed (nothing valid was left)."""


class UsageError(Error):
    """Bad input from a command line (raised by the CLIs only; they exit with code 2)."""
