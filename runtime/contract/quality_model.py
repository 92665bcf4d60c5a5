"""The quality model a bundle carries (manifest ``quality``): what its training labels' volumes were
and how its per-label Dice estimate was calibrated. Pure data; the estimate itself is computed in
:mod:`..app.quality`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# the features a calibration may combine, in the order :mod:`..app.quality` computes them
FEATURES = ("soft_dice", "soft_dice_near", "volume_z", "fragmented")


@dataclass(frozen=True)
class LabelVolumes:
    """One label's volume over the training cases that contoured it: how many did, in how many it was
    absent, and the mean and standard deviation of the natural log of its volume in ml where present."""

    cases: int
    absent: int
    log_mean: float
    log_std: float

    def __post_init__(self) -> None:
        if self.cases < 0 or not 0 <= self.absent <= self.cases:
            raise ValueError(f"label volumes: 0 <= absent ({self.absent}) <= cases ({self.cases})")
        if not (math.isfinite(self.log_mean) and math.isfinite(self.log_std) and self.log_std >= 0):
            raise ValueError("label volumes: log_mean and log_std must be finite, log_std >= 0")

    @property
    def absent_rate(self) -> float:
        """How often the label is absent, with one pseudo-case each way (never exactly 0 or 1)."""
        return (self.absent + 1) / (self.cases + 2)


@dataclass(frozen=True)
class QualityModel:
    """``estimate = clip(bias + label_bias[label] + sum(weights[i] * feature_i), 0, 1)`` for a label
    the scan's label map holds; for a label it does not, the rate at which training cases lacked it.

    ``calibration`` says on what it was fitted (cases, model, date) and what a leave-one-scan-out
    check of the fit measured; a model with no ``features`` is uncalibrated (the soft Dice itself)."""

    label_volumes: dict[str, LabelVolumes] = field(default_factory=dict)
    features: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    bias: float = 0.0
    label_bias: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"quality features {unknown} unknown (known: {', '.join(FEATURES)})")
        if len(self.weights) != len(self.features):
            raise ValueError(f"quality: {len(self.features)} features but {len(self.weights)} weights")
        if not all(math.isfinite(w) for w in (*self.weights, self.bias, *self.label_bias.values())):
            raise ValueError("quality: weights and biases must be finite")

    @property
    def calibrated(self) -> bool:
        return bool(self.features)
