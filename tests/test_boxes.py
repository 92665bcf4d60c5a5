"""Owner boxes (adaptive mode): a partition of the volume, one box per blended window, each inside
that window with its far lattice face."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imunet.runtime.kernels.boxes import axis_layout, owner_boxes
from imunet.runtime.kernels.windows import window_slices, window_starts


@settings(max_examples=80, deadline=None)
@given(
    shape=st.tuples(*[st.integers(16, 70)] * 3),
    overlap=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.75]),
    stride=st.sampled_from([1, 2, 4]),
)
def test_owner_boxes_partition_the_volume_one_per_blended_window(shape, overlap, stride):
    patch = (16, 16, 12)
    shape = tuple(max(s, p) for s, p in zip(shape, patch))
    boxes = owner_boxes(shape, patch, overlap, stride)
    windows = window_slices(shape, patch, overlap)
    assert [b.window for b in boxes] == [tuple(w.start for w in win) for win in windows]  # same windows, same order
    hits = np.zeros(shape, np.int32)
    for b in boxes:
        hits[tuple(slice(a, a + n) for a, n in zip(b.start, b.size))] += 1
        for a, n, w, p, length in zip(b.start, b.size, b.window, patch, shape):
            assert n >= 1 and 0 <= w and w + p <= length  # the window lies in the volume
            assert w <= a and a + n <= w + p  # the box lies in its window
            abut = any(s2 == w + p for s2 in window_starts(length, p, overlap))
            assert abut or min(a + n, length - 1) <= w + p - 1  # and its far lattice face, unless windows abut
    assert (hits == 1).all()  # every voxel in exactly one box


def test_a_patch_too_small_for_the_stride_is_refused():
    with pytest.raises(ValueError, match="too small for adaptive decoding at stride 8"):
        owner_boxes((32, 32, 32), (8, 8, 8), 0.3, 8)


def test_faces_lie_halfway_between_window_centres_on_the_stride_lattice():
    for length, patch in ((200, 40), (512, 56), (154, 48), (154, 80), (97, 40)):
        layout = axis_layout(length, patch, 0.3, 4)
        starts = window_starts(length, patch, 0.3)
        assert [w for _, _, w in layout] == starts
        for (a, n, w), nxt in zip(layout, starts[1:]):
            face = a + n
            assert face % 4 == 0
            assert abs(face - (w + nxt + patch) / 2) <= 2  # nearest stride multiple to the midpoint
