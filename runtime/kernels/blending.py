"""Adaptive mode's second pass: where no label is certain, decode in every window and blend. Pure numpy.

The first pass decodes each owner box once, in its own window. Where the model depends on its
window (a weakly trained model near thin structures), that can differ from dense mode, which blends
every window covering a voxel with Gaussian weights. The second pass takes the voxels where no
label's first-pass probability exceeds ``1 - blend_above`` (boundaries, and faint structures the
coarse lattice passed over), grown by ``blend_margin`` and the smoothing's reach, decodes them in
every window that covers them and blends them as dense mode does, so there the labels are dense
mode's. Elsewhere the first pass is certain and its values stay. A window whose Gaussian weight
at a voxel is under 3% of the largest any window has there is left out of that voxel's blend (it
would move the probabilities by about that share): on a CT-sized volume that leaves 37% of the
second pass's points. A window's own box's voxels that the first pass decoded (not interpolated)
enter with their first-pass values, decoded once.

A window is blended as soon as every owner box within reach of it has been decoded, with the
features its owner box was decoded with; those are kept until then, up to a memory budget (beyond
it, a window is encoded again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..contract.settings import InferenceSettings
from .boxes import OwnerBox
from .mesh import dilate
from .windows import axis_profiles, gaussian_importance

RETAIN_BYTES = 512 * 2**20  # encoder features kept for the second pass (a CT window's are 26 MB)
WEIGHT_FLOOR = 0.03  # a window whose weight at a voxel is under this share of the largest there is left out


def axis_peaks(shape: tuple[int, ...], starts: list[list[int]], profiles: list[np.ndarray]) -> list[np.ndarray]:
    """Per axis, the largest profile value any window start gives each voxel; the windows are every
    combination of the per-axis ``starts``, so the largest weight at a voxel is their product."""
    peaks = []
    for n, axis_starts, prof in zip(shape, starts, profiles):
        peak = np.zeros(n)
        for s in axis_starts:
            np.maximum(peak[s : s + len(prof)], prof, out=peak[s : s + len(prof)])
        peaks.append(peak)
    return peaks


def features_bytes(features: Any) -> int:
    """Bytes held by a backend's features (numpy arrays in a dict, list or alone; 0 if unknown)."""
    if isinstance(features, np.ndarray):
        return int(features.nbytes)
    if isinstance(features, dict):
        return sum(features_bytes(v) for v in features.values())
    if isinstance(features, (list, tuple)):
        return sum(features_bytes(v) for v in features)
    return 0


class WindowBlend:
    """The second pass over a padded volume's windows (one per owner box, same order).

    ``probs`` ``(C, Z, Y, X)``: the first pass's probabilities, blended in place where the second
    pass decodes. ``decode(features, points)``: probabilities ``(N, C)`` of window-local points;
    ``encode(i)``: features of window ``i`` again, for a window whose features were not kept."""

    def __init__(
        self,
        probs: np.ndarray,
        boxes: list[OwnerBox],
        patch: tuple[int, int, int],
        settings: InferenceSettings,
        decode: Callable[[Any, np.ndarray], np.ndarray],
        encode: Callable[[int], Any],
        retain_bytes: int | None = None,
    ) -> None:
        self.probs, self.boxes, self.patch = probs, boxes, patch
        self.decode, self.encode = decode, encode
        self.above = settings.blend_above
        self.reach = settings.blend_margin + settings.smoothing // 2
        self.enabled = self.above < 1
        shape = probs.shape[1:]
        self.hot = np.zeros(shape, dtype=bool) if self.enabled else None
        self.weights: np.ndarray | None = None  # Gaussian weight sums, where blended
        self.gauss = gaussian_importance(patch, settings.sigma_scale) if self.enabled else None
        self.kept: dict[int, Any] = {}
        self.kept_bytes, self.retain_bytes = 0, RETAIN_BYTES if retain_bytes is None else retain_bytes
        self.due = self._schedule(shape) if self.enabled else {}
        self.reencoded = 0
        self.profiles = axis_profiles(patch, settings.sigma_scale) if self.enabled else []
        starts = [sorted({b.window[a] for b in boxes}) for a in range(3)]
        self.peaks = axis_peaks(shape, starts, self.profiles) if self.enabled else []

    def _schedule(self, shape: tuple[int, ...]) -> dict[int, list[int]]:
        """Windows to blend after each box: a window is due once the last owner box (in z, y, x
        order) that lies within ``reach`` of it is decoded."""
        axes = [sorted({b.start[a] for b in self.boxes}) for a in range(3)]
        counts = [len(x) for x in axes]
        due: dict[int, list[int]] = {}
        for i, box in enumerate(self.boxes):
            last = []
            for a in range(3):
                end = min(shape[a], box.window[a] + self.patch[a] + self.reach)
                last.append(int(np.searchsorted(axes[a], end, side="left")) - 1)
            due.setdefault((last[0] * counts[1] + last[1]) * counts[2] + last[2], []).append(i)
        return due

    def box_done(self, i: int, box: OwnerBox, out: np.ndarray, exact: np.ndarray, features: Any | None) -> None:
        """Record owner box ``i``'s first-pass probabilities ``out`` (``(C, *box.size)``), which of
        its voxels were decoded rather than interpolated (``exact``) and its window's features (None:
        not reusable), then blend every window now due."""
        if not self.enabled:
            return
        region = tuple(slice(a, a + n) for a, n in zip(box.start, box.size))
        self.hot[region] = out.max(0) < 1.0 - self.above  # no label certain
        if features is not None and self.kept_bytes + features_bytes(features) > self.retain_bytes:
            features = None
        self.kept[i] = (features, out, exact)  # the decoded voxels serve as this window's share below
        self.kept_bytes += features_bytes(features)
        for j in self.due.get(i, []):
            self._blend(j)

    def _blend(self, j: int) -> None:
        """Decode window ``j`` at its candidate voxels and add them, Gaussian-weighted, to the sums;
        its own box's voxels that the first pass decoded are taken as they are."""
        features, own, exact = self.kept.pop(j)
        self.kept_bytes -= features_bytes(features)
        shape = self.hot.shape
        start = self.boxes[j].window
        lo = [max(0, s - self.reach) for s in start]
        hi = [min(n, s + p + self.reach) for s, p, n in zip(start, self.patch, shape)]
        near = self.hot[tuple(slice(a, b) for a, b in zip(lo, hi))]
        if not near.any():
            return
        inner = tuple(slice(s - a, s - a + p) for s, a, p in zip(start, lo, self.patch))
        points = np.argwhere(dilate(near, self.reach)[inner])
        share = np.ones(len(points))
        for a in range(3):
            share *= self.profiles[a][points[:, a]] / self.peaks[a][points[:, a] + start[a]]
        points = points[share >= WEIGHT_FLOOR]
        if not len(points):
            return
        box = self.boxes[j]
        rel = points - (np.asarray(box.start) - np.asarray(start))  # in the box's own coordinates
        mine = ((rel >= 0) & (rel < np.asarray(box.size))).all(1)
        mine[mine] = exact[rel[mine, 0], rel[mine, 1], rel[mine, 2]]
        p = np.empty((len(points), own.shape[0]), dtype=np.float32)
        p[mine] = own[:, rel[mine, 0], rel[mine, 1], rel[mine, 2]].T
        if not mine.all():
            if features is None:
                features = self.encode(j)
                self.reencoded += 1
            p[~mine] = self.decode(features, points[~mine])  # (N, C)
        w = self.gauss[points[:, 0], points[:, 1], points[:, 2]]
        z, y, x = (points[:, a] + start[a] for a in range(3))
        if self.weights is None:
            self.weights = np.zeros(shape, dtype=np.float32)
        fresh = self.weights[z, y, x] == 0
        self.probs[:, z[fresh], y[fresh], x[fresh]] = 0.0  # the first pass's values give way
        self.probs[:, z, y, x] += (p * w[:, None]).T
        self.weights[z, y, x] += w

    def finish(self) -> int:
        """Divide the blended sums by their weights; the number of voxels blended."""
        self.kept.clear()
        if self.weights is None:
            return 0
        mask = self.weights > 0
        self.probs[:, mask] /= self.weights[mask]
        return int(mask.sum())
