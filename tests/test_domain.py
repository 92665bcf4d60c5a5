"""Right answers on clinical input: any orientation and spacing lands the labels where the anatomy
is; another modality is refused; a scan far outside the training data is flagged."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime import Segmenter
from imunet.runtime.errors import InputError
from imunet.runtime.imaging.orientation import orientation_code

from conftest import CT_DIR

runner = CliRunner()


class ThresholdBackend:
    """An exact stand-in for a model: label 1 wherever the normalised intensity exceeds 0.8."""

    name, max_points, precision, features_reusable, skipped = "threshold", 100_000, "fp32", False, []

    def encode(self, patch):
        return patch

    def decode(self, features, points):
        v = features[points[:, 0], points[:, 1], points[:, 2]]
        return np.stack([np.zeros_like(v), 20.0 * (v - 0.8), np.full_like(v, -100.0)], axis=1)

    def predict_dense(self, patch):
        raise NotImplementedError

    def close(self):
        pass


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def sphere_scan(size, spacing, direction, origin, centre, radius):
    """A scan (HU 146 in a sphere of ``radius`` mm at physical ``centre``, 39 elsewhere) on an arbitrary grid."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetDirection(tuple(np.asarray(direction).ravel()))
    img.SetOrigin(origin)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)  # x, y, z
    phys = np.asarray(origin) + (np.asarray(direction) @ (idx * np.asarray(spacing)).T).T
    inside = np.linalg.norm(phys - np.asarray(centre), axis=1) <= radius
    arr = np.where(inside, 146.0, 39.0).astype(np.float32).reshape(size).transpose(2, 1, 0)  # (z, y, x)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def test_labels_land_on_the_anatomy_in_an_oblique_anisotropic_scan(bundle_dir):
    permute = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # another axis order than the bundle's LPS
    direction = rotation((1, 2, 3), 25) @ permute
    centre = np.array([12.0, -7.0, 20.0])
    scan = sphere_scan((44, 38, 30), (0.9, 1.7, 2.3), direction, (-10.0, -30.0, -8.0), centre, 11.0)
    assert orientation_code(scan) != "LPS"
    seg = Segmenter(bundle_dir, backend="ort-cpu", workers=1)
    seg.backend = ThresholdBackend()
    labels = seg.predict(scan)
    assert labels.GetSize() == scan.GetSize() and labels.GetOrigin() == scan.GetOrigin()
    assert labels.GetSpacing() == scan.GetSpacing() and labels.GetDirection() == scan.GetDirection()
    arr = sitk.GetArrayFromImage(labels)
    found = np.array(
        [labels.TransformIndexToPhysicalPoint([int(i) for i in zyx[::-1]]) for zyx in np.argwhere(arr == 1)]
    )
    assert np.linalg.norm(found.mean(0) - centre) < 0.9  # within a voxel (the smallest spacing)
    truth = sitk.GetArrayFromImage(scan) > 100
    assert 2 * np.logical_and(arr == 1, truth).sum() / ((arr == 1).sum() + truth.sum()) > 0.9


def test_every_axis_order_gives_the_same_labels(bundle_dir, phantom_dir):
    scan = sitk.ReadImage(str(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz"))
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    reference = sitk.GetArrayFromImage(seg.predict(scan))
    for code in ("PIL", "SRA", "ILP", "RAS"):
        stored = sitk.DICOMOrient(scan, code)
        labels = seg.predict(stored)
        assert labels.GetDirection() == stored.GetDirection() and labels.GetSize() == stored.GetSize()
        back = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPS"))
        np.testing.assert_array_equal(back, reference)


def test_bundles_without_an_orientation_run_scans_as_stored(bundle_dir, phantom_dir, tmp_path):
    from imunet.runtime.imaging.preprocess import normalize
    from imunet.runtime.kernels.inference import Loop, predict_labels

    b = shutil.copytree(bundle_dir, tmp_path / "old.imunet")
    m = json.loads((b / "manifest.json").read_text())
    del m["orientation"], m["fingerprint"]
    (b / "manifest.json").write_text(json.dumps(m))
    seg = Segmenter(b, backend="ort-cpu", workers=1)
    stored = sitk.DICOMOrient(sitk.ReadImage(str(phantom_dir / "imagesTr" / "phantom_002_0000.nii.gz")), "PIL")
    stored.SetSpacing(seg.bundle.manifest.spacing)  # no resampling: the comparison is the orientation alone
    volume = normalize(sitk.GetArrayFromImage(stored), seg.bundle.manifest.normalization)
    direct, _ = predict_labels(volume, Loop(seg.backend, seg.bundle.manifest.patch_size, seg.settings))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg.predict(stored)), direct)


def test_a_scan_of_another_modality_is_refused_unless_allowed(bundle_dir):
    scan = sitk.Image((40, 40, 20), sitk.sitkFloat32)
    scan.SetSpacing((1.5, 1.5, 3.0))
    scan.SetMetaData("0008|0060", "MR")
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    with pytest.raises(
        InputError, match=r"the scan is MR but the model is for CT \(Phantoms CT, about 60 x 60 x 72 mm\)"
    ):
        seg.predict(scan)
    assert Segmenter(bundle_dir, backend="ort-cpu", allow_modality=True).predict(scan).GetSize() == scan.GetSize()


@pytest.mark.skipif(not (CT_DIR / "example_ct_dicom").is_dir(), reason="shared CT data not present")
def test_the_cli_refuses_a_ct_series_for_the_mri_model_in_one_line(tmp_path):
    from imunet.runtime.app.cli import app

    res = runner.invoke(app, [str(CT_DIR / "example_ct_dicom"), "--out", str(tmp_path / "ct.nii.gz")])
    assert res.exit_code == 1 and not (tmp_path / "ct.nii.gz").exists()
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("FAILED")]
    assert (
        len(failed) == 1 and "the scan is CT but the model is for MR" in failed[0] and "--allow-modality" in failed[0]
    )


def test_a_scan_far_outside_the_training_data_is_flagged(bundle_dir, tmp_path):
    from imunet.runtime.app.cli import app

    big = sitk.Image((200, 200, 30), sitk.sitkFloat32) + 40.0  # 300 x 300 x 90 mm against 60 x 60 x 72 mm
    big.SetSpacing((1.5, 1.5, 3.0))
    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(big, str(path))
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    seg.predict(big)
    assert any("field of view 300 x 300 x 90 mm is far outside" in w for w in seg.last_stats["warnings"])
    res = runner.invoke(app, [str(path), "--model", str(bundle_dir), "--out", str(tmp_path / "o.nii.gz"),
                              "--stats", str(tmp_path / "s.json")])  # fmt: skip
    assert res.exit_code == 0 and f"WARNING {path}: field of view" in res.stderr
    assert json.loads((tmp_path / "s.json").read_text())["scans"][0]["warnings"]
    assert "Phantoms CT, about 60 x 60 x 72 mm" in res.stdout  # the header says what the model is for


def test_a_nightly_job_can_refuse_what_would_be_flagged(bundle_dir, phantom_dir, tmp_path):
    from imunet.runtime.app.cli import app

    big = sitk.Image((200, 200, 30), sitk.sitkFloat32) + 40.0  # far outside the training field of view
    big.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(big, str(tmp_path / "big.nii.gz"))
    ok = phantom_dir / "imagesTr" / "phantom_001_0000.nii.gz"
    out = tmp_path / "out"
    res = runner.invoke(app, [str(tmp_path / "big.nii.gz"), str(ok), "--model", str(bundle_dir), "--out", str(out),
                              "--refuse-out-of-domain"])  # fmt: skip
    assert res.exit_code == 1
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and "outside the model's domain: field of view 300 x 300 x 90 mm" in failed[0]
    assert sorted(p.name for p in out.iterdir()) == ["phantom_001.nii.gz"]  # the scan in the domain is written
    with pytest.raises(InputError, match="outside the model's domain"):
        Segmenter(bundle_dir, backend="ort-cpu", refuse_out_of_domain=True).predict(big)


def test_predict_array_needs_the_arrays_grid(bundle_dir):
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    arr = np.zeros((20, 30, 30), np.float32)
    for call in (lambda: seg.predict_array(arr), lambda: seg.predict_array(arr, (3.0, 1.5, 1.5))):
        with pytest.raises(InputError, match="needs the array's grid: reference=IMAGE, or spacing_zyx"):
            call()  # no guessed direction
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    with pytest.raises(InputError, match="spacing_zyx must be three positive numbers"):
        seg.predict_array(arr, (3.0, 0.0, 1.5), direction=identity)
    with pytest.raises(InputError, match="direction must be nine numbers forming a rotation"):
        seg.predict_array(arr, (3.0, 1.5, 1.5), direction=(2, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match="is not the reference's"):
        seg.predict_array(arr, reference=sitk.Image(30, 30, 21, sitk.sitkFloat32))
    assert seg.predict_array(arr, (3.0, 1.5, 1.5), direction=identity).shape == arr.shape
