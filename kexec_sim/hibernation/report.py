"""What hibernate and resume report: their summary as JSON, and an error in one line."""

from dataclasses import asdict


class Report:
    """A hibernate's or a resume's summary (a frozen dataclass deriving from this one): its
    JSON form and the compression ratio of the data it moved."""

    data_bytes: int
    stored_bytes: int
    warnings: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """Stored over raw data bytes (1.0 when there was no data)."""
        return self.stored_bytes / self.data_bytes if self.data_bytes else 1.0

    def to_dict(self) -> dict[str, object]:
        """The JSON form (``--json``): every field (tuples as lists) and the ratio."""
        data: dict[str, object] = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in asdict(self).items()  # type: ignore[call-overload]
        }
        data["ratio"] = round(self.ratio, 4)
        return data


def reason(exc: BaseException) -> str:
    """One line for an error: an OSError's strerror, else its message."""
    return str(exc) if not isinstance(exc, OSError) else (exc.strerror or str(exc))
