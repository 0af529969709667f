"""Objects holding host resources (mappings, file descriptors): ``close()``, or ``with``."""

from types import TracebackType
from typing import Self


class Closing:
    """A base for objects closed by ``close()``; ``with obj:`` closes it at the block's end."""

    def close(self) -> None:
        """Release what the object holds (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
