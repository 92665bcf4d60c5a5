"""Patch and point sampling."""

import numpy as np
import pytest

from imunet.runtime.kernels.mesh import label_boundary
from imunet.sampling import point_labels, sample_patch, sample_points


def sphere_label(shape=(32, 40, 36), r=8):
    z, y, x = np.indices(shape)
    c = np.asarray(shape) / 2
    return (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= r * r).astype(np.uint8)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_boundary_fraction_is_alpha(alpha):
    lbl = sphere_label()
    rng = np.random.default_rng(0)
    pts, from_b = sample_points(lbl, 20000, alpha, 0.0, rng)
    assert from_b.mean() == pytest.approx(alpha, abs=1e-4)
    on_boundary = label_boundary(lbl)[pts[:, 0], pts[:, 1], pts[:, 2]]
    base = label_boundary(lbl).mean()  # uniform points hit the boundary this often
    assert on_boundary.mean() == pytest.approx(alpha + (1 - alpha) * base, abs=0.015)
    assert on_boundary[from_b].all()


def test_boundary_points_spread_with_sigma_and_stay_inside():
    lbl = sphere_label()
    rng = np.random.default_rng(1)
    pts, from_b = sample_points(lbl, 10000, 1.0, 5.0, rng)
    assert pts.min() >= 0 and (pts < np.asarray(lbl.shape)).all()
    assert label_boundary(lbl)[tuple(pts.T)].mean() < 0.3  # displaced off the surface
    # far more points inside than the sphere's 5% of the volume, but not all of them
    assert lbl.mean() < 0.06 and 0.15 < point_labels(lbl, pts).mean() < 0.5


def test_no_boundary_means_uniform_points():
    lbl = np.zeros((10, 10, 10), np.uint8)
    pts, from_b = sample_points(lbl, 1000, 0.5, 5.0, np.random.default_rng(0))
    assert not from_b.any() and pts.shape == (1000, 3)


def test_positive_patches_contain_foreground_and_small_volumes_are_padded():
    lbl = np.zeros((20, 30, 30), np.uint8)
    lbl[15:17, 2:4, 25:27] = 1
    img = np.random.default_rng(0).normal(size=lbl.shape).astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        pi, pl = sample_patch(img, lbl, (16, 16, 16), True, rng)
        assert pi.shape == (16, 16, 16) and pl.sum() > 0
    pi, pl = sample_patch(img, lbl, (24, 40, 40), False, rng)  # bigger than the volume
    assert pi.shape == (24, 40, 40) and int(pl.sum()) == int(lbl.sum())
    assert np.count_nonzero(pi) == img.size
