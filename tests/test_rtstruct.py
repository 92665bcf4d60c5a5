"""RT Structure Set output: valid under dciodvfy, read back by an independent reader (polygon filling
of the contour data, even-odd per slice) onto the series' own grid, holes and islands kept, the
same object on a resend, refusals before inference."""

import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("skimage")

from rtstruct_check import read_back  # noqa: E402
from test_dicom import mr_series  # noqa: E402, F401  (a fixture)

from imunet.runtime.app.cli import app  # noqa: E402
from imunet.runtime.contract.bundle import load_bundle, resolve_model  # noqa: E402
from imunet.runtime.dicom.rtstruct import structure_set  # noqa: E402
from imunet.runtime.imaging.io import series_files  # noqa: E402
from imunet.runtime.imaging.metrics import dice  # noqa: E402

runner = CliRunner()


def test_the_structure_set_gives_back_the_labels(mr_series, tmp_path):  # noqa: F811
    out = tmp_path / "rt.dcm"
    res = runner.invoke(app, [str(mr_series["folder"]), "--out", str(out), "--dicom-format", "rtstruct"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, [str(mr_series["folder"]), "--out", str(tmp_path / "labels.nii.gz")])
    assert res.exit_code == 0, res.stderr
    ds = pydicom.dcmread(str(out))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.PatientID == "PAT-0014" and ds.StudyInstanceUID == mr_series["study"]
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["anterior", "posterior"]
    assert {o.RTROIInterpretedType for o in ds.RTROIObservationsSequence} == {"ORGAN"}
    assert ds.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0].CodeMeaning == "Hippocampus"
    assert [list(r.ROIDisplayColor) for r in ds.ROIContourSequence] == [[230, 25, 75], [60, 180, 75]]
    ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == mr_series["series"] and len(ref.ContourImageSequence) == len(mr_series["files"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    masks = read_back(ds, series_files(mr_series["folder"], None))
    for k, name in ((1, "anterior"), (2, "posterior")):
        assert (labels == k).sum() >= 500
        assert dice(masks[name].astype(np.uint8), (labels == k).astype(np.uint8), 1) >= 0.95, name
    first_uid = ds.SOPInstanceUID
    res = runner.invoke(app, [str(mr_series["folder"]), "--out", str(out), "--dicom-format", "rtstruct", "--overwrite"])
    assert res.exit_code == 0 and pydicom.dcmread(str(out)).SOPInstanceUID == first_uid  # a resend is stored once
    if shutil.which("dciodvfy"):
        checked = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=120)
        assert [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.startswith("Error")] == []


def test_holes_and_islands_come_back_exactly(mr_series):  # noqa: F811
    sources = series_files(mr_series["folder"], None)
    reference = sitk.ReadImage([str(f) for f in sources])
    arr = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    z, rows, cols = arr.shape
    rr, cc = np.mgrid[:rows, :cols]
    ring = ((rr - rows / 2) ** 2 + (cc - cols / 2) ** 2 < 12**2) & ((rr - rows / 2) ** 2 + (cc - cols / 2) ** 2 >= 5**2)
    arr[z // 2][ring] = 1  # a ring: one outer contour, one hole
    arr[z // 2 + 1, 2:6, 2:8] = 2  # two islands of one label on one slice
    arr[z // 2 + 1, 10:14, 20:25] = 2
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(reference)
    bundle = load_bundle(resolve_model(None))
    masks = read_back(structure_set(label, sources, bundle), sources)
    np.testing.assert_array_equal(masks["anterior"], arr == 1)
    np.testing.assert_array_equal(masks["posterior"], arr == 2)


def test_a_series_without_a_frame_of_reference_is_refused_before_inference(mr_series, tmp_path, monkeypatch):  # noqa: F811
    from imunet.runtime.app.pipeline import Segmenter

    def no_inference(*_args, **_kw):
        raise AssertionError("inference ran")

    monkeypatch.setattr(Segmenter, "segment", no_inference)
    (tmp_path / "nofor").mkdir()
    for f in mr_series["files"]:
        ds = pydicom.dcmread(str(f))
        del ds.FrameOfReferenceUID
        ds.save_as(str(tmp_path / "nofor" / f.name), enforce_file_format=True)
    res = runner.invoke(app, [str(tmp_path / "nofor"), "--out", str(tmp_path / "rt.dcm"), "--dicom-format", "rtstruct"])
    assert res.exit_code == 1 and "lacks FrameOfReferenceUID; an RT Structure Set cannot reference it" in res.stderr
    assert not (tmp_path / "rt.dcm").exists()
    res = runner.invoke(app, [str(tmp_path / "nofor"), "--out", str(tmp_path / "rt.dcm"), "--dicom-format", "nope"])
    assert res.exit_code == 2 and "--dicom-format must be one of seg, rtstruct" in res.stderr
