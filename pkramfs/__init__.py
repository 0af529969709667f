"""pkramfs: a tmpfs in a simulated machine's RAM that survives a simulated kexec."""

from .errors import FsError, MountError, OptionError, PkramfsError

__all__ = ["FsError", "MountError", "OptionError", "PkramfsError"]
