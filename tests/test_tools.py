"""The evaluation tool: per-label Dice and HD95 through the runtime, on phantoms with known labels."""

import numpy as np
import SimpleITK as sitk

from imunet.runtime import Segmenter
from imunet.runtime.io import read_image
from imunet.runtime.metrics import dice, hd95


def test_evaluate_matches_direct_computation(bundle_dir, phantom_dir):
    from evaluate import evaluate, pair_cases

    pairs = pair_cases(phantom_dir / "imagesTr", phantom_dir / "labelsTr", {"phantom_001", "phantom_003"})
    assert [p[0] for p in pairs] == ["phantom_001", "phantom_003"]
    res = evaluate(bundle_dir, phantom_dir / "imagesTr", phantom_dir / "labelsTr", only={"phantom_001", "phantom_003"})
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    d = []
    for _, img, lbl in pairs:
        pred = sitk.GetArrayFromImage(seg.predict(read_image(img)))
        ref = sitk.GetArrayFromImage(read_image(lbl))
        d.append(dice(pred, ref, 1))
    assert res["cases"] == 2 and np.isclose(res["labels"]["organ"]["dice_mean"], np.mean(d))
    assert res["labels"]["organ"]["dice_mean"] > 0.7


def test_hd95_on_known_shapes():
    a = np.zeros((20, 20, 20), np.uint8)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = 1
    b[5:15, 5:15, 7:17] = 1  # shifted by 2 voxels along x
    assert hd95(a, a, 1, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(a, b, 1, (1.0, 1.0, 1.0)) == 2.0
    assert hd95(a, b, 1, (1.0, 1.0, 3.0)) == 6.0  # spacing (z, y, x): x is 3 mm
    assert np.isnan(hd95(a, np.zeros_like(a), 1, (1.0, 1.0, 1.0)))
