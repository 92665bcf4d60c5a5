"""Broad-mesh and boundary-band geometry for sparse decoding, and the final smoothing. Pure numpy.

All volumes are ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` for per-class maps); points are ``(N, 3)``
integer voxel indices ``(z, y, x)`` inside one patch.
"""

from __future__ import annotations

import numpy as np


def mesh_axes(patch: tuple[int, int, int], stride: int) -> list[np.ndarray]:
    """Per-axis mesh coordinates: every ``stride``-th voxel, plus the last voxel of the axis.

    Including the last voxel keeps every voxel within ``stride / 2`` of a mesh point.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    axes = []
    for p in patch:
        a = np.arange(0, p, stride, dtype=np.int64)
        if a[-1] != p - 1:
            a = np.append(a, p - 1)
        axes.append(a)
    return axes


def grid_points(axes: list[np.ndarray]) -> np.ndarray:
    """The ``(N, 3)`` int64 points of the grid spanned by three coordinate vectors, C order."""
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)


def nearest_index(axis: np.ndarray, length: int) -> np.ndarray:
    """For each voxel ``0..length-1``, the index into sorted ``axis`` of the nearest coordinate."""
    v = np.arange(length)
    right = np.clip(np.searchsorted(axis, v), 0, len(axis) - 1)
    left = np.clip(right - 1, 0, len(axis) - 1)
    # Ties go to the lower coordinate, so the fill is deterministic.
    return np.where(np.abs(axis[left] - v) <= np.abs(axis[right] - v), left, right)


def nearest_fill(values: np.ndarray, axes: list[np.ndarray], patch: tuple[int, int, int]) -> np.ndarray:
    """Upsample mesh values ``(C, nz, ny, nx)`` to the patch ``(C, Z, Y, X)`` by nearest neighbour."""
    iz, iy, ix = (nearest_index(a, p) for a, p in zip(axes, patch))
    return values[:, iz][:, :, iy][:, :, :, ix]


def shifted(ndim: int, axis: int, d: int, n: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index tuples ``(hi, lo)`` that pair each voxel with its neighbour ``d`` further along ``axis``
    (of length ``n``): ``a[hi]`` and ``a[lo]`` are the same array shifted by ``d``."""
    hi, lo = [slice(None)] * ndim, [slice(None)] * ndim
    hi[axis], lo[axis] = slice(d, None), slice(0, n - d)
    return tuple(hi), tuple(lo)


def box_filter(array: np.ndarray, radius: int, reduce: np.ufunc) -> np.ndarray:
    """Separable ``reduce`` (maximum, minimum, logical or) over a ``(2 radius + 1)`` box per axis,
    clipped at the borders."""
    out = array.copy()
    for axis in range(array.ndim):
        src = out.copy()
        n = out.shape[axis]
        for d in range(1, min(radius, n - 1) + 1):
            hi, lo = shifted(array.ndim, axis, d, n)
            reduce(out[hi], src[lo], out=out[hi])
            reduce(out[lo], src[hi], out=out[lo])
    return out


def label_boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels of a ``(Z, Y, X)`` label map with a 6-neighbour of another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        hi, lo = shifted(labels.ndim, axis, 1, labels.shape[axis])
        diff = labels[lo] != labels[hi]
        edge[lo] |= diff
        edge[hi] |= diff
    return edge


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a ``(Z, Y, X)`` mask by a cube of half-width ``radius`` (separable)."""
    return box_filter(mask, radius, np.logical_or)


def boundary_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """Voxels within ``radius`` (Chebyshev distance) of a label change in ``labels``."""
    return dilate(label_boundary(labels), radius)


def box_smooth(maps: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Average pooling of ``(C, Z, Y, X)`` maps with a ``kernel``^3 box, stride 1, 'same' size.

    At the borders only voxels inside the volume are averaged (PyTorch's
    ``avg_pool3d(count_include_pad=False)``). ``kernel`` 1 returns the input.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"smoothing kernel must be odd and >= 1, got {kernel}")
    if kernel == 1:
        return maps
    r = kernel // 2
    out = maps.astype(np.float32, copy=True)
    for axis in range(1, maps.ndim):
        n = out.shape[axis]
        total = out.copy()
        for d in range(1, r + 1):
            a = [slice(None)] * out.ndim
            b = [slice(None)] * out.ndim
            a[axis], b[axis] = slice(d, None), slice(0, n - d)
            total[tuple(a)] += out[tuple(b)]
            total[tuple(b)] += out[tuple(a)]
        idx = np.arange(n)
        count = (np.minimum(idx + r, n - 1) - np.maximum(idx - r, 0) + 1).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = n
        out = total / count.reshape(shape)
    return out
