"""The shipped head-and-neck CT model: chosen by name, coded for DICOM, guarded against scans it was
not made for (an MR series is refused, a hippocampus crop is flagged), and it finds organs on a
real planning CT of the shared data."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime import Segmenter
from imunet.runtime.app.cli import app
from imunet.runtime.contract.bundle import load_bundle, shipped_bundles
from imunet.runtime.errors import InputError

from conftest import ROOT, SHARED

runner = CliRunner()
ORGANS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"]
pytestmark = pytest.mark.skipif(
    "headneck-ct" not in shipped_bundles(), reason="headneck-ct bundle not placed in runtime/default (see its README)"
)


def test_the_bundle_names_and_codes_its_seven_organs():
    m = load_bundle(shipped_bundles()["headneck-ct"]).manifest
    assert [m.labels[k] for k in range(1, 8)] == ORGANS and m.modality == "CT"
    assert m.label_codes[1]["type"]["value"] == "15926001" and m.label_codes[7]["type"]["meaning"] == "Mandible"
    assert set(m.accuracy["dice"]) == set(ORGANS) and m.accuracy["cases"]["Esophagus"] < 41
    assert m.normalization.scheme == "ct" and m.fingerprint.modality == "CT"


def test_an_mr_series_is_refused_by_the_ct_model():
    scan = sitk.Image((64, 64, 40), sitk.sitkFloat32)
    scan.SetSpacing((3.9, 3.9, 2.5))
    scan.SetMetaData("0008|0060", "MR")
    with pytest.raises(InputError, match=r"the scan is MR but the model is for CT"):
        Segmenter("headneck-ct", backend="ort-cpu").predict(scan)


def test_a_hippocampus_crop_is_flagged_by_the_ct_model(tmp_path):
    sample = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"
    res = runner.invoke(app, [str(sample), "--model", "headneck-ct", "--out", str(tmp_path / "o.nii.gz"),
                              "--backend", "ort-cpu"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("WARNING")]
    assert warnings and any("far outside" in w for w in warnings), res.stderr
    assert "HeadNeckOAR CT" in res.stdout
    res = runner.invoke(app, [str(sample), "--model", "headneck-ct", "--out", str(tmp_path / "p.nii.gz"),
                              "--backend", "ort-cpu", "--refuse-out-of-domain"])  # fmt: skip
    assert res.exit_code == 1 and not (tmp_path / "p.nii.gz").exists()


@pytest.mark.skipif(not (SHARED / "headneck-ct").is_dir(), reason="shared head-and-neck data not present")
def test_a_planning_ct_gets_organs_on_its_own_grid(tmp_path):
    split = json.loads((ROOT / "docs" / "results" / "headneck_split.json").read_text())
    case = split["val"][0]
    scan = SHARED / "headneck-ct" / "imagesTr" / f"{case}_0000.nii.gz"
    with Segmenter("headneck-ct", backend="ort-cpu") as seg:
        result = seg.segment(str(scan))
    image = sitk.ReadImage(str(scan))
    assert result.labels.GetSize() == image.GetSize() and result.labels.GetOrigin() == image.GetOrigin()
    found = np.unique(sitk.GetArrayViewFromImage(result.labels))
    assert len(found) >= 3, found  # background and at least two organs
    assert not result.stats["warnings"], result.stats["warnings"]  # a planning CT is what it was made for


@pytest.mark.skipif(not (SHARED / "headneck-ct").is_dir(), reason="shared head-and-neck data not present")
def test_a_ct_stored_at_another_spacing_gets_the_same_labels_with_or_without_its_probabilities():
    """Labels go back to a scan stored at another spacing through probabilities read only around the
    organs; asking for every class map (``probabilities=True``) reads them everywhere: same labels."""
    from imunet.runtime.imaging.preprocess import resample_to_spacing

    split = json.loads((ROOT / "docs" / "results" / "headneck_split.json").read_text())
    image = sitk.ReadImage(str(SHARED / "headneck-ct" / "imagesTr" / f"{split['val'][0]}_0000.nii.gz"))
    image = resample_to_spacing(image, (2.9, 2.9, 3.1))
    with Segmenter("headneck-ct", backend="ort-cpu") as seg:
        lean = seg.segment(image)
        full = seg.segment(image, probabilities=True)
    labels = sitk.GetArrayFromImage(lean.labels)
    assert lean.labels.GetSize() == image.GetSize() and len(np.unique(labels)) >= 3
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(full.labels))
    assert full.probabilities.shape == (8, *labels.shape)
