"""Owner boxes for adaptive mode: a partition of the volume, one box per blended window. Pure numpy.

The (padded) volume is cut into boxes, one per window of the blended modes (the same windows, so
their encoder features serve both adaptive mode's passes), each box the voxels nearest its
window's centre, faces on the global stride lattice where the windows allow. Each box is decoded
coarse to fine with its window's features (:mod:`.lattice`); the context a face gets (half of the
patch minus the box) decides the accuracy next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .windows import window_starts


@dataclass(frozen=True)
class OwnerBox:
    """A box ``[start, start + size)`` of the volume, ``(z, y, x)`` voxels, and the start of the window
    that decodes it."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    window: tuple[int, int, int]


def axis_layout(length: int, patch: int, overlap: float, stride: int) -> list[tuple[int, int, int]]:
    """``(box start, box size, window start)`` along one axis: one box per blended window
    (:func:`.windows.window_starts`), each face halfway between the two windows' centres, on the
    nearest stride multiple where that keeps the box and its far lattice face inside its window and
    the next box inside the next window (else the voxel halfway; where windows only abut, the box
    ends with its window and its far lattice face is clamped to the window)."""
    starts = window_starts(length, patch, overlap)
    faces: list[int] = []
    for a, b in zip(starts, starts[1:]):
        mid = (a + b + patch) / 2  # halfway between the two windows' centres
        low, high = max(b, faces[-1] + 1 if faces else 1), a + patch - 1
        face = int(round(mid / stride)) * stride
        if not low <= face <= high:
            high = max(high, a + patch)  # windows that only abut: the far lattice face is clamped
            face = int(np.clip(int(mid), low, high))
        if not low <= face <= high:
            raise ValueError(f"overlap {overlap} leaves no owner box per window on an axis of {length}")
        faces.append(face)
    bounds = [0, *faces, length]
    return [(lo, hi - lo, w) for lo, hi, w in zip(bounds, bounds[1:], starts)]


def owner_boxes(
    shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float, stride: int
) -> list[OwnerBox]:
    """Partition of a volume of ``shape`` (padded to at least ``patch``) into owner boxes, one per
    blended window (:func:`.windows.window_slices`, in its z, y, x order), each decoded by that
    window."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    for length, p in zip(shape, patch):
        if length < p:
            raise ValueError(f"volume axis {length} is shorter than the patch {p}; pad first")
        if p < 2 * stride:
            raise ValueError(f"patch {p} is too small for adaptive decoding at stride {stride}")
    axes = [axis_layout(length, p, overlap, stride) for length, p in zip(shape, patch)]
    return [
        OwnerBox((z[0], y[0], x[0]), (z[1], y[1], x[1]), (z[2], y[2], x[2]))
        for z in axes[0]
        for y in axes[1]
        for x in axes[2]
    ]
