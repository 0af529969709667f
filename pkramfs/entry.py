"""``pkramfs`` and ``mount.pkramfs``'s entry point: a mount runs warm when the standby of the
machine's boot waits for it (pkramfs.standby); a remount, a foreground or fake mount, a call
for help, and a mount without a standby run pkramfs.mount_cli as it is. Only the standard
library's lightest modules are imported first."""

import sys

from kexec_sim import machine_path

_STANDBY_KIND = "pkramfs-mount"  # pkramfs.standby.KIND (not imported: it imports the daemon)
_COLD_FLAGS = {"-f", "-d", "-h", "--help"}


def _mount_machine(argv: list[str]) -> str | None:
    """The machine a plain mount's command line names (None: anything else, left to
    mount_cli: a remount, foreground, fake, help, quoting)."""
    items: list[str] = []
    for i, arg in enumerate(argv):
        if arg in _COLD_FLAGS:
            return None
        if arg.startswith("-o"):
            text = arg[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            items += text.split(",")
        elif arg.startswith("--"):
            return None
    if "remount" in items or any('"' in item or "'" in item for item in items):
        return None
    machines = [item.partition("=")[2] for item in items if item.startswith("machine=")]
    return machine_path(machines[-1] if machines else None)


def main(argv: list[str] | None = None) -> int:
    """Run ``pkramfs`` / ``mount.pkramfs`` with *argv* (default: sys.argv[1:]); return the
    exit code."""
    args = sys.argv[1:] if argv is None else argv
    machine = _mount_machine(args)
    if machine is not None:
        from kexec_sim import run_warm  # sockets and json: not for a remount helper

        code = run_warm(_STANDBY_KIND, machine, [sys.argv[0], *args], "pkramfs")
        if code is not None:
            return code
    from .mount_cli import main as run_cold

    return run_cold(args)
