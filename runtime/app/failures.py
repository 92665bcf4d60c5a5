"""One line per failed scan or study: what nightly jobs and their logs read."""

from __future__ import annotations

from ..errors import ImunetError


def failure_message(where: str, exc: BaseException) -> str:
    """The reason ``where`` (a scan, a folder or a study) failed, as one line naming it.

    Errors imunet raises for the user (and ValueError, OSError) are their own text; anything else is
    marked unexpected with its type; running out of memory says how to refuse such scans up front."""
    known = isinstance(exc, ImunetError | ValueError | OSError)
    text = str(exc) if known else f"unexpected {type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        text = "out of memory; try --max-memory to refuse such scans up front"
    return text if where in text else f"{where}: {text}"
