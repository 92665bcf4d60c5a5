"""Labels on the scan's grid from class probabilities on the network's grid: the argmax of the
probabilities interpolated linearly (nnU-Net's way back), computed only where it can differ from
the nearest network voxel's label.

Where the eight network voxels around a scan voxel share one label, every convex combination of
their probabilities has its largest value at that label too, so linear interpolation can change a
label only next to a label change. Those voxels (the network voxels whose 3^3 neighbourhood holds
two labels, carried onto the scan's grid by nearest neighbour: a superset) are interpolated; the
rest take the nearest network voxel's label. Labels whose largest component is kept
(``keep_largest``) lose their other components on the network's grid first, where they become
certain background, so interpolation cannot bring them back.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .postprocess import keep_largest
from .preprocess import resample_label_like

CHUNK = 1 << 20  # scan voxels interpolated at a time (bounds the (C, N) temporaries)


def labels_on_grid(
    probs: np.ndarray,
    source: sitk.Image,
    grid: sitk.Image,
    largest: tuple[int, ...] = (),
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Label map ``(Z, Y, X)`` uint8 on ``grid`` from class probabilities ``probs`` ``(C, Z, Y, X)``
    on ``source``'s grid (same physical space); ``largest``: labels reduced to their largest
    component first; ``scale`` ``(C,)``: each class's probability is multiplied by it before the
    argmax (``exp`` of the manifest's logit offsets). ``probs`` is modified where components are
    removed."""
    labels = _net_image(_argmax(probs, scale), source)
    kept = sitk.GetArrayFromImage(keep_largest(labels, largest))
    removed = kept != sitk.GetArrayViewFromImage(labels)
    if removed.any():
        probs[:, removed] = 0.0
        probs[0, removed] = 1.0
    organ = (
        np.nonzero(kept.any(axis=(1, 2)))[0],
        np.nonzero(kept.any(axis=(0, 2)))[0],
        np.nonzero(kept.any(axis=(0, 1)))[0],
    )
    if any(len(o) == 0 for o in organ):  # no label but background
        return sitk.GetArrayFromImage(resample_label_like(_net_image(kept, source), grid))
    # A voxel whose neighbourhood holds two labels lies within one voxel of a foreground one: the
    # neighbourhoods are taken over the foreground's bounding box only, and the band looked for in
    # the part of the scan's grid that box covers (a planning CT is 15 times the network's voxels).
    box = tuple(slice(max(int(o[0]) - 2, 0), min(int(o[-1]) + 3, n)) for o, n in zip(organ, kept.shape))
    crop = sitk.GetImageFromArray(np.ascontiguousarray(kept[box]))
    mixed = np.zeros(kept.shape, np.uint8)
    mixed[box] = sitk.GetArrayFromImage(
        sitk.GrayscaleDilate(crop, [1, 1, 1], sitk.sitkBox) != sitk.GrayscaleErode(crop, [1, 1, 1], sitk.sitkBox)
    )  # the 3^3 neighbourhood holds two labels
    if probs.shape[0] <= 128:  # one nearest-neighbour pass: the label in 7 bits, the band in the top one
        out = sitk.GetArrayFromImage(resample_label_like(_net_image(kept | (mixed << 7), source), grid))
        scan_box = _covering(box, source, grid, out.shape)
        points = tuple(p + b.start for p, b in zip(np.nonzero(out[scan_box] >= 128), scan_box))
        out &= 127
    else:
        out = sitk.GetArrayFromImage(resample_label_like(_net_image(kept, source), grid))
        points = np.nonzero(sitk.GetArrayFromImage(resample_label_like(_net_image(mixed, source), grid)))
    for start in range(0, len(points[0]), CHUNK):
        chunk = tuple(p[start : start + CHUNK] for p in points)
        out[chunk] = _argmax(_interpolate(probs, _continuous_index(chunk, grid, source)), scale)
    return out


def _covering(
    box: tuple[slice, ...], source: sitk.Image, grid: sitk.Image, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """The block of ``grid``'s voxels (array order) that ``box`` of ``source``'s voxels covers, a voxel wider."""
    corners = np.array(np.meshgrid(*[(b.start - 1, b.stop) for b in box], indexing="ij")).reshape(3, -1)
    index = _continuous_index(tuple(corners), source, grid)
    return tuple(
        slice(max(int(np.floor(lo)) - 1, 0), min(int(np.ceil(hi)) + 2, n))
        for lo, hi, n in zip(index.min(1), index.max(1), shape)
    )


def _argmax(probs: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    if scale is not None:
        probs = probs * scale.reshape(-1, *([1] * (probs.ndim - 1)))
    return probs.argmax(0).astype(np.uint8)


def _net_image(array: np.ndarray, source: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(source)
    return img


def _continuous_index(index_zyx: tuple[np.ndarray, ...], grid: sitk.Image, source: sitk.Image) -> np.ndarray:
    """``(3, N)`` continuous ``(z, y, x)`` indices on ``source`` of the ``grid`` voxels ``index_zyx``."""

    def affine(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        matrix = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
        return matrix, np.asarray(img.GetOrigin())

    g, g0 = affine(grid)
    s, s0 = affine(source)
    xyz = np.stack(index_zyx[::-1]).astype(np.float64)
    physical = g @ xyz + g0[:, None]
    return (np.linalg.solve(s, physical - s0[:, None]))[::-1]


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
