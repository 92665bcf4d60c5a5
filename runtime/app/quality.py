"""The per-label Dice estimate of one scan, from the model's own output (no ground truth).

Features per label, from :class:`..kernels.quality.LabelEvidence` and the label map on the
network's grid:

- ``soft_dice``: the Dice the labels would score if the probabilities were the truth;
- ``soft_dice_near``: the same, ignoring probabilities under ``HAZE`` far from the label;
- ``volume_z``: how many training standard deviations the label's log volume lies from the
  training cases' mean (0 without the training volumes);
- ``fragmented``: the share of the label outside its largest connected component.

A calibrated bundle combines them linearly (fitted on validation cases at export,
:mod:`imunet.export.calibration`); an uncalibrated one reports the soft Dice. A label the scan's
map does not hold is estimated by how likely it is truly absent: the training cases' absence rate
where known, else the model's own probability that no voxel is the label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..contract.quality_model import LabelVolumes, QualityModel
from ..kernels.quality import LabelEvidence

Z_CAP = 5.0  # volume_z is capped: a volume 5 standard deviations out is as wrong as one 50 out


@dataclass(frozen=True)
class QualityEstimate:
    """Per label name: the Dice estimate in 0..1 and the features it came from; ``calibrated`` says
    whether the bundle's calibration was applied; ``empty`` maps each label the map does not hold to
    its probability mass (the voxels the model expected of it)."""

    dice_estimate: dict[str, float]
    features: dict[str, dict[str, float]] = field(default_factory=dict)
    calibrated: bool = False
    empty: dict[str, float] = field(default_factory=dict)

    @property
    def lowest(self) -> tuple[str, float] | None:
        """The label with the lowest estimate and that estimate (None without labels)."""
        if not self.dice_estimate:
            return None
        name = min(self.dice_estimate, key=self.dice_estimate.__getitem__)
        return name, self.dice_estimate[name]

    @property
    def mean(self) -> float | None:
        values = list(self.dice_estimate.values())
        return float(np.mean(values)) if values else None

    def as_dict(self) -> dict:
        """What ``--stats`` records: estimates rounded to 3 decimals, and whether they are calibrated."""
        low = self.lowest
        return {
            "dice_estimate": {k: round(v, 3) for k, v in self.dice_estimate.items()},
            "lowest": {"label": low[0], "dice_estimate": round(low[1], 3)} if low else None,
            "calibrated": self.calibrated,
            "predicted_empty": list(self.empty),
        }


def largest_share(labels: np.ndarray, value: int) -> float:
    """Share of the voxels labelled ``value`` in their largest 26-connected component (1 if none)."""
    mask = labels == value
    if not mask.any():
        return 1.0
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask[box].astype(np.uint8)), True)
    sizes = np.bincount(sitk.GetArrayViewFromImage(cc).ravel())[1:]
    return float(sizes.max() / sizes.sum())


def volume_z(ml: float, volumes: LabelVolumes | None) -> float:
    """Training standard deviations between ``ml``'s log and the training mean (capped; 0 unknown)."""
    if volumes is None or volumes.log_std <= 0 or ml <= 0:
        return 0.0
    return min(Z_CAP, abs(math.log(ml) - volumes.log_mean) / volumes.log_std)


def label_features(
    evidence: LabelEvidence,
    labels: np.ndarray,
    voxel_ml: float,
    names: dict[int, str],
    model: QualityModel | None,
    components: bool = False,
) -> dict[str, dict[str, float]]:
    """The features of every foreground label the map ``labels`` (network grid, voxels of ``voxel_ml``)
    holds, by name. ``fragmented`` (connected components: several times the cost of the rest) only
    with ``components``."""
    soft, near = evidence.soft_dice(), evidence.soft_dice(near=True)
    out = {}
    for k, name in names.items():
        if k == 0 or not evidence.voxels[k]:
            continue
        ml = float(evidence.voxels[k]) * voxel_ml
        out[name] = {
            "soft_dice": float(soft[k]),
            "soft_dice_near": float(near[k]),
            "volume_z": volume_z(ml, model.label_volumes.get(name) if model else None),
            "volume_ml": ml,
        }
        if components:
            out[name]["fragmented"] = 1.0 - largest_share(labels, k)
    return out


def absent_estimate(name: str, mass: float, model: QualityModel | None) -> float:
    """How likely a label the map does not hold is truly absent (its Dice then being 1, else 0)."""
    volumes = model.label_volumes.get(name) if model else None
    if volumes is not None and volumes.cases > 0:
        return volumes.absent_rate
    return math.exp(-mass)  # the model's own odds that no voxel is the label (independent voxels)


def estimate(
    evidence: LabelEvidence,
    labels: np.ndarray,
    voxel_ml: float,
    names: dict[int, str],
    model: QualityModel | None,
    every_feature: bool = False,
) -> QualityEstimate:
    """The per-label Dice estimate of one scan from its ``evidence`` and network-grid ``labels``; the
    features the calibration uses are computed, or with ``every_feature`` all (to calibrate)."""
    components = every_feature or (model is not None and "fragmented" in model.features)
    feats = label_features(evidence, labels, voxel_ml, names, model, components)
    calibrated = model is not None and model.calibrated
    dice: dict[str, float] = {}
    empty: dict[str, float] = {}
    for k, name in names.items():
        if k == 0:
            continue
        if name not in feats:
            empty[name] = float(evidence.mass_near[k])
            dice[name] = absent_estimate(name, empty[name], model)
            continue
        dice[name] = label_estimate(name, feats[name], model)
    return QualityEstimate(dice, feats, calibrated, empty)


def label_estimate(name: str, features: dict[str, float], model: QualityModel | None) -> float:
    """The Dice estimate of a label the map holds, from its ``features``: the calibration's linear
    combination clipped to 0..1, or the soft Dice without a calibration."""
    if model is None or not model.calibrated:
        return float(min(1.0, max(0.0, features["soft_dice"])))
    value = model.bias + model.label_bias.get(name, 0.0)
    value += sum(w * features[n] for n, w in zip(model.features, model.weights))
    return float(min(1.0, max(0.0, value)))
