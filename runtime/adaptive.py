"""Decode-once, coarse-to-fine inference for implicit bundles (the ``adaptive`` mode). Pure numpy.

The paper's loop decodes every window on its own and blends: with overlap 0.3 each voxel is decoded
in two to three windows, and a band of fixed width is decoded even where the broad mesh is certain.
Here instead:

* **Owner boxes.** The (padded) volume is partitioned into boxes aligned to the global stride-``s``
  lattice. Each box is decoded only with the features of the window centred on it, so windows still
  overlap for context but every voxel is decoded in one window; nothing is blended.
* **Coarse to fine.** Per box: decode the stride-``s`` lattice; a cell (its 8 lattice corners)
  whose corners share one label (and, optionally, are all confident) is filled with that label;
  the other cells are refined on the stride ``s/2`` lattice, and so on down to stride 1.
* **Constant windows** (padding, masked air) are decoded once per distinct value and box position
  and reused: the result is exactly what decoding them would give.

The result is one probability map per class with no blending weights; the caller smooths it and takes
the argmax exactly as for the blended modes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .mesh import dilate, grid_points
from .windows import window_starts

REFINE_RULES = ("cells", "elements")

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend
    from .inference import InferenceSettings, InferenceStats


@dataclass(frozen=True)
class OwnerBox:
    """A box ``[start, start + size)`` of the volume and the start of the window that decodes it."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    window: tuple[int, int, int]


def _axis_layout(length: int, patch: int, step: int) -> list[tuple[int, int, int]]:
    """``(box start, box size, window start)`` along one axis; boxes sharing a window are merged."""
    out: list[tuple[int, int, int]] = []
    margin = (patch - step) // 2
    for a in range(0, length, step):
        size = min(step, length - a)
        w = int(np.clip(a - margin, 0, length - patch))
        if out and out[-1][2] == w:
            a0, s0, _ = out[-1]
            out[-1] = (a0, s0 + size, w)
        else:
            out.append((a, size, w))
    return out


def box_step(length: int, patch: int, overlap: float, stride: int) -> int:
    """Edge of the owner boxes along one axis: as many boxes as the blended modes have windows
    (``window_starts``), each a multiple of ``stride`` (aligned to the global lattice) and at most
    ``patch - 2``, so the lattice face after a box still lies inside the box's window."""
    limit = (patch - 2) // stride * stride
    if limit < stride:
        raise ValueError(f"patch {patch} is too small for adaptive decoding at stride {stride}")
    n = len(window_starts(length, patch, overlap))
    while True:
        per_box = -(-length // n)  # ceil(length / n)
        step = -(-per_box // stride) * stride  # rounded up to the stride
        if step <= limit:
            return step
        n += 1


def owner_boxes(
    shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float, stride: int
) -> list[OwnerBox]:
    """Partition of a volume of ``shape`` (padded to >= ``patch``) into owner boxes, each decoded
    by the window centred on it (shifted to stay inside the volume)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    axes = []
    for length, p in zip(shape, patch):
        if length < p:
            raise ValueError(f"volume axis {length} is shorter than the patch {p}; pad first")
        axes.append(_axis_layout(length, p, box_step(length, p, overlap, stride)))
    return [
        OwnerBox((z[0], y[0], x[0]), (z[1], y[1], x[1]), (z[2], y[2], x[2]))
        for z in axes[0]
        for y in axes[1]
        for x in axes[2]
    ]


def upsample_linear(lattice: np.ndarray) -> np.ndarray:
    """``(K+1, K+1, K+1, C)`` lattice values to the ``(2K+1, ...)`` lattice of half the stride, by
    (separable) linear interpolation: even points keep their values, odd points average two."""
    out = lattice
    for axis in range(3):
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = 2 * n - 1
        up = np.empty(shape, dtype=np.float32)
        even = [slice(None)] * out.ndim
        odd = [slice(None)] * out.ndim
        lo = [slice(None)] * out.ndim
        hi = [slice(None)] * out.ndim
        even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        up[tuple(even)] = out
        up[tuple(odd)] = 0.5 * (out[tuple(lo)] + out[tuple(hi)])
        out = up
    return out


def _corners_disagree(lab: np.ndarray) -> np.ndarray:
    """Cells ``(K, K, K)`` of a lattice label array ``(K+1, ...)`` whose 8 corners are not all equal."""
    ref = lab[:-1, :-1, :-1]
    out = np.zeros(ref.shape, dtype=bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    out |= lab[dz : dz + ref.shape[0], dy : dy + ref.shape[1], dx : dx + ref.shape[2]] != ref
    return out


def _any_corner(mask: np.ndarray) -> np.ndarray:
    """Cells whose corner set contains a ``True`` point of the lattice mask ``(K+1, ...)``."""
    k = tuple(s - 1 for s in mask.shape)
    out = np.zeros(k, dtype=bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                out |= mask[dz : dz + k[0], dy : dy + k[1], dx : dx + k[2]]
    return out


def _closure_points(cells: np.ndarray) -> np.ndarray:
    """Points of the refined lattice ``(2K+1, ...)`` on or inside the selected cells ``(K, ...)``."""
    rep = cells
    for axis in range(3):
        rep = np.repeat(rep, 2, axis=axis)  # (2K, ...): fine point p lies in cell p // 2
    k2 = rep.shape
    out = np.zeros(tuple(s + 1 for s in k2), dtype=bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                out[dz : dz + k2[0], dy : dy + k2[1], dx : dx + k2[2]] |= rep
    return out


def _element_points(lab: np.ndarray) -> np.ndarray:
    """Points of the refined lattice ``(2K+1, ...)`` that lie on an edge, face or cell of the coarse
    lattice ``lab`` ``(K+1, ...)`` whose own corners (2, 4 or 8 coarse points) carry different labels."""
    shape = lab.shape
    out = np.zeros(tuple(2 * n - 1 for n in shape), dtype=bool)
    for parity in np.ndindex(2, 2, 2):
        if not any(parity):
            continue  # coarse points themselves
        corners = [
            lab[tuple(slice(d, n - p + d) for d, p, n in zip(offset, parity, shape))]
            for offset in np.ndindex(*(p + 1 for p in parity))
        ]
        differ = np.zeros(corners[0].shape, dtype=bool)
        for c in corners[1:]:
            differ |= c != corners[0]
        out[tuple(slice(p, None, 2) for p in parity)] = differ
    return out


def refine_box(
    decode: Callable[[np.ndarray], np.ndarray],
    box: OwnerBox,
    limits: tuple[int, int, int],
    stride: int,
    halo: int = 0,
    confidence: float = 0.0,
    min_stride: int = 1,
    refine: str = "elements",
) -> np.ndarray:
    """Probabilities ``(C, *box.size)`` of one owner box by coarse-to-fine decoding.

    ``decode(points)`` takes ``(N, 3)`` window-local voxel indices and returns ``(N, C)``
    probabilities. ``limits`` is the last valid voxel index per axis (lattice points beyond it are
    clamped). Cells are refined where their corners' labels differ, where a corner's top probability
    is below ``confidence``, and within ``halo`` cells of those, down to ``min_stride``: every point
    on or inside such a cell is decoded. With ``refine="elements"`` the last level (to stride 1)
    decodes only the points whose own edge, face or cell has corners that differ (plus the
    ``halo`` / ``confidence`` cells). A point that is not decoded gets the probabilities
    interpolated linearly from the coarser lattice.
    """
    if refine not in REFINE_RULES:
        raise ValueError(f"refine must be one of {REFINE_RULES}, got {refine!r}")
    a = np.asarray(box.start)
    w = np.asarray(box.window)
    cells = [-(-n // stride) for n in box.size]

    def local(step: int, counts: tuple[int, ...]) -> list[np.ndarray]:
        return [np.minimum(a[i] + step * np.arange(counts[i]), limits[i]) - w[i] for i in range(3)]

    # The coarse lattice includes the box's far face (the next box's first plane) so that every cell has
    # its 8 corners; at stride 1 there are no cells and each voxel is decoded exactly once.
    axes = local(stride, tuple(k + 1 for k in cells) if stride > 1 else box.size)
    probs = decode(grid_points(axes))
    prob = probs.reshape(*(len(x) for x in axes), probs.shape[1])  # (Kz+1, Ky+1, Kx+1, C)
    s = stride
    while s > 1:
        lab = prob.argmax(-1)
        differ = _corners_disagree(lab)
        chosen = differ.copy()  # cells to refine
        if confidence > 0:
            chosen |= _any_corner(prob.max(-1) < confidence)
        if halo and chosen.any():
            chosen = dilate(chosen, halo)
        prob = upsample_linear(prob)  # exact on the coarse lattice, interpolated between
        if refine == "elements" and s == 2:
            need = _element_points(lab) | _closure_points(chosen & ~differ)
        else:
            need = _closure_points(chosen)
        need[::2, ::2, ::2] = False  # already decoded at the coarser level
        s //= 2
        if s < min_stride:
            continue  # below the finest decoded stride: interpolation only
        pts = np.argwhere(need)
        if len(pts):
            fine = local(s, prob.shape[:3])
            prob[need] = decode(np.stack([fine[i][pts[:, i]] for i in range(3)], axis=1))
    out = prob[: box.size[0], : box.size[1], : box.size[2]]
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def accumulate_adaptive(
    padded: np.ndarray,
    backend: Backend,
    patch_size: tuple[int, int, int],
    settings: InferenceSettings,
    stats: InferenceStats,
    decode_probs: Callable[[object, np.ndarray], np.ndarray],
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class probabilities ``(C, *padded.shape)`` of a padded, normalised volume, one owner box at a time."""
    boxes = owner_boxes(padded.shape, patch_size, settings.overlap, settings.stride)
    limits = tuple(s - 1 for s in padded.shape)
    probs: np.ndarray | None = None
    reuse: dict[tuple, np.ndarray] = {}
    for i, box in enumerate(boxes):
        win = tuple(slice(o, o + p) for o, p in zip(box.window, patch_size))
        patch = padded[win]
        key = None
        if patch.min() == patch.max():
            rel = tuple(np.subtract(box.start, box.window).tolist())
            lim = tuple(np.minimum(np.subtract(limits, box.window), np.subtract(patch_size, 1)).tolist())
            key = (float(patch.flat[0]), rel, box.size, lim)
        if key is not None and key in reuse:
            out = reuse[key]
            stats.windows_reused += 1
        else:
            t = time.perf_counter()
            features = backend.encode(np.ascontiguousarray(patch))
            stats.encode_s += time.perf_counter() - t
            out = refine_box(
                lambda pts, f=features: decode_probs(f, pts),
                box,
                limits,
                settings.stride,
                settings.halo,
                settings.confidence,
                settings.min_stride,
                settings.refine,
            )
            if key is not None and len(reuse) < 8:
                reuse[key] = out
        if probs is None:
            probs = np.zeros((out.shape[0], *padded.shape), dtype=np.float32)
        z, y, x = box.start
        dz, dy, dx = box.size
        probs[:, z : z + dz, y : y + dy, x : x + dx] = out
        stats.windows += 1
        if progress is not None:
            progress(i + 1, len(boxes))
    assert probs is not None  # at least one box always exists
    return probs
