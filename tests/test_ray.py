"""imunet-run --ray on a real two-node Ray cluster on this host, inside a private network namespace
with loopback only (test traffic never leaves it): one Ray worker running imunet is killed with
SIGKILL mid-run, and every scan still gets exactly one label map, identical to a plain run's."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("ray")


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
ray start --head --port 6391 --num-cpus 1 --include-dashboard false --disable-usage-stats \
    --temp-dir "$RAYDIR" > "$WORK/head.log" 2>&1
ray start --address 127.0.0.1:6391 --num-cpus 1 > "$WORK/node.log" 2>&1
"$PYTHON" -m imunet.runtime.app.cli "$WORK/in" --model "$BUNDLE" --out "$WORK/ray" --ray auto \
    --table "$WORK/cohort.csv" --stats "$WORK/stats.json" -q > "$WORK/run.out" 2> "$WORK/run.err" &
run=$!
for _ in $(seq 600); do  # wait for the first label maps, then kill one worker mid-run
    [ "$(ls "$WORK/ray" 2>/dev/null | wc -l)" -ge 2 ] && break
    sleep 0.1
done
pattern="ray::Scan""Worker"  # split, so that this script's own command line does not match
victim=$(pgrep -f "$pattern" | head -n 1)
[ -n "$victim" ] && kill -9 "$victim" && echo "$victim" > "$WORK/killed"
wait $run
echo $? > "$WORK/run.rc"
"""


def test_a_cohort_on_two_ray_nodes_survives_a_killed_worker(bundle_dir, phantom_dir, tmp_path):
    scans = tmp_path / "in"
    scans.mkdir()
    for i in range(16):
        shutil.copy(phantom_dir / "imagesTr" / f"phantom_00{i % 4}_0000.nii.gz", scans / f"case{i:02d}_0000.nii.gz")
    raydir = tempfile.mkdtemp(prefix="imunet-ray-", dir="/tmp")  # short: Ray's sockets live there
    env = {"WORK": str(tmp_path), "PYTHON": sys.executable, "BUNDLE": str(bundle_dir), "PATH": _path(),
           "RAYDIR": raydir, "HOME": os.environ.get("HOME", "/root")}  # fmt: skip
    try:
        subprocess.run(["unshare", "-n", "bash", "-c", SCRIPT], env=env, timeout=400, check=False)
    finally:  # whatever happened, no Ray process of this test outlives it
        subprocess.run(["pkill", "-9", "-f", raydir], check=False)
        shutil.rmtree(raydir, ignore_errors=True)
    assert (tmp_path / "killed").exists(), "no Ray worker running imunet was found to kill"
    assert (tmp_path / "run.rc").read_text().strip() == "0", (tmp_path / "run.err").read_text()
    command = [sys.executable, "-m", "imunet.runtime.app.cli", str(scans), "--model", str(bundle_dir), "-q"]
    local = subprocess.run([*command, "--out", str(tmp_path / "local")], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    ray_out = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert ray_out == sorted(p.name for p in (tmp_path / "local").iterdir()) and len(ray_out) == 16
    for name in ray_out:  # exactly one label map per scan, identical to a plain run's
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    rows = list(csv.DictReader((tmp_path / "cohort.csv").open()))
    assert len(rows) == 16 and {r["status"] for r in rows} == {"segmented"}
    assert len({r["input"] for r in rows}) == 16
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert len(stats["scans"]) == 16 and all(s["ok"] for s in stats["scans"])
    assert len({s["pid"] for s in stats["scans"]}) >= 2  # more than one worker process did the work


def _path() -> str:
    return os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
