"""Multi-frame DICOM (enhanced MR, made from a single-frame series by highdicom's legacy converter):
one volume is read with the series' geometry and segmented to a SEG and an RT Structure Set that
reference its frames; frames that are not one stack in stored order (two volumes at the same
positions, as Philips stores a field map; frames out of order; frames without positions) are
refused in one line before inference, never read as a volume with the wrong geometry."""

import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import ROOT

pydicom = pytest.importorskip("pydicom", reason="needs the dicom extra")
pytest.importorskip("highdicom", reason="needs the dicom extra")
pytest.importorskip("skimage", reason="needs the dicom extra")
from dicom_series import enhanced_copy, write_series  # noqa: E402

from imunet.runtime.app.cli import app  # noqa: E402
from imunet.runtime.errors import InputError  # noqa: E402
from imunet.runtime.imaging.io import read_image  # noqa: E402
from imunet.runtime.imaging.metrics import dice  # noqa: E402

SAMPLE = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"
runner = CliRunner()


@pytest.fixture()
def enhanced(tmp_path):
    """A single-frame MR series and the same volume as one Legacy Converted Enhanced MR image."""
    _, _, files = write_series(sitk.ReadImage(str(SAMPLE)), tmp_path / "series", "MR")
    file = enhanced_copy(files, tmp_path / "enhanced" / "image.dcm")
    return {"series": tmp_path / "series", "folder": file.parent, "file": file}


def altered(enhanced, tmp_path, change):
    """A copy of the enhanced image with ``change(dataset)`` applied."""
    ds = pydicom.dcmread(str(enhanced["file"]))
    change(ds)
    folder = tmp_path / "altered"
    folder.mkdir()
    ds.save_as(str(folder / "image.dcm"))
    return folder


def positions(ds):
    return [fr.PlanePositionSequence[0] for fr in ds.PerFrameFunctionalGroupsSequence]


def test_one_volume_reads_with_its_series_geometry(enhanced):
    series, frames = read_image(enhanced["series"]), read_image(enhanced["folder"])
    assert frames.GetSize() == series.GetSize() and np.allclose(frames.GetSpacing(), series.GetSpacing())
    on_series = sitk.Resample(frames, series, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayFromImage(on_series), sitk.GetArrayFromImage(series))
    assert read_image(enhanced["file"]).GetSize() == series.GetSize()  # the file itself, not its folder


def swapped(ds):
    a, b = positions(ds)[3], positions(ds)[4]
    a.ImagePositionPatient, b.ImagePositionPatient = b.ImagePositionPatient, a.ImagePositionPatient


def without_positions(ds):
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (None, "frames hold 2 volumes at the same 20 positions"),
        (swapped, "not one evenly spaced stack in stored order"),
        (without_positions, "carry no plane positions"),
    ],
    ids=["two-volumes", "out-of-order", "no-positions"],
)
def test_frames_that_are_not_one_stack_are_refused_before_inference(enhanced, tmp_path, change, message):
    if change is None:  # two volumes at the same positions
        folder = enhanced_copy(sorted(enhanced["series"].iterdir()), tmp_path / "two" / "image.dcm", True).parent
    else:
        folder = altered(enhanced, tmp_path, change)
    with pytest.raises(InputError, match=message):
        read_image(folder)
    out = tmp_path / "labels.nii.gz"
    res = runner.invoke(app, [str(folder), "--out", str(out)])
    assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and list(tmp_path.glob("*.part")) == []


def test_without_pydicom_a_multiframe_file_is_refused_not_guessed(enhanced):
    code = (
        "import sys; sys.modules['pydicom'] = None\n"
        "from imunet.runtime.imaging.io import read_image\n"
        "from imunet.runtime.errors import InputError\n"
        f"try:\n    read_image({str(enhanced['folder'])!r})\nexcept InputError as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs the dicom extra" in res.stdout, res.stdout + res.stderr


def frame_masks(rt, source) -> dict[str, np.ndarray]:
    """The structure set's contours filled again on the source's frames (read independently of imunet:
    each contour's frame by its Referenced Frame Number, the frame's plane from the functional groups)."""
    from skimage.draw import polygon2mask

    groups = source.PerFrameFunctionalGroupsSequence
    shared = source.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    shape = (len(groups), source.Rows, source.Columns)
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    masks = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.ContourSequence:
            ref = contour.ContourImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            z = int(ref.ReferencedFrameNumber) - 1
            origin = np.array([float(v) for v in groups[z].PlanePositionSequence[0].ImagePositionPatient])
            d = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3) - origin
            mask[z] ^= polygon2mask(shape[1:], np.stack([d @ iop[3:] / row_mm, d @ iop[:3] / col_mm], 1))
        masks[names[roi.ReferencedROINumber]] = mask
    return masks


def test_seg_and_structure_set_reference_the_frames(enhanced, tmp_path):
    folder = enhanced["folder"]
    for name, extra in (("labels.nii.gz", []), ("seg.dcm", []), ("rt.dcm", ["--dicom-format", "rtstruct"])):
        res = runner.invoke(app, [str(folder), "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.stderr
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))  # frame k is slice k
    source = pydicom.dcmread(str(enhanced["file"]), stop_before_pixels=True)
    # the SEG: each frame names its source frame; decoded on the source's frames, it is the label map
    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    decoded = np.zeros_like(labels)
    for item, pixels in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array.reshape(-1, *labels.shape[1:])):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        k = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        decoded[int(ref.ReferencedFrameNumber) - 1][pixels > 0] = k
    assert np.array_equal(decoded, labels)
    # the structure set: contours on the frames, filled again, give the labels back
    rt = pydicom.dcmread(str(tmp_path / "rt.dcm"))
    contour_images = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    contour_images = contour_images.RTReferencedSeriesSequence[0].ContourImageSequence
    assert sorted(int(i.ReferencedFrameNumber) for i in contour_images) == list(range(1, labels.shape[0] + 1))
    masks = frame_masks(rt, source)
    for k, name in ((1, "anterior"), (2, "posterior")):
        assert (labels == k).sum() >= 500
        assert dice(masks[name].astype(np.uint8), (labels == k).astype(np.uint8), 1) >= 0.95, name
    if shutil.which("dciodvfy"):
        for name in ("seg.dcm", "rt.dcm"):
            checked = subprocess.run(["dciodvfy", str(tmp_path / name)], capture_output=True, text=True, timeout=120)
            assert [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.startswith("Error")] == []


REAL = ROOT / "tests" / "data" / "dcm_qa_philips_enh"


@pytest.fixture()
def philips_enhanced(tmp_path):
    """A real enhanced MR of one volume (Philips, 40 oblique frames), decompressed into a folder."""
    import gzip

    folder = tmp_path / "pcasl"
    folder.mkdir()
    (folder / "image.dcm").write_bytes(gzip.decompress((REAL / "1901_WIP_3DpCASL_real.dcm.gz").read_bytes()))
    return folder


def test_a_real_enhanced_mr_reads_as_dcm2niix_reads_it(philips_enhanced, tmp_path):
    ours, ref = read_image(philips_enhanced), sitk.ReadImage(str(REAL / "1901_WIP_3DpCASL_enh_real_dcm2niix.nii.gz"))
    assert ours.GetSize() == ref.GetSize() and np.allclose(ours.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    on_ref = sitk.Resample(ours, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -1e9, sitk.sitkFloat64)
    a, b = sitk.GetArrayFromImage(on_ref), sitk.GetArrayFromImage(ref).astype(np.float64)
    assert (a > -1e9).all()  # every voxel of the reference lies inside ours: the same grid in space
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999999  # the same voxels (up to the stored scaling)
    for name, extra in (("seg.dcm", []), ("rt.dcm", ["--dicom-format", "rtstruct"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = runner.invoke(app, [str(philips_enhanced), "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.stderr
        # highdicom's opinion of the source's one-component patient name is not shown to the user
        assert not [w for w in caught if "person name" in str(w.message)]
        if shutil.which("dciodvfy"):
            checked = subprocess.run(["dciodvfy", str(tmp_path / name)], capture_output=True, text=True, timeout=120)
            assert [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.startswith("Error")] == []
