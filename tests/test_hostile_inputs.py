"""What an attacker's or an unlucky hospital's input must not do: write over an input or over
another output. Each is refused before any work, in one line, with every file intact."""

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime.app.cli import app

from conftest import ROOT

runner = CliRunner()
SAMPLE = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"


@pytest.fixture()
def scan(tmp_path):
    return shutil.copy(SAMPLE, tmp_path / "scan_0000.nii.gz")


def refused(args, *files, message):
    before = {f: f.read_bytes() for f in files if f.exists()}
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "[1/1]" not in res.stdout  # refused before any scan was segmented
    for f, data in before.items():
        assert f.read_bytes() == data, f"{f} changed"
    return res


def test_stats_naming_the_label_map_is_refused(scan, tmp_path):
    out = tmp_path / "o.nii.gz"
    refused([scan, "--out", out, "--stats", out], scan, message="would be written twice")
    assert not out.exists()
    out.write_bytes(b"an earlier result")
    refused([scan, "--out", out, "--stats", out, "--overwrite"], scan, out, message="would be written twice")


@pytest.mark.parametrize(("option", "message"), [("--stats", "is the input"), ("--preview", "previews are PNG")])
def test_an_input_is_never_written_over_even_with_overwrite(scan, tmp_path, option, message):
    refused([scan, "--out", tmp_path / "o.nii.gz", option, scan, "--overwrite"], scan, message=message)
    assert not (tmp_path / "o.nii.gz").exists()


def test_the_label_map_written_over_its_own_scan_is_refused(scan):
    refused([scan, "--out", scan, "--overwrite"], scan, message="is the input")


def test_masks_that_clash_with_the_label_map_are_refused(scan, tmp_path):
    """A label called like the output's own name cannot shadow it: two outputs, one path."""
    out = tmp_path / "o.nii.gz"
    res = runner.invoke(app, [str(scan), "--out", str(out), "--masks", "--stats", str(tmp_path / "o_anterior.nii.gz")])
    assert res.exit_code == 2 and "would be written twice" in res.stderr


def crafted_bundle(tmp_path, edit_text):
    """A copy of the shipped bundle whose manifest text ``edit_text`` rewrites."""
    b = shutil.copytree(ROOT / "runtime" / "default" / "hippocampus.imunet", tmp_path / "b.imunet")
    m = b / "manifest.json"
    m.write_text(edit_text(m.read_text()))
    return b


def one_line_exit_2(args, timeout_message=""):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr[-500:])
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr[-500:]
    return res.stderr


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: "[" * 100_000 + "]" * 100_000, "nested 100000 deep"),
        (lambda t: t.replace('"patch_size": [', '"patch_size": [Infinity, ', 1), "malformed manifest"),
        (lambda t: t.replace('"patch_size": [', '"patch_size": [1e400, ', 1), "malformed manifest"),
        (lambda t: "[" + t + "]", "must be a JSON object, not a list"),
        (
            lambda t: t.replace('"patch_size": [\n    40,\n    56,\n    40\n  ]', '"patch_size": [4000, 4000, 4000]'),
            "each side 1..1024",
        ),
        (lambda t: " " * (2 << 20), "over the 1048576 bytes"),
    ],
    ids=["deep", "infinity", "1e400", "list", "huge-patch", "huge-file"],
)
def test_hostile_manifests_are_one_line_and_exit_2(scan, tmp_path, edit, message):
    b = crafted_bundle(tmp_path, edit)
    err = one_line_exit_2([scan, "--model", b, "--out", tmp_path / "o.nii.gz"])
    assert message in err, err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_file_name_too_long_is_one_line(scan, tmp_path):
    err = one_line_exit_2([scan, "--model", "x" * 5000, "--out", tmp_path / "o.nii.gz"])
    assert "not a usable path" in err or "cannot be read" in err


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "nested"])
def test_hostile_signatures_are_answered_at_once(scan, tmp_path, kind):
    import os
    import time

    b = crafted_bundle(tmp_path, lambda t: t)
    sig = b / "manifest.json.sig"
    if kind == "fifo":
        os.mkfifo(sig)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", sig)
    else:
        sig.write_text("{" * 50_000 + "}" * 50_000)
    t = time.perf_counter()
    for extra in ([], ["--trusted-keys", tmp_path]):
        err = one_line_exit_2([scan, "--model", b, "--out", tmp_path / "o.nii.gz", *extra])
        assert "manifest.json.sig" in err, err
    assert time.perf_counter() - t < 20


def test_a_fifo_given_as_the_scan_is_refused(tmp_path):
    import os

    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    res = runner.invoke(app, [str(fifo), "--out", str(tmp_path / "o.nii.gz")])
    assert res.exit_code == 1 and "not a regular file" in res.stderr


def nifti_bomb(path, shape_xyz=(1500, 1500, 1500)):
    """A .nii.gz whose header claims ``shape_xyz`` uint8 voxels of zeros: the header and the first
    megabyte of its zeros, compressed (a whole 1500^3 bomb is 3.3 MB of gzip for 3.4 GB of voxels;
    the refusal must come from the header, before any of them is read)."""
    import gzip
    import struct

    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *shape_xyz, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)  # datatype uint8, bitpix 8
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    with gzip.open(path, "wb") as fh:
        fh.write(bytes(header) + bytes(4) + bytes(1 << 20))
    return path


def peak_rss_of(args, tmp_path):
    import subprocess
    import sys

    # VmHWM: this process image's own peak (ru_maxrss would include the forking parent's RSS)
    code = (
        "import sys\nfrom imunet.runtime.app.cli import main\ntry:\n    main()\nfinally:\n"
        "    hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
        "    print('PEAK_KB', hwm, file=sys.stderr)"
    )
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    peak_kb = int(next(line.split()[1] for line in res.stderr.splitlines() if line.startswith("PEAK_KB")))
    return res, peak_kb / 2**20  # GiB


def test_a_zero_bomb_is_refused_from_its_header_without_max_memory(tmp_path):
    bomb = nifti_bomb(tmp_path / "bomb_0000.nii.gz")
    res, peak = peak_rss_of([bomb, "--out", tmp_path / "out"], tmp_path)
    assert res.returncode == 1 and "needs about" in res.stderr and "GiB of working memory" in res.stderr
    assert "Traceback" not in res.stderr and peak < 2.0, (res.stderr, peak)
    assert not (tmp_path / "out" / "bomb.nii.gz").exists()


def test_an_extreme_spacing_is_refused_before_resampling(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((40, 50, 39), np.float32))
    image.SetSpacing((7.5e5, 1.0, 1e-6))
    sitk.WriteImage(image, str(tmp_path / "odd_0000.nii.gz"))
    res, peak = peak_rss_of([tmp_path / "odd_0000.nii.gz", "--out", tmp_path / "out", "--max-memory", "1"], tmp_path)
    assert res.returncode == 1 and "needs about" in res.stderr and "over 1 GiB (--max-memory)" in res.stderr
    res, peak = peak_rss_of([tmp_path / "odd_0000.nii.gz", "--out", tmp_path / "out"], tmp_path)
    assert res.returncode == 1 and "needs about" in res.stderr and "Traceback" not in res.stderr
    assert peak < 2.0


@pytest.mark.parametrize("backend", ["ort-cpu", "auto"])
def test_a_run_writes_nothing_outside_its_outputs(tmp_path, backend):
    """No telemetry database or usage counter of onnxruntime or OpenVINO lands in the home folder."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    res = subprocess.run([sys.executable, "-m", "imunet.runtime.app.cli", str(SAMPLE), "--backend", backend,
                          "--out", str(tmp_path / "o.nii.gz")], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_of_two_writers_of_one_output_exactly_one_wins(tmp_path):
    """The exclusive create behind every output: the second writer gets an error, the first's
    file stays, and no temporary file is left."""
    from imunet.runtime.errors import OutputError
    from imunet.runtime.imaging.atomic import atomic_output

    target = tmp_path / "case01.nii.gz"
    with pytest.raises(OutputError, match="another run wrote it first"):
        with atomic_output(target) as first:
            first.write_bytes(b"first")
            with atomic_output(target) as second:  # both passed the existence check
                second.write_bytes(b"second")
    assert target.read_bytes() == b"second"  # the inner writer finished first and won
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case01.nii.gz"]


def test_sigterm_during_a_run_leaves_no_temporary_files(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    scans = tmp_path / "in"
    scans.mkdir()
    for i in range(30):
        shutil.copy(SAMPLE, scans / f"c{i:02d}_0000.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "imunet.runtime.app.cli", str(scans), "--out", str(out),
                             "--backend", "ort-cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and len(list(out.glob("*.nii.gz"))) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    left = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert left == [], left
    assert all(os.path.getsize(p) > 0 for p in out.glob("*.nii.gz"))


def test_largest_component_on_a_planning_ct_sized_map():
    """keep_largest read a freed image through a numpy view; at 622 x 622 x 128 that crashed the
    process (a segmentation fault in numpy) on every planning-resolution CT."""
    import numpy as np
    import SimpleITK as sitk

    from imunet.runtime.imaging.postprocess import keep_largest

    arr = np.zeros((128, 622, 622), np.uint8)
    arr[10:60, 100:300, 100:300] = 1  # the largest component of label 1
    arr[80:90, 500:510, 500:510] = 1  # a small one, removed
    arr[70:75, 10:20, 10:20] = 2  # label 2 is not post-processed
    out = sitk.GetArrayFromImage(keep_largest(sitk.GetImageFromArray(arr), (1,)))
    assert out[85, 505, 505] == 0 and out[30, 200, 200] == 1 and out[72, 15, 15] == 2
    assert int((out == 1).sum()) == 50 * 200 * 200


def test_a_folder_of_a_thousand_one_file_series_is_answered_fast_in_one_short_line(tmp_path):
    """GDCM scans the folder once for the series and once for the chosen one's files; listing every
    series' files would scan it once per series (1,000 x 0.14 s here)."""
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(1000):
        image = sitk.GetImageFromArray(np.zeros((8, 8), np.int16))
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.3", "0020|000e": f"1.2.826.0.1.3680043.8.498.{i + 1}",
                           "0008|0018": f"1.2.4.{i + 1}", "0020|0032": "0\\0\\0"}.items():  # fmt: skip
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{i:04d}.dcm"))
        writer.Execute(image)
    t = time.monotonic()
    res = runner.invoke(app, [str(folder), "--out", str(tmp_path / "o.nii.gz")])
    assert time.monotonic() - t < 60 and res.exit_code == 1
    (failed,) = [line for line in res.stderr.splitlines() if line.startswith("FAILED")]
    assert "holds 1000 DICOM series; pick one with --series" in failed and "and 995 more" in failed
    assert len(failed) < 400


def test_the_memory_cap_follows_the_process_own_cgroup(tmp_path):
    """A limit on this process's cgroup or any cgroup above it counts, in v1 and v2 layouts."""
    from imunet.runtime.app.memory import cgroup_limit_files

    v1 = "4:memory:/jobs/night\n3:cpu:/\n0::/"
    assert cgroup_limit_files(v1, tmp_path)[:3] == [
        tmp_path / "memory/jobs/night/memory.limit_in_bytes",
        tmp_path / "memory/jobs/memory.limit_in_bytes",
        tmp_path / "memory/memory.limit_in_bytes",
    ]
    assert cgroup_limit_files("0::/user.slice/job-7", tmp_path) == [
        tmp_path / "user.slice/job-7/memory.max",
        tmp_path / "user.slice/memory.max",
        tmp_path / "memory.max",
    ]
    assert cgroup_limit_files("garbage\n5:pids:/x", tmp_path) == []


def test_a_scan_too_large_for_the_cgroup_is_refused_before_work(tmp_path):
    """In a container or batch job whose cgroup holds 1 GiB, a scan needing more is refused from its
    header (without --max-memory) instead of being killed by the kernel mid-scan."""
    import subprocess
    import sys

    from test_ray import memory_cgroup, zero_volume

    cgroup = memory_cgroup(1 << 30)
    if cgroup is None:
        pytest.skip("needs a writable memory cgroup (root)")
    zero_volume(tmp_path / "big_0000.nii.gz", 400)  # about 3 GiB of working memory: fits this machine
    command = f'echo $$ > "{cgroup}/cgroup.procs" && exec "$0" -m imunet.runtime.app.cli "$1" --out "$2"'
    try:
        res = subprocess.run(["bash", "-c", command, sys.executable, str(tmp_path / "big_0000.nii.gz"),
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        cgroup.rmdir()
    assert res.returncode == 1 and "needs about" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "over 0.75 GiB (the memory this process may use" in res.stderr, res.stderr  # 75% of the cgroup's
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
