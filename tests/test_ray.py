"""imunet-run --ray on a real two-node Ray cluster on this host, inside a private network namespace
with loopback only (test traffic never leaves it).

- One Ray worker running imunet is killed with SIGKILL mid-run: every one of 52 scans still gets
  exactly one label map, identical to a plain run's, and the table has one row per scan.
- A memory bomb (a scan that needs more memory than the cluster's cgroup allows, let through with
  --max-memory) kills its worker each time it is tried: it becomes a failed row after the retry
  limit, and every other scan is segmented."""

import csv
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")

from imunet.runtime.app.ray_run import MAX_ATTEMPTS  # noqa: E402


def namespaces_available() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(
    not namespaces_available(), reason="needs unshare -n (root) for a loopback-only cluster"
)

SCRIPT = r"""
set -u
ip link set lo up
export RAY_USAGE_STATS_ENABLED=0
trap 'ray stop --force > /dev/null 2>&1' EXIT
ray start --head --port 6391 --num-cpus "$HEAD_CPUS" --include-dashboard false --disable-usage-stats \
    --temp-dir "$RAYDIR" > "$WORK/head.log" 2>&1
(  # the second node, and every worker it starts, in the memory cgroup if there is one
    [ -n "$CGROUP" ] && echo $BASHPID > "$CGROUP/cgroup.procs"
    ray start --address 127.0.0.1:6391 --num-cpus 1 > "$WORK/node.log" 2>&1
)
"$PYTHON" -m imunet.runtime.app.cli "$WORK/in" --model "$BUNDLE" --out "$WORK/ray" --ray auto \
    --table "$WORK/cohort.csv" --stats "$WORK/stats.json" -q $EXTRA > "$WORK/run.out" 2> "$WORK/run.err" &
run=$!
if [ "$KILL" = 1 ]; then
    for _ in $(seq 600); do  # wait for the first label maps, then kill one worker mid-run
        [ "$(ls "$WORK/ray" 2>/dev/null | wc -l)" -ge 2 ] && break
        sleep 0.1
    done
    pattern="ray::Scan""Worker"  # split, so that this script's own command line does not match
    victim=$(pgrep -f "$pattern" | head -n 1)
    [ -n "$victim" ] && kill -9 "$victim" && echo "$victim" > "$WORK/killed"
fi
wait $run
echo $? > "$WORK/run.rc"
"""


def run_on_cluster(work: Path, bundle: Path, kill: bool, extra: str = "", cgroup: Path | None = None) -> None:
    """Start a head and a second node in a loopback-only namespace, run imunet-run --ray over
    ``work/in`` and stop the cluster; whatever happens, no Ray process outlives the call. With a
    ``cgroup``, the second node runs in it and the head runs no workers."""
    raydir = tempfile.mkdtemp(prefix="imunet-ray-", dir="/tmp")  # short: Ray's sockets live there
    env = {"WORK": str(work), "PYTHON": sys.executable, "BUNDLE": str(bundle), "PATH": _path(), "RAYDIR": raydir,
           "HOME": os.environ.get("HOME", "/root"), "KILL": "1" if kill else "0", "EXTRA": extra,
           "CGROUP": str(cgroup or ""), "HEAD_CPUS": "0" if cgroup else "1"}  # fmt: skip
    try:
        subprocess.run(["unshare", "-n", "bash", "-c", SCRIPT], env=env, timeout=400, check=False)
    finally:
        subprocess.run(["pkill", "-9", "-f", raydir], check=False)
        shutil.rmtree(raydir, ignore_errors=True)


def plain_run(work: Path, bundle: Path) -> Path:
    """The same scans through a plain local run, into ``work/local``."""
    command = [sys.executable, "-m", "imunet.runtime.app.cli", str(work / "in"), "--model", str(bundle), "-q"]
    local = subprocess.run([*command, "--out", str(work / "local")], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    return work / "local"


def copy_scans(phantom_dir: Path, into: Path, count: int) -> None:
    into.mkdir()
    for i in range(count):
        shutil.copy(phantom_dir / "imagesTr" / f"phantom_00{i % 4}_0000.nii.gz", into / f"case{i:02d}_0000.nii.gz")


def test_a_cohort_on_two_ray_nodes_survives_a_killed_worker(bundle_dir, phantom_dir, tmp_path):
    copy_scans(phantom_dir, tmp_path / "in", 52)
    run_on_cluster(tmp_path, bundle_dir, kill=True)
    assert (tmp_path / "killed").exists(), "no Ray worker running imunet was found to kill"
    assert (tmp_path / "run.rc").read_text().strip() == "0", (tmp_path / "run.err").read_text()
    local = plain_run(tmp_path, bundle_dir)
    ray_out = sorted(p.name for p in (tmp_path / "ray").iterdir() if not p.name.startswith("."))
    assert ray_out == sorted(p.name for p in local.iterdir()) and len(ray_out) == 52
    # a worker killed while writing may leave its hidden temporary file (DESIGN-NOTES, "One output, one
    # writer"), never a visible one: the scan it was writing is done again under its own name
    left = [p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]
    assert all(".part" in n and n[1:].split(".nii.gz.")[0] + ".nii.gz" in ray_out for n in left), left
    for name in ray_out:  # exactly one label map per scan, identical to a plain run's
        assert (tmp_path / "ray" / name).read_bytes() == (local / name).read_bytes(), name
    rows = list(csv.DictReader((tmp_path / "cohort.csv").open()))
    assert len(rows) == 52 and {r["status"] for r in rows} == {"segmented"}
    assert len({r["input"] for r in rows}) == 52
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert len(stats["scans"]) == 52 and all(s["ok"] for s in stats["scans"])
    assert len({s["pid"] for s in stats["scans"]}) >= 2  # more than one worker process did the work


def memory_cgroup(limit_bytes: int) -> Path | None:
    """A fresh memory cgroup (v1 or v2) limited to ``limit_bytes``, or None where none can be made."""
    name = f"imunet-test-{uuid.uuid4().hex[:8]}"
    for parent, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                               (Path("/sys/fs/cgroup"), "memory.max")):  # fmt: skip
        if not (parent / limit_file).exists() and not (parent / "cgroup.subtree_control").exists():
            continue
        try:
            (parent / name).mkdir()
        except OSError:
            continue
        try:
            (parent / name / limit_file).write_text(str(limit_bytes))
            return parent / name
        except OSError:
            (parent / name).rmdir()
    return None


def zero_volume(path: Path, side: int) -> None:
    """A complete .nii.gz of ``side``^3 uint8 zeros at 1 mm (a few MB of gzip for side^3 bytes)."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, side, side, side, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<h", header, 254, 1)  # sform_code: scanner
    struct.pack_into("<12f", header, 280, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)
    header[344:348] = b"n+1\0"
    plane = bytes(side * side)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(bytes(header) + bytes(4))
        for _ in range(side):
            fh.write(plane)


def test_a_scan_that_keeps_killing_its_worker_becomes_a_failed_row(bundle_dir, phantom_dir, tmp_path):
    cgroup = memory_cgroup(3 << 29)  # 1.5 GiB for a node and its one worker
    if cgroup is None:
        pytest.skip("needs a writable memory cgroup (root) to hold the cluster under a memory limit")
    try:
        copy_scans(phantom_dir, tmp_path / "in", 6)
        zero_volume(tmp_path / "in" / "bomb_0000.nii.gz", 768)  # 0.4 GiB of voxels, 1.7 GiB as float32
        run_on_cluster(tmp_path, bundle_dir, kill=False, extra="--max-memory 64", cgroup=cgroup)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
        cgroup.rmdir()
    err = (tmp_path / "run.err").read_text()
    assert (tmp_path / "run.rc").read_text().strip() == "1", err  # one scan failed
    rows = {Path(r["input"]).name: r for r in csv.DictReader((tmp_path / "cohort.csv").open())}
    assert len(rows) == 7 and rows["bomb_0000.nii.gz"]["status"] == "failed"
    assert f"its Ray worker died {MAX_ATTEMPTS} times on it" in rows["bomb_0000.nii.gz"]["error"], err
    assert {r["status"] for n, r in rows.items() if n != "bomb_0000.nii.gz"} == {"segmented"}
    assert not (tmp_path / "ray" / "bomb.nii.gz").exists()
    (tmp_path / "in" / "bomb_0000.nii.gz").unlink()
    local = plain_run(tmp_path, bundle_dir)
    for p in local.iterdir():
        assert (tmp_path / "ray" / p.name).read_bytes() == p.read_bytes(), p.name


def _path() -> str:
    return os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
