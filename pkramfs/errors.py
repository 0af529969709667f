"""The exceptions pkramfs raises."""

import errno as errno_module

from kexec_sim import Error


class PkramfsError(Error):
    """Base of every pkramfs error (under the project's one root, kexec_sim.errors.Error)."""


class FsError(PkramfsError):
    """A filesystem operation failed with *errno*; the FUSE layer turns it into that errno."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or errno_module.errorcode.get(errno, str(errno)))
        self.errno = errno


class OptionError(PkramfsError):
    """A mount option is unknown or malformed; the message names it."""


class MountError(PkramfsError):
    """Mounting, remounting or talking to a running mount failed."""


class CorruptNode(PkramfsError):
    """A preserved node read back from RAM failed validation; the message says where and why."""


class CorruptNodeList(PkramfsError):
    """This boot's super block or node list does not read back valid: no preserved node can
    be trusted to be found (a restore must not pretend there is none)."""


class NodeError(PkramfsError):
    """A preserved-node operation cannot be done (no such node, a name already taken, ...)."""
