"""Axis order and directions of a scan, as SimpleITK's three-letter orientation codes (``RAS``,
``LPS``, ``PIL``, ...; the convention of ``sitk.DICOMOrient``).

A model sees arrays, not patients: a scan stored in another axis order (a sagittal acquisition
given to an axial model) must be permuted back to the order the model was trained in. Flips and
permutations are exact (no interpolation); oblique directions keep their obliqueness and are
taken to the nearest code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import SimpleITK as sitk

from ..errors import InputError


def orientation_code(image: sitk.Image) -> str:
    """The three-letter code nearest to ``image``'s direction matrix."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def check_code(code: str) -> str:
    """``code`` if it names one of R/L, A/P and S/I per axis, each once; else ``ValueError``."""
    pairs = [{"R", "L"}, {"A", "P"}, {"S", "I"}]
    used = [next((i for i, p in enumerate(pairs) if c in p), None) for c in code.upper()]
    if len(code) != 3 or None in used or sorted(used) != [0, 1, 2]:  # type: ignore[type-var]
        raise ValueError(f"not an orientation code: {code!r} (expected e.g. RAS, LPS, PIL)")
    return code.upper()


def reorient(image: sitk.Image, code: str) -> sitk.Image:
    """``image`` with its axes permuted and flipped to ``code`` (no interpolation; the physical
    position of every voxel is kept). Returns ``image`` itself when it already has that code."""
    if orientation_code(image) == code:
        return image
    try:
        return sitk.DICOMOrient(image, code)
    except RuntimeError as exc:
        raise InputError(f"cannot reorient the scan to {code}: {exc}") from None


def dominant_orientation(codes: Iterable[str]) -> str:
    """The most frequent code (ties: the first seen)."""
    counts = Counter(codes)
    if not counts:
        raise ValueError("no orientations to choose from")
    return counts.most_common(1)[0][0]
