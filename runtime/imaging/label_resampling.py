"""Labels on the scan's grid from class probabilities on the network's grid: the argmax of the
probabilities interpolated linearly (nnU-Net's way back), computed only where it can differ from
the nearest network voxel's label.

Where the eight network voxels around a scan voxel (the corners of the cell it lies in) share one
label, every convex combination of their probabilities has its largest value at that label too, so
linear interpolation can change a label only in a cell whose corners hold two labels. The scan
voxels in such cells are interpolated; the rest take the nearest network voxel's label. Labels whose
largest component is kept (``keep_largest``) lose their other components on the network's grid
first, where they become certain background, so interpolation cannot bring them back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from .postprocess import keep_largest
from .preprocess import axis_coordinates, nearest_array

CHUNK = 1 << 20  # scan voxels interpolated at a time (bounds the (C, N) temporaries)

Box = tuple[slice, slice, slice]
SmoothedProbabilities = Callable[[Box], np.ndarray]
"""The class probabilities ``(C, *box)`` over a box of the network's grid, as a new array: the
loop's class maps are smoothed only where the way back reads them."""


def labels_on_grid(
    probs: np.ndarray | SmoothedProbabilities,
    source: sitk.Image,
    grid: sitk.Image,
    largest: tuple[int, ...] = (),
    scale: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Label map ``(Z, Y, X)`` uint8 on ``grid`` from class probabilities on ``source``'s grid (same
    physical space): ``probs`` ``(C, Z, Y, X)``, or a function giving them over a box (read only
    around the organs); ``largest``: labels reduced to their largest component first; ``scale``
    ``(C,)``: each class's probability is multiplied by it before the argmax (``exp`` of the
    manifest's logit offsets); ``labels``: that argmax on ``source``'s grid, where the caller has it
    (required with a function). An array ``probs`` is not changed."""
    over = probs if callable(probs) else (lambda box: np.array(probs[(slice(None), *box)]))
    if labels is None:
        if callable(probs):
            raise ValueError("labels_on_grid: the labels are required when the probabilities come from a function")
        labels = _argmax(probs, scale)
    kept = sitk.GetArrayFromImage(keep_largest(_net_image(labels, source), largest))
    coords = axis_coordinates(source, grid)
    if coords is None:  # grids of two directions (the runtime makes none): every class map resampled
        whole = _certain_background(over(tuple(slice(0, n) for n in kept.shape)), kept, labels)
        return _argmax(np.stack([_linear(p, source, grid) for p in whole]), scale)
    out = nearest_array(kept, source, grid)
    mixed = _mixed_cells(kept)
    if mixed is None:  # no label but background
        return out
    cells, at = [], []
    for c, n, (lo, hi) in zip(coords, kept.shape, mixed[1]):
        cell = np.minimum(np.floor(np.clip(c, 0.0, n - 1.0)), max(n - 2, 0)).astype(np.intp)
        inside = (c >= -0.5) & (c < n - 0.5) & (cell >= lo) & (cell < hi)  # outside source: background
        at.append(np.nonzero(inside)[0])
        cells.append(cell[at[-1]] - lo)
    block = mixed[0]
    for axis, cell in enumerate(cells):
        block = block.take(cell, axis=axis)
    points = tuple(a[i] for a, i in zip(at, np.nonzero(block)))
    if len(points[0]) == 0:
        return out
    # the corners of the mixed cells: the probabilities are read (and smoothed) only there
    box = tuple(slice(lo, min(hi + 1, n)) for (lo, hi), n in zip(mixed[1], kept.shape))
    near = _certain_background(over(box), kept[box], labels[box])
    start = np.array([b.start for b in box], np.float64)[:, None]
    for first in range(0, len(points[0]), CHUNK):
        chunk = tuple(p[first : first + CHUNK] for p in points)
        index = np.stack([c[i] for c, i in zip(coords, chunk)])
        out[chunk] = _argmax(_interpolate(near, index - start), scale)
    return out


def _certain_background(probs: np.ndarray, kept: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``probs`` with the voxels of removed components made certain background."""
    removed = kept != labels
    if removed.any():
        probs[:, removed] = 0.0
        probs[0, removed] = 1.0
    return probs


def _mixed_cells(labels: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
    """Which cells of ``labels``' grid (cell ``i``: voxels ``i`` and ``i + 1`` along each axis, the
    last voxel alone at the far edge) hold two labels, over the foreground's bounding box a voxel
    wider (elsewhere every cell is background), and that box's ``(start, stop)`` per axis; None
    without foreground."""
    extent = []
    for axis in range(3):
        hit = np.nonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if len(hit) == 0:
            return None
        extent.append((max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 1, labels.shape[axis])))
    crop = labels[tuple(slice(lo, min(hi + 1, n)) for (lo, hi), n in zip(extent, labels.shape))]
    high, low = crop.copy(), crop.copy()
    for axis in range(3):  # the max and min over each cell's corners, one axis at a time
        nxt = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        cur = tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))
        np.maximum(high[cur], high[nxt], out=high[cur])
        np.minimum(low[cur], low[nxt], out=low[cur])
    shape = tuple(hi - lo for lo, hi in extent)
    return (high != low)[: shape[0], : shape[1], : shape[2]], extent


def _linear(p: np.ndarray, source: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(_net_image(p, source), grid, sitk.Transform(), sitk.sitkLinear, 0.0))


def _argmax(probs: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    if scale is not None:
        probs = probs * scale.reshape(-1, *([1] * (probs.ndim - 1)))
    return probs.argmax(0).astype(np.uint8)


def _net_image(array: np.ndarray, source: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(source)
    return img


def _interpolate(probs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Trilinear interpolation ``(C, N)`` of ``probs`` at continuous ``index`` ``(3, N)``; points
    beyond the outermost voxel centres take the edge's values."""
    shape = probs.shape[1:]
    lower, frac = [], []
    for axis in range(3):
        c = np.clip(index[axis], 0.0, shape[axis] - 1.0)
        f = np.minimum(np.floor(c), shape[axis] - 2 if shape[axis] > 1 else 0).astype(np.intp)
        lower.append(f)
        frac.append((c - f).astype(np.float32))
    out = np.zeros((probs.shape[0], index.shape[1]), np.float32)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = np.ones(index.shape[1], np.float32)
                at = []
                for axis, d in enumerate((dz, dy, dx)):
                    w *= frac[axis] if d else 1.0 - frac[axis]
                    at.append(np.minimum(lower[axis] + d, shape[axis] - 1))
                out += probs[:, at[0], at[1], at[2]] * w
    return out
