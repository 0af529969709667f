"""Mount options as tmpfs has them, plus ``pkram=NAME``, ``machine=DIR`` and ``secret``.

``secret`` makes every regular file of the mount secret: its pages leave the daemon's direct
map of RAM, as memfd_secret's do (see secret_pages).

``parse_options`` turns the ``-o`` list of a mount helper into `MountOptions`; anything unknown or
malformed raises `OptionError` naming the option, and so does a value the mount could not
report: ``size=`` (``N%`` resolved) must stay below 2^64 bytes once rounded up to whole pages,
so statfs, df and the control file's msgpack carry it (kernel tmpfs wraps it modulo 2^64);
``nr_inodes=`` is at most 2^54 - 1, the most kernel tmpfs accepts, which statfs readers that
take its counts as signed (Python's os.statvfs) still see right.
"""

import re
from dataclasses import dataclass, field

from kexec_sim import PAGE_SIZE, InvalidRequest, pages_for_bytes, parse_size

from .errors import OptionError

PKRAM_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HUGE_POLICIES = ("never", "always")
SUBTYPE = "pkramfs"
FSTYPE = f"fuse.{SUBTYPE}"  # in the mount table
MAX_SIZE_BYTES = 2**64 - PAGE_SIZE  # its pages, in bytes, still fit 64 bits (df multiplies)
MAX_NR_INODES = 2**54 - 1  # kernel tmpfs: ULONG_MAX / BOGO_INODE_SIZE

# Options mount(8), mount.fuse3 and fstab put in the list that the kernel or mount(8) itself
# handles: accepted and handed to the FUSE mount (flags) or ignored (userspace-only ones).
_KERNEL_FLAGS = frozenset(
    [
        "ro",
        "rw",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "sync",
        "async",
        "dirsync",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "mand",
        "nomand",
    ]
)
_USERSPACE_ONLY = frozenset(
    ["defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev"]
)
_FUSE_FLAGS = frozenset(["allow_other", "allow_root", "default_permissions", "auto_unmount"])
# What the kernel lists for a FUSE mount in /proc/mounts, and mount(8) hands back on a remount.
_FUSE_KERNEL_PARAMS = frozenset(["user_id", "group_id", "rootmode", "fd", "blksize", "max_read"])


@dataclass
class MountOptions:
    """Everything the ``-o`` list of a pkramfs mount says."""

    size_bytes: int | None = None  # None: half of RAM, like tmpfs; 0: unlimited
    nr_inodes: int | None = None  # None: half of RAM pages, like tmpfs; 0: unlimited
    mode: int = 0o1777
    uid: int = 0
    gid: int = 0
    huge: str | None = None  # None: "never", or what a restored node says
    secret: bool | None = None  # None: not secret, or what a restored node says
    pkram: str | None = None
    machine: str | None = None
    fsname: str | None = None
    remount: bool = False
    preserve: bool = False
    read_only: bool = False
    kernel_flags: list[str] = field(default_factory=list)
    fuse_flags: list[str] = field(default_factory=list)

    def resolved_size_pages(self, ram_pages: int) -> int:
        """Return the page limit (0 means unlimited) for a machine of *ram_pages*."""
        if self.size_bytes is None:
            return ram_pages // 2
        return pages_for_bytes(self.size_bytes)

    def resolved_nr_inodes(self, ram_pages: int) -> int:
        """Return the inode limit (0 means unlimited) for a machine of *ram_pages*."""
        return ram_pages // 2 if self.nr_inodes is None else self.nr_inodes


def split_option_list(text: str) -> list[str]:
    """Split ``a,b=c,d`` into items, dropping empty ones."""
    return [item for item in text.split(",") if item]


def parse_options(items: list[str], *, ram_bytes: int | None = None) -> MountOptions:
    """Parse mount option items; raise OptionError naming the first bad one.

    *ram_bytes* resolves ``size=N%``; without it a percentage is an error.
    """
    opts = MountOptions()
    for item in items:
        key, has_value, value = item.partition("=")
        try:
            _apply(opts, key, value if has_value else None, ram_bytes)
        except (ValueError, InvalidRequest) as exc:  # int() and parse_size
            raise OptionError(f"bad value for mount option '{key}': {exc}") from None
    return opts


def _need(value: str | None, key: str) -> str:
    if value is None or value == "":
        raise OptionError(f"mount option '{key}' needs a value ({key}=...)")
    return value


def _at_most(value: int, limit: int, unit: str) -> int:
    if value > limit:
        raise ValueError(f"{value} is more than the mount can take, at most {limit} {unit}")
    return value


def _apply(opts: MountOptions, key: str, value: str | None, ram_bytes: int | None) -> None:
    if key in _KERNEL_FLAGS or key in _USERSPACE_ONLY or key in _FUSE_FLAGS:
        if value is not None:
            raise OptionError(f"mount option '{key}' takes no value")
        if key in _KERNEL_FLAGS:
            opts.kernel_flags.append(key)
            if key in ("ro", "rw"):
                opts.read_only = key == "ro"
        elif key in _FUSE_FLAGS:
            opts.fuse_flags.append(key)
    elif key == "size":
        size_bytes = parse_size(_need(value, key), percent_of=ram_bytes)
        opts.size_bytes = _at_most(size_bytes, MAX_SIZE_BYTES, "bytes (2^64 less one page)")
    elif key == "nr_inodes":
        opts.nr_inodes = _at_most(parse_size(_need(value, key)), MAX_NR_INODES, "(2^54 - 1)")
    elif key == "mode":
        mode = int(_need(value, key), 8)
        if mode > 0o7777 or mode < 0:
            raise ValueError(f"not a permission mode: {value!r}")
        opts.mode = mode
    elif key in ("uid", "gid"):
        number = int(_need(value, key), 10)
        if not 0 <= number < 2**32 - 1:
            raise ValueError(f"out of range: {value!r}")
        setattr(opts, key, number)
    elif key == "huge":
        policy = _need(value, key)
        if policy not in HUGE_POLICIES:
            raise ValueError(f"{policy!r} is not one of {', '.join(HUGE_POLICIES)}")
        opts.huge = policy
    elif key == "pkram":
        name = _need(value, key)
        if not PKRAM_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a name of 1-64 letters, digits, '_', '.', '-'")
        opts.pkram = name
    elif key == "machine":
        opts.machine = _need(value, key)
    elif key == "fsname":
        opts.fsname = _need(value, key)
    elif key == "secret":
        if value is not None:
            raise OptionError("mount option 'secret' takes no value")
        opts.secret = True
    elif key == "remount":
        opts.remount = True
    elif key == "preserve":
        opts.preserve = True
    elif key in _FUSE_KERNEL_PARAMS:
        pass  # describes the FUSE connection itself; the daemon sets these
    elif key.startswith("x-") or key in ("comment", "subtype", "source"):
        pass  # userspace annotations (fstab x-*, comment=) and names mount(8) may add
    else:
        raise OptionError(f"unknown mount option '{item_text(key, value)}'")


def item_text(key: str, value: str | None) -> str:
    """Render an option item back as the user wrote it."""
    return key if value is None else f"{key}={value}"
