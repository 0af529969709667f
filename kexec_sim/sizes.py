"""Parsing of human sizes as mount(8) and tmpfs write them (``512M``, ``2G``, ``10%``)."""

from kexec_sim.errors import InvalidRequest

_SUFFIXES = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}


def parse_size(text: str, *, percent_of: int | None = None) -> int:
    """Parse ``123``, ``4k``, ``512M``, ``2G``, ``1GiB`` or (with *percent_of*) ``50%``.

    Raises InvalidRequest with a short reason when *text* is not a size.
    """
    value = text.strip().lower()
    if percent_of is not None and value.endswith("%"):
        number = value[:-1]
        if not number.isdigit():
            raise InvalidRequest(f"not a percentage: {text!r}")
        return percent_of * int(number) // 100
    for tail in ("ib", "b"):
        if value.endswith(tail) and len(value) > len(tail) and value[-len(tail) - 1] in "kmgtpe":
            value = value[: -len(tail)]
            break
    suffix = value[-1:] if value[-1:] in _SUFFIXES and value[-1:] != "" else ""
    number = value[: len(value) - len(suffix)]
    if not number.isdigit():
        raise InvalidRequest(f"not a size: {text!r}")
    return int(number) * _SUFFIXES[suffix]
