"""A multi-frame DICOM file (enhanced CT or MR, or any other) checked to hold one evenly spaced 3D
stack, frame k at slice k of the image SimpleITK read from it.

SimpleITK (GDCM) reads every frame of such a file as one more slice, spaced as its first frames are.
A file that holds several volumes at the same positions (echoes, maps, time points: Philips stores
a field map's magnitude and phase in one file this way), cine frames in time, or frames out of
position order would give an image whose geometry is wrong, without an error. The positions and
orientations of the frames are in the per-frame and shared functional groups, which only a full
DICOM parser reads; pydicom (the ``dicom`` extra) reads them from the header, no pixel data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

POSITION_TOLERANCE = 0.1  # of the slice spacing: how far a frame may lie from where the image puts it


def frame_planes(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each frame's Image Position (Patient), Image Orientation (Patient) and Pixel Spacing (zeros
    where absent), shapes (frames, 3), (frames, 6) and (frames, 2), from the functional groups; None
    where a frame has no position or orientation, per frame or shared."""
    import pydicom

    ds = pydicom.dcmread(str(file), stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        return None
    positions, orientations, spacings = [], [], []
    for item in per_frame:
        position = group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = group_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
            return None
        positions.append([float(v) for v in position])
        orientations.append([float(v) for v in orientation])
        spacings.append([float(v) for v in spacing] if spacing is not None and len(spacing) == 2 else [0.0, 0.0])
    return np.array(positions), np.array(orientations), np.array(spacings)


def group_value(item: object, shared: object, sequence: str, keyword: str) -> object:
    """``keyword`` of a frame's functional group ``sequence``, or of the shared one; None in neither."""
    for group in (item, shared):
        if group is not None and sequence in group and len(getattr(group, sequence)) > 0:
            value = getattr(group, sequence)[0].get(keyword)
            if value is not None:
                return value
    return None


def check_multiframe(name: str, file: Path, image: sitk.Image) -> None:
    """:class:`InputError` unless the frames of ``file`` are one 3D stack lying exactly where ``image``
    (read from it) puts its slices."""
    frames = image.GetSize()[2]
    try:
        planes = frame_planes(file)
    except ImportError:
        raise InputError(
            f"{name}: a multi-frame DICOM file ({frames} frames); checking where its frames lie needs the dicom "
            "extra (pip install 'imunet[dicom]'), or convert it first (dcm2niix) and give the NIfTI"
        ) from None
    if planes is None:
        raise InputError(
            f"{name}: a multi-frame DICOM file whose {frames} frames carry no plane positions (cine or time "
            "frames, not slices of one volume): imunet segments 3D volumes"
        )
    positions, orientations, spacings = planes
    if np.ptp(orientations, axis=0).max() > 1e-3:
        raise InputError(f"{name}: the {frames} frames of this multi-frame file lie in different orientations")
    if np.ptp(spacings, axis=0).max() > 1e-4:
        raise InputError(f"{name}: the {frames} frames of this multi-frame file have different pixel spacings")
    repeats = Counter(tuple(np.round(p, 2)) for p in positions)
    if len(repeats) < frames:
        volumes = max(repeats.values())
        raise InputError(
            f"{name}: its {frames} frames hold {volumes} volumes at the same {len(repeats)} positions (echoes, "
            "maps or time points in one file): split them first (dcm2niix) and give the volume to segment"
        )
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    expected = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(frames)])
    worst = float(np.linalg.norm(positions - expected, axis=1).max())
    turned = not np.allclose(direction[:, :2].T.ravel(), orientations[0], atol=1e-3)
    if turned or worst > POSITION_TOLERANCE * image.GetSpacing()[2]:
        raise InputError(
            f"{name}: the frames of this multi-frame file are not one evenly spaced stack in stored order (a "
            f"frame lies {worst:.3g} mm from its slice): convert it first (dcm2niix) and give the NIfTI"
        )
