"""What a command does with an exception nobody expected (a bug): one line, a log, an exit code.

The traceback goes to a file (the machine's ``logs/`` when there is one, else the temporary
directory); the user gets one line naming the error and that file.
"""

import os
import tempfile
import time
import traceback
from pathlib import Path

EXIT_INTERNAL = 70
"""EX_SOFTWARE (sysexits.h): an internal software error."""


def report_internal_error(prog: str, exc: BaseException, machine_dir: Path | None) -> str:
    """Log *exc* with its traceback; return the one line to print for it."""
    logs = machine_dir / "logs" if machine_dir is not None else None
    directory = logs if logs is not None and logs.is_dir() else Path(tempfile.gettempdir())
    path: Path | None = directory / f"{prog}-internal-error-{os.getpid()}.log"
    assert path is not None
    try:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {prog} (pid {os.getpid()})\n")
            log.write("".join(traceback.format_exception(exc)))
    except OSError:
        path = None
    where = f" (traceback in {path})" if path is not None else ""
    return f"{prog}: internal error: {type(exc).__name__}: {exc}{where}"
