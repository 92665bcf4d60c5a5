"""Post-processing decided on validation data (nnU-Net's rule): for the labels where it helped,
keep only the largest connected component of that label."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def keep_largest(label: sitk.Image, labels: tuple[int, ...]) -> sitk.Image:
    """``label`` with every component of each of ``labels`` but its largest set to background
    (26-connectivity: components touching at a corner are one)."""
    if not labels:
        return label
    arr = sitk.GetArrayFromImage(label)
    for k in labels:
        mask = sitk.GetImageFromArray((arr == k).astype(np.uint8))
        cc = sitk.GetArrayViewFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask, True)))
        arr[(arr == k) & (cc != 1)] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    return out


def decide(cases: list[tuple[np.ndarray, np.ndarray]], labels: list[int]) -> tuple[list[int], dict[str, dict]]:
    """Labels for which keeping the largest component raises the mean Dice over ``cases``
    (``(prediction, reference)`` arrays), and the Dice with and without it per label."""
    from .metrics import dice

    chosen, figures = [], {}
    for k in labels:
        before = [dice(p, r, k) for p, r in cases]
        after = [dice(sitk.GetArrayFromImage(keep_largest(sitk.GetImageFromArray(p), (k,))), r, k) for p, r in cases]
        figures[str(k)] = {"dice": float(np.mean(before)), "dice_largest_component": float(np.mean(after))}
        if np.mean(after) > np.mean(before):
            chosen.append(k)
    return chosen, figures
