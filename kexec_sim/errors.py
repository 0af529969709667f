"""The exceptions kexec_sim raises."""


class MachineError(Exception):
    """Base of every error about the simulated machine (bad state, bad request)."""


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


class UsageError(Exception):
    """Bad input from a command line (the CLIs exit with code 2)."""
