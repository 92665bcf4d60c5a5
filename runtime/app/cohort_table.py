"""``imunet-run --table cohort.csv``: one CSV row per scan, appended and flushed as each scan ends, so
that a run that dies leaves a table saying what is done. A table from an earlier run with the same
columns is added to, never replaced (a nightly job keeps one path); a reader takes a scan's last
row. The columns: the scan, its label map, status (segmented, skipped, failed), the error line,
seconds, the machine, the run's start, one volume in ml per label of the model, the lowest per-label
Dice estimate, whether the scan was flagged for review (``--flag-below``), and each label's estimate."""

from __future__ import annotations

import csv
import io
import os
import socket
from pathlib import Path

from ..errors import OutputError

BASE_COLUMNS = ("input", "output", "status", "error", "seconds", "node", "run")
QUALITY_COLUMNS = ("dice_estimate_lowest", "flagged")
ESTIMATE = "_dice_estimate"


def columns(labels: dict[int, str]) -> list[str]:
    """The table's header for a model with ``labels``."""
    names = [labels[k] for k in sorted(labels) if k]
    return [*BASE_COLUMNS, *(f"{n}_ml" for n in names), *QUALITY_COLUMNS, *(f"{n}{ESTIMATE}" for n in names)]


class CohortTable:
    """An open table: :meth:`add` writes one scan's row at once."""

    def __init__(self, path: Path, labels: dict[int, str], run: str) -> None:
        self.path, self.header, self.run, self.node = path, columns(labels), run, socket.gethostname()
        self.names = {labels[k] for k in labels if k}
        existing = _header_of(path)
        if existing is not None and existing != self.header:
            raise OutputError(
                f"--table {path}: exists with other columns ({', '.join(existing[:9])}...); a table holds "
                "one model's scans: choose another path"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = path.open("a", newline="", encoding="utf-8")
        if existing is None:
            self._write(self.header)

    def add(self, entry: dict) -> None:
        """The row of one report entry (as ``imunet-run`` reports a scan)."""
        self._write(row_of(entry, self.header, self.node, self.run))

    def _write(self, row: list) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(row)
        self.fh.write(buffer.getvalue())  # one write per row: a reader never sees half a row but the last
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def row_of(entry: dict, header: list[str], node: str, run: str) -> list:
    """The table row (CSV text values) of one report entry, in ``header``'s order."""
    status = "failed" if not entry["ok"] else "skipped" if entry.get("skipped") else "segmented"
    seconds = sum(entry.get(k, 0.0) for k in ("read_s", "total_s", "write_s")) if status == "segmented" else ""
    volumes = entry.get("volumes_ml", {})
    row = [entry["input"], entry.get("output", ""), status, entry.get("error", ""),
           f"{seconds:.3f}" if seconds != "" else "", entry.get("node", node), run]  # fmt: skip
    names = [h[: -len("_ml")] for h in header if h.endswith("_ml")]
    quality = entry.get("quality") or {}
    estimates = quality.get("dice_estimate", {})
    low = quality.get("lowest")
    row += [volumes.get(name, "") for name in names]
    row += [low["dice_estimate"] if low else "", ("yes" if entry.get("flagged") else "no") if quality else ""]
    row += [estimates.get(name, "") for name in names]
    return row


def _header_of(path: Path) -> list[str] | None:
    """The existing table's header row, or None when there is no table; :class:`OutputError` for a
    file that is not a CSV table."""
    if not path.exists():
        return None
    if not path.is_file():
        raise OutputError(f"--table {path}: exists and is not a file")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            first = fh.readline(1 << 16)
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"--table {path}: exists and cannot be read as a table ({exc})") from None
    if not first.strip():
        return None if path.stat().st_size == 0 else []
    return next(csv.reader([first]))
