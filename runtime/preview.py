"""A PNG for a person: the segmentation over three orthogonal slices through the largest label."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output

PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
    ],
    dtype=np.float32,
)


def _slice_rgb(img: np.ndarray, lab: np.ndarray, aspect: float) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colour = PALETTE[lab % len(PALETTE)]
    mask = (lab > 0)[..., None]
    rgb = np.where(mask, 0.55 * rgb + 0.45 * colour, rgb)
    rows = max(1, int(round(rgb.shape[0] * aspect)))
    idx = np.minimum((np.arange(rows) / aspect).astype(int), rgb.shape[0] - 1)
    return rgb[idx]


def write_preview(image: sitk.Image, label: sitk.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Axial, coronal and sagittal slices through the centroid of the largest label, side by side."""
    img = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(label).astype(np.int64)
    sx, sy, sz = image.GetSpacing()
    counts = np.bincount(lab.ravel())
    if len(counts) > 1 and counts[1:].any():
        biggest = int(np.argmax(counts[1:]) + 1)
        z, y, x = (int(round(c)) for c in np.argwhere(lab == biggest).mean(0))
    else:
        z, y, x = (s // 2 for s in lab.shape)
    views = [
        _slice_rgb(img[z], lab[z], sy / sx),
        _slice_rgb(img[::-1, y, :], lab[::-1, y, :], sz / sx),
        _slice_rgb(img[::-1, :, x], lab[::-1, :, x], sz / sy),
    ]
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, 4), (0, 0))) for v in views]
    canvas = np.concatenate(padded, axis=1).astype(np.uint8)
    zoom = max(1, 256 // canvas.shape[0])  # small scans: enlarge so a person can see them
    canvas = np.repeat(np.repeat(canvas, zoom, axis=0), zoom, axis=1)
    with atomic_output(path, overwrite) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(tmp))
    return Path(path)
