"""The hibernation image writer: a fresh process writing the handed-over page set to an image.

``kexec-sim hibernate`` runs ``python -m kexec_sim.hibernation.writer_process`` after it
wrote the handover (the super block and the preserved-pages table), the way kexec-based
hibernation boots a fresh kernel to write the image: this process knows nothing of the daemons
that made the pages, only the machine, the super block pfn it is given and, for an incremental
image, the base image on disk. It saves the pages the table marks (the table and the super
block among them, nosave regions never), with their storage keys; then clears every page's
SINCE_IMAGE key bit, since the image now holds what RAM holds.

Protocol: one JSON request on stdin (see ``kexec_sim.hibernation.hibernate._run_writer``);
JSON lines on stdout: ``{"progress": [done, total]}`` while writing, then
``{"result": {...}}`` (exit 0) or
``{"error": message, "kind": "too_large" | "refused" | "machine"}`` (exit 1).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kexec_sim.errors import CorruptHandover, CorruptImage, ImageTooLarge, MachineError
from kexec_sim.hibernation import reader, writer
from kexec_sim.hibernation.crypto import image_key
from kexec_sim.machine import Machine
from kexec_sim.memmap import RegionType
from kexec_sim.pages import PfnArray
from kexec_sim.preserved_pages import walk_table
from kexec_sim.ram import Ram
from kexec_sim.storage_keys import ARCHITECTURAL, FETCH_PROTECT
from kexec_sim.super_block import read_super_block

PROGRESS_EVERY_S = 0.1
FAULT_ENV = "KEXEC_SIM_FAULT"
KILL_MIDWAY = "hibernate:kill-midway"
"""$KEXEC_SIM_FAULT value for tests: halfway through, SIGKILL hibernate (and so this writer)."""


def handover_page_set(ram: Ram, sb_pfn: int) -> PfnArray:
    """The pages the handover at *sb_pfn* names: every marked pfn, table and super block too.

    Raises CorruptHandover when the super block or the table fails validation.
    """
    sb = read_super_block(ram, sb_pfn)
    if sb.table_root_pfn == 0:
        raise CorruptHandover(f"super block {sb_pfn} names no preserved-pages table")
    marked, _table = walk_table(ram, sb.table_root_pfn)
    return np.flatnonzero(marked)


def _saveable(machine: Machine, pfns: PfnArray) -> PfnArray:
    """*pfns* without those in the memory map's NOSAVE regions."""
    keep = np.ones(pfns.size, dtype=np.bool_)
    for region in machine.memory_map.regions:
        if region.type == RegionType.NOSAVE:
            keep &= (pfns < region.start_pfn) | (pfns >= region.end_pfn_exclusive)
    return pfns[keep]


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def write_from_handover(request: dict[str, Any]) -> dict[str, Any]:
    """Write the image *request* asks for; return the result message's body."""
    machine = Machine.open(request["machine"], create=False)
    key_file, passphrase = request.get("key_file"), request.get("passphrase")
    key = image_key(Path(key_file) if key_file else None, passphrase)
    sb_pfn = int(request["super_block_pfn"])
    image = Path(request["image"])
    last = [0.0]

    kill_midway = os.environ.get(FAULT_ENV) == KILL_MIDWAY

    def progress(done: int, total: int) -> None:
        if kill_midway and done * 2 >= total:
            os.kill(os.getppid(), signal.SIGKILL)  # PR_SET_PDEATHSIG then kills this writer
            time.sleep(5)
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done == total:
            last[0] = now
            _emit({"progress": [done, total]})

    with machine.ram() as ram:
        pfns = _saveable(machine, handover_page_set(ram, sb_pfn))
        keys = ram.keys.array[pfns] & np.uint8(ARCHITECTURAL)
        # Fetch-protected pages (a secret file's) stay out of this process's direct map too:
        # they are read through temporary mappings of their runs only.
        protected = pfns[(keys & FETCH_PROTECT) != 0]
        ram.remove_pfns_from_direct_map(protected)
        base_id = None
        in_base = None
        if request.get("base"):
            base = Path(request["base"])
            header = reader.read_header(base, key=key, allow_used=True)
            base_pfns = reader.read_pfn_list(base, header, key=key).pfns
            base_id = header.image_id
            in_base = np.isin(pfns, base_pfns, assume_unique=True)
            in_base &= ~ram.keys.changed_since_image()[pfns]
        stats = writer.write_image(
            image,
            ram.pages,
            pfns,
            keys,
            machine_id=machine.machine_id,
            nr_ram_pages=machine.nr_pages,
            generation=machine.generation,
            epoch_ns=time.time_ns(),
            compression=str(request.get("compression") or "lz4"),
            threads=request.get("threads"),
            base_image_id=base_id,
            in_base=in_base,
            key=key,
            max_bytes=request.get("max_bytes"),
            super_block_pfn=sb_pfn,
            copy_pages=ram.copy_pages if protected.size else None,
            progress=progress,
        )
        # SINCE_IMAGE stays: the image counts only once hibernate powers off (which clears
        # every key); a hibernate undone before that must leave the next increment complete.
    written = reader.read_header(image, key=key)
    return {
        "image_id": written.image_id.hex(),
        "pages": stats.pages,
        "zero_pages": stats.zero_pages,
        "in_base_pages": 0 if in_base is None else int(np.count_nonzero(in_base)),
        "fetch_protected_pages": int(protected.size),
        "data_bytes": stats.data_bytes,
        "stored_bytes": stats.stored_bytes,
        "image_bytes": stats.image_bytes,
        "seconds": stats.seconds,
    }


def main() -> int:
    """Read the request from stdin, write the image, report on stdout; the exit status."""
    try:
        request = json.loads(sys.stdin.read())
        _emit({"result": write_from_handover(request)})
    except ImageTooLarge as exc:
        _emit({"error": str(exc), "kind": "too_large"})
        return 1
    except (CorruptHandover, CorruptImage) as exc:
        _emit({"error": str(exc), "kind": "refused"})
        return 1
    except (MachineError, OSError, ValueError) as exc:
        _emit({"error": str(exc), "kind": "machine"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
