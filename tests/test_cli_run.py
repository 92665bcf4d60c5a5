"""imunet-run end to end: real DICOM, preview, batches, and bad input that must fail cleanly."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime.app.cli import app

from conftest import CT_DIR

runner = CliRunner()


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def write(arr, path, spacing=(1.5, 1.5, 3.0), direction=None):
    img = sitk.GetImageFromArray(arr, isVector=False)
    if arr.ndim == 3:
        img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def phantom(phantom_dir, i=0):
    return phantom_dir / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz"


@pytest.mark.skipif(not (CT_DIR / "example_ct_dicom").is_dir(), reason="shared CT data not present")
def test_real_dicom_series_keeps_its_geometry(bundle_dir, tmp_path):
    dicom = CT_DIR / "example_ct_dicom"
    code, out, err = run(
        dicom,
        "--model",
        bundle_dir,
        "--out",
        tmp_path / "ct.nrrd",
        "--stats",
        tmp_path / "s.json",
        "--preview",
        tmp_path / "p.png",
    )
    assert code == 0, err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom)))
    ref = reader.Execute()
    seg = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    assert seg.GetSize() == ref.GetSize() == (512, 512, 20)
    assert np.allclose(seg.GetSpacing(), ref.GetSpacing()) and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    assert np.allclose(seg.GetDirection(), ref.GetDirection())
    stats = json.loads((tmp_path / "s.json").read_text())["scans"][0]
    assert stats["ok"] and stats["windows"] > 1 and {"read_s", "encode_s", "decode_s", "write_s"} <= set(stats)
    png = sitk.ReadImage(str(tmp_path / "p.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] > 512


def test_batch_with_one_bad_scan_writes_the_others(bundle_dir, phantom_dir, tmp_path):
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    for i in (0, 1):
        shutil.copy(phantom(phantom_dir, i), tmp_path / "in")
    code, out, err = run(tmp_path / "in", "--model", bundle_dir, "--out", tmp_path / "out")
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert f"FAILED {bad}: truncated or corrupt compressed file" in err
    assert f"2 of 3 scans segmented; failed: {bad}" in err


def test_existing_output_is_kept_without_overwrite(bundle_dir, phantom_dir, tmp_path):
    dest = tmp_path / "seg.nii.gz"
    dest.write_bytes(b"precious")
    code, _, err = run(phantom(phantom_dir), "--model", bundle_dir, "--out", dest)
    assert code == 1 and "exists; pass --overwrite" in err and dest.read_bytes() == b"precious"
    code, _, err = run(phantom(phantom_dir), "--model", bundle_dir, "--out", dest, "--overwrite")
    assert code == 0 and sitk.ReadImage(str(dest)).GetSize() == sitk.ReadImage(str(phantom(phantom_dir))).GetSize()


def test_output_equal_to_input_is_refused(bundle_dir, phantom_dir, tmp_path):
    scan = shutil.copy(phantom(phantom_dir), tmp_path / "scan.nii.gz")
    before = (tmp_path / "scan.nii.gz").read_bytes()
    code, _, err = run(scan, "--model", bundle_dir, "--out", scan, "--overwrite")
    assert code == 2 and "is the input" in err and "an input is never written over" in err
    assert (tmp_path / "scan.nii.gz").read_bytes() == before


def bad_cases(tmp_path):
    rng = np.random.default_rng(0)
    nan = rng.normal(size=(20, 30, 30)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[7, 1, 2] = np.inf
    (tmp_path / "random.nii.gz").write_bytes(rng.bytes(5000))
    (tmp_path / "random.mha").write_bytes(rng.bytes(5000))
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    for suffix in (".nii.gz", ".nii"):  # SimpleITK reads these silently as zero-filled voxels
        whole = write(rng.integers(0, 1000, size=(20, 30, 30)).astype(np.int16), tmp_path / f"whole{suffix}")
        (tmp_path / f"cut{suffix}").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return {
        "missing": (tmp_path / "nope.nii.gz", "no such file or directory"),
        "random": (tmp_path / "random.nii.gz", "truncated or corrupt compressed file"),
        "random-mha": (tmp_path / "random.mha", "cannot read as an image"),
        "empty": (tmp_path / "empty.nii.gz", "not a NIfTI file (no valid NIfTI header)"),
        "cut-gz": (tmp_path / "cut.nii.gz", "truncated or corrupt compressed file"),
        "cut-nii": (tmp_path / "cut.nii", "truncated: holds 18176 bytes of the 36352 its header describes"),
        "2d": (write(np.zeros((30, 40), np.float32), tmp_path / "flat.nii.gz"), "is 2D (40x30); need a 3D volume"),
        "4d": (
            write(np.zeros((3, 10, 12, 14), np.float32), tmp_path / "four.nii.gz"),
            "is 4D with 3 volumes; pick one with --channel 0..2",
        ),
        "nan": (write(nan, tmp_path / "nan.mha"), "scan has 2 NaN or infinite voxels"),
        "skew": (
            write(np.zeros((10, 12, 14), np.float32), tmp_path / "skew.mha", direction=(1, 0, 0, 0.5, 1, 0, 0, 0, 1)),
            "direction matrix is not orthonormal",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing", "random", "random-mha", "empty", "cut-gz", "cut-nii", "2d", "4d", "nan", "skew"]
)
def test_bad_input_fails_with_one_clear_line_and_no_output(bundle_dir, tmp_path, case):
    path, message = bad_cases(tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, err = run(path, "--model", bundle_dir, "--out", out)
    assert code == 1
    failed = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and str(path) in failed[0] and message in failed[0], err
    assert "Traceback" not in err + stdout
    assert not out.exists() or not any(out.iterdir())


def test_4d_input_with_channel_and_tiny_volume_are_segmented(bundle_dir, tmp_path):
    four = write(np.random.default_rng(0).normal(size=(2, 10, 12, 14)).astype(np.float32), tmp_path / "f.nii.gz")
    code, _, err = run(four, "--model", bundle_dir, "--channel", "1", "--out", tmp_path / "f_seg.nii.gz")
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "f_seg.nii.gz")).GetSize() == (14, 12, 10)
    tiny = write(np.zeros((3, 4, 5), np.int16), tmp_path / "tiny.nii.gz")  # far smaller than one patch
    code, _, err = run(tiny, "--model", bundle_dir, "--out", tmp_path / "tiny_seg.nii.gz")
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "tiny_seg.nii.gz")).GetSize() == (5, 4, 3)


@pytest.mark.parametrize("dtype,value", [(np.int64, 2**62), (np.uint32, 4_000_000_000), (np.float64, 1e30)])
def test_extreme_integer_and_float_ranges_are_segmented(bundle_dir, tmp_path, dtype, value):
    arr = np.full((10, 12, 14), value, dtype)
    arr[2:5, 3:8, 4:9] = 0
    scan = write(arr, tmp_path / "x.nrrd")
    code, _, err = run(scan, "--model", bundle_dir, "--out", tmp_path / "x_seg.nii.gz")
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "x_seg.nii.gz")).GetSize() == (14, 12, 10)


def test_max_memory_refuses_before_work(bundle_dir, phantom_dir, tmp_path):
    code, _, err = run(phantom(phantom_dir), "--model", bundle_dir, "--max-memory", "0.0001", "--out", tmp_path / "o")
    assert code == 1 and "over 0.0001 GiB (--max-memory)" in err and not (tmp_path / "o").exists()


def test_unknown_backend_and_missing_bundle_are_one_line_errors(bundle_dir, phantom_dir, tmp_path):
    from imunet.runtime.contract.bundle import shipped_bundles

    code, _, err = run(phantom(phantom_dir), "--model", bundle_dir, "--backend", "magic")
    assert code == 2 and err.strip() == (
        "imunet-run: error: unknown backend 'magic'; choose from auto, ort-cpu, openvino, ort-cuda, ort-trt, tensorrt"
    )
    code, _, err = run(phantom(phantom_dir), "--model", tmp_path / "none.imunet")
    shipped = ", ".join(shipped_bundles())
    assert code == 2 and err.strip() == (
        f"imunet-run: error: {tmp_path / 'none.imunet'}: no such bundle folder, and not a shipped model "
        f"(shipped: {shipped})"
    )
    code, _, err = run(phantom(phantom_dir), "--model", bundle_dir, "--precision", "int4")
    assert (
        code == 2 and err.strip() == "imunet-run: error: unknown precision 'int4'; choose from auto, fp32, fp16, int8"
    )
    code, _, err = run(phantom(phantom_dir), "--model", bundle_dir, "--mode", "adaptive", "--stride", "3")
    assert code == 2 and "adaptive mode needs a power-of-two stride, got 3" in err and "Traceback" not in err


def write_dicom_series(folder, uid, values, spacing=(1.0, 1.0, 2.0)):
    """A small CT series written slice by slice with its own SeriesInstanceUID."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, arr in enumerate(values):
        sl = sitk.GetImageFromArray(arr.astype(np.int16))
        sl.SetSpacing(spacing[:2])
        for tag, value in (
            ("0008|0060", "CT"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", uid),
            ("0020|0013", str(k + 1)),
            ("0020|0032", f"0\\0\\{k * spacing[2]}"),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0008|0018", f"{uid}.{k + 1}"),
            ("0018|0050", str(spacing[2])),
        ):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid}_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_folder_with_two_series_needs_series(bundle_dir, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    a, b = "1.2.826.0.1.3680043.2.1125.11", "1.2.826.0.1.3680043.2.1125.12"
    write_dicom_series(folder, a, rng.integers(-100, 100, size=(6, 20, 24)))
    write_dicom_series(folder, b, rng.integers(-100, 100, size=(4, 20, 24)))
    code, _, err = run(folder, "--model", bundle_dir, "--out", tmp_path / "o.nii.gz")
    assert code == 1 and f"holds 2 DICOM series; pick one with --series: {a} (6 files), {b} (4 files)" in err
    assert not (tmp_path / "o.nii.gz").exists()
    code, _, err = run(folder, "--model", bundle_dir, "--series", b, "--out", tmp_path / "o.nii.gz")
    assert code == 0, err
    seg = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    assert seg.GetSize() == (24, 20, 4) and np.allclose(seg.GetSpacing(), (1.0, 1.0, 2.0))


def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path, monkeypatch):
    from imunet.runtime.imaging import io

    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    real_write = sitk.WriteImage

    def write_half_then_fail(img, path, *args, **kwargs):
        real_write(img, path, *args, **kwargs)  # the temporary file really exists now
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_image_atomic(image, tmp_path / "seg.nii.gz")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "seg.nii.gz").write_bytes(b"old")
    io.write_image_atomic(image, tmp_path / "seg.nii.gz", overwrite=True)
    assert sitk.ReadImage(str(tmp_path / "seg.nii.gz")).GetSize() == (6, 5, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_workers_option_runs_and_a_bad_count_fails_in_one_line(bundle_dir, phantom_dir, tmp_path):
    out = tmp_path / "seg.nii.gz"
    code, stdout, err = run(phantom(phantom_dir), "--model", bundle_dir, "--workers", 2, "--out", out)
    assert code == 0 and "2 windows at a time" in stdout and out.exists()
    code, stdout, err = run(phantom(phantom_dir), "--model", bundle_dir, "--workers", 0, "--out", tmp_path / "x.nii.gz")
    assert code != 0 and "workers must be >= 1, got 0" in err and "Traceback" not in err + stdout
    assert not (tmp_path / "x.nii.gz").exists()
