"""Patch and point sampling for training (numpy, on the CPU).

Patches: positives (centred on a foreground voxel) and negatives (anywhere). With class
locations, a positive patch first draws one of the case's annotated classes uniformly, then one of
its voxels, so an organ of a few hundred voxels is centred as often as one of thousands (nnU-Net's
foreground oversampling).
Points: a fraction ``alpha`` from label boundaries displaced by N(0, sigma) voxels, the rest
uniform; coordinates are rounded and clipped to the patch, labels read at that voxel. Class-balanced
sampling splits the boundary points equally among the foreground classes in the patch, each drawn
from that class's own boundary, so a thin organ gets as many points as a large one.
"""

from __future__ import annotations

import numpy as np

from imunet.runtime.kernels.mesh import label_boundary


def class_locations(
    label: np.ndarray, classes: list[int], rng: np.random.Generator, per_class: int = 10000
) -> dict[int, np.ndarray]:
    """Up to ``per_class`` voxel coordinates ``(n, 3)`` of each of ``classes`` present in ``label``."""
    out = {}
    flat = np.asarray(label).ravel()
    for c in classes:
        idx = np.flatnonzero(flat == c)
        if idx.size:
            idx = rng.choice(idx, size=min(per_class, idx.size), replace=False)
            out[c] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32)
    return out


def sample_patch(
    image: np.ndarray,
    label: np.ndarray,
    patch: tuple[int, int, int],
    positive: bool,
    rng: np.random.Generator,
    locations: dict[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a ``patch``-sized ``(image, label)`` pair out of ``(Z, Y, X)`` volumes, padding with 0.

    ``positive`` centres the patch on a foreground voxel (if there is any): with ``locations``
    (:func:`class_locations`) on a voxel of a class drawn uniformly, else on any foreground voxel.
    """
    shape = np.asarray(image.shape)
    size = np.asarray(patch)
    centre = None
    if positive and locations:
        cls = sorted(locations)[int(rng.integers(len(locations)))]
        centre = locations[cls][int(rng.integers(len(locations[cls])))].astype(np.int64)
    elif positive:
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


def _boundary_picks(label: np.ndarray, n: int, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    """``n`` boundary voxels ``(n, 3)`` (fewer only when the patch has no boundary at all)."""
    if not balanced:
        boundary = np.argwhere(label_boundary(label))
        return boundary[rng.integers(0, len(boundary), size=n)] if len(boundary) and n else np.empty((0, 3), int)
    classes = [int(c) for c in np.unique(label) if c != 0]
    edges = [np.argwhere(label_boundary(label == c)) for c in classes]
    edges = [e for e in edges if len(e)]
    if not edges or not n:
        return np.empty((0, 3), dtype=np.int64)
    shares = np.full(len(edges), n // len(edges))
    shares[: n - shares.sum()] += 1
    return np.concatenate([e[rng.integers(0, len(e), size=m)] for e, m in zip(edges, shares)])


def sample_points(
    label: np.ndarray, k: int, alpha: float, sigma: float, rng: np.random.Generator, balanced: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` points ``(k, 3)`` int64 in a ``(Z, Y, X)`` label patch, and which came from boundaries.

    ``balanced`` splits the boundary points equally among the foreground classes present, each from
    its own boundary. With no boundary in the patch every point is uniform.
    """
    shape = np.asarray(label.shape)
    pick = _boundary_picks(label, int(round(alpha * k)), balanced, rng)
    n_b = len(pick)
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
