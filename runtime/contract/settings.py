"""Inference settings: the options a user or a bundle chooses, and nothing else.

The manifest reader and the exporter use this module without importing any inference loop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

MODES = ("adaptive", "sparse", "dense")


@dataclass(frozen=True)
class InferenceSettings:
    """How a volume is segmented; a bundle's manifest holds its defaults.

    ``mode``: ``adaptive`` (each voxel decoded once, coarse to fine, in owner boxes), ``sparse`` (the
    paper's loop: broad mesh, nearest fill, a band decoded around the boundary, windows blended) or
    ``dense`` (every voxel of every window decoded and blended). ``overlap``: fraction of a window
    shared with its neighbour in [0, 1); in adaptive mode it sets the number of owner boxes.
    ``stride``: spacing of the broad mesh in voxels (a power of two in adaptive mode). ``band``:
    half-width in voxels of the band decoded around the broad boundary (sparse mode). ``sigma_scale``:
    the Gaussian importance map's sigma as a fraction of the patch. ``smoothing``: odd kernel of the
    box average applied to the class probabilities before the argmax (1: none). ``tta``: also
    segment the scan mirrored along each axis and average the class probabilities.
    ``blend_above`` and ``blend_margin`` (adaptive mode's second pass): voxels where no label's
    first-pass probability exceeds ``1 - blend_above``, grown by ``blend_margin`` voxels (and the
    smoothing's reach), are decoded again in every window that covers them and blended as dense mode
    blends them, so their labels are dense mode's (``blend_above`` 1: no second pass; a bundle's
    manifest sets it where measurement chose it). ``refine_below`` (adaptive mode): a decoded
    lattice point whose largest probability is under it counts as uncertain, and the cells it
    bounds are refined as if their corners' labels differed, so a structure thinner than the stride
    that its neighbourhood only hints at is decoded rather than interpolated away (0: only differing
    labels refine). ``logit_offsets``: one number per class added to the log of each class's
    smoothed probability where the label is chosen (the argmax on the network's grid and, for a
    scan stored at another spacing, on the scan's grid), so a class whose probabilities the
    training's class-balanced sampling left off its best threshold is moved to it; fitted on
    validation cases (``imunet-export calibrate --logit-offsets``; empty: none). The probabilities
    themselves (``--save-probabilities``) are the model's.
    """

    mode: str = "adaptive"
    overlap: float = 0.3
    stride: int = 4
    band: int = 2
    sigma_scale: float = 0.125
    smoothing: int = 3
    tta: bool = False
    blend_above: float = 1.0
    blend_margin: int = 2
    refine_below: float = 0.0
    logit_offsets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.mode == "adaptive" and self.stride & (self.stride - 1):
            raise ValueError(f"adaptive mode needs a power-of-two stride, got {self.stride}")
        if self.band < 0:
            raise ValueError(f"band must be >= 0, got {self.band}")
        if not self.sigma_scale > 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale}")
        if not 0 <= self.blend_above <= 1:
            raise ValueError(f"blend_above must be in [0, 1], got {self.blend_above}")
        if self.blend_margin < 0:
            raise ValueError(f"blend_margin must be >= 0, got {self.blend_margin}")
        if not 0 <= self.refine_below < 1:
            raise ValueError(f"refine_below must be in [0, 1), got {self.refine_below}")
        if not all(math.isfinite(v) for v in self.logit_offsets):
            raise ValueError(f"logit_offsets must be finite numbers, got {self.logit_offsets}")
        if self.smoothing < 1 or self.smoothing % 2 == 0:
            raise ValueError(f"smoothing must be an odd kernel >= 1, got {self.smoothing}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the offsets as a list)."""
        return {**asdict(self), "logit_offsets": list(self.logit_offsets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceSettings:
        """Settings from a manifest's ``inference`` mapping; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ValueError(f"unknown inference settings: {', '.join(unknown)}")
        if "logit_offsets" in data:
            data = {**data, "logit_offsets": tuple(float(v) for v in data["logit_offsets"])}
        return cls(**data)
