"""``imunet-run --stats FILE``: one JSON file that a job run every night with the same command line
keeps adding to. Each scan has one entry, the one of the last run that segmented it or failed on it
(a scan skipped because its outputs exist keeps its earlier entry); ``runs`` lists every run with
its model, backend and counts, and each scan entry names its run by index. A file that is not such a
ledger is never replaced."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..contract.safe_json import load_object
from ..errors import ImunetError, OutputError
from ..imaging.atomic import write_text_atomic

FORMAT = "imunet-run-stats"
MAX_BYTES = 64 << 20  # 64 MiB: about 100,000 scan entries


def read_ledger(path: Path) -> dict:
    """The ledger at ``path`` (empty if there is none); :class:`OutputError` if the file is something
    else, so that it is refused before any work rather than overwritten after it."""
    if not path.exists() and not path.is_symlink():
        return {"format": FORMAT, "runs": [], "scans": []}
    try:
        data, _ = load_object(path, "imunet-run statistics", MAX_BYTES)
    except ImunetError as exc:
        raise OutputError(f"--stats {path}: exists and cannot be read as imunet-run statistics ({exc})") from None
    if not (isinstance(data.get("scans"), list) and isinstance(data.get("runs", []), list)):
        raise OutputError(f"--stats {path}: exists and is not an imunet-run statistics file; choose another path")
    data.setdefault("runs", [])
    data["format"] = FORMAT
    return data


def add_run(ledger: dict, run: dict, report: list[dict]) -> dict:
    """``ledger`` with this run recorded: ``run`` (model, backend, ...) appended to ``runs`` with its
    counts, and each scan of ``report`` entered, replacing that scan's earlier entry unless it was
    skipped. The latest run's model, signature and backend are also kept at the top."""
    index = len(ledger["runs"])
    counts = {
        "segmented": sum(1 for r in report if r["ok"] and not r.get("skipped")),
        "skipped": sum(1 for r in report if r.get("skipped")),
        "failed": sum(1 for r in report if not r["ok"]),
    }
    runs = [*ledger["runs"], {**run, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **counts}]
    scans = {str(s.get("input")): s for s in ledger["scans"] if isinstance(s, dict)}
    for entry in report:
        key = entry["input"]
        if entry.get("skipped") and key in scans:
            continue
        scans[key] = {**entry, "run": index}
    return {**ledger, **{k: run[k] for k in ("model", "signature", "backend") if k in run}, "runs": runs,
            "scans": list(scans.values())}  # fmt: skip


def write_ledger(path: Path, ledger: dict) -> None:
    """Replace the ledger atomically (it was read, and checked to be one, before the run)."""
    write_text_atomic(path, json.dumps(ledger, indent=2) + "\n", overwrite=True)
