"""Patch and point sampling for training (numpy, on the CPU).

Patches: 1 positive (centred on a random foreground voxel) to 2 negative (anywhere).
Points: a fraction ``alpha`` from label boundaries displaced by N(0, sigma) voxels, the rest
uniform; coordinates are rounded and clipped to the patch, labels read at that voxel.
"""

from __future__ import annotations

import numpy as np

from imunet.runtime.mesh import label_boundary


def sample_patch(
    image: np.ndarray, label: np.ndarray, patch: tuple[int, int, int], positive: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a ``patch``-sized ``(image, label)`` pair out of ``(Z, Y, X)`` volumes, padding with 0.

    ``positive`` centres the patch on a random foreground voxel (if there is any).
    """
    shape = np.asarray(image.shape)
    size = np.asarray(patch)
    centre = None
    if positive:
        fg = np.flatnonzero(np.asarray(label).ravel())
        if fg.size:
            centre = np.asarray(np.unravel_index(rng.choice(fg), label.shape))
    if centre is None:
        centre = np.array([rng.integers(0, s) for s in shape])
    # Corner may lie outside the volume when the patch is larger than it: pad there.
    lo_min = np.minimum(0, shape - size)
    lo_max = np.maximum(0, shape - size)
    corner = np.clip(centre - size // 2, lo_min, lo_max)
    img_out = np.zeros(patch, dtype=np.float32)
    lbl_out = np.zeros(patch, dtype=np.uint8)
    src = tuple(slice(max(c, 0), min(c + p, s)) for c, p, s in zip(corner, size, shape))
    dst = tuple(slice(s.start - c, s.stop - c) for s, c in zip(src, corner))
    img_out[dst] = image[src]
    lbl_out[dst] = label[src]
    return img_out, lbl_out


def sample_points(
    label: np.ndarray, k: int, alpha: float, sigma: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` points ``(k, 3)`` int64 in a ``(Z, Y, X)`` label patch, and which came from boundaries.

    With no boundary in the patch every point is uniform.
    """
    shape = np.asarray(label.shape)
    boundary = np.argwhere(label_boundary(label))
    n_b = int(round(alpha * k)) if len(boundary) else 0
    pick = boundary[rng.integers(0, len(boundary), size=n_b)] if n_b else np.empty((0, 3), dtype=np.int64)
    near = np.rint(pick + rng.normal(0.0, sigma, size=pick.shape)) if sigma > 0 else pick.astype(np.float64)
    uniform = rng.random((k - n_b, 3)) * shape
    points = np.concatenate([near, np.floor(uniform)], axis=0)
    points = np.clip(points, 0, shape - 1).astype(np.int64)
    from_boundary = np.zeros(k, dtype=bool)
    from_boundary[:n_b] = True
    return points, from_boundary


def point_labels(label: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Labels at integer ``points`` ``(N, 3)`` of a ``(Z, Y, X)`` map."""
    return label[points[:, 0], points[:, 1], points[:, 2]]
