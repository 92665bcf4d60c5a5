"""Pure geometry: windows, Gaussian map, mesh, nearest fill, band, smoothing."""

import numpy as np
import pytest

from imunet.runtime.kernels.mesh import boundary_band, box_smooth, grid_points, mesh_axes, nearest_fill
from imunet.runtime.kernels.windows import gaussian_importance, pad_to_patch, window_slices, window_starts


@pytest.mark.parametrize("size,patch,overlap", [(100, 32, 0.3), (32, 32, 0.3), (33, 32, 0.5), (200, 48, 0.0)])
def test_windows_cover_the_axis_with_the_overlap(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] + patch == size
    steps = np.diff(starts)
    assert (steps <= patch * (1 - overlap) + 1).all() and (steps > 0).all()
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


def test_window_errors_are_specific():
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        window_starts(10, 4, 1.0)
    with pytest.raises(ValueError, match="patch"):
        window_starts(3, 4, 0.3)


def test_window_slices_and_padding():
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    padded, crop = pad_to_patch(arr, (8, 6, 4))
    assert padded.shape == (8, 6, 7)
    np.testing.assert_array_equal(padded[crop], arr)
    assert len(window_slices(padded.shape, (8, 6, 4), 0.3)) == 3  # x: 7 voxels, step 2.8 -> 0, 2, 3


def test_gaussian_importance_peaks_in_the_centre():
    w = gaussian_importance((9, 11, 13))
    assert w.max() == 1.0 and w[4, 5, 6] == 1.0 and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])


def test_mesh_includes_last_voxel_and_nearest_fill_is_exact_on_mesh():
    axes = mesh_axes((9, 10, 4), 4)
    assert [a.tolist() for a in axes] == [[0, 4, 8], [0, 4, 8, 9], [0, 3]]
    pts = grid_points(axes)
    vals = (pts[:, 0] * 100 + pts[:, 1] * 10 + pts[:, 2]).astype(np.float32)
    filled = nearest_fill(vals.reshape(1, 3, 4, 2), axes, (9, 10, 4))[0]
    for z, y, x in pts:
        assert filled[z, y, x] == z * 100 + y * 10 + x
    # voxel (2, 6, 1): nearest mesh coordinates z 0|4 -> tie goes low (0), y 4|8 -> tie low (4), x 0
    assert filled[2, 6, 1] == 0 * 100 + 4 * 10 + 0
    assert filled[3, 7, 2] == 4 * 100 + 8 * 10 + 3


def test_boundary_band_width():
    lab = np.zeros((20, 20, 20), np.int64)
    lab[:, :, 10:] = 1
    band = boundary_band(lab, 2)
    xs = np.nonzero(band[5, 5])[0]
    assert xs.tolist() == [7, 8, 9, 10, 11, 12]


def test_box_smooth_matches_torch_avg_pool_without_padding_counts():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((3, 7, 8, 9)).astype(np.float32)
    ref = torch.nn.functional.avg_pool3d(torch.from_numpy(x)[None], 3, 1, 1, count_include_pad=False)[0].numpy()
    np.testing.assert_allclose(box_smooth(x, 3), ref, atol=1e-6)
    assert box_smooth(x, 1) is x
