"""Which image chain the machine's RAM was last resumed from: ``last-image.json``.

An incremental hibernate saves only the pages changed since RAM was resumed from its base
image, so it needs to know that this base is what RAM came from: resume records the chain's
image ids and the generation it booted; losing RAM (power off, reboot) forgets them.
"""

from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from kexec_sim.errors import MachineError
from kexec_sim.jsonfile import read_json_object, write_json_atomic

LAST_IMAGE_FILE = "last-image.json"
"""In the machine directory: {"chain": [image id in hex, ...], "generation": booted}."""


def read_last_image(machine_dir: Path) -> list[str] | None:
    """The chain of image ids RAM was last resumed from, None when unknown."""
    try:
        data = read_json_object(machine_dir / LAST_IMAGE_FILE)
    except (FileNotFoundError, MachineError):
        return None
    chain = data.get("chain")
    if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
        return None
    return chain


def write_last_image(machine_dir: Path, chain: Sequence[str], generation: int) -> None:
    """Record that RAM now holds what the image chain *chain* holds (booted as *generation*)."""
    write_json_atomic(
        machine_dir / LAST_IMAGE_FILE, {"chain": list(chain), "generation": generation}
    )


def forget_last_image(machine_dir: Path) -> None:
    """RAM no longer holds what the last image chain holds (it was lost)."""
    with suppress(FileNotFoundError):
        (machine_dir / LAST_IMAGE_FILE).unlink()
