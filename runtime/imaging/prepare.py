"""One preprocessing, and its inverse, for training and inference alike.

:class:`Preprocessing` is what a model expects of its input (spacing, normalisation, orientation)
and what its training data looked like (the fingerprint): computed once from the training data,
stored with the run, copied into the bundle's manifest. :func:`prepare` takes a scan to the
network's input; :func:`prepare_label` takes its reference labels along (training);
:func:`restore` takes a label map on the network's grid back to the scan's own grid (inference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .domain import Fingerprint
from .label_resampling import SmoothedProbabilities, labels_on_grid
from .orientation import orientation_code, reorient
from .postprocess import keep_largest
from .preprocess import Normalization, normalize, resample_label_like, resample_to_spacing


@dataclass(frozen=True)
class Preprocessing:
    """``spacing``: the network's grid, SimpleITK ``(x, y, z)`` mm; ``normalization``: how
    intensities become inputs; ``orientation``: the axis order and directions every scan is turned
    to first (None: none); ``fingerprint``: the training data's ranges (None: no domain checks)."""

    spacing: tuple[float, float, float]
    normalization: Normalization
    orientation: str | None = None
    fingerprint: Fingerprint | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spacing": list(self.spacing), "normalization": self.normalization.to_dict()}
        if self.orientation:
            out["orientation"] = self.orientation
        if self.fingerprint:
            out["fingerprint"] = asdict(self.fingerprint)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        fp = data.get("fingerprint")
        return cls(
            tuple(data["spacing"]),  # type: ignore[arg-type]
            Normalization.from_dict(data["normalization"]),
            data.get("orientation"),
            Fingerprint(**{k: tuple(v) if isinstance(v, list) else v for k, v in fp.items()}) if fp else None,
        )


@dataclass(frozen=True)
class Prepared:
    """A scan on its way in: ``oriented`` (the scan turned to the training orientation, on its own
    voxels), ``resampled`` (on the network's grid) and ``volume`` (normalised ``(Z, Y, X)`` float32)."""

    oriented: sitk.Image
    resampled: sitk.Image
    volume: np.ndarray


def orient(image: sitk.Image, p: Preprocessing) -> sitk.Image:
    """``image`` turned to the training orientation (the same voxels, permuted and flipped)."""
    return reorient(image, p.orientation) if p.orientation else image


def prepare(image: sitk.Image, p: Preprocessing, oriented: sitk.Image | None = None) -> Prepared:
    """Reorient, resample to the network's spacing, normalise. ``oriented``: :func:`orient`'s result
    when the caller already has it."""
    oriented = orient(image, p) if oriented is None else oriented
    resampled = resample_to_spacing(oriented, p.spacing)
    return Prepared(oriented, resampled, normalize(sitk.GetArrayViewFromImage(resampled), p.normalization))


def prepare_label(label: sitk.Image, p: Preprocessing) -> np.ndarray:
    """A reference label map taken along as :func:`prepare` takes its scan (nearest neighbour), uint8."""
    resampled = resample_to_spacing(sitk.Cast(orient(label, p), sitk.sitkUInt8), p.spacing, is_label=True)
    return sitk.GetArrayFromImage(resampled).astype(np.uint8, copy=False)


def restore(
    labels: sitk.Image,
    prepared: Prepared,
    image: sitk.Image,
    largest: tuple[int, ...] = (),
    probabilities: np.ndarray | SmoothedProbabilities | None = None,
    scale: np.ndarray | None = None,
) -> sitk.Image:
    """The inverse of :func:`prepare` for a label map on the network's grid: ``largest`` labels
    reduced to their largest component there, back onto the reoriented scan's voxels, back to the
    scan's own orientation, with its exact geometry. uint8. Where the scan's spacing is not the
    network's, the network grid's class ``probabilities`` ``(C, Z, Y, X)``, or a function giving
    them over a box (smoothed, as the labels were taken from them), are interpolated linearly near
    the organs' boundaries and their argmax taken, each class's probability times ``scale`` (the
    manifest's logit offsets' ``exp``; :func:`.label_resampling.labels_on_grid`); without them,
    labels go back by nearest neighbour.

    Components are found on the network's grid, where validation decided which labels keep only
    their largest: nearest-neighbour upsampling keeps every component as it is, and a planning CT's
    grid has about 15 times the voxels (13 s with five organs' components found on that grid).
    ``labels`` are the argmax of ``probabilities`` (times ``scale``) where both are given."""
    if probabilities is not None and prepared.resampled is not prepared.oriented:
        grid = prepared.oriented
        chosen = sitk.GetArrayFromImage(labels)  # the probabilities' argmax, as labels_on_grid would take it
        out = sitk.GetImageFromArray(labels_on_grid(probabilities, prepared.resampled, grid, largest, scale, chosen))
        out.CopyInformation(prepared.oriented)
    else:
        out = keep_largest(sitk.Cast(labels, sitk.sitkUInt8), largest)
        out = out if prepared.resampled is prepared.oriented else resample_label_like(out, prepared.oriented)
    if prepared.oriented is not image:
        out = reorient(out, orientation_code(image))
    out.CopyInformation(image)
    return out
