"""Labels back onto a scan stored at another spacing: the argmax of the linearly interpolated class
probabilities, computed only next to label changes (``runtime/imaging/label_resampling.py``)."""

import numpy as np
import pytest
import SimpleITK as sitk

from imunet.runtime.imaging.label_resampling import labels_on_grid
from imunet.runtime.imaging.prepare import Prepared, restore
from imunet.runtime.imaging.preprocess import nearest_array, resample_label_like


def grid(size_xyz, spacing, origin=(0.0, 0.0, 0.0)):
    img = sitk.Image(*size_xyz, sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def physical_zyx(img):
    """``(3, Z, Y, X)`` physical coordinates (z, y, x order) of ``img``'s voxel centres (identity direction)."""
    size = img.GetSize()[::-1]
    idx = np.indices(size).astype(np.float64)
    sp, org = np.asarray(img.GetSpacing())[::-1], np.asarray(img.GetOrigin())[::-1]
    return idx * sp[:, None, None, None] + org[:, None, None, None]


def tube_probabilities(net, radius_mm=4.0, centre_yx=(50.0, 50.0), softness=1.5):
    """Background / tube probabilities on ``net``: a cylinder along z of ``radius_mm``, its probability
    a logistic in the distance from its surface; and its true mask on any grid."""
    z, y, x = physical_zyx(net)
    dist = np.hypot(y - centre_yx[0], x - centre_yx[1])
    tube = 1.0 / (1.0 + np.exp((dist - radius_mm) / softness))
    return np.stack([1.0 - tube, tube]).astype(np.float32)


def tube_truth(img, radius_mm=4.0, centre_yx=(50.0, 50.0)):
    _, y, x = physical_zyx(img)
    return (np.hypot(y - centre_yx[0], x - centre_yx[1]) <= radius_mm).astype(np.uint8)


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def full_linear_argmax(probs, net, scan):
    """Every class map resampled linearly onto the scan, then the argmax: what the band must equal."""
    maps = []
    for p in probs:
        img = sitk.GetImageFromArray(p)
        img.CopyInformation(net)
        maps.append(sitk.GetArrayFromImage(sitk.Resample(img, scan, sitk.Transform(), sitk.sitkLinear, 0.0)))
    return np.argmax(np.stack(maps), axis=0)


def _oriented(img, direction):
    img.SetDirection(direction)
    return img


@pytest.mark.parametrize(
    "case",
    ["coarser, inside", "planning grid reaching past the network's", "oblique, one direction", "two directions"],
)
def test_the_band_gives_the_argmax_of_the_fully_interpolated_probabilities(case):
    """Three classes (two tubes side by side), each class's probability scaled as the logit offsets
    scale it: interpolating only the cells whose corners hold two labels equals resampling every
    class map linearly and taking the argmax, on a coarser grid, a finer one that reaches past the
    network's grid (outside it: background), an oblique pair of grids and grids of two directions."""
    oblique = _rotation(3)
    net, scan = {
        "coarser, inside": (
            grid((26, 26, 12), (3.9, 3.9, 2.5)),
            grid((21, 21, 10), (4.69, 4.69, 3.0), (0.4, 0.4, 0.25)),
        ),
        "planning grid reaching past the network's": (
            grid((26, 26, 12), (3.9, 3.9, 2.5)),
            grid((120, 120, 16), (0.98, 0.98, 2.5), (-8.0, -6.0, -5.0)),
        ),
        "oblique, one direction": (
            _oriented(grid((26, 26, 12), (3.9, 3.9, 2.5)), oblique),
            _oriented(grid((60, 60, 14), (1.7, 1.7, 2.2), (-1.0, 0.5, -0.3)), oblique),
        ),
        "two directions": (
            grid((26, 26, 12), (3.9, 3.9, 2.5)),
            _oriented(grid((40, 40, 14), (2.3, 2.3, 2.2), (50.0, -8.0, 0.0)), _rotation(5)),
        ),
    }[case]
    tube = tube_probabilities(net, radius_mm=10.0, centre_yx=(50.0, 40.0))
    other = tube_probabilities(net, radius_mm=8.0, centre_yx=(50.0, 62.0))
    probs = np.stack([tube[0] * other[0], tube[1] * other[0], other[1]]).astype(np.float32)
    scale = np.exp(np.array([0.0, 0.3, -0.2], np.float32))
    out = labels_on_grid(probs.copy(), net, scan, scale=scale)
    expected = full_linear_argmax(probs * scale[:, None, None, None], net, scan)
    assert out.shape == expected.shape == sitk.GetArrayViewFromImage(scan).shape
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out == expected).mean() == 1.0


def test_an_organ_boundary_lands_closer_to_the_truth_than_by_nearest_neighbour():
    """A tube a few network voxels across, its probability a logistic in the distance from its surface:
    interpolating puts the boundary between network voxels where the probabilities cross; nearest
    neighbour snaps it to the network's voxels. Coarser stored grid (4.69 mm) and a planning CT's
    finer one (0.98 mm). (A tube under one network voxel in radius can vanish instead: its
    interpolated probability falls under the background's between the voxel centres; measured in
    docs/DESIGN-NOTES.md, "Back to the input grid".)"""
    net = grid((26, 26, 12), (3.9, 3.9, 2.5))
    for scan, radius, margin in (
        (grid((21, 21, 10), (4.69, 4.69, 3.0), origin=(0.4, 0.4, 0.25)), 12.0, 0.15),
        (grid((100, 100, 12), (0.98, 0.98, 2.5), origin=(-1.0, -1.0, 0.0)), 6.0, 0.05),
    ):
        probs = tube_probabilities(net, radius_mm=radius)
        truth = tube_truth(scan, radius_mm=radius)
        net_labels = sitk.GetImageFromArray(probs.argmax(0).astype(np.uint8))
        net_labels.CopyInformation(net)
        nearest = sitk.GetArrayFromImage(resample_label_like(net_labels, scan))
        linear = labels_on_grid(probs.copy(), net, scan)
        assert dice(linear, truth) > dice(nearest, truth) + margin


def test_a_removed_island_is_not_brought_back_by_interpolation_and_restore_uses_the_probabilities():
    net = grid((26, 26, 12), (3.9, 3.9, 2.5))
    scan = grid((40, 40, 12), (2.5, 2.5, 2.5))
    probs = tube_probabilities(net)
    z, y, x = physical_zyx(net)
    island = np.hypot(y - 15.0, x - 15.0) < 3.0  # a second, smaller blob of the tube's class
    probs[1][island], probs[0][island] = 0.9, 0.1
    kept_only = labels_on_grid(probs.copy(), net, scan, largest=(1,))
    both = labels_on_grid(probs.copy(), net, scan)
    _, sy, sx = physical_zyx(scan)
    near_island = np.hypot(sy - 15.0, sx - 15.0) < 5.0
    assert both[near_island].any() and not kept_only[near_island].any()
    assert (kept_only[~near_island] == both[~near_island]).all()
    labels = sitk.GetImageFromArray(probs.argmax(0).astype(np.uint8))
    labels.CopyInformation(net)
    prepared = Prepared(oriented=scan, resampled=net, volume=np.zeros((12, 26, 26), np.float32))
    restored = sitk.GetArrayFromImage(restore(labels, prepared, scan, (1,), probs.copy()))
    np.testing.assert_array_equal(restored, kept_only)


def test_a_model_of_more_than_128_classes_goes_back_the_same_way():
    net = grid((26, 26, 12), (3.9, 3.9, 2.5))
    scan = grid((21, 21, 10), (4.69, 4.69, 3.0), origin=(0.4, 0.4, 0.25))
    tube = tube_probabilities(net)
    probs = np.zeros((130, *tube.shape[1:]), np.float32)
    probs[0], probs[129] = tube[0], tube[1]
    out = labels_on_grid(probs.copy(), net, scan)
    assert set(np.unique(out)) == {0, 129}
    np.testing.assert_array_equal(out, np.where(full_linear_argmax(tube, net, scan) == 1, 129, 0))


def _rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return tuple((q * np.sign(np.diag(r))).ravel())


@pytest.mark.parametrize("seed", range(12))
def test_nearest_resample_by_axis_equals_simpleitks(seed):
    """The per-axis nearest-neighbour resample (grids of one direction, as a scan and its network
    grid are) equals SimpleITK's, also for voxels outside the labels (0), oblique directions and a
    grid reaching past the labels on every side; other directions fall back to SimpleITK."""
    rng = np.random.default_rng(seed)
    direction = _rotation(seed) if seed % 2 else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    size = tuple(int(n) for n in rng.integers(4, 14, 3))
    net = grid(size, tuple(rng.uniform(1.5, 4.5, 3)), tuple(rng.normal(0, 5, 3)))
    net.SetDirection(direction)
    array = rng.integers(0, 200, size=net.GetSize()[::-1], dtype=np.uint8)
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(net)
    spacing = rng.uniform(0.6, 5.0, 3)  # a scan about the labels' centre, wider than them on every side
    extent = max(np.multiply(net.GetSize(), net.GetSpacing()))
    size = np.ceil(1.8 * extent / spacing).astype(int) + rng.integers(0, 5, 3)
    scan = grid(tuple(int(n) for n in size), tuple(spacing))
    scan.SetDirection(direction if seed % 3 else _rotation(seed + 100))
    middle = (np.asarray(net.GetSize()) - 1) / 2 + rng.normal(0, 0.3, 3)
    centre = net.TransformContinuousIndexToPhysicalPoint(tuple(middle))
    half = scan.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2))
    scan.SetOrigin(tuple(np.asarray(centre) - np.asarray(half)))
    expected = sitk.GetArrayFromImage(sitk.Resample(labels, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    got = nearest_array(array, net, scan)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert (got == 0).any() and (got > 0).any()  # the geometry reaches past the labels and into them
    back = resample_label_like(labels, scan)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)
    assert back.GetOrigin() == scan.GetOrigin() and back.GetDirection() == scan.GetDirection()
