"""What a model was made for (its training data's fingerprint), and how a scan compares with it.

The fingerprint is computed at training time from the training cases and travels in the manifest:
modality, the ranges of spacing and physical extent, and intensity percentiles as the model's
normalisation sees them (raw values for CT, whose normalisation is dataset-wide; z-scored values
otherwise). The runtime refuses a DICOM scan of another modality and flags a scan whose extent or
intensities lie far outside the training range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .preprocess import Normalization, normalize

PERCENTILES = (1.0, 50.0, 99.0)
EXTENT_FACTOR = 2.0  # an extent more than 2x the largest, or under half the smallest, seen in training

#: DICOM Modality (0008,0060) values for the names datasets use in ``channel_names``.
DICOM_MODALITY = {"MRI": "MR", "MR": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "ADC": "MR", "CT": "CT",
                  "PET": "PT", "PT": "PT", "US": "US", "XA": "XA", "NM": "NM"}  # fmt: skip


def dicom_modality(name: str) -> str | None:
    """The DICOM modality code a dataset's modality name stands for, or None when it names none."""
    return DICOM_MODALITY.get(name.strip().upper())


@dataclass(frozen=True)
class Fingerprint:
    """Ranges over the training cases. Spacing and extents in mm, SimpleITK's ``(x, y, z)`` order
    after reorientation to the training orientation; intensities at :data:`PERCENTILES`."""

    modality: str
    cases: int
    spacing_min: tuple[float, float, float]
    spacing_max: tuple[float, float, float]
    extent_min: tuple[float, float, float]
    extent_median: tuple[float, float, float]
    extent_max: tuple[float, float, float]
    intensity_space: str  # "raw" (CT) or "zscore"
    intensity_min: tuple[float, float, float]
    intensity_max: tuple[float, float, float]

    def describe(self, dataset: str = "") -> str:
        """One line for the run's header, e.g. ``Hippocampus MRI, about 35 x 50 x 36 mm``."""
        size = " x ".join(f"{e:.0f}" for e in self.extent_median)
        return f"{dataset + ' ' if dataset else ''}{self.modality}, about {size} mm".strip()


@dataclass(frozen=True)
class ScanSummary:
    """One scan's spacing, extent and intensity percentiles, as a fingerprint counts them."""

    spacing: tuple[float, float, float]
    extent: tuple[float, float, float]
    intensity: tuple[float, float, float]


def summarise(image: sitk.Image, norm: Normalization, sample: int = 200_000) -> ScanSummary:
    """The :class:`ScanSummary` of a scan already in the training orientation."""
    spacing = tuple(float(s) for s in image.GetSpacing())
    extent = tuple(float(n * s) for n, s in zip(image.GetSize(), spacing))
    arr = sitk.GetArrayViewFromImage(image)
    values = arr.ravel()
    if values.size > sample:  # percentiles of an even subsample: the same to the precision that matters
        values = values[:: values.size // sample]
    values = np.asarray(values, dtype=np.float32)
    if norm.scheme != "ct":
        values = normalize(values, norm)
    return ScanSummary(spacing, extent, tuple(float(p) for p in np.percentile(values, PERCENTILES)))  # type: ignore[arg-type]


def fingerprint(modality: str, scans: list[ScanSummary], norm: Normalization) -> Fingerprint:
    """The fingerprint of a training set from its cases' summaries."""
    sp = np.array([s.spacing for s in scans])
    ex = np.array([s.extent for s in scans])
    it = np.array([s.intensity for s in scans])

    def t(a: np.ndarray) -> tuple[float, float, float]:
        return tuple(round(float(v), 4) for v in a)  # type: ignore[return-value]

    space = "raw" if norm.scheme == "ct" else "zscore"
    return Fingerprint(
        modality, len(scans), t(sp.min(0)), t(sp.max(0)), t(ex.min(0)), t(np.median(ex, 0)), t(ex.max(0)), space,
        t(it.min(0)), t(it.max(0)),
    )  # fmt: skip


def domain_warnings(fp: Fingerprint, scan: ScanSummary) -> list[str]:
    """One line per way ``scan`` lies far outside the training data: an extent more than
    :data:`EXTENT_FACTOR` times the largest (or under the smallest divided by it) along an axis, or
    an intensity percentile outside the training range widened by that range's width on each side."""
    out = []
    too_big = [a for a, e, m in zip("xyz", scan.extent, fp.extent_max) if e > EXTENT_FACTOR * m]
    too_small = [a for a, e, m in zip("xyz", scan.extent, fp.extent_min) if e < m / EXTENT_FACTOR]
    if too_big or too_small:
        got = " x ".join(f"{e:.0f}" for e in scan.extent)
        lo = " x ".join(f"{e:.0f}" for e in fp.extent_min)
        hi = " x ".join(f"{e:.0f}" for e in fp.extent_max)
        out.append(f"field of view {got} mm is far outside the model's training range ({lo} to {hi} mm)")
    for p, v, lo, hi in zip(PERCENTILES, scan.intensity, fp.intensity_min, fp.intensity_max):
        width = max(hi - lo, 1e-6)
        if not lo - width <= v <= hi + width:
            space = "HU" if fp.intensity_space == "raw" else "after z-scoring"
            out.append(
                f"intensity percentile {p:g} is {v:.3g} {space}, far outside the training range {lo:.3g} to {hi:.3g}"
            )
            break
    return out
