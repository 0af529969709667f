"""The page-ownership checker: compare what owners believe they own with the map.

Every check is a vectorized pass over the claims or the map; a problem is reported once per
kind (and per owner), with a count and a few example pfns, never once per page.
"""

from collections.abc import Collection, Mapping

import numpy as np
import numpy.typing as npt

from kexec_sim.errors import CorruptHandover
from kexec_sim.memmap import MemoryMap, RegionType
from kexec_sim.owners import (
    FREE,
    HANDOVER,
    KERNEL,
    PRESERVED,
    REGION_OWNER,
    RESERVED_OWNERS,
    count_owners,
    owned_by_any,
    owner_name,
)
from kexec_sim.pages import PfnArray
from kexec_sim.preserved_pages import walk_table
from kexec_sim.ram import Ram
from kexec_sim.super_block import read_super_block

EXAMPLES = 5
"""How many example pfns a problem message lists."""


def _examples(pfns: npt.NDArray[np.int64]) -> str:
    shown = ", ".join(str(int(p)) for p in pfns[:EXAMPLES])
    return f"{shown}, ..." if pfns.size > EXAMPLES else shown


def find_problems(
    owner_map: npt.NDArray[np.int32],
    memory_map: MemoryMap,
    registered: Collection[int],
    claims: Mapping[int, PfnArray],
    *,
    super_block_pfn: int = 0,
    kernel_image: tuple[int, int] = (0, 0),
) -> list[str]:
    """Return human-readable problems of *owner_map* against *claims* (empty list = clean).

    *claims* maps owner ids to the pfns each believes it owns. Only owners present in
    *claims* are checked for leaks, so a caller may check its own owners while others run.
    *super_block_pfn* (0 = none) is the one page HANDOVER may own outside an exec;
    *kernel_image* is the pfn range of the boot's kernel image, owned by KERNEL.
    """
    nr_pages = owner_map.size
    problems: list[str] = []
    problems += _check_claim_owners(claims, registered)
    pfns, labels = _flatten_claims(claims, nr_pages, problems)
    problems += _check_duplicates(pfns, labels)
    problems += _check_claimed_owned(owner_map, pfns, labels)
    problems += _check_leaks(owner_map, pfns, labels, claims.keys())
    problems += _check_unregistered(owner_map, registered)
    problems += _check_reserved(owner_map, memory_map, kernel_image)
    problems += _check_handover(owner_map, super_block_pfn)
    return problems


def handover_problems(ram: Ram, super_block_pfn: int, generation: int) -> list[str]:
    """Problems of this boot's super block (valid, this generation's) and of the
    preserved-pages table it names, if any (empty list = clean)."""
    where = f"this boot's super block, pfn {super_block_pfn}"
    try:
        sb = read_super_block(ram, super_block_pfn)
    except CorruptHandover as exc:
        return [f"{where}: {str(exc).removeprefix(f'pkram={super_block_pfn}: ')}"]
    if sb.generation != generation:
        return [f"{where}: written by generation {sb.generation}, this boot is {generation}"]
    if sb.table_root_pfn:
        try:
            walk_table(ram, sb.table_root_pfn)
        except CorruptHandover as exc:
            return [f"{where}: its preserved-pages table: {exc}"]
    return []


def _check_claim_owners(claims: Mapping[int, PfnArray], registered: Collection[int]) -> list[str]:
    return [
        f"claims given for {owner_name(owner)}, which is not a registered owner"
        for owner in sorted(claims)
        if owner not in registered and owner != PRESERVED
    ]


def _flatten_claims(
    claims: Mapping[int, PfnArray], nr_pages: int, problems: list[str]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Concatenate the claims into (pfns, owner per pfn), dropping and reporting bad pfns."""
    parts: list[npt.NDArray[np.int64]] = []
    label_parts: list[npt.NDArray[np.int32]] = []
    for owner, raw in claims.items():
        pfns = np.asarray(raw, dtype=np.int64).ravel()
        outside = (pfns < 0) | (pfns >= nr_pages)
        if outside.any():
            problems.append(
                f"{owner_name(owner)} claims {int(outside.sum())} pfns outside RAM "
                f"(0..{nr_pages - 1}), e.g. {_examples(pfns[outside])}"
            )
            pfns = pfns[~outside]
        parts.append(pfns)
        label_parts.append(np.full(pfns.size, owner, dtype=np.int32))
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32)
    return np.concatenate(parts), np.concatenate(label_parts)


def _check_duplicates(pfns: npt.NDArray[np.int64], labels: npt.NDArray[np.int32]) -> list[str]:
    order = np.argsort(pfns, kind="stable")
    sorted_pfns, sorted_labels = pfns[order], labels[order]
    repeated = np.flatnonzero(sorted_pfns[1:] == sorted_pfns[:-1]) + 1
    if repeated.size == 0:
        return []
    problems: list[str] = []
    same_owner = sorted_labels[repeated] == sorted_labels[repeated - 1]
    for owner in np.unique(sorted_labels[repeated][same_owner]).tolist():
        dup = np.unique(sorted_pfns[repeated][same_owner & (sorted_labels[repeated] == owner)])
        problems.append(
            f"{owner_name(owner)} claims {dup.size} pfns more than once, e.g. {_examples(dup)}"
        )
    across = np.unique(sorted_pfns[repeated][~same_owner])
    if across.size:
        first = int(across[0])
        who = sorted(set(sorted_labels[sorted_pfns == first].tolist()))
        problems.append(
            f"{across.size} pfns are claimed by more than one owner, e.g. {_examples(across)} "
            f"(pfn {first} by {', '.join(owner_name(o) for o in who)})"
        )
    return problems


def _check_claimed_owned(
    owner_map: npt.NDArray[np.int32], pfns: npt.NDArray[np.int64], labels: npt.NDArray[np.int32]
) -> list[str]:
    actual = owner_map[pfns]
    wrong = actual != labels
    problems: list[str] = []
    for owner in np.unique(labels[wrong]).tolist():
        mask = wrong & (labels == owner)
        bad = np.unique(pfns[mask])
        holders = sorted(set(actual[mask][:EXAMPLES].tolist()))
        problems.append(
            f"{owner_name(owner)} claims {bad.size} pfns the map gives to someone else, "
            f"e.g. {_examples(bad)} (owned by {', '.join(owner_name(h) for h in holders)})"
        )
    return problems


def _check_leaks(
    owner_map: npt.NDArray[np.int32],
    pfns: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int32],
    checked_owners: Collection[int],
) -> list[str]:
    if not checked_owners:
        return []
    claimed_right = np.zeros(owner_map.size, dtype=np.bool_)
    claimed_right[pfns[owner_map[pfns] == labels]] = True
    leaked = owned_by_any(owner_map, checked_owners) & ~claimed_right
    leaked_pfns = np.flatnonzero(leaked)
    problems: list[str] = []
    for owner in np.unique(owner_map[leaked_pfns]).tolist():
        mine = leaked_pfns[owner_map[leaked_pfns] == owner]
        problems.append(
            f"{owner_name(owner)} owns {mine.size} pfns in the map that it does not claim "
            f"(leaked), e.g. {_examples(mine)}"
        )
    return problems


def _check_unregistered(owner_map: npt.NDArray[np.int32], registered: Collection[int]) -> list[str]:
    known = {*registered, FREE, PRESERVED, HANDOVER, *RESERVED_OWNERS}
    counts = count_owners(owner_map)
    unknown = sorted(set(counts) - known)
    problems: list[str] = []
    for owner in unknown[:EXAMPLES]:
        mine = np.flatnonzero(owner_map == owner)
        problems.append(
            f"{mine.size} pfns are owned by unregistered {owner_name(owner)}, "
            f"e.g. {_examples(mine)}"
        )
    if len(unknown) > EXAMPLES:
        rest = unknown[EXAMPLES:]
        problems.append(
            f"{sum(counts[o] for o in rest)} more pfns are owned by {len(rest)} more "
            f"unregistered owner ids, e.g. {', '.join(map(str, rest[:EXAMPLES]))}"
        )
    return problems


def _check_reserved(
    owner_map: npt.NDArray[np.int32], memory_map: MemoryMap, kernel_image: tuple[int, int]
) -> list[str]:
    """Reserved owners must own exactly the non-usable regions (holes count as FIRMWARE),
    plus KERNEL the usable pages of the kernel image."""
    missing: dict[int, list[npt.NDArray[np.int64]]] = {}
    stray: list[npt.NDArray[np.int64]] = []
    unmarked: list[npt.NDArray[np.int64]] = []
    image = np.zeros(owner_map.size, dtype=np.bool_)
    image[kernel_image[0] : kernel_image[1]] = True
    for region in memory_map.covering(owner_map.size):
        start, end = region.start_pfn, region.end_pfn_exclusive
        chunk = owner_map[start:end]
        if region.type is RegionType.USABLE:
            in_image = image[start:end]
            reserved = (chunk <= max(RESERVED_OWNERS)) & (chunk >= min(RESERVED_OWNERS))
            stray.append(np.flatnonzero(reserved & ~(in_image & (chunk == KERNEL))) + start)
            unmarked.append(np.flatnonzero(in_image & (chunk != KERNEL)) + start)
        else:
            expected = REGION_OWNER[region.type]
            missing.setdefault(expected, []).append(np.flatnonzero(chunk != expected) + start)
    problems: list[str] = []
    for owner, parts in missing.items():
        bad = np.concatenate(parts)
        if bad.size:
            problems.append(
                f"{bad.size} pfns of the memory map's {owner_name(owner)} regions are not owned "
                f"by {owner_name(owner)}, e.g. {_examples(bad)}"
            )
    bad = np.concatenate(unmarked) if unmarked else np.empty(0, dtype=np.int64)
    if bad.size:
        problems.append(
            f"{bad.size} usable pfns of the kernel image ({kernel_image[0]}.."
            f"{kernel_image[1] - 1}) are not owned by kernel, e.g. {_examples(bad)}"
        )
    bad = np.concatenate(stray) if stray else np.empty(0, dtype=np.int64)
    if bad.size:
        holders = sorted(set(owner_map[bad[:EXAMPLES]].tolist()))
        problems.append(
            f"{bad.size} usable pfns are owned by a reserved owner "
            f"({', '.join(owner_name(h) for h in holders)}), e.g. {_examples(bad)}"
        )
    return problems


def _check_handover(owner_map: npt.NDArray[np.int32], super_block_pfn: int) -> list[str]:
    """HANDOVER owns the boot's super block and nothing else (outside an exec)."""
    handover = np.flatnonzero(owner_map == HANDOVER)
    problems: list[str] = []
    stray = handover[handover != super_block_pfn] if super_block_pfn else handover
    if stray.size:
        where = f"pfn {super_block_pfn}" if super_block_pfn else "none"
        problems.append(
            f"{stray.size} pfns are owned by handover but are not this boot's super block "
            f"({where}), e.g. {_examples(stray)}"
        )
    if super_block_pfn and owner_map[super_block_pfn] != HANDOVER:
        problems.append(
            f"this boot's super block, pfn {super_block_pfn}, is owned by "
            f"{owner_name(int(owner_map[super_block_pfn]))}, not handover"
        )
    return problems
