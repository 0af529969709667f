"""Small JSON files of a machine directory: atomic writes and bounded, validated reads."""

import json
import os
import secrets
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from kexec_sim.errors import CorruptMachine

MAX_JSON_BYTES = 4 << 20
"""Largest JSON file read back; anything bigger is treated as corrupt."""


def write_text_atomic(path: Path, text: str) -> None:
    """Replace *path* with *text* (mode 0600): write a temporary file, fsync it, rename it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.rename(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: object) -> None:
    """Replace *path* with *value* as JSON, atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: Path) -> None:
    """Make the entries of directory *path* durable (after a create, rename or unlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def read_json_object(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, object]:
    """Read *path* as a JSON object of at most *max_bytes*.

    Raises FileNotFoundError when it is missing, CorruptMachine when it is not such an object.
    """
    with path.open("rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CorruptMachine(f"{path}: larger than {max_bytes} bytes")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise CorruptMachine(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptMachine(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def get_int(obj: Mapping[str, object], key: str, where: str, minimum: int = 0) -> int:
    """Return ``obj[key]`` as an int >= *minimum*; raise CorruptMachine naming *where* if not."""
    value = obj.get(key)
    if type(value) is not int or value < minimum:
        raise CorruptMachine(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def get_str(obj: Mapping[str, object], key: str, where: str) -> str:
    """Return ``obj[key]`` as a str; raise CorruptMachine naming *where* if it is not one."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise CorruptMachine(f"{where}: {key!r} must be a string, got {value!r}")
    return value
