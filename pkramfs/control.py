"""The hidden control file: how CLI tools talk to a running mount.

The file ``/.__pkramfs_ctrl__`` (inode 2) exists only for lookups at the root: it is absent from
readdir, owned by root, mode 0600, so only root can use it. Commands arrive as a setxattr of
``user.pkramfs.command`` whose value is a msgpack map ``{"cmd": NAME, ...arguments}``; a failed
command answers its errno and leaves a one-line reason in ``user.pkramfs.error``. Queries are
getxattrs, which work on a read-only mount too: ``user.pkramfs.status`` answers a msgpack map,
``user.pkramfs.claims`` the path of a .npy file the daemon just wrote with every pfn it owns.
"""

import errno
import os
from typing import Any

import msgpack

from .errors import MountError

CONTROL_NAME = b".__pkramfs_ctrl__"
CONTROL_INO = 2
COMMAND_XATTR = b"user.pkramfs.command"
STATUS_XATTR = b"user.pkramfs.status"
ERROR_XATTR = b"user.pkramfs.error"
CLAIMS_XATTR = b"user.pkramfs.claims"
MAX_REQUEST_BYTES = 64 * 1024


def control_path(mountpoint: str) -> str:
    """Return the path of a mount's control file."""
    return os.path.join(mountpoint, CONTROL_NAME.decode())


def decode_request(value: bytes) -> dict[str, Any]:
    """Decode a command value; raise MountError if it is not a msgpack map with a ``cmd``."""
    if len(value) > MAX_REQUEST_BYTES:
        raise MountError("command too long")
    try:
        request = msgpack.unpackb(value, raw=False)
    except Exception as exc:  # msgpack raises several types for bad input
        raise MountError(f"undecodable command: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise MountError("a command is a map with a 'cmd' string")
    return request


def send_command(mountpoint: str, cmd: str, **args: Any) -> None:
    """Send *cmd* to the daemon of *mountpoint*; raise MountError with its reason on failure."""
    path = control_path(mountpoint)
    value = msgpack.packb({"cmd": cmd, **args}, use_bin_type=True)
    try:
        os.setxattr(path, COMMAND_XATTR.decode(), value)
    except OSError as exc:
        reason = _last_error(path) or os.strerror(exc.errno or errno.EIO)
        raise MountError(f"{mountpoint}: {cmd}: {reason}") from None


def query_status(mountpoint: str) -> dict[str, Any]:
    """Return the status map of the daemon serving *mountpoint*."""
    try:
        value = os.getxattr(control_path(mountpoint), STATUS_XATTR.decode())
    except OSError as exc:
        raise MountError(f"{mountpoint}: not a running pkramfs mount ({exc.strerror})") from None
    status = msgpack.unpackb(value, raw=False)
    if not isinstance(status, dict):
        raise MountError(f"{mountpoint}: malformed status from the daemon")
    return status


def query_claims_path(mountpoint: str) -> str:
    """Ask the daemon of *mountpoint* to dump the pfns it owns; return the .npy file's path."""
    try:
        return os.getxattr(control_path(mountpoint), CLAIMS_XATTR.decode()).decode()
    except OSError as exc:
        raise MountError(f"{mountpoint}: no page claims ({exc.strerror})") from None


def _last_error(path: str) -> str:
    try:
        return os.getxattr(path, ERROR_XATTR.decode()).decode(errors="replace")
    except OSError:
        return ""
