"""Owner boxes (adaptive mode): a partition of the volume, each box inside its window, as many as the
blended windows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imunet.runtime.kernels.boxes import box_faces, owner_boxes
from imunet.runtime.kernels.windows import window_starts


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(16, 70)] * 3),
    overlap=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    stride=st.sampled_from([1, 2, 4]),
)
def test_owner_boxes_partition_the_volume_and_fit_their_windows(shape, overlap, stride):
    patch = (16, 16, 12)
    shape = tuple(max(s, p) for s, p in zip(shape, patch))
    boxes = owner_boxes(shape, patch, overlap, stride)
    hits = np.zeros(shape, np.int32)
    for b in boxes:
        hits[tuple(slice(a, a + n) for a, n in zip(b.start, b.size))] += 1
        for a, n, w, p, length in zip(b.start, b.size, b.window, patch, shape):
            assert a % stride == 0  # aligned to the global lattice
            assert 0 <= w and w + p <= length  # the window lies in the volume
            assert w <= a and min(a + n, length - 1) <= w + p - 1  # box and its far lattice face in the window
    assert (hits == 1).all()  # every voxel in exactly one box


def test_a_patch_too_small_for_the_stride_is_refused():
    with pytest.raises(ValueError, match="too small for adaptive decoding at stride 8"):
        owner_boxes((32, 32, 32), (8, 8, 8), 0.3, 8)


def test_boxes_match_the_blended_window_count_with_near_equal_sizes():
    for length, patch in ((200, 40), (512, 56), (512, 40), (256, 40), (97, 40)):
        faces = box_faces(length, patch, 0.3, 4)
        sizes = np.diff([0, *faces, length])
        assert len(sizes) == len(window_starts(length, patch, 0.3))
        assert all(f % 4 == 0 for f in faces)
        assert sizes[:-1].max() - sizes[:-1].min() <= 4  # the last box takes the remainder
    # a 512-voxel axis with a 40-voxel patch: 18 boxes as there are 18 windows, 28 or 32 voxels each
    assert np.unique(np.diff([0, *box_faces(512, 40, 0.3, 4), 512])).tolist() == [28, 32]


def test_owner_boxes_need_fewer_windows_at_lower_overlap():
    counts = [len(owner_boxes((200, 300, 300), (40, 56, 40), o, 4)) for o in (0.3, 0.15, 0.0)]
    assert counts[0] > counts[1] > counts[2]
