"""Adaptive mode: owner boxes partition the volume, coarse-to-fine decoding reproduces dense decoding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_inference import PATCH, SHAPE, index_volume, sphere_logits

from imunet.runtime.adaptive import owner_boxes, upsample_linear
from imunet.runtime.inference import InferenceSettings, predict_labels, predict_probabilities, softmax

from conftest import FakeBackend


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(16, 70)] * 3),
    overlap=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    stride=st.sampled_from([1, 2, 4, 8]),
    layout=st.sampled_from(["even", "balanced"]),
)
def test_owner_boxes_partition_the_volume_and_fit_their_windows(shape, overlap, stride, layout):
    patch = (16, 16, 12)
    shape = tuple(max(s, p) for s, p in zip(shape, patch))
    if stride > 4:
        with pytest.raises(ValueError, match="too small"):
            owner_boxes(shape, (8, 8, 8), overlap, stride, layout=layout)
    boxes = owner_boxes(shape, patch, overlap, min(stride, 4), layout=layout)
    hits = np.zeros(shape, np.int32)
    for b in boxes:
        hits[tuple(slice(a, a + n) for a, n in zip(b.start, b.size))] += 1
        for a, n, w, p, length in zip(b.start, b.size, b.window, patch, shape):
            assert a % min(stride, 4) == 0  # aligned to the global lattice
            assert 0 <= w and w + p <= length  # the window lies in the volume
            assert w <= a and min(a + n, length - 1) <= w + p - 1  # box and its far lattice face in the window
    assert (hits == 1).all()  # every voxel in exactly one box


def test_balanced_boxes_match_the_blended_window_count_with_near_equal_sizes():
    from imunet.runtime.adaptive import box_faces
    from imunet.runtime.windows import window_starts

    for length, patch in ((200, 40), (512, 56), (512, 40), (256, 40), (97, 40)):
        faces = box_faces(length, patch, 0.3, 4, "balanced")
        sizes = np.diff([0, *faces, length])
        assert len(sizes) == len(window_starts(length, patch, 0.3))
        assert all(f % 4 == 0 for f in faces)
        assert sizes[:-1].max() - sizes[:-1].min() <= 4  # the last box takes the remainder
        even = box_faces(length, patch, 0.3, 4, "even")
        assert len(faces) >= len(even)  # never fewer windows than the even layout
    # at 512 voxels and a 40-voxel patch the even layout rounds 29-voxel boxes up to 32: 16 boxes, not 18
    assert len(box_faces(512, 40, 0.3, 4, "even")) + 1 == 16
    with pytest.raises(ValueError, match="box layout must be one of"):
        box_faces(100, 40, 0.3, 4, "tight")
    with pytest.raises(ValueError, match="boxes must be one of"):
        InferenceSettings(boxes="tight")


def test_owner_boxes_need_fewer_windows_at_lower_overlap():
    counts = [len(owner_boxes((200, 300, 300), (40, 56, 40), o, 4)) for o in (0.3, 0.15, 0.0)]
    assert counts[0] > counts[1] > counts[2]


def test_adaptive_at_stride_1_decodes_every_voxel_once_and_exactly():
    fn = sphere_logits()
    s = InferenceSettings(mode="adaptive", stride=1, smoothing=1)
    probs, stats = predict_probabilities(index_volume(), FakeBackend(fn), PATCH, s)
    expected = softmax(fn(index_volume().ravel())).T.reshape(3, *SHAPE)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert stats.points_per_voxel < 1.25  # once per voxel, plus the shared far faces of the boxes


def test_balanced_boxes_decode_a_window_independent_function_exactly():
    fn = sphere_logits()
    expected = softmax(fn(index_volume().ravel())).T.reshape(3, *SHAPE)
    once = InferenceSettings(mode="adaptive", stride=1, smoothing=1, boxes="balanced")
    probs, stats = predict_probabilities(index_volume(), FakeBackend(fn), PATCH, once)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    even_settings = InferenceSettings(mode="adaptive", boxes="even")
    even = predict_probabilities(index_volume(), FakeBackend(fn), PATCH, even_settings)[1]
    coarse = InferenceSettings(mode="adaptive")  # balanced: the default
    labels, balanced = predict_labels(index_volume(), FakeBackend(fn), PATCH, coarse)
    dense = predict_labels(index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="dense"))[0]
    assert (labels == dense).mean() >= 0.999
    assert balanced.windows >= even.windows


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_coarse_to_fine_matches_dense_and_decodes_far_fewer_points(stride):
    fn = sphere_logits()
    dense, s_dense = predict_labels(index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="dense"))
    patch = (16, 20, 20) if stride == 8 else PATCH
    s = InferenceSettings(mode="adaptive", stride=stride)
    adaptive, s_ad = predict_labels(index_volume(), FakeBackend(fn), patch, s)
    exact = fn(index_volume().ravel()).argmax(1).reshape(SHAPE)
    assert (adaptive == dense).mean() >= 0.999
    raw = InferenceSettings(mode="adaptive", stride=stride, smoothing=1)
    unsmoothed, _ = predict_labels(index_volume(), FakeBackend(fn), patch, raw)
    assert (unsmoothed == exact).mean() >= 0.9995  # only features thinner than a cell may be missed
    assert s_ad.points_decoded < 0.3 * s_dense.points_decoded
    assert s_ad.points_per_voxel < 0.4


def test_halo_and_confidence_only_add_points():
    fn = sphere_logits()
    base = predict_labels(index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="adaptive"))[1]
    halo = predict_labels(index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="adaptive", halo=1))[1]
    assert halo.points_decoded > base.points_decoded

    def soft(idx):  # same labels, but class 1 is uncertain everywhere
        logits = fn(idx)
        logits[:, 1] = np.where(logits[:, 1] > 0, 0.1, 0.0)
        return logits

    low = predict_labels(index_volume(), FakeBackend(soft), PATCH, InferenceSettings(mode="adaptive"))[1]
    conf = predict_labels(index_volume(), FakeBackend(soft), PATCH, InferenceSettings(mode="adaptive", confidence=0.6))[
        1
    ]
    assert conf.points_decoded > low.points_decoded


def test_constant_windows_are_reused_with_the_exact_result():
    volume = index_volume((40, 41, 37))
    volume[:, :, 18:] = 7.0  # a constant slab several windows wide
    fn = sphere_logits((40, 41, 37), (10, 20, 9), (6, 8, 5))
    expected = softmax(fn(volume.ravel())).T.reshape(3, *volume.shape)
    for s in (InferenceSettings(mode="adaptive", stride=1, smoothing=1), InferenceSettings(mode="dense", smoothing=1)):
        probs, stats = predict_probabilities(volume, FakeBackend(fn), PATCH, s)
        assert stats.windows_reused > 0
        np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_adaptive_rejects_a_stride_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two stride, got 3"):
        InferenceSettings(mode="adaptive", stride=3)
    with pytest.raises(ValueError, match="confidence in"):
        InferenceSettings(mode="adaptive", confidence=1.0)


def test_linear_upsampling_is_exact_for_a_linear_field():
    k = np.stack(np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij"), -1).astype(np.float32)
    coarse = np.concatenate([k @ np.array([[1.0], [2.0], [-3.0]], np.float32), k[..., :1] * 0 + 1], -1)
    fine = upsample_linear(coarse)
    assert fine.shape == (5, 7, 9, 2)
    z, y, x = np.meshgrid(np.arange(5), np.arange(7), np.arange(9), indexing="ij")
    np.testing.assert_allclose(fine[..., 0], (z + 2 * y - 3 * x) / 2.0, atol=1e-6)
    assert (fine[..., 1] == 1).all()


def test_min_stride_decodes_fewer_points():
    fn = sphere_logits()
    full = predict_labels(index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="adaptive", refine="cells"))
    coarse = predict_labels(
        index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="adaptive", min_stride=2, refine="cells")
    )
    assert coarse[1].points_decoded < 0.6 * full[1].points_decoded
    assert (coarse[0] == full[0]).mean() > 0.95  # step-function logits: interpolation blurs edges
    with pytest.raises(ValueError, match="min_stride must be a power of two"):
        InferenceSettings(mode="adaptive", min_stride=3)


def test_element_points_are_those_between_differing_corners():
    from imunet.runtime.adaptive import _element_points

    lab = np.zeros((3, 3, 3), np.int64)
    lab[1, 1, 1] = 2  # one coarse point differs from all its neighbours
    need = _element_points(lab)
    assert need.shape == (5, 5, 5)
    # every refined point whose edge, face or cell touches coarse point (1,1,1), i.e. fine (2,2,2)
    expected = np.zeros_like(need)
    expected[1:4, 1:4, 1:4] = True
    expected[2, 2, 2] = False  # the coarse point itself
    np.testing.assert_array_equal(need, expected)
    assert not _element_points(np.ones((4, 3, 5), np.int64)).any()


def test_element_refinement_decodes_fewer_points_for_the_same_labels():
    fn = sphere_logits()
    runs = {
        r: predict_labels(index_volume(), FakeBackend(fn), PATCH, InferenceSettings(mode="adaptive", refine=r))
        for r in ("cells", "elements")
    }
    assert runs["elements"][1].points_decoded < 0.8 * runs["cells"][1].points_decoded
    assert (runs["elements"][0] == runs["cells"][0]).mean() > 0.995
    with pytest.raises(ValueError, match="refine"):
        InferenceSettings(refine="faces")


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*[st.integers(16, 70)] * 3),
    overlap=st.sampled_from([0.0, 0.3, 0.5]),
    stride=st.sampled_from([1, 2, 4]),
    seam=st.integers(1, 5),
)
def test_seam_weights_are_a_partition_of_unity_inside_each_window(shape, overlap, stride, seam):
    from imunet.runtime.adaptive import seam_weights

    patch = (16, 16, 12)
    shape = tuple(max(s, p) for s, p in zip(shape, patch))
    total = np.zeros(shape, np.float64)
    for b in owner_boxes(shape, patch, overlap, stride, seam):
        start, size = b.region
        assert all(lo <= seam and hi <= seam for lo, hi in zip(b.seam_lo, b.seam_hi))
        for a, n, w, p in zip(start, size, b.window, patch):
            assert w <= a and a + n - 1 <= w + p - 1  # the decoded region lies inside the window
        wts = seam_weights(b)
        total[tuple(slice(a, a + n) for a, n in zip(start, size))] += 1.0 if wts is None else wts
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_owner_boxes_get_seams_where_their_windows_overlap():
    boxes = owner_boxes((200, 300, 300), (40, 56, 40), 0.3, 4, seam=2)
    interior = [b for b in boxes if all(0 < a for a in b.start)]
    assert interior and all(b.seam_lo == (2, 2, 2) for b in interior)
    assert all(b.seam_lo == (0, 0, 0) for b in boxes if b.start == (0, 0, 0))


@pytest.mark.parametrize("rule", ["both", "decoded"])
@pytest.mark.parametrize("stride", [1, 4])
def test_seams_keep_a_window_independent_function_exact(stride, rule):
    fn = sphere_logits()
    base = InferenceSettings(mode="adaptive", stride=stride, smoothing=1)
    seamed = InferenceSettings(mode="adaptive", stride=stride, smoothing=1, seam=2, seam_rule=rule)
    p0, s0 = predict_probabilities(index_volume(), FakeBackend(fn), PATCH, base)
    p1, s1 = predict_probabilities(index_volume(), FakeBackend(fn), PATCH, seamed)
    if stride == 1:
        expected = softmax(fn(index_volume().ravel())).T.reshape(3, *SHAPE)
        np.testing.assert_allclose(p1, expected, atol=1e-5)
    assert (p1.argmax(0) == p0.argmax(0)).mean() >= 0.999
    assert s1.points_decoded > s0.points_decoded  # the seams are decoded twice
    if rule == "decoded" and stride > 1:  # only the boundary points of a band of 2 before each face
        assert s1.points_decoded < 1.3 * s0.points_decoded


def test_decoded_seams_blend_only_where_the_lower_box_decoded():
    """With a model that adds a per-window bias, the "decoded" rule changes exactly the voxels in the
    bands before box faces that the lower box decoded, towards the upper window's value."""
    from test_inference import SHAPE as shape

    class WindowBias(FakeBackend):
        def decode(self, features, points):
            logits = super().decode(features, points)
            logits[:, 0] += np.float32(np.sin(int(features[0, 0, 0]) * 0.7))  # depends on the window
            return logits

    fn = sphere_logits()
    plain = InferenceSettings(mode="adaptive", smoothing=1, overlap=0.5)
    banded = InferenceSettings(mode="adaptive", smoothing=1, overlap=0.5, seam=2, seam_rule="decoded")
    p0, _ = predict_probabilities(index_volume(), WindowBias(fn), PATCH, plain)
    p1, _ = predict_probabilities(index_volume(), WindowBias(fn), PATCH, banded)
    changed = np.abs(p1 - p0).max(0) > 1e-6
    assert changed.any()
    faces = [sorted({b.start[k] for b in owner_boxes(shape, PATCH, 0.5, 4)} - {0}) for k in range(3)]
    near = np.zeros(shape, bool)
    for k in range(3):
        for f in faces[k]:
            cut = [slice(None)] * 3
            cut[k] = slice(f - 2, f)
            near[tuple(cut)] = True
    assert not (changed & ~near).any()  # nothing changes outside the bands
    np.testing.assert_allclose(p1.sum(0), 1.0, atol=1e-5)


def test_seams_blend_window_dependent_predictions_smoothly():
    """A model whose output depends on where the window lies (as real ones do at its edges): without
    seams the probability jumps at every face between owner boxes; with seams of width s it ramps
    over 2s voxels, so no step between neighbouring voxels exceeds the largest jump / (2 s)."""

    class WindowBias(FakeBackend):
        def decode(self, features, points):
            origin = int(features[0, 0, 0])  # the window's first voxel, from the index volume
            bias = np.float32(np.sin(origin * 0.7) * 3.0)
            logits = np.zeros((len(points), 2), np.float32)
            logits[:, 1] = bias
            return logits

    def max_step(p):
        return max(float(np.abs(np.diff(p[1], axis=a)).max()) for a in range(3))

    vol = index_volume((50, 61, 57))
    steps = {}
    for seam in (0, 2):  # boxes of 12 voxels in windows of 16: room for seams of 2
        s = InferenceSettings(mode="adaptive", smoothing=1, seam=seam)
        probs, _ = predict_probabilities(vol, WindowBias(None), PATCH, s)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        steps[seam] = max_step(probs)
    assert steps[0] > 0.2  # the boxes really disagree
    assert steps[2] <= steps[0] / 4 + 1e-5


def test_seam_must_not_be_negative():
    with pytest.raises(ValueError, match="seam must be >= 0, got -1"):
        InferenceSettings(seam=-1)
