"""What a power-state step reports: the wall-clock time of its phases and what it did."""

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from kexec_sim.allocator import PfnRange
from kexec_sim.shutdown import StoppedOwner


@dataclass(frozen=True)
class ExecReport:
    """What an exec, reboot, boot or poweroff did."""

    action: str
    generation: int
    """The generation booted (for poweroff: the one powered off)."""
    cmdline: str
    image_range: PfnRange | None
    scrub: str
    super_block_pfn: int
    preserved_pages: int
    """Pages the new boot reserved as PRESERVED (the handed-over data)."""
    table_pages: int
    scrubbed_pages: int
    stopped: tuple[StoppedOwner, ...]
    warnings: tuple[str, ...]
    durations_s: Mapping[str, float]

    def stopped_by(self, how: str) -> int:
        """How many processes were stopped *how* (``term``, ``kill``, ...)."""
        return len({s.pid for s in self.stopped if s.how == how})

    def to_dict(self) -> dict[str, object]:
        """The JSON form (``kexec-sim exec --json``)."""
        data = asdict(self)
        data["durations_s"] = dict(self.durations_s)
        data["warnings"] = list(self.warnings)
        data["stopped"] = [asdict(s) for s in self.stopped]
        return data


class Phases:
    """Wall-clock durations of named phases."""

    def __init__(self) -> None:
        self.durations_s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations_s[name] = self.durations_s.get(name, 0.0) + time.perf_counter() - start


def boot_report(
    action: str,
    generation: int,
    cmdline: str,
    kernel: PfnRange | None,
    scrub_mode: str,
    scrubbed: int,
    stopped: list[StoppedOwner],
    warnings: list[str],
    sb_pfn: int,
    boot_warnings: tuple[str, ...],
    phases: Phases,
) -> ExecReport:
    return ExecReport(
        action=action,
        generation=generation,
        cmdline=cmdline,
        image_range=kernel,
        scrub=scrub_mode,
        super_block_pfn=sb_pfn,
        preserved_pages=0,
        table_pages=0,
        scrubbed_pages=scrubbed,
        stopped=tuple(stopped),
        warnings=tuple(warnings + list(boot_warnings)),
        durations_s=phases.durations_s,
    )
