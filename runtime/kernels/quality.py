"""What the class probabilities say about each label's own reliability, summed while they are still in
memory (before the label map is written and they are freed). Pure numpy.

For each class ``c`` with hard labels ``H_c`` (the final label map) and unsmoothed probabilities
``P_c``: the predicted voxels ``|H_c|``, the probability on them ``sum(P_c over H_c)`` (the soft true
positives) and the probability mass everywhere ``sum(P_c)``; also the mass of the voxels where
``P_c >= HAZE`` so the faint haze far from any organ can be told apart. The soft Dice
``2 tp / (|H_c| + mass)`` is the Dice the labels would score if the probabilities were the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HAZE = 0.05  # probabilities below this count in ``mass`` but not in ``mass_near``


@dataclass(frozen=True)
class LabelEvidence:
    """Per class (index 0 is background), float64 arrays of length C: ``voxels`` predicted,
    ``tp`` the probability summed over them, ``mass`` summed over the volume, ``mass_near`` summed
    where it is at least ``HAZE``."""

    voxels: np.ndarray
    tp: np.ndarray
    mass: np.ndarray
    mass_near: np.ndarray

    def soft_dice(self, near: bool = False) -> np.ndarray:
        """``2 tp / (voxels + mass)`` per class; 1 where both are zero (nothing predicted, no mass)."""
        mass = self.mass_near if near else self.mass
        den = self.voxels + mass
        return np.where(den > 0, 2 * self.tp / np.maximum(den, 1e-12), 1.0)


def label_evidence(
    acc: np.ndarray, weights: np.ndarray | None, crop: tuple[slice, ...], labels: np.ndarray
) -> LabelEvidence:
    """Sums of the class maps ``acc`` ``(C, Z, Y, X)`` (divided by ``weights`` where given) over the
    ``crop`` whose labels ``(Z, Y, X)`` were chosen from them. ``acc`` is not changed."""
    n = acc.shape[0]
    voxels = np.bincount(labels.ravel(), minlength=n)[:n].astype(np.float64)
    tp, mass, near = (np.zeros(n) for _ in range(3))
    w = weights[crop] if weights is not None else None
    for c in range(1, n):
        p = acc[c][crop]
        if w is not None:
            p = p / w
        mass[c] = float(p.sum(dtype=np.float64))
        near[c] = float(p[p >= HAZE].sum(dtype=np.float64))
        if voxels[c]:
            tp[c] = float(p[labels == c].sum(dtype=np.float64))
    return LabelEvidence(voxels, tp, mass, near)
