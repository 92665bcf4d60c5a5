"""``--table``: which cohort table a file name asks for, CSV (:mod:`.cohort_table`) or Parquet
(:mod:`.parquet_table`)."""

from __future__ import annotations

from pathlib import Path

from .cohort_table import CohortTable
from .parquet_table import ParquetTable

TABLE_SUFFIXES = (".csv", ".parquet")


def open_table(path: Path, labels: dict[int, str], run: str) -> CohortTable | ParquetTable:
    """The table ``path`` names: Parquet for a ``.parquet`` name, else CSV."""
    if path.suffix.lower() == ".parquet":
        return ParquetTable(path, labels, run)
    return CohortTable(path, labels, run)
