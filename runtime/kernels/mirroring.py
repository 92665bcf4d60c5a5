"""Test-time mirroring (``tta``): a backend whose answers are the class probabilities averaged over
the window and its mirror images along the axes the training flipped (nnU-Net's default).

Every mode works unchanged on top of it: each window is encoded once per flip, a point is decoded
in every flipped window at its mirrored position, and the averaged probabilities drive the mesh,
the band or the coarse-to-fine refinement as a single model's would. The backend returns their
logarithm, so the loop's softmax gives the average back exactly. A mirror image along the
left-right axis swaps paired organs (:mod:`..contract.laterality`): its probabilities are swapped
back before they are averaged.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from ..backends.base import Backend
from .labels import softmax

TINY = np.float32(1e-30)


def flips(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, the identity first: 8 for three axes."""
    return [c for r in range(len(axes) + 1) for c in combinations(sorted(axes), r)]


class MirroredBackend:
    """Wraps ``backend`` for windows of ``patch_size``; ``axes`` are array axes ``(z, y, x) = (0, 1, 2)``;
    ``swap`` is the class permutation of a mirror image along array axis ``lateral`` (None: no pairs)."""

    def __init__(
        self,
        backend: Backend,
        axes: tuple[int, ...],
        patch_size: tuple[int, int, int],
        lateral: int | None = None,
        swap: tuple[int, ...] = (),
    ) -> None:
        self.backend, self.flips, self.patch = backend, flips(axes), np.asarray(patch_size)
        self.lateral, self.swap = lateral, np.asarray(swap, np.intp)
        self.name, self.max_points = backend.name, backend.max_points
        self.features_reusable, self.precision = backend.features_reusable, backend.precision
        self.skipped = backend.skipped

    def encode(self, patch: np.ndarray) -> list[Any]:
        return [self.backend.encode(np.ascontiguousarray(np.flip(patch, f)) if f else patch) for f in self.flips]

    def decode(self, features: list[Any], points: np.ndarray) -> np.ndarray:
        total = np.zeros((len(points), 0), np.float32)
        for f, feats in zip(self.flips, features):
            pts = points.copy()
            for a in f:
                pts[:, a] = self.patch[a] - 1 - pts[:, a]
            probs = self._unswap(softmax(self.backend.decode(feats, pts), axis=1), f, 1)
            total = probs if total.size == 0 else total + probs
        return np.log(total / len(self.flips) + TINY)

    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        total = None
        for f in self.flips:
            logits = self.backend.predict_dense(np.ascontiguousarray(np.flip(patch, f)) if f else patch)
            probs = softmax(np.flip(logits, tuple(a + 1 for a in f)) if f else logits, axis=0)
            probs = self._unswap(probs, f, 0)
            total = probs if total is None else total + probs
        return np.log(total / len(self.flips) + TINY)  # type: ignore[operator]

    def _unswap(self, probs: np.ndarray, flip: tuple[int, ...], class_axis: int) -> np.ndarray:
        """``probs`` of a window mirrored by ``flip``, with paired organs back on their own sides."""
        if self.lateral is None or self.lateral not in flip or not self.swap.size:
            return probs
        return np.take(probs, self.swap, axis=class_axis)

    def close(self) -> None:
        self.backend.close()
