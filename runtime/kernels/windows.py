"""Sliding-window geometry: window positions, padding and the Gaussian importance map. Pure numpy."""

from __future__ import annotations

from itertools import product

import numpy as np


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``patch`` covering ``size`` voxels with ``overlap``.

    Windows are spread evenly so the first starts at 0 and the last ends at ``size`` (nnU-Net's
    rule). ``size`` must be at least ``patch`` (pad first, see :func:`pad_to_patch`).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if patch < 1 or size < patch:
        raise ValueError(f"need 1 <= patch <= size, got patch={patch}, size={size}")
    step = max(1.0, patch * (1.0 - overlap))
    n = int(np.ceil((size - patch) / step)) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def window_slices(
    shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float
) -> list[tuple[slice, slice, slice]]:
    """All ``(Z, Y, X)`` window slices for a volume of ``shape`` (already padded to >= ``patch``)."""
    starts = [window_starts(s, p, overlap) for s, p in zip(shape, patch)]
    return [
        tuple(slice(a, a + p) for a, p in zip(corner, patch))  # type: ignore[misc]
        for corner in product(*starts)
    ]


def pad_to_patch(array: np.ndarray, patch: tuple[int, int, int], value: float = 0.0):
    """Pad a ``(Z, Y, X)`` array symmetrically up to at least ``patch``.

    Returns the padded array and the slices that cut the original back out of it.
    """
    pads = [max(0, p - s) for s, p in zip(array.shape, patch)]
    widths = [(d // 2, d - d // 2) for d in pads]
    if not any(pads):
        return array, tuple(slice(0, s) for s in array.shape)
    padded = np.pad(array, widths, mode="constant", constant_values=value)
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(widths, array.shape))
    return padded, crop


def axis_profiles(patch: tuple[int, ...], sigma_scale: float) -> list[np.ndarray]:
    """The Gaussian importance map's factor along each axis (float64, peak 1 at the centre):
    :func:`gaussian_importance` is their outer product, up to one scale."""
    return [np.exp(-0.5 * ((np.arange(p, dtype=np.float64) - (p - 1) / 2.0) / (sigma_scale * p)) ** 2) for p in patch]


def gaussian_importance(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights over a patch, peak 1 at the centre, sigma = ``sigma_scale * patch``.

    Zero is replaced by the smallest positive weight so every voxel keeps some weight (nnU-Net).
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    axes = axis_profiles(patch, sigma_scale)
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = (w / w.max()).astype(np.float32)
    w[w == 0] = w[w > 0].min()
    return w
