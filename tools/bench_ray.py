"""Cohorts on Ray: throughput per number of workers, the per-scan overhead against a plain local run,
and what the driver costs per scan at cohort scale.

Needs a running cluster; on one host, a loopback-only one in a private network namespace:

    unshare -n bash -c 'ip link set lo up; ray start --head --port 6391 --num-cpus 1 --include-dashboard false;
        ray start --address 127.0.0.1:6391 --num-cpus 1;
        python tools/bench_ray.py --scans DIR --count 40 --json docs/results/ray_hippocampus.json; ray stop --force'

For each worker count the same command line runs in a fresh process, ``imunet-run LIST --ray auto
--ray-workers W --table T -q``, then the plain local run of the same list; wall seconds are medians
over ``--repeats``. ``--tiny N`` adds the driver's CPU seconds per scan over N volumes of 8 x 8 x 8
voxels (scheduling, results and table rows; the workers' work is not the driver's).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import emit, machine, median


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's CPU seconds (user + system) of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cohort(source: Path, count: int, folder: Path) -> Path:
    """A list file of ``count`` scans (the source folder's images, repeated under new names)."""
    images = sorted(p for p in source.iterdir() if p.name.endswith((".nii.gz", ".nii", ".mha", ".nrrd")))
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"s{i:05d}_0000.nii.gz").symlink_to(images[i % len(images)].resolve())
    listing = folder.parent / f"{folder.name}.txt"
    listing.write_text("\n".join(str(p) for p in sorted(folder.iterdir())) + "\n")
    return listing


def tiny_cohort(count: int, folder: Path) -> Path:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = sitk.GetImageFromArray(rng.normal(size=(8, 8, 8)).astype(np.float32))
        sitk.WriteImage(image, str(folder / f"t{i:05d}_0000.nii.gz"))
    listing = folder.parent / "tiny.txt"
    listing.write_text("\n".join(str(p) for p in sorted(folder.iterdir())) + "\n")
    return listing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=Path, required=True, help="a folder of scans (repeated to --count)")
    ap.add_argument("--count", type=int, default=40, help="scans for the throughput runs (0: none)")
    ap.add_argument("--model", default=None, help="bundle folder or shipped name (default: the default)")
    ap.add_argument("--address", default="auto")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", type=int, default=0, help="volumes for the driver-cost run (0: none)")
    ap.add_argument("--tiny-table", choices=["csv", "parquet"], default="csv", help="the driver-cost run's table")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    base = [sys.executable, "-m", "imunet.runtime.app.cli", "-q"] + (["--model", args.model] if args.model else [])
    report: dict = {"setup": {"machine": machine(), "command": " ".join(sys.argv), "scans": args.count}}
    with tempfile.TemporaryDirectory(prefix="imunet-bench-ray-") as tmp:
        work = Path(tmp)
        walls: dict[str, list[float]] = {}
        if args.count:
            listing = cohort(args.scans, args.count, work / "in")
        for r in range(args.repeats if args.count else 0):  # configurations alternate within each repeat
            for w in args.workers:
                out = work / f"ray{w}_{r}"
                wall, _ = run([*base, str(listing), "--out", str(out), "--ray", args.address, "--ray-workers", str(w),
                               "--table", str(out / "t.csv")])  # fmt: skip
                walls.setdefault(f"ray_{w}_workers", []).append(wall)
            wall, _ = run([*base, str(listing), "--out", str(work / f"local_{r}")])
            walls.setdefault("local", []).append(wall)
        for name, values in walls.items():
            report[f"{name}_s"] = median(values, 3)
            report[f"{name}_scans_per_s"] = round(args.count / float(np.median(values)), 3)
        if args.count:
            # against the local run on the same cores: the most workers measured (one CPU each)
            most = f"ray_{max(args.workers)}_workers_s"
            report["ray_overhead_s_per_scan"] = round((report[most] - report["local_s"]) / args.count, 4)
            report["ray_overhead_against"] = most
        if args.tiny:
            tiny = tiny_cohort(args.tiny, work / "tiny")
            out = work / "tiny_out"
            table = str(work / f"t.{args.tiny_table}")
            wall, cpu = run([*base, str(tiny), "--out", str(out), "--ray", args.address, "--table", table])
            report["tiny"] = {"volumes": args.tiny, "table": args.tiny_table, "wall_s": round(wall, 2),
                              "driver_cpu_s": round(cpu, 2),
                              "driver_cpu_ms_per_scan": round(1000 * cpu / args.tiny, 3)}  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
    emit(report, args.json)


if __name__ == "__main__":
    main()
