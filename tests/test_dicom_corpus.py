"""Real-world DICOM: series that are not one 3D image (localizers mixed in, gantry tilt, uneven
spacing, repeated positions, several multi-frame volumes) and pydicom's public test files in
compressed transfer syntaxes and other character sets, through ``imunet-run`` to a SEG and an RT
Structure Set, or refused in one line with no traceback. The full corpus: tools/dicom_corpus.py."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT

pydicom = pytest.importorskip("pydicom", reason="needs the dicom extra")
from dicom_series import jpeg_lossless_copy, write_series  # noqa: E402

from imunet.runtime.errors import InputError  # noqa: E402
from imunet.runtime.imaging.io import read_image  # noqa: E402

SAMPLE = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"


@pytest.fixture()
def base(tmp_path):
    files = write_series(sitk.ReadImage(str(SAMPLE)), tmp_path / "base", "MR")[2]
    return files


def variant(files, folder, change=None, drop=()):
    folder.mkdir()
    for i, f in enumerate(files):
        if i in drop:
            continue
        ds = pydicom.dcmread(str(f))
        if change is not None:
            change(i, ds)
        ds.save_as(str(folder / f.name))
    return folder


def test_a_localizer_in_the_series_is_left_out_and_the_volume_is_unchanged(base, tmp_path):
    folder = variant(base, tmp_path / "loc")
    ds = pydicom.dcmread(str(base[5]))
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(str(folder / "localizer.dcm"))
    want, got = read_image(base[0].parent), read_image(folder)
    assert got.GetSize() == want.GetSize() and got.GetSpacing() == want.GetSpacing()
    assert got.GetOrigin() == want.GetOrigin()
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    # the SEG and the structure set reference the volume's slices, not the localizer
    for fmt in ("seg", "rtstruct"):
        out = tmp_path / f"{fmt}.dcm"
        cmd = [sys.executable, "-m", "imunet.runtime.app.cli", str(folder), "--out", str(out), "--dicom-format", fmt]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        text = out.read_bytes()
        assert ds.SOPInstanceUID.encode() not in text and pydicom.dcmread(str(base[5])).SOPInstanceUID.encode() in text


def tilted(i, ds):
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + 0.27 * i, z]  # 1 mm slices, 0.27 mm further each: 15 degrees


def repeated(i, ds):
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(i // 2)]


@pytest.mark.parametrize(
    "name, change, drop, message",
    [
        ("tilt", tilted, (), "gantry tilt of 15"),
        ("gap", None, (20,), "slice spacing varies from 1 to 2 mm"),
        ("repeat", repeated, (), "repeat slice positions"),
    ],
)
def test_series_that_no_3d_image_holds_right_are_refused_in_one_line(base, tmp_path, name, change, drop, message):
    folder = variant(base, tmp_path / name, change, drop)
    with pytest.raises(InputError, match=message) as err:
        read_image(folder)
    assert "\n" not in str(err.value)


def test_a_siemens_mosaic_is_refused_not_read_as_one_slice(base, tmp_path):
    def mosaic(i, ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]

    folder = variant(base[:1], tmp_path / "mosaic", mosaic)
    with pytest.raises(InputError, match="Siemens mosaic"):
        read_image(folder)


def test_several_multi_frame_volumes_in_one_series_are_refused_before_their_pixels_are_read(tmp_path):
    src = pydicom.data.get_testdata_file("MR_small.dcm", download=False)
    folder = tmp_path / "multi"
    folder.mkdir()
    for k in range(2):
        ds = pydicom.dcmread(src)
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(str(folder / f"vol{k}.dcm"))
    with pytest.raises(InputError, match="2 multi-frame files in one series"):
        read_image(folder)


def test_a_jpeg_lossless_series_reads_as_the_uncompressed_one(base, tmp_path):
    folder = tmp_path / "jpeg"
    jpeg_lossless_copy(base, folder)
    assert "Process 14" in pydicom.dcmread(str(folder / base[0].name)).file_meta.TransferSyntaxUID.name
    got, want = read_image(folder), read_image(base[0].parent)
    assert got.GetSize() == want.GetSize() and np.allclose(got.GetOrigin(), want.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))


def test_a_multi_frame_file_without_frame_positions_is_refused_before_inference(tmp_path):
    """Three frames in a classic MR file carry no plane of their own (they could be cine, echoes or
    copies): read as slices, they would be a volume of made-up geometry."""
    src = pydicom.data.get_testdata_file("MR_small.dcm", download=False)
    ds = pydicom.dcmread(src)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    folder = tmp_path / "frames"
    folder.mkdir()
    ds.save_as(str(folder / "frames.dcm"))
    with pytest.raises(InputError, match="3 frames carry no plane positions"):
        read_image(folder)
    for out in ("x.dcm", "x.nii.gz"):
        cmd = [sys.executable, "-m", "imunet.runtime.app.cli", str(folder), "--out", str(tmp_path / out), "--stats",
               str(tmp_path / f"{out}.json")]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and "3 frames carry no plane positions" in res.stderr
        assert "inference_s" not in (tmp_path / f"{out}.json").read_text()  # refused before inference
        assert not (tmp_path / out).exists()


PUBLIC = [  # pydicom's own test files (installed with pydicom): what each exercises
    ("MR_small_RLE.dcm", "RLE lossless"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless"),
    ("MR_small_bigendian.dcm", "explicit VR big endian"),
    ("J2K_pixelrep_mismatch.dcm", "JPEG 2000, CT, Japanese patient name (ISO 2022 IR 87)"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG lossless, colour secondary capture"),
]


@pytest.mark.parametrize("name, what", PUBLIC)
def test_public_test_files_give_a_valid_seg_and_structure_set_or_one_line(name, what, tmp_path):
    src = pydicom.data.get_testdata_file(name, download=False)
    if src is None:
        pytest.skip(f"{name} is not among this pydicom's installed test files")
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(src, folder / name)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    model = "headneck-ct" if ds.get("Modality") == "CT" else "hippocampus"
    for fmt in ("seg", "rtstruct"):
        out = tmp_path / f"{fmt}.dcm"
        cmd = [sys.executable, "-m", "imunet.runtime.app.cli", str(folder), "-m", model, "--out", str(out),
               "--dicom-format", fmt, "-q"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert "Traceback" not in res.stderr, res.stderr
        if res.returncode != 0:
            failed = [ln for ln in res.stderr.splitlines() if ln.startswith("FAILED")]
            assert res.returncode == 1 and len(failed) == 1 and not out.exists(), (what, res.stderr)
            continue
        back = pydicom.dcmread(str(out))
        assert back.Modality == ("RTSTRUCT" if fmt == "rtstruct" else "SEG")
        assert back.StudyInstanceUID == ds.StudyInstanceUID and back.PatientName == ds.PatientName
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=120)
            errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, (what, errors)
