"""The sliding-window loop with an exact fake backend: stitching must reproduce a known function."""

import numpy as np
import pytest

from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.kernels.inference import Loop, predict_labels, predict_labels_and_maps, predict_probabilities
from imunet.runtime.kernels.labels import softmax

from conftest import FakeBackend

SHAPE = (30, 41, 37)
PATCH = (16, 16, 16)


def index_volume(shape=SHAPE):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # exact below 2**24


def sphere_logits(shape=SHAPE, centre=(14, 20, 19), radii=(9, 12, 7)):
    def fn(index):
        z, y, x = np.unravel_index(index.astype(np.int64), shape)
        d = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii))
        inner = d <= 0.35
        shell = (d <= 1.0) & ~inner
        logits = np.zeros((len(index), 3), np.float32)
        logits[shell, 1] = 8.0
        logits[inner, 2] = 8.0
        return logits

    return fn


def test_dense_stitching_reproduces_the_function_exactly():
    fn = sphere_logits()
    backend = FakeBackend(fn)
    loop = Loop(backend, PATCH, InferenceSettings(mode="dense", smoothing=1))
    probs, stats = predict_probabilities(index_volume(), loop)
    expected = softmax(fn(index_volume().ravel())).T.reshape(3, *SHAPE)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert stats.windows == 3 * 4 * 3 and stats.points_per_voxel > 1.5  # windows per axis at overlap 0.3


def test_sparse_agrees_with_dense_and_decodes_far_fewer_points():
    fn = sphere_logits()
    dense, s_dense = predict_labels(index_volume(), Loop(FakeBackend(fn), PATCH, InferenceSettings(mode="dense")))
    sparse, s_sparse = predict_labels(index_volume(), Loop(FakeBackend(fn), PATCH, InferenceSettings(mode="sparse")))
    assert (dense == sparse).mean() >= 0.999
    assert s_sparse.points_decoded < 0.5 * s_dense.points_decoded


def test_windows_without_boundary_stop_after_the_broad_mesh():
    fn = lambda idx: np.tile(np.array([[5.0, 0.0]], np.float32), (len(idx), 1))  # noqa: E731
    labels, stats = predict_labels(index_volume(), Loop(FakeBackend(fn), PATCH, InferenceSettings(mode="sparse")))
    assert not labels.any()
    assert stats.skipped_refinement == stats.windows
    mesh_points = np.prod([len(range(0, 16, 4)) + 1] * 3)
    assert stats.points_decoded == stats.windows * mesh_points


def test_chunking_respects_backend_max_points():
    seen = []

    class Recording(FakeBackend):
        def decode(self, features, points):
            seen.append(len(points))
            return super().decode(features, points)

    recording = Recording(sphere_logits((16, 16, 16), (8, 8, 8), (5, 5, 5)), 333)
    predict_labels(index_volume((16, 16, 16)), Loop(recording, PATCH, InferenceSettings(mode="dense")))
    assert max(seen) == 333 and sum(seen) == 16**3


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    fn = sphere_logits((8, 9, 10), (4, 4, 5), (3, 3, 3))
    loop = Loop(FakeBackend(fn), PATCH, InferenceSettings(mode="dense", smoothing=1))
    labels, _ = predict_labels(index_volume((8, 9, 10)), loop)
    assert labels.shape == (8, 9, 10)
    expected = fn(index_volume((8, 9, 10)).ravel()).argmax(1).reshape(8, 9, 10)
    np.testing.assert_array_equal(labels, expected)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="mode must be one of"):
        InferenceSettings(mode="fast")
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        InferenceSettings(stride=0)


def test_streaming_labels_equal_the_argmax_of_the_probabilities():
    fn = sphere_logits()
    for mode in ("sparse", "dense"):
        settings = InferenceSettings(mode=mode)
        probs, _ = predict_probabilities(index_volume(), Loop(FakeBackend(fn), PATCH, settings))
        labels, _ = predict_labels(index_volume(), Loop(FakeBackend(fn), PATCH, settings))
        np.testing.assert_array_equal(labels, probs.argmax(0))


@pytest.mark.parametrize("mode", ["adaptive", "sparse", "dense"])
def test_the_class_maps_give_the_smoothed_probabilities_over_any_box_bit_for_bit(mode):
    """The way back reads the smoothed probabilities only around the organs: over any box, at the
    volume's border or inside it, they are predict_probabilities' exactly, and the labels are its argmax."""
    fn = sphere_logits()
    settings = InferenceSettings(mode=mode, smoothing=5)
    probs, _ = predict_probabilities(index_volume(), Loop(FakeBackend(fn), PATCH, settings))
    labels, maps, _ = predict_labels_and_maps(index_volume(), Loop(FakeBackend(fn), PATCH, settings))
    np.testing.assert_array_equal(labels, probs.argmax(0))
    for box in [
        (slice(0, 30), slice(0, 41), slice(0, 37)),
        (slice(3, 9), slice(10, 30), slice(0, 2)),
        (slice(28, 30), slice(1, 40), slice(20, 37)),
        (slice(14, 15), slice(20, 21), slice(19, 20)),
    ]:
        got = maps.smoothed(box)
        assert got.dtype == np.float32 and got.shape == (3, *(b.stop - b.start for b in box))
        np.testing.assert_array_equal(got, probs[(slice(None), *box)])
        got[:] = -1.0  # a new array: changing it changes nothing the loop keeps
        np.testing.assert_array_equal(maps.smoothed(box), probs[(slice(None), *box)])
