"""Owner boxes for adaptive mode: a partition of the volume, each box decoded by one window. Pure numpy.

The (padded) volume is cut into boxes aligned to the global stride lattice, as many per axis as the
blended modes have windows; each box is decoded with the features of the window centred on it.
Windows still overlap for the encoder's context, but every voxel is decoded in one window only.
The context a face gets (half of patch minus box) decides the accuracy next to it.
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


def box_limit(patch: int, stride: int) -> int:
    """Largest box edge for ``patch``: a multiple of ``stride`` of at most ``patch - 2``, so the lattice
    face after a box still lies inside the box's window."""
    limit = (patch - 2) // stride * stride
    if limit < stride:
        raise ValueError(f"patch {patch} is too small for adaptive decoding at stride {stride}")
    return limit


def box_faces(length: int, patch: int, overlap: float, stride: int) -> list[int]:
    """Starts of the owner boxes after the first along one axis (multiples of ``stride``).

    As many boxes as the blended modes have windows, each face on the stride multiple nearest an even
    split, so sizes differ by at most one stride and most faces get the context the blended windows
    give their midpoints; more boxes where a box would exceed :func:`box_limit`."""
    limit = box_limit(patch, stride)
    n = len(window_starts(length, patch, overlap))
    while True:
        faces = sorted({int(round(k * length / n / stride)) * stride for k in range(1, n)} - {0})
        faces = [f for f in faces if f < length]
        if np.diff([0, *faces, length]).max() <= limit:
            return faces
        n += 1


def axis_layout(length: int, patch: int, faces: list[int]) -> list[tuple[int, int, int]]:
    """``(box start, box size, window start)`` along one axis for boxes starting at ``0`` and at each
    of ``faces``; each window is centred on its box (shifted to stay inside the volume); boxes
    sharing a window are merged."""
    out: list[tuple[int, int, int]] = []
    for a, b in zip([0, *faces], [*faces, length]):
        size = b - a
        w = int(np.clip(a - (patch - size) // 2, 0, length - patch))
        if out and out[-1][2] == w:
            a0, s0, _ = out[-1]
            out[-1] = (a0, s0 + size, w)
        else:
            out.append((a, size, w))
    return out


def owner_boxes(
    shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float, stride: int
) -> list[OwnerBox]:
    """Partition of a volume of ``shape`` (padded to at least ``patch``) into owner boxes in z, y, x
    order, each decoded by the window centred on it (shifted to stay inside the volume)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    axes = []
    for length, p in zip(shape, patch):
        if length < p:
            raise ValueError(f"volume axis {length} is shorter than the patch {p}; pad first")
        axes.append(axis_layout(length, p, box_faces(length, p, overlap, stride)))
    return [
        OwnerBox((z[0], y[0], x[0]), (z[1], y[1], x[1]), (z[2], y[2], x[2]))
        for z in axes[0]
        for y in axes[1]
        for x in axes[2]
    ]
