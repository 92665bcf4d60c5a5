"""Decode-once, coarse-to-fine inference for implicit bundles (the ``adaptive`` mode). Pure numpy.

The paper's loop decodes every window on its own and blends: with overlap 0.3 each voxel is decoded
in two to three windows, and a band of fixed width is decoded even where the broad mesh is certain.
Here instead:

* **Owner boxes.** The (padded) volume is partitioned into boxes aligned to the global stride-``s``
  lattice, by default as many per axis as the blended modes have windows (:func:`box_faces`). Each
  box is decoded only with the features of the window centred on it, so windows still overlap for
  context but every voxel is decoded in one window; nothing is blended. The context a face gets
  (half of patch minus box) is what decides the accuracy next to it.
* **Coarse to fine.** Per box: decode the stride-``s`` lattice; a cell (its 8 lattice corners)
  whose corners share one label (and, optionally, are all confident) is filled with that label;
  the other cells are refined on the stride ``s/2`` lattice, and so on down to stride 1.
* **Seams** (``seam`` > 0). The ``seam`` voxels either side of a face between two boxes are decoded
  by both boxes and blended with linear weights that sum to 1, so the step between two windows'
  predictions becomes a ramp. Windows see anatomy cut at their edges differently; a model trained on
  whole crops, or any model near its window's edge, disagrees with its neighbour there, and most of
  the voxels where decode-once loses against blending lie next to these faces.
* **Constant windows** (padding, masked air) are decoded once per distinct value and box position
  and reused: the result is exactly what decoding them would give.

The result is one probability map per class with no blending weights (the seams' weights sum to 1);
the caller smooths it and takes the argmax exactly as for the blended modes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .mesh import dilate, grid_points
from .parallel import ordered_map
from .windows import window_starts

REFINE_RULES = ("cells", "elements")
SEAM_RULES = ("both", "decoded")
BOX_LAYOUTS = ("even", "balanced")

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend
    from .inference import InferenceSettings, InferenceStats


@dataclass(frozen=True)
class OwnerBox:
    """A box ``[start, start + size)`` of the volume and the start of the window that decodes it.

    ``seam_lo`` / ``seam_hi``: voxels decoded beyond the box's low / high face per axis, where the
    box's prediction is blended with its neighbour's (0 at the volume's border)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    window: tuple[int, int, int]
    seam_lo: tuple[int, int, int] = (0, 0, 0)
    seam_hi: tuple[int, int, int] = (0, 0, 0)

    @property
    def region(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Start and size of what the box decodes: the box and its seams."""
        start = tuple(a - lo for a, lo in zip(self.start, self.seam_lo))
        size = tuple(n + lo + hi for n, lo, hi in zip(self.size, self.seam_lo, self.seam_hi))
        return start, size  # type: ignore[return-value]


def _axis_layout(length: int, patch: int, faces: list[int]) -> list[tuple[int, int, int]]:
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


def _box_limit(patch: int, stride: int) -> int:
    """Largest box edge for ``patch``: a multiple of ``stride`` of at most ``patch - 2``, so the lattice
    face after a box still lies inside the box's window."""
    limit = (patch - 2) // stride * stride
    if limit < stride:
        raise ValueError(f"patch {patch} is too small for adaptive decoding at stride {stride}")
    return limit


def box_step(length: int, patch: int, overlap: float, stride: int) -> int:
    """Edge of the ``even`` owner boxes along one axis: about as many boxes as the blended modes have
    windows (``window_starts``), each a multiple of ``stride`` (aligned to the global lattice) and at
    most ``patch - 2``, so the lattice face after a box still lies inside the box's window. Rounding
    up to the stride can leave fewer boxes than windows (larger boxes, less context at their faces)."""
    limit = _box_limit(patch, stride)
    n = len(window_starts(length, patch, overlap))
    while True:
        per_box = -(-length // n)  # ceil(length / n)
        step = -(-per_box // stride) * stride  # rounded up to the stride
        if step <= limit:
            return step
        n += 1


def box_faces(length: int, patch: int, overlap: float, stride: int, layout: str = "balanced") -> list[int]:
    """Starts of the owner boxes after the first along one axis (multiples of ``stride``).

    ``even``: boxes of :func:`box_step` voxels, the last one shorter. ``balanced``: exactly as many
    boxes as the blended modes have windows, each face on the stride multiple nearest to an even
    split, so sizes differ by at most one stride and most faces get the context the blended windows
    give their midpoints (more encoder windows than ``even`` where that rounds up)."""
    if layout not in BOX_LAYOUTS:
        raise ValueError(f"box layout must be one of {BOX_LAYOUTS}, got {layout!r}")
    if layout == "even":
        step = box_step(length, patch, overlap, stride)
        return list(range(step, length, step))
    limit = _box_limit(patch, stride)
    n = len(window_starts(length, patch, overlap))
    while True:
        faces = sorted({int(round(k * length / n / stride)) * stride for k in range(1, n)} - {0})
        faces = [f for f in faces if f < length]
        sizes = np.diff([0, *faces, length])
        if sizes.max() <= limit:
            return faces
        n += 1


def _axis_seams(layout: list[tuple[int, int, int]], patch: int, seam: int) -> list[tuple[int, int]]:
    """``(low, high)`` seam widths per box of one axis: at each face between two boxes, ``seam``
    voxels on either side, fewer where either box's window would not reach (the seam's lattice may
    reach past the window; its points there are clamped to the window, as at the volume's border),
    or where a box is thinner than two seams."""
    widths = []
    for (_, n0, w0), (face, n1, w1) in zip(layout, layout[1:]):
        widths.append(max(0, min(seam, n0 // 2, n1 // 2, w0 + patch - face, face - w1)))
    return list(zip([0, *widths], [*widths, 0]))


def owner_boxes(
    shape: tuple[int, int, int],
    patch: tuple[int, int, int],
    overlap: float,
    stride: int,
    seam: int = 0,
    layout: str = "balanced",
) -> list[OwnerBox]:
    """Partition of a volume of ``shape`` (padded to >= ``patch``) into owner boxes (``layout``:
    :func:`box_faces`), each decoded by the window centred on it (shifted to stay inside the volume),
    with up to ``seam`` voxels either side of each face between two boxes decoded by both and blended
    (:func:`seam_weights`)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if seam < 0:
        raise ValueError(f"seam must be >= 0, got {seam}")
    axes = []
    for length, p in zip(shape, patch):
        if length < p:
            raise ValueError(f"volume axis {length} is shorter than the patch {p}; pad first")
        boxes = _axis_layout(length, p, box_faces(length, p, overlap, stride, layout))
        axes.append([(*entry, *sides) for entry, sides in zip(boxes, _axis_seams(boxes, p, seam))])
    return [
        OwnerBox(*(tuple(int(a[k]) for a in (z, y, x)) for k in range(5)))  # type: ignore[arg-type]
        for z in axes[0]
        for y in axes[1]
        for x in axes[2]
    ]


def seam_weights(box: OwnerBox) -> np.ndarray | None:
    """Blending weights ``(Z, Y, X)`` over ``box.region``: 1 inside, a linear ramp across each seam
    such that the two boxes at a face sum to 1. ``None`` for a box without seams."""
    if not any(box.seam_lo) and not any(box.seam_hi):
        return None
    ramps = []
    for n, lo, hi in zip(box.size, box.seam_lo, box.seam_hi):
        w = np.ones(n + lo + hi, dtype=np.float32)
        if lo:
            w[: 2 * lo] = (np.arange(2 * lo, dtype=np.float32) + 0.5) / (2 * lo)
        if hi:
            w[len(w) - 2 * hi :] = (np.arange(2 * hi, 0, -1, dtype=np.float32) - 0.5) / (2 * hi)
        ramps.append(w)
    return ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]


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
    decoded: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities ``(C, *region size)`` of one owner box and its seams (``box.region``) by
    coarse-to-fine decoding. ``decoded``, a ``bool`` array of the region's shape, is set where a
    voxel was decoded (not interpolated).

    ``decode(points)`` takes ``(N, 3)`` window-local voxel indices and returns ``(N, C)``
    probabilities. ``limits`` is the last voxel index per axis inside both the volume and the window
    (lattice points beyond it, or before the window's start, are clamped). The coarse lattice is
    aligned to the global stride-``stride`` lattice and covers the region. Cells are refined where
    their corners' labels differ, where a corner's top probability is below ``confidence``, and
    within ``halo`` cells of those, down to ``min_stride``: every point on or inside such a cell is
    decoded. With ``refine="elements"`` the last level (to stride 1)
    decodes only the points whose own edge, face or cell has corners that differ (plus the
    ``halo`` / ``confidence`` cells). A point that is not decoded gets the probabilities
    interpolated linearly from the coarser lattice. Points outside the region are never refined.
    """
    if refine not in REFINE_RULES:
        raise ValueError(f"refine must be one of {REFINE_RULES}, got {refine!r}")
    r_start, r_size = box.region
    w = np.asarray(box.window)
    if stride == 1:  # no lattice: each voxel of the region is decoded exactly once
        axes = [np.clip(r_start[i] + np.arange(r_size[i]), w[i], limits[i]) - w[i] for i in range(3)]
        probs = decode(grid_points(axes))
        if decoded is not None:
            decoded[...] = True
        return np.ascontiguousarray(np.moveaxis(probs.reshape(*r_size, probs.shape[1]), -1, 0))
    # lattice origin: the last stride-aligned plane at or before the region (the box's start is aligned)
    origin = np.asarray([a - -(-lo // stride) * stride for a, lo in zip(box.start, box.seam_lo)])
    offset = np.asarray(r_start) - origin  # region start in lattice voxels
    cells = [-(-(off + n) // stride) for off, n in zip(offset, r_size)]

    def local(step: int, counts: tuple[int, ...]) -> list[np.ndarray]:
        return [np.clip(origin[i] + step * np.arange(counts[i]), w[i], limits[i]) - w[i] for i in range(3)]

    def inside(step: int, counts: tuple[int, ...], pad: int) -> np.ndarray | None:
        """Lattice points of this level within ``pad`` of the region, or None when all are (no seams)."""
        if not offset.any() and not any(box.seam_hi):
            return None
        keep = [
            (step * np.arange(n) >= off - pad) & (step * np.arange(n) < off + size + pad)
            for n, off, size in zip(counts, offset, r_size)
        ]
        return keep[0][:, None, None] & keep[1][None, :, None] & keep[2][None, None, :]

    # The coarse lattice includes the far face (the next box's first plane) so that every cell has its
    # 8 corners.
    axes = local(stride, tuple(k + 1 for k in cells))
    probs = decode(grid_points(axes))
    prob = probs.reshape(*(len(x) for x in axes), probs.shape[1])  # (Kz+1, Ky+1, Kx+1, C)
    done = np.ones(prob.shape[:3], dtype=bool) if decoded is not None else None
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
        if done is not None:
            grown = np.zeros(prob.shape[:3], dtype=bool)
            grown[::2, ::2, ::2] = done
            done = grown
        if refine == "elements" and s == 2:
            need = _element_points(lab) | _closure_points(chosen & ~differ)
        else:
            need = _closure_points(chosen)
        need[::2, ::2, ::2] = False  # already decoded at the coarser level
        s //= 2
        if s < min_stride:
            continue  # below the finest decoded stride: interpolation only
        # a finer level still needs the corners of the region's cells
        keep = inside(s, prob.shape[:3], s if s > min_stride else 0)
        if keep is not None:
            need &= keep
        pts = np.argwhere(need)
        if len(pts):
            fine = local(s, prob.shape[:3])
            prob[need] = decode(np.stack([fine[i][pts[:, i]] for i in range(3)], axis=1))
            if done is not None:
                done |= need
    region = tuple(slice(off, off + n) for off, n in zip(offset, r_size))
    if decoded is not None and done is not None:
        decoded[...] = done[region]
    out = prob[region]
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def _upper_neighbours(boxes: list[OwnerBox]) -> list[list[int | None]]:
    """Per box, the index of the next box along z, y and x (``None`` at the volume's far faces);
    ``boxes`` in :func:`owner_boxes` order."""
    counts = [len({b.start[k] for b in boxes}) for k in range(3)]
    step = (counts[1] * counts[2], counts[2], 1)
    out = []
    for i in range(len(boxes)):
        pos = (i // step[0], i // step[1] % counts[1], i % counts[2])
        out.append([i + step[k] if pos[k] + 1 < counts[k] else None for k in range(3)])
    return out


def accumulate_adaptive(
    padded: np.ndarray,
    backend: Backend,
    patch_size: tuple[int, int, int],
    settings: InferenceSettings,
    stats: InferenceStats,
    decode_probs: Callable[[object, np.ndarray], np.ndarray],
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Class probabilities ``(C, *padded.shape)`` of a padded, normalised volume, one owner box at a time
    (``workers`` boxes computed at once; written in order, so the result does not depend on it).

    Seams (``settings.seam`` > 0) follow ``settings.seam_rule``: ``"both"`` extends both boxes at a
    face by ``seam`` voxels and blends the overlap (:func:`seam_weights`); ``"decoded"`` takes the band
    of ``seam`` voxels on the lower box's side of the face and has the upper box decode again only the
    points the lower box decoded there (its boundary points), blended with a linear ramp that reaches
    the upper box's own prediction at the face. Boxes run in z, y, x order, so a box's lower
    neighbours are done when it runs."""
    boxes = owner_boxes(padded.shape, patch_size, settings.overlap, settings.stride, settings.seam, settings.boxes)
    banded = settings.seam > 0 and settings.seam_rule == "decoded"
    bands = [b.seam_lo for b in boxes]  # band width before each box's low faces
    if banded:
        boxes = [OwnerBox(b.start, b.size, b.window) for b in boxes]
    upper = _upper_neighbours(boxes) if banded else []
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # box -> (axis, (N, 3) volume indices) to re-decode
    limits = tuple(s - 1 for s in padded.shape)
    probs: np.ndarray | None = None
    first: dict[tuple, int] = {}  # constant windows: key -> first box with it (its result is reused)
    reuse: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    if banded:
        workers = 1  # a box's bands need its lower neighbours' decoded points: strictly in order

    def jobs() -> Iterator[tuple[OwnerBox, int | None]]:
        for i, box in enumerate(boxes):
            win = tuple(slice(o, o + p) for o, p in zip(box.window, patch_size))
            patch = padded[win]
            if patch.min() == patch.max():
                rel = tuple(np.subtract(box.start, box.window).tolist())
                lim = tuple(np.minimum(np.subtract(limits, box.window), np.subtract(patch_size, 1)).tolist())
                key = (float(patch.flat[0]), rel, box.size, box.seam_lo, box.seam_hi, lim)
                if key in first:
                    yield box, first[key]
                    continue
                if len(first) < 8:
                    first[key] = i
            yield box, None

    def compute(job: tuple[OwnerBox, int | None]) -> tuple[np.ndarray | None, np.ndarray | None, object, int | None]:
        box, same_as = job
        if same_as is not None:
            return None, None, None, same_as
        win = tuple(slice(o, o + p) for o, p in zip(box.window, patch_size))
        t = time.perf_counter()
        features = backend.encode(np.ascontiguousarray(padded[win]))
        stats.add(encode_s=time.perf_counter() - t)
        mask = np.zeros(box.size, dtype=bool) if banded else None
        out = refine_box(
            lambda pts, f=features: decode_probs(f, pts),
            box,
            tuple(min(v, o + p - 1) for v, o, p in zip(limits, box.window, patch_size)),  # inside the window
            settings.stride,
            settings.halo,
            settings.confidence,
            settings.min_stride,
            settings.refine,
            decoded=mask,
        )
        return out, mask, (features if banded else None), None

    for i, (box, (out, mask, features, same_as)) in enumerate(zip(boxes, ordered_map(compute, jobs(), workers))):
        if out is None:
            out, mask = reuse[same_as]  # type: ignore[index]
            stats.windows_reused += 1
        elif i in first.values():
            reuse[i] = (out, mask)
        if probs is None:
            probs = np.zeros((out.shape[0], *padded.shape), dtype=np.float32)
        (z, y, x), (dz, dy, dx) = box.region
        weights = seam_weights(box)
        if weights is None:
            probs[:, z : z + dz, y : y + dy, x : x + dx] = out
        else:  # seams: the neighbour adds its share there; the weights of a face sum to 1
            probs[:, z : z + dz, y : y + dy, x : x + dx] += out * weights
        if banded:
            _blend_bands(probs, box, bands[i], pending.pop(i, []), features, decode_probs)
            assert mask is not None
            for axis, j in enumerate(upper[i]):
                width = bands[j][axis] if j is not None else 0
                if width:
                    cut = [slice(None)] * 3
                    cut[axis] = slice(box.size[axis] - width, None)
                    pts = np.argwhere(mask[tuple(cut)])
                    pts[:, axis] += box.size[axis] - width
                    pending.setdefault(j, []).append((axis, pts + np.asarray(box.start)))  # type: ignore[arg-type]
        stats.windows += 1
        if progress is not None:
            progress(i + 1, len(boxes))
    assert probs is not None  # at least one box always exists
    return probs


def _blend_bands(
    probs: np.ndarray,
    box: OwnerBox,
    band: tuple[int, int, int],
    requests: list[tuple[int, np.ndarray]],
    features: object | None,
    decode_probs: Callable[[object, np.ndarray], np.ndarray],
) -> None:
    """Decode, with this box's window, the points its lower neighbours decoded in the bands before its
    low faces, and blend them in place: weight ``1 - d / (band + 1)`` at ``d`` voxels before the face.
    A reused constant window (``features`` None) keeps its neighbours' values."""
    if features is None:
        return
    for axis, pts in requests:
        if not len(pts):
            continue
        new = decode_probs(features, pts - np.asarray(box.window))  # (N, C)
        d = (box.start[axis] - pts[:, axis]).astype(np.float32)
        w = 1.0 - d / (band[axis] + 1)
        idx = (slice(None), pts[:, 0], pts[:, 1], pts[:, 2])
        probs[idx] = probs[idx] * (1.0 - w) + new.T * w
