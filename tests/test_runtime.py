"""The runtime against PyTorch on the same scan, sparse against dense, and exact output geometry."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from imunet.runtime import Segmenter
from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.imaging.io import read_image
from imunet.runtime.imaging.metrics import dice
from imunet.runtime.imaging.preprocess import normalize, resample_to_spacing
from imunet.runtime.kernels.inference import Loop, predict_labels

from conftest import HIPPO, ROOT


def phantom_scan(phantom_dir, i=4):
    return read_image(phantom_dir / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz")


def test_dense_runtime_matches_pytorch_voxel_for_voxel(trained_run, bundle_dir, phantom_dir):
    pytest.importorskip("torch")
    from imunet.export.bundle import load_run
    from imunet.torch_backend import TorchBackend

    cfg, _, model = load_run(trained_run[0])
    seg = Segmenter(bundle_dir, backend="ort-cpu", mode="dense")
    m = seg.bundle.manifest
    image = phantom_scan(phantom_dir)
    volume = normalize(sitk.GetArrayFromImage(resample_to_spacing(image, m.spacing)), m.normalization)
    settings = InferenceSettings(mode="dense")
    ref, _ = predict_labels(volume, Loop(TorchBackend(model), m.patch_size, settings))
    got, _ = predict_labels(volume, Loop(seg.backend, m.patch_size, settings))
    assert (ref == got).mean() >= 0.999
    full = sitk.GetArrayFromImage(seg.predict(image))
    assert (full == ref).mean() >= 0.999  # same grid (spacing already matches): whole pipeline agrees too


@pytest.mark.parametrize("mode", ["sparse", "adaptive"])
def test_sparse_modes_agree_with_dense(bundle_dir, phantom_dir, mode):
    dense = Segmenter(bundle_dir, backend="ort-cpu", mode="dense")
    sparse = Segmenter(bundle_dir, backend="ort-cpu", mode=mode)
    agree, both = [], ([], [])
    for i in range(6):
        image = phantom_scan(phantom_dir, i)
        d = sitk.GetArrayFromImage(dense.predict(image))
        s = sitk.GetArrayFromImage(sparse.predict(image))
        agree.append((d == s).mean())
        both[0].append(d.ravel())
        both[1].append(s.ravel())
        assert sparse.last_stats["points_per_voxel"] < dense.last_stats["points_per_voxel"]
    assert min(agree) >= 0.995, agree
    if mode == "sparse":  # sparse decodes the whole band around every boundary and blends as dense does
        # Pooled over the six scans: a lesion of a few dozen voxels moves a per-scan Dice by 0.01 per
        # voxel, and which voxel flips depends on the CPU's float kernels (AVX2 against AVX-512).
        d_all, s_all = np.concatenate(both[0]), np.concatenate(both[1])
        gaps = [abs(1 - dice(s_all, d_all, lab)) for lab in (1, 2)]
        assert max(gaps) <= 0.005, gaps


def real_cases(count=6):
    """The shipped sample and up to ``count - 1`` held-out hippocampus scans (when the data is here)."""
    sample = ROOT / "runtime" / "default" / "sample"
    cases = [(sample / "hippocampus_014_0000.nii.gz", sample / "hippocampus_014.nii.gz")]
    split = json.loads((ROOT / "docs" / "results" / "hippocampus_split.json").read_text())
    for name in split["val"][: count - 1]:
        img, lbl = HIPPO / "imagesTr" / f"{name}_0000.nii.gz", HIPPO / "labelsTr" / f"{name}.nii.gz"
        if img.exists() and lbl.exists():
            cases.append((img, lbl))
    return cases


@pytest.mark.parametrize("mode", ["sparse", "adaptive"])
def test_sparse_modes_score_as_dense_does_on_real_scans(mode):
    """With the shipped model, the mean Dice against the truth of each mode is within 0.005 of dense
    decoding (the tiny phantom model is too weak for such a figure: its lesion of a few dozen voxels
    moves with the CPU's float kernels)."""
    dense = Segmenter(backend="ort-cpu", precision="fp32", mode="dense")
    fast = Segmenter(backend="ort-cpu", precision="fp32", mode=mode)
    gaps = []
    for img, lbl in real_cases():
        truth = sitk.GetArrayFromImage(read_image(lbl))
        d, f = (sitk.GetArrayFromImage(s.predict(str(img))) for s in (dense, fast))
        gaps.append(np.mean([dice(f, truth, c) - dice(d, truth, c) for c in (1, 2)]))
        assert (d == f).mean() >= 0.995
    assert abs(np.mean(gaps)) <= 0.005, gaps


def test_segmentation_of_the_phantom_is_good(bundle_dir, phantom_dir):
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    image = phantom_scan(phantom_dir, 4)  # a validation case of the tiny run's split or not: organ is easy
    pred = sitk.GetArrayFromImage(seg.predict(image))
    ref = sitk.GetArrayFromImage(read_image(phantom_dir / "labelsTr" / "phantom_004.nii.gz"))
    assert dice(pred, ref, 1) > 0.7
    assert seg.last_stats["volumes_ml"]["organ"] > 0


def geometry_case(spacing, origin, direction, size=(37, 29, 17)):
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 20, size=size[::-1]).astype(np.float32)
    arr[5:12, 8:20, 10:25] = 70
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def rotation(deg):
    a = np.radians(deg)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return tuple((r @ np.diag([1, -1, 1])).ravel())


@pytest.mark.parametrize(
    "spacing,origin,direction",
    [
        ((0.7, 0.9, 3.3), (-120.5, 33.0, 817.25), rotation(30)),
        ((1.5, 1.5, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())),
        ((2.1, 0.6, 1.2), (5.0, -5.0, 1e3), (0, 1, 0, 0, 0, 1, 1, 0, 0)),
    ],
)
def test_output_has_the_input_geometry_exactly(bundle_dir, spacing, origin, direction):
    img = geometry_case(spacing, origin, direction)
    out = Segmenter(bundle_dir, backend="ort-cpu").predict(img)
    assert out.GetSize() == img.GetSize()
    assert out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin()
    assert out.GetDirection() == img.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8


def test_unet_bundle_runs_through_the_same_loop(unet_bundle_dir, phantom_dir):
    seg = Segmenter(unet_bundle_dir, backend="ort-cpu", mode="sparse")  # mode is ignored for U-Net bundles
    out = seg.predict(phantom_scan(phantom_dir, 0))
    assert out.GetSize() == phantom_scan(phantom_dir, 0).GetSize()
    assert seg.last_stats["mode"] == "dense-model" and seg.last_stats["points_decoded"] == 0


def test_numpy_api_takes_the_arrays_grid(bundle_dir, phantom_dir):
    """An array from a scan stored with a flipped direction gets that scan's labels, not those of
    the array read as if it were in LPS order."""
    seg = Segmenter(bundle_dir, backend="ort-cpu")
    image = phantom_scan(phantom_dir, 2)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    arr = sitk.GetArrayFromImage(image)
    want = sitk.GetArrayFromImage(seg.predict(image))
    by_reference = seg.predict_array(arr, reference=image)
    by_grid = seg.predict_array(arr, spacing_zyx=image.GetSpacing()[::-1], direction=image.GetDirection())
    assert by_reference.shape == arr.shape and by_reference.dtype == np.uint8
    np.testing.assert_array_equal(by_reference, want)
    np.testing.assert_array_equal(by_grid, want)


def test_shipped_default_model_segments_the_shipped_sample():
    from imunet.runtime.contract.bundle import default_bundle_path

    bundle = default_bundle_path()
    assert bundle is not None and bundle.name == "hippocampus.imunet"
    sample = bundle.parent / "sample"
    seg = Segmenter(backend="ort-cpu")  # no bundle given: the shipped default, verified on load
    pred = sitk.GetArrayFromImage(seg.predict(read_image(sample / "hippocampus_014_0000.nii.gz")))
    ref = sitk.GetArrayFromImage(read_image(sample / "hippocampus_014.nii.gz"))
    assert dice(pred, ref, 1) > 0.8 and dice(pred, ref, 2) > 0.75
    assert seg.bundle.manifest.labels == {0: "background", 1: "anterior", 2: "posterior"}


@pytest.mark.skipif(not (HIPPO / "imagesTr").is_dir(), reason="shared hippocampus data not present")
def test_adaptive_mode_keeps_the_dice_of_dense_mode_on_real_scans():
    cases = ["hippocampus_038", "hippocampus_045", "hippocampus_051", "hippocampus_057", "hippocampus_065"]  # held out
    dense = Segmenter(backend="ort-cpu", mode="dense")
    adaptive = Segmenter(backend="ort-cpu", mode="adaptive")
    gaps, ratio = [], []
    for case in cases:
        image = read_image(HIPPO / "imagesTr" / f"{case}_0000.nii.gz")
        truth = sitk.GetArrayFromImage(read_image(HIPPO / "labelsTr" / f"{case}.nii.gz"))
        d = sitk.GetArrayFromImage(dense.predict(image))
        a = sitk.GetArrayFromImage(adaptive.predict(image))
        gaps.append(np.mean([dice(a, truth, c) - dice(d, truth, c) for c in (1, 2)]))
        ratio.append(adaptive.last_stats["points_decoded"] / dense.last_stats["points_decoded"])
    assert abs(np.mean(gaps)) <= 0.005, gaps
    assert max(ratio) < 0.15, ratio
