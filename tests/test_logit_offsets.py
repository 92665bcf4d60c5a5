"""Per-class logit offsets: the runtime adds them to the decoder's logits before the softmax, the
manifest checks them, and ``imunet-export calibrate --logit-offsets`` fits them on labelled cases."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_quality import held_out_dataset, run

from imunet.export.logit_offsets import case_probabilities, fit_offsets, per_class_dice
from imunet.runtime import Segmenter
from imunet.runtime.contract.bundle import load_bundle
from imunet.runtime.contract.settings import InferenceSettings


def sphere_case(shift: float, radius: float = 6.0, shape=(24, 24, 24)):
    """A ball of class 1 (truth radius ``radius``) whose probability falls off from the centre so that
    its 0.5 contour lies at ``radius - shift``: an under-confident model when ``shift`` > 0. Class 2
    has a faint haze and is never scored."""
    r = np.linalg.norm(np.indices(shape) - ((np.array(shape) - 1) / 2.0)[:, None, None, None], axis=0)
    organ = 1.0 / (1.0 + np.exp(r - (radius - shift)))
    haze = np.full(shape, 0.01)
    probs = np.stack([1.0 - organ - haze, organ, haze]).clip(1e-6, None)
    probs /= probs.sum(0)
    return probs.astype(np.float32), (r <= radius).astype(np.uint8)


def test_the_fit_moves_an_under_confident_class_to_its_best_threshold_and_leaves_unscored_ones():
    cases = []
    for i, shift in enumerate((1.0, 1.2, 0.8)):
        probs, truth = sphere_case(shift)
        cases.append(case_probabilities(f"c{i}", probs, truth, scored=(1,)))
    offsets, before, after = fit_offsets(cases, classes=3)
    assert offsets[0] == 0.0 and offsets[2] == 0.0  # background fixed; class 2 scored nowhere: not moved
    assert 0.5 <= offsets[1] <= 1.5  # the logit at the true radius is about +1
    assert set(before) == {1} and after[1] > before[1] + 0.05 and after[1] > 0.95
    assert per_class_dice(cases, offsets, 3)[1] == pytest.approx(after[1])
    # a well-placed class keeps 0: the flat top of the curve resolves toward no shift
    probs, truth = sphere_case(0.0)
    offsets, _, _ = fit_offsets([case_probabilities("c", probs, truth, (1,))], classes=3)
    assert abs(offsets[1]) <= 0.25


def test_a_case_whose_labels_are_on_another_grid_is_refused():
    probs, truth = sphere_case(1.0)
    with pytest.raises(ValueError, match="grid"):
        case_probabilities("c", probs, truth[:-1], (1,))


def test_offsets_shift_the_runtime_labels_and_a_wrong_count_is_refused(bundle_dir, phantom_dir):
    image = sitk.ReadImage(str(sorted((phantom_dir / "imagesTr").iterdir())[0]))
    counts = {}
    for name, offsets in (
        ("none", None),
        ("zeros", (0.0, 0.0, 0.0)),
        ("up", (0.0, 3.0, 3.0)),
        ("down", (0.0, -3.0, -3.0)),
    ):
        with Segmenter(bundle_dir, backend="ort-cpu", logit_offsets=offsets) as seg:
            labels = sitk.GetArrayFromImage(seg.segment(image).labels)
        counts[name] = int((labels > 0).sum())
    assert counts["zeros"] == counts["none"]
    assert counts["down"] < counts["none"] < counts["up"]
    with pytest.raises(ValueError, match="logit_offsets needs 3 values"):
        Segmenter(bundle_dir, backend="ort-cpu", logit_offsets=(0.0, 1.0))
    with pytest.raises(ValueError, match="logit_offsets"):
        InferenceSettings(logit_offsets=(0.0, float("nan")))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["inference"]["logit_offsets"] = [0.0, 1.0]
    from imunet.runtime.contract.manifest import Manifest

    with pytest.raises(ValueError, match="logit_offsets has 2 values for 3 classes"):
        Manifest.from_dict(manifest)


def test_calibrate_fits_offsets_into_the_copy_and_calibrates_the_estimate_with_them(bundle_dir, phantom_dir, tmp_path):
    from imunet.export.cli import calibrate_app

    data = held_out_dataset(phantom_dir, tmp_path)
    before = (bundle_dir / "manifest.json").read_bytes()
    out = tmp_path / "offsets.imunet"
    held = ",".join(f"held_{i:03d}" for i in range(6))
    code, stdout, err = run(bundle_dir, "--out", out, "--dataset", data, "--cases", held, "--logit-offsets",
                            command=calibrate_app)  # fmt: skip
    assert code == 0, err
    assert "segmenting 6 cases for the logit offsets" in stdout and "mean Dice over" in stdout
    assert (bundle_dir / "manifest.json").read_bytes() == before
    m = load_bundle(out).manifest
    assert len(m.inference.logit_offsets) == 3 and m.inference.logit_offsets[0] == 0.0
    assert m.quality is not None and m.quality.calibrated
    assert set(m.accuracy["dice"]) == {"organ", "lesion"} and m.accuracy["cases"] == {"organ": 6, "lesion": 6}
    assert "logit offsets fitted on them" in m.accuracy["note"]
    code, _, err = run(bundle_dir, "--out", tmp_path / "y.imunet", "--dataset", data, "--from", out,
                       "--logit-offsets", command=calibrate_app)  # fmt: skip
    assert code == 2 and "--logit-offsets fits on labelled cases" in err
    assert not (tmp_path / "y.imunet").exists() and not list(tmp_path.glob(".y.imunet*"))


def test_the_collected_cases_score_as_the_runtime_labels_do(bundle_dir, phantom_dir):
    from imunet.export.calibration import dataset_pairs
    from imunet.export.logit_offsets import collect
    from imunet.runtime.imaging.metrics import dice

    names = [p.name.removesuffix(".nii.gz") for p in sorted((phantom_dir / "labelsTr").iterdir())][:2]
    pairs = dataset_pairs(phantom_dir, names)
    with Segmenter(bundle_dir, backend="ort-cpu") as seg:
        found = collect(seg, pairs, None)
        runtime = {k: [] for k in (1, 2)}
        for _, image, label in pairs:
            pred = sitk.GetArrayFromImage(seg.segment(image).labels)
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
            for k in runtime:
                runtime[k].append(dice(pred, ref, k))
    collected = per_class_dice(found, np.zeros(3), 3)
    for k in (1, 2):
        assert collected[k] > 0.5 and collected[k] == pytest.approx(np.mean(runtime[k]), abs=0.02)
