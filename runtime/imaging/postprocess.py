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
        # A copy, not a view: a view does not keep the temporary image alive, and reading it after the
        # image is freed crashed the process on a 622 x 622 x 128 planning CT.
        cc = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask, True)))
        arr[(arr == k) & (cc != 1)] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    return out


def decide(cases: list[tuple], labels: list[int]) -> tuple[list[int], dict[str, dict]]:
    """Labels for which keeping the largest component raises the mean Dice over ``cases``
    (``(prediction, reference)`` arrays, or ``(prediction, reference, scored labels)`` for partially
    annotated references: a label counts only on the cases that annotated it), and the Dice with and
    without it per label."""
    from .metrics import dice

    chosen, figures = [], {}
    for k in labels:
        mine = [(c[0], c[1]) for c in cases if len(c) < 3 or k in c[2]]
        if not mine:
            continue
        before = [dice(p, r, k) for p, r in mine]
        after = [dice(sitk.GetArrayFromImage(keep_largest(sitk.GetImageFromArray(p), (k,))), r, k) for p, r in mine]
        figures[str(k)] = {"dice": float(np.mean(before)), "dice_largest_component": float(np.mean(after))}
        if np.mean(after) > np.mean(before):
            chosen.append(k)
    return chosen, figures
