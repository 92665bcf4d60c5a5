"""Coarse-to-fine decoding of one owner box on nested lattices. Pure numpy.

Per box: decode the stride-``s`` lattice (including the far face, so that every cell has its 8
corners). Cells whose corners carry different labels are refined on the stride ``s/2`` lattice,
down to stride 2; going to stride 1, only the points whose own edge, face or cell of the stride-2
lattice has differing corners are decoded. With ``refine_below``, a decoded point whose largest
probability is under it differs from every other point, so the cells around an uncertain point are
refined too. Every point that is not decoded gets the probabilities
interpolated linearly from the coarser lattice.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .boxes import OwnerBox
from .mesh import grid_points


def upsample_linear(lattice: np.ndarray) -> np.ndarray:
    """``(K+1, K+1, K+1, C)`` lattice values to the ``(2K+1, ...)`` lattice of half the stride, by
    (separable) linear interpolation: even points keep their values, odd points average two."""
    out = lattice
    for axis in range(3):
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = 2 * n - 1
        up = np.empty(shape, dtype=np.float32)
        even, odd, lo, hi = ([slice(None)] * out.ndim for _ in range(4))
        even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        up[tuple(even)] = out
        up[tuple(odd)] = 0.5 * (out[tuple(lo)] + out[tuple(hi)])
        out = up
    return out


def corners_disagree(lab: np.ndarray) -> np.ndarray:
    """Cells ``(K, K, K)`` of a lattice label array ``(K+1, ...)`` whose 8 corners are not all equal."""
    ref = lab[:-1, :-1, :-1]
    out = np.zeros(ref.shape, dtype=bool)
    for dz, dy, dx in np.ndindex(2, 2, 2):
        if dz or dy or dx:
            out |= lab[dz : dz + ref.shape[0], dy : dy + ref.shape[1], dx : dx + ref.shape[2]] != ref
    return out


def closure_points(cells: np.ndarray) -> np.ndarray:
    """Points of the refined lattice ``(2K+1, ...)`` on or inside the selected cells ``(K, ...)``."""
    rep = cells
    for axis in range(3):
        rep = np.repeat(rep, 2, axis=axis)  # (2K, ...): fine point p lies in cell p // 2
    k2 = rep.shape
    out = np.zeros(tuple(s + 1 for s in k2), dtype=bool)
    for dz, dy, dx in np.ndindex(2, 2, 2):
        out[dz : dz + k2[0], dy : dy + k2[1], dx : dx + k2[2]] |= rep
    return out


def element_points(lab: np.ndarray) -> np.ndarray:
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
    refine_below: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(C, *box.size)`` of one owner box by coarse-to-fine decoding, and which of its
    voxels were decoded (``(*box.size)`` bool; the others are interpolated).

    ``decode(points)`` takes ``(N, 3)`` window-local voxel indices and returns ``(N, C)``
    probabilities. ``limits`` is the last voxel index per axis inside both the volume and the window;
    lattice points beyond it are clamped. The box's start lies on the global stride lattice.
    ``refine_below``: decoded points whose largest probability is under it refine their cells.
    """
    w = np.asarray(box.window)

    def local(step: int, counts: tuple[int, ...]) -> list[np.ndarray]:
        """Window-local coordinates of a lattice of ``counts`` points per axis from the box's start."""
        return [np.clip(box.start[i] + step * np.arange(counts[i]), w[i], limits[i]) - w[i] for i in range(3)]

    if stride == 1:  # no lattice: each voxel of the box is decoded exactly once
        probs = decode(grid_points(local(1, box.size)))
        out = np.ascontiguousarray(np.moveaxis(probs.reshape(*box.size, probs.shape[1]), -1, 0))
        return out, np.ones(box.size, dtype=bool)
    axes = local(stride, tuple(-(-n // stride) + 1 for n in box.size))
    probs = decode(grid_points(axes))
    prob = probs.reshape(*(len(a) for a in axes), probs.shape[1])  # (Kz+1, Ky+1, Kx+1, C)
    exact = np.ones(prob.shape[:3], dtype=bool)
    s = stride
    while s > 1:
        lab = prob.argmax(-1).astype(np.int64)
        if refine_below:
            uncertain = exact & (prob.max(-1) < refine_below)
            lab[uncertain] = -1 - np.arange(int(uncertain.sum()))  # a label of its own: unlike any neighbour
        need = element_points(lab) if s == 2 else closure_points(corners_disagree(lab))
        prob = upsample_linear(prob)  # exact on the coarse lattice, interpolated between
        coarse = exact
        exact = np.zeros(prob.shape[:3], dtype=bool)
        exact[::2, ::2, ::2] = coarse
        need[::2, ::2, ::2] = False  # decoded at the coarser level already
        s //= 2
        pts = np.argwhere(need)
        if len(pts):
            fine = local(s, prob.shape[:3])
            prob[need] = decode(np.stack([fine[i][pts[:, i]] for i in range(3)], axis=1))
            exact |= need
    inside = tuple(slice(0, n) for n in box.size)
    return np.ascontiguousarray(np.moveaxis(prob[inside], -1, 0)), exact[inside]
