"""Kernel command lines: validation, parameters, and the ``pkram=<pfn>`` handover parameter.

A command line is one line of at most MAX_CMDLINE_BYTES; parameters are separated by
whitespace (no quoting), ``name=value`` or a bare ``name``.
"""

from kexec_sim.errors import InvalidRequest

MAX_CMDLINE_BYTES = 4096
PKRAM_PARAM = "pkram"
_DECIMAL_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def check_cmdline(cmdline: str) -> None:
    """Raise InvalidRequest unless *cmdline* is one line of at most MAX_CMDLINE_BYTES."""
    if "\n" in cmdline or "\0" in cmdline or len(cmdline.encode()) > MAX_CMDLINE_BYTES:
        raise InvalidRequest(f"a command line is one line of at most {MAX_CMDLINE_BYTES} bytes")


def param_values(cmdline: str, name: str) -> list[str]:
    """Return the value of every ``name=value`` on *cmdline*, in order (``name`` alone: "")."""
    values = []
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == name:
            values.append(value)
    return values


def without_param(cmdline: str, name: str) -> str:
    """Return *cmdline* without any ``name`` or ``name=value`` parameter."""
    return " ".join(word for word in cmdline.split() if word.partition("=")[0] != name)


def join_cmdline(*parts: str) -> str:
    """Join command-line fragments with single spaces, skipping empty ones."""
    return " ".join(part.strip() for part in parts if part.strip())


def parse_pfn(text: str) -> int:
    """Parse a pfn written in decimal or ``0x`` hex; raise InvalidRequest if it is not one."""
    is_hex = text[:2].lower() == "0x"
    digits = text[2:] if is_hex else text
    allowed = _HEX_DIGITS if is_hex else _DECIMAL_DIGITS
    if not digits or not set(digits) <= allowed:
        raise InvalidRequest(f"not a pfn: {text!r}")
    return int(digits, 16 if is_hex else 10)


def pkram_pfn(cmdline: str, nr_pages: int) -> int | None:
    """Return the pfn that ``pkram=`` on *cmdline* names, or None when there is none.

    Raises InvalidRequest when the parameter is given twice, is not a decimal or 0x-hex pfn, or
    names no page of a RAM of *nr_pages* pages (pfn 0 is never a super block).
    """
    values = param_values(cmdline, PKRAM_PARAM)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"{PKRAM_PARAM}= is given {len(values)} times")
    try:
        pfn = parse_pfn(values[0])
    except InvalidRequest:
        raise InvalidRequest(
            f"{PKRAM_PARAM}={values[0]}: not a pfn (decimal or 0x hex, as in "
            f"sys/kernel/{PKRAM_PARAM})"
        ) from None
    if not 0 < pfn < nr_pages:
        raise InvalidRequest(
            f"{PKRAM_PARAM}={values[0]}: not a page of this RAM (1..{nr_pages - 1})"
        )
    return pfn
