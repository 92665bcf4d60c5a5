"""Segmentation metrics on label maps: Dice and the 95th-percentile Hausdorff distance."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of ``label`` between two label maps; 1.0 when both lack it."""
    p, r = pred == label, ref == label
    denom = int(p.sum()) + int(r.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice of every label in ``labels``."""
    return {lab: dice(pred, ref, lab) for lab in labels}


def hd95(pred: np.ndarray, ref: np.ndarray, label: int, spacing_zyx: tuple[float, float, float]) -> float:
    """95th percentile of the symmetric surface distance (mm) of ``label``.

    ``nan`` when either map lacks the label (undefined), 0 when both lack it.
    """
    import SimpleITK as sitk

    p, r = pred == label, ref == label
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return float("nan")

    def surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        img_b = sitk.GetImageFromArray(b.astype(np.uint8))
        img_b.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
        dist = sitk.GetArrayFromImage(
            sitk.Abs(
                sitk.SignedMaurerDistanceMap(img_b, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
            )
        )
        img_a = sitk.GetImageFromArray(a.astype(np.uint8))
        contour = sitk.GetArrayFromImage(sitk.BinaryContour(img_a, fullyConnected=True)).astype(bool)
        return dist[contour]

    d = np.concatenate([surface_distances(p, r), surface_distances(r, p)])
    return float(np.percentile(d, 95))
