"""Page owner ids: the special owners and the registry of live owners (``boot/owners.json``).

An owner id is an int32 stored per pfn in the page-ownership map. ``FREE`` (0) marks a free
usable page, negative ids are special owners, positive ids are owners registered by a process
of the current boot (a pkramfs daemon, a test). Registered ids are never reused within a boot.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import CorruptMachine, InvalidRequest
from kexec_sim.jsonfile import get_int, get_str, read_json_object, write_json_atomic
from kexec_sim.memmap import MemoryMap, RegionType

FREE = 0
FIRMWARE = -1
KERNEL = -2
NOSAVE = -3
PRESERVED = -4
"""Pages handed over a kexec, owned by nobody until a restore transfers them."""
HANDOVER = -5
"""The handover ABI's own pages: this boot's super block (and, during an exec, the table)."""

SPECIAL_OWNER_NAMES: Mapping[int, str] = {
    FREE: "free",
    FIRMWARE: "firmware",
    KERNEL: "kernel",
    NOSAVE: "nosave",
    PRESERVED: "preserved",
    HANDOVER: "handover",
}
RESERVED_OWNERS = (FIRMWARE, KERNEL, NOSAVE)
"""The owners of the memory map's non-usable regions (and nothing else)."""
REGION_OWNER: Mapping[RegionType, int] = {
    RegionType.USABLE: FREE,
    RegionType.FIRMWARE: FIRMWARE,
    RegionType.KERNEL: KERNEL,
    RegionType.NOSAVE: NOSAVE,
}
MAX_OWNER_ID = (1 << 31) - 1
MAX_NAME_CHARS = 255
MAX_MOUNTPOINT_CHARS = 4096
REGISTRY_FORMAT = 1
_FEW_IDS = 16  # up to this many ids, one comparison pass per id beats np.isin
_BINCOUNT_MAX_RANGE = 1 << 20  # ids spanning less than this are counted with np.bincount


def check_mountpoint(mountpoint: str | None) -> None:
    """Raise InvalidRequest unless *mountpoint* is None or an absolute, printable path."""
    if mountpoint is None:
        return
    if (
        not mountpoint.startswith("/")
        or len(mountpoint) > MAX_MOUNTPOINT_CHARS
        or not mountpoint.isprintable()
    ):
        raise InvalidRequest(
            f"mountpoint must be an absolute printable path of at most {MAX_MOUNTPOINT_CHARS} "
            f"characters, got {mountpoint[:100]!r}"
        )


def _get_mountpoint(raw: Mapping[str, object], where: str) -> str | None:
    """The optional ``mountpoint`` of a registry entry (absent in older registries)."""
    value = raw.get("mountpoint")
    if value is None:
        return None
    if not isinstance(value, str):
        raise CorruptMachine(f"{where}: 'mountpoint' must be a string or null, got {value!r}")
    try:
        check_mountpoint(value)
    except InvalidRequest as exc:
        raise CorruptMachine(f"{where}: {exc}") from None
    return value


def _get_preservable(raw: Mapping[str, object], where: str) -> bool:
    """The optional ``preservable`` flag of a registry entry (absent in older registries)."""
    value = raw.get("preservable", False)
    if not isinstance(value, bool):
        raise CorruptMachine(f"{where}: 'preservable' must be true or false, got {value!r}")
    return value


def owner_name(owner_id: int) -> str:
    """Return a short display name of a special owner id, or ``owner N``."""
    return SPECIAL_OWNER_NAMES.get(owner_id, f"owner {owner_id}")


def boot_owner_map(memory_map: MemoryMap, nr_pages: int) -> npt.NDArray[np.int32]:
    """Return the owner of every pfn at boot: FREE where usable, a reserved owner elsewhere.

    Holes in the memory map are owned by FIRMWARE (not RAM the kernel may use).
    """
    owner_map = np.empty(nr_pages, dtype=np.int32)
    for region in memory_map.covering(nr_pages):
        owner_map[region.start_pfn : region.end_pfn_exclusive] = REGION_OWNER[region.type]
    return owner_map


def owned_by_any(
    owner_map: npt.NDArray[np.int32], owner_ids: Iterable[int]
) -> npt.NDArray[np.bool_]:
    """Return a bool per pfn: True where *owner_map* holds one of *owner_ids*."""
    ids = np.array(sorted(set(owner_ids)), dtype=np.int64)  # np.unique imports numpy.ma: 40 ms
    if ids.size > _FEW_IDS:
        return np.isin(owner_map, ids, kind="sort")
    mask = np.zeros(owner_map.shape, dtype=np.bool_)
    for owner_id in ids.tolist():
        mask |= owner_map == owner_id
    return mask


def count_owners(owner_map: npt.NDArray[np.int32]) -> dict[int, int]:
    """Return the number of pfns of every owner id present in *owner_map*."""
    if owner_map.size == 0:
        return {}
    low, high = int(owner_map.min()), int(owner_map.max())
    if high - low > _BINCOUNT_MAX_RANGE:
        ids, counts = np.unique(owner_map, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))
    bins = np.bincount(owner_map.astype(np.int64) - low)
    present = np.flatnonzero(bins)
    return dict(zip((present + low).tolist(), bins[present].tolist(), strict=True))


@dataclass(frozen=True)
class OwnerInfo:
    """A registered owner: who it is and which process (pid + start time) keeps it alive."""

    owner_id: int
    name: str
    pid: int
    pid_start_time: int
    registered_ns: int
    mountpoint: str | None = None
    """The mount the owner serves, if any (``kexec-sim exec`` unmounts it lazily)."""
    preservable: bool = False
    """Whether the mount can preserve its pages (``mount -o remount,preserve,ro``): what
    ``kexec-sim hibernate`` asks of it before writing an image."""

    def to_dict(self) -> dict[str, object]:
        """Return the JSON form stored in owners.json (the id is the key, not a field)."""
        return {
            "name": self.name,
            "pid": self.pid,
            "pid_start_time": self.pid_start_time,
            "registered_ns": self.registered_ns,
            "mountpoint": self.mountpoint,
            "preservable": self.preservable,
        }


@dataclass
class OwnerRegistry:
    """The contents of ``boot/owners.json``: the next id to hand out and the live owners."""

    next_id: int = 1
    owners: dict[int, OwnerInfo] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write the registry to *path* atomically."""
        write_json_atomic(
            path,
            {
                "format": REGISTRY_FORMAT,
                "next_id": self.next_id,
                "owners": {str(i): info.to_dict() for i, info in sorted(self.owners.items())},
            },
        )

    @classmethod
    def load(cls, path: Path) -> "OwnerRegistry":
        """Read and validate the registry at *path*; raise CorruptMachine when it is bad."""
        where = str(path)
        try:
            data = read_json_object(path)
        except FileNotFoundError:
            raise CorruptMachine(f"{where}: missing") from None
        if data.get("format") != REGISTRY_FORMAT:
            raise CorruptMachine(f"{where}: unsupported format {data.get('format')!r}")
        next_id = get_int(data, "next_id", where, minimum=1)
        raw_owners = data.get("owners")
        if not isinstance(raw_owners, dict):
            raise CorruptMachine(f"{where}: 'owners' must be an object")
        owners: dict[int, OwnerInfo] = {}
        for key, raw in raw_owners.items():
            entry = f"{where}: owner {key!r}"
            if not (key.isascii() and key.isdigit()) or not 0 < int(key) < next_id:
                raise CorruptMachine(f"{entry}: id must be an integer in 1..{next_id - 1}")
            if not isinstance(raw, dict):
                raise CorruptMachine(f"{entry}: expected an object")
            owner_id = int(key)
            owners[owner_id] = OwnerInfo(
                owner_id=owner_id,
                name=get_str(raw, "name", entry),
                pid=get_int(raw, "pid", entry, minimum=1),
                pid_start_time=get_int(raw, "pid_start_time", entry),
                registered_ns=get_int(raw, "registered_ns", entry),
                mountpoint=_get_mountpoint(raw, entry),
                preservable=_get_preservable(raw, entry),
            )
        if next_id > MAX_OWNER_ID + 1:
            raise CorruptMachine(f"{where}: next_id {next_id} exceeds the int32 owner range")
        return cls(next_id, owners)
