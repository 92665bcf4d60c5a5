"""What one scan costs beyond its inference: import time, and whole-command wall time in fresh
processes, one scan per process against several scans in one process.

    python tools/bench_startup.py --repeats 5 --json docs/results/startup.json
    python tools/bench_startup.py --python /path/to/other/venv/bin/python ...   # another installation

Every measurement is a new process of ``--python`` (default: this interpreter), so nothing is warm
but the operating system's file cache. The scan is the shipped sample (one window).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, emit, machine, median

SAMPLE = REPO / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scans", type=int, default=10, help="scans for the one-process and many-process runs")
    ap.add_argument("--backend", nargs="+", default=["auto"], help="backends to time the one-scan command with")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    py = args.python
    run = [py, "-c", "from imunet.runtime.app.cli import main; main()"]
    import_cli = [py, "-c", "import imunet.runtime.app.cli"]
    report: dict = {"import_cli_s": median(wall(import_cli) for _ in range(args.repeats))}
    with tempfile.TemporaryDirectory(prefix="imunet-startup-") as tmp:
        work = Path(tmp)
        for backend in args.backend:
            out = work / "one.nii.gz"
            times = [wall([*run, str(SAMPLE), "--out", str(out), "--overwrite", "-q", "--backend", backend])
                     for _ in range(args.repeats)]  # fmt: skip
            report[f"one_scan_command_s[{backend}]"] = median(times)
        scans = []
        for i in range(args.scans):
            scans.append(work / "in" / f"case{i:02d}_0000.nii.gz")
            scans[-1].parent.mkdir(exist_ok=True)
            shutil.copy(SAMPLE, scans[-1])
        batch = wall([*run, *map(str, scans), "--out", str(work / "batch"), "-q", "--backend", args.backend[0]])
        each = sum(wall([*run, str(s), "--out", str(work / "each"), "-q", "--backend", args.backend[0]]) for s in scans)
        report[f"{args.scans}_scans_one_process_s_per_scan"] = round(batch / args.scans, 4)
        report[f"{args.scans}_scans_{args.scans}_processes_s_per_scan"] = round(each / args.scans, 4)
    report["setup"] = {"python": py, "machine": machine(), "command": " ".join(["python", *sys.argv])}
    emit(report, args.json)


if __name__ == "__main__":
    main()
