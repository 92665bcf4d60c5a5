"""Adaptive mode's second pass: where the model depends on its window, the labels become dense mode's."""

import numpy as np
import pytest
from test_inference import index_volume, sphere_logits

from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.kernels.blending import axis_peaks
from imunet.runtime.kernels.inference import Loop, predict_labels
from imunet.runtime.kernels.windows import axis_profiles, gaussian_importance, window_starts

from conftest import FakeBackend

PATCH = (16, 16, 16)


class WindowDependent(FakeBackend):
    """A model less sure of its structures towards its window's edges, as a weakly trained one is:
    the structure logits fall with the distance from the window's centre, so the labels near a
    structure's boundary depend on the window that decodes them."""

    def decode(self, features, points):
        logits = super().decode(features, points)
        off = np.abs(points - (np.array(PATCH) - 1) / 2).max(1) / (PATCH[0] / 2)  # 0 centre, 1 edge
        logits[:, 1:] -= 6.0 * off[:, None] ** 2
        return logits


class KeepsFeatures(WindowDependent):
    features_reusable = True  # the loop keeps each window's features for the second pass


def foreground_agreement(a, b):
    either = (a > 0) | (b > 0)
    return float((a[either] == b[either]).mean())


def labels(backend, **kw):
    return predict_labels(index_volume(), Loop(backend, PATCH, InferenceSettings(**kw)))


def test_second_pass_makes_adaptive_labels_those_of_dense_mode(monkeypatch):
    fn = sphere_logits()
    dense, s_dense = labels(WindowDependent(fn), mode="dense")
    one_pass, s_one = labels(WindowDependent(fn), blend_above=1.0)
    blended, s_blend = labels(WindowDependent(fn), blend_above=0.05)
    assert foreground_agreement(one_pass, dense) < 0.99  # the model's window dependence shows
    assert foreground_agreement(blended, dense) >= 0.995  # windows of under 1% weight left out
    assert s_one.points_decoded < s_blend.points_decoded < 0.7 * s_dense.points_decoded
    assert s_blend.blended_voxels > 0 and s_one.blended_voxels == 0
    monkeypatch.setattr("imunet.runtime.kernels.blending.WEIGHT_FLOOR", 0.0)  # every window: dense's labels
    every, _ = labels(WindowDependent(fn), blend_above=0.05)
    np.testing.assert_array_equal(every, dense)


@pytest.mark.parametrize("workers", [1, 2])
def test_kept_and_recomputed_features_give_the_same_labels(workers, monkeypatch):
    fn = sphere_logits()
    kept, s_kept = predict_labels(
        index_volume(), Loop(KeepsFeatures(fn), PATCH, InferenceSettings(blend_above=0.05), workers=workers)
    )
    again, s_again = labels(WindowDependent(fn), blend_above=0.05)
    assert s_kept.windows_reencoded == 0 and s_again.windows_reencoded > 0
    np.testing.assert_array_equal(kept, again)
    monkeypatch.setattr("imunet.runtime.kernels.blending.RETAIN_BYTES", 0)  # nothing fits: encode again
    none_kept, s_none = predict_labels(
        index_volume(), Loop(KeepsFeatures(fn), PATCH, InferenceSettings(blend_above=0.05), workers=workers)
    )
    assert s_none.windows_reencoded > 0
    np.testing.assert_array_equal(none_kept, kept)


def test_largest_window_weight_per_voxel_is_the_product_of_axis_peaks():
    shape = (30, 41, 37)
    starts = [window_starts(n, p, 0.3) for n, p in zip(shape, PATCH)]
    peaks = axis_peaks(shape, starts, axis_profiles(PATCH, 0.125))
    g = gaussian_importance(PATCH, 0.125)
    best = np.zeros(shape, np.float32)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                region = best[z : z + 16, y : y + 16, x : x + 16]
                np.maximum(region, g, out=region)
    product = peaks[0][:, None, None] * peaks[1][None, :, None] * peaks[2][None, None, :]
    np.testing.assert_allclose(product / product.max(), best / best.max(), rtol=1e-5)


def test_one_pass_settings_are_refused_out_of_range():
    with pytest.raises(ValueError, match="blend_above"):
        InferenceSettings(blend_above=1.5)
    with pytest.raises(ValueError, match="blend_margin"):
        InferenceSettings(blend_margin=-1)
