"""Coarse-to-fine decoding: the lattice helpers, and adaptive mode's labels against dense decoding."""

import numpy as np
import pytest
from test_inference import PATCH, SHAPE, index_volume, sphere_logits

from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.kernels.boxes import OwnerBox
from imunet.runtime.kernels.inference import Loop, predict_labels, predict_probabilities
from imunet.runtime.kernels.labels import softmax
from imunet.runtime.kernels.lattice import (
    closure_points,
    corners_disagree,
    element_points,
    refine_box,
    upsample_linear,
)

from conftest import FakeBackend


def test_linear_upsampling_is_exact_for_a_linear_field():
    k = np.stack(np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij"), -1).astype(np.float32)
    coarse = np.concatenate([k @ np.array([[1.0], [2.0], [-3.0]], np.float32), k[..., :1] * 0 + 1], -1)
    fine = upsample_linear(coarse)
    assert fine.shape == (5, 7, 9, 2)
    z, y, x = np.meshgrid(np.arange(5), np.arange(7), np.arange(9), indexing="ij")
    np.testing.assert_allclose(fine[..., 0], (z + 2 * y - 3 * x) / 2.0, atol=1e-6)
    assert (fine[..., 1] == 1).all()


def test_element_points_are_those_between_differing_corners():
    lab = np.zeros((3, 3, 3), np.int64)
    lab[1, 1, 1] = 2  # one coarse point differs from all its neighbours
    need = element_points(lab)
    assert need.shape == (5, 5, 5)
    # every refined point whose edge, face or cell touches coarse point (1,1,1), i.e. fine (2,2,2)
    expected = np.zeros_like(need)
    expected[1:4, 1:4, 1:4] = True
    expected[2, 2, 2] = False  # the coarse point itself
    np.testing.assert_array_equal(need, expected)
    assert not element_points(np.ones((4, 3, 5), np.int64)).any()


def test_cells_with_differing_corners_and_their_closure():
    lab = np.zeros((3, 3, 3), np.int64)
    lab[2, 2, 2] = 1  # only the last cell has a differing corner
    cells = corners_disagree(lab)
    assert cells.sum() == 1 and cells[1, 1, 1]
    points = closure_points(cells)
    assert points.shape == (5, 5, 5) and points.sum() == 27 and points[2:, 2:, 2:].all()


def test_adaptive_at_stride_1_decodes_every_voxel_once_and_exactly():
    fn = sphere_logits()
    s = InferenceSettings(mode="adaptive", stride=1, smoothing=1)
    probs, stats = predict_probabilities(index_volume(), Loop(FakeBackend(fn), PATCH, s))
    expected = softmax(fn(index_volume().ravel())).T.reshape(3, *SHAPE)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert stats.points_per_voxel <= 1.0 + 1e-9  # each voxel decoded once


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_coarse_to_fine_labels_match_dense_decoding(stride):
    fn = sphere_logits()
    dense, s_dense = predict_labels(index_volume(), Loop(FakeBackend(fn), PATCH, InferenceSettings(mode="dense")))
    patch = (16, 20, 20) if stride == 8 else PATCH
    adaptive, s_ad = predict_labels(index_volume(), Loop(FakeBackend(fn), patch, InferenceSettings(stride=stride)))
    exact = fn(index_volume().ravel()).argmax(1).reshape(SHAPE)
    assert (adaptive == dense).mean() >= 0.999
    raw = InferenceSettings(mode="adaptive", stride=stride, smoothing=1)
    unsmoothed, _ = predict_labels(index_volume(), Loop(FakeBackend(fn), patch, raw))
    assert (unsmoothed == exact).mean() >= 0.9995  # only features thinner than a cell may be missed
    for label in (1, 2):  # and every structure is found, with its volume
        assert abs(int((unsmoothed == label).sum()) - int((exact == label).sum())) <= 0.01 * (exact == label).sum()
    assert s_ad.points_decoded < 0.3 * s_dense.points_decoded


def test_constant_windows_are_reused_with_the_exact_result():
    volume = index_volume((40, 41, 37))
    volume[:, :, 18:] = 7.0  # a constant slab several windows wide
    fn = sphere_logits((40, 41, 37), (10, 20, 9), (6, 8, 5))
    expected = softmax(fn(volume.ravel())).T.reshape(3, *volume.shape)
    for s in (InferenceSettings(mode="adaptive", stride=1, smoothing=1), InferenceSettings(mode="dense", smoothing=1)):
        probs, stats = predict_probabilities(volume, Loop(FakeBackend(fn), PATCH, s))
        assert stats.windows_reused > 0
        np.testing.assert_allclose(probs, expected, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_refine_box_marks_exactly_the_voxels_it_decoded(stride):
    fn = sphere_logits()
    volume = index_volume()
    box = OwnerBox(start=(4, 8, 4), size=(12, 12, 10), window=(2, 4, 2))
    window = volume[2:18, 4:20, 2:18]
    decoded = set()

    def decode(points):
        decoded.update(map(tuple, points.tolist()))
        return softmax(fn(window[points[:, 0], points[:, 1], points[:, 2]]))

    out, exact = refine_box(decode, box, (17, 19, 17), stride)  # last voxels of the window (global)
    offset = np.subtract(box.start, box.window)
    inside = {tuple(p) for p in (np.argwhere(np.ones(box.size, bool)) + offset).tolist()}
    marked = {tuple(p) for p in (np.argwhere(exact) + offset).tolist()}
    assert marked <= decoded & inside  # no interpolated voxel is marked
    lattice = {p for p in inside if all((c - o) % stride == 0 for c, o in zip(p, offset))}
    assert lattice <= marked  # the first lattice, and with it every voxel at stride 1
    # a far face clamped onto the box's last voxel is decoded but held for the face, so not marked
    assert all(any(c == o + n - 1 for c, o, n in zip(p, offset, box.size)) for p in (decoded & inside) - marked)
    truth = softmax(fn(window[tuple(slice(o, o + n) for o, n in zip(offset, box.size))].ravel()))
    truth = truth.T.reshape(-1, *box.size)
    np.testing.assert_allclose(out[:, exact], truth[:, exact], atol=1e-6)  # decoded values are exact


def test_uncertain_lattice_points_refine_a_structure_thinner_than_the_stride():
    """A line one voxel across runs between the stride-4 lattice points; points within 2 voxels of it
    lean towards it but stay background (probability 0.9), as a weak model's do. Differing labels
    alone never refine there and the line is lost; with ``refine_below`` it is decoded."""
    box = OwnerBox(start=(0, 0, 0), size=(16, 16, 16), window=(0, 0, 0))
    grid = np.stack(np.meshgrid(*(np.arange(16),) * 3, indexing="ij"), -1)
    dist = np.maximum(np.abs(grid[..., 1] - 6), np.abs(grid[..., 2] - 6))  # a line along z at y = x = 6
    p_line = np.where(dist == 0, 0.9, np.where(dist <= 2, 0.1, 0.0))

    def decode(points):
        p = p_line[points[:, 0], points[:, 1], points[:, 2]]
        return np.stack([1 - p, p], 1).astype(np.float32)

    found = {}
    for refine_below in (0.0, 0.99):
        calls: list[int] = []

        def counted(pts, calls=calls):
            calls.append(len(pts))
            return decode(pts)

        out, _ = refine_box(counted, box, (15, 15, 15), 4, refine_below)
        found[refine_below] = (out.argmax(0) == 1, sum(calls))
    line = dist == 0
    assert not found[0.0][0].any()  # every lattice point is background: nothing refined, the line is gone
    np.testing.assert_array_equal(found[0.99][0], line)  # decoded, exactly the line
    assert found[0.99][1] < 16**3 / 2  # refined around the line only, not the whole box
    with pytest.raises(ValueError, match="refine_below"):
        InferenceSettings(refine_below=1.0)
