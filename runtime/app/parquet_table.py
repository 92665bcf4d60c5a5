"""``imunet-run --table cohort.parquet``: the cohort table (the columns of :mod:`.cohort_table`) as
typed Parquet, for cohorts read with pandas, polars, Spark or DuckDB.

A Parquet file is complete only once its footer is written, so it cannot grow a row at a time the
way the CSV does. The table is therefore rewritten whole, atomically (a temporary file renamed over
it), as scans end: after each scan while a rewrite is cheap, and no more often than the time the
last rewrite took times :data:`REWRITE_EVERY` once the table is large, so rewriting costs at most a
few percent of the run. A run that dies leaves the table as of its last rewrite, never a torn file.
An existing table of the same columns is read first and added to, as the CSV is.

Types: numbers are float64 (null where the CSV is empty), ``flagged`` is a nullable boolean, the
rest are strings. Needs pyarrow (``pip install 'imunet[table]'``).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..imaging.atomic import atomic_output
from .cohort_table import columns, row_of

REWRITE_EVERY = 20.0  # the least seconds between rewrites, in units of the last rewrite's duration
TEXT = ("input", "output", "status", "error", "node", "run")


def import_pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError("--table *.parquet needs pyarrow: pip install 'imunet[table]' (or name a .csv)") from None
    return pa, pq


class ParquetTable:
    """An open Parquet table: :meth:`add` records one scan; :meth:`close` writes the last rows."""

    def __init__(self, path: Path, labels: dict[int, str], run: str) -> None:
        self.pa, self.pq = import_pyarrow()
        self.path, self.header, self.run, self.node = path, columns(labels), run, socket.gethostname()
        self.schema = self.pa.schema([(name, _type(self.pa, name)) for name in self.header])
        self.columns: dict[str, list] = {name: [] for name in self.header}
        if path.exists():
            self._read_existing()
        self.last_write, self.write_s, self.dirty = 0.0, 0.0, False
        self._flush()  # the table exists (and is writable) before any work

    def _read_existing(self) -> None:
        if not self.path.is_file():
            raise OutputError(f"--table {self.path}: exists and is not a file")
        try:
            table = self.pq.read_table(self.path)
        except (OSError, self.pa.ArrowException) as exc:
            raise OutputError(f"--table {self.path}: exists and cannot be read as Parquet ({exc})") from None
        if table.schema.names != self.header:
            raise OutputError(
                f"--table {self.path}: exists with other columns ({', '.join(table.schema.names[:9])}...); "
                "a table holds one model's scans: choose another path"
            )
        for name in self.header:
            self.columns[name] = table.column(name).to_pylist()

    def add(self, entry: dict) -> None:
        """Record one report entry; the file is rewritten when the pacing allows."""
        for name, value in zip(self.header, row_of(entry, self.header, self.node, self.run)):
            self.columns[name].append(_typed(name, value))
        self.dirty = True
        if time.monotonic() - self.last_write >= REWRITE_EVERY * self.write_s:
            self._flush()

    def close(self) -> None:
        if self.dirty:
            self._flush()

    def _flush(self) -> None:
        start = time.monotonic()
        table = self.pa.table(self.columns, schema=self.schema)
        with atomic_output(self.path, overwrite=True) as tmp:
            self.pq.write_table(table, tmp)
        self.last_write, self.dirty = time.monotonic(), False
        self.write_s = self.last_write - start


def _type(pa: Any, name: str) -> Any:
    if name in TEXT:
        return pa.string()
    return pa.bool_() if name == "flagged" else pa.float64()


def _typed(name: str, value: Any) -> Any:
    """A CSV row value as the column's type (empty: null)."""
    if name in TEXT:
        return str(value)
    if value == "" or value is None:
        return None
    if name == "flagged":
        return value == "yes"
    return float(value)
