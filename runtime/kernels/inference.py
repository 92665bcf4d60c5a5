"""The inference loop over windows, for implicit and dense models. It only orchestrates.

Blended modes (``sparse``, ``dense``, and dense models): per window, class probabilities are
computed and accumulated with a Gaussian importance map. ``sparse`` decodes a broad mesh (every
``stride``-th voxel), fills the rest by nearest neighbour and decodes a band around the broad
boundary. Adaptive mode: each owner box (:mod:`.boxes`) is decoded once, coarse to fine
(:mod:`.lattice`), with the features of its window; where no label is certain, the voxels are
decoded in every window covering them and blended as in dense mode (:mod:`.blending`). Then the
probabilities are smoothed (box average) and the argmax taken. The geometry lives in
:mod:`.windows`, :mod:`.boxes`, :mod:`.mesh` and :mod:`.lattice`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..contract.kinds import IMPLICIT, ModelKind
from ..contract.settings import InferenceSettings
from .blending import WindowBlend
from .boxes import OwnerBox, owner_boxes
from .constant_windows import ConstantWindows, SharedFeatures, constant_value
from .labels import choose_labels, smoothed_argmax, softmax
from .lattice import refine_box
from .mesh import boundary_band, box_smooth, grid_points, mesh_axes, nearest_fill
from .parallel import ordered_map
from .quality import LabelEvidence, label_evidence
from .windows import gaussian_importance, pad_to_patch, window_slices

if TYPE_CHECKING:  # pragma: no cover
    from ..backends.base import Backend

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Loop:
    """What the loop runs and how: a backend for a model ``kind`` at ``patch_size`` ``(Z, Y, X)``,
    with ``settings``; ``workers`` windows at once (the result does not depend on it) and
    ``progress(done, total)`` called after every window."""

    backend: Backend
    patch_size: tuple[int, int, int]
    settings: InferenceSettings
    kind: ModelKind = IMPLICIT
    workers: int = 1
    progress: Progress | None = None


@dataclass
class InferenceStats:
    """What one volume cost: seconds per stage and points decoded.

    With several windows in flight, ``encode_s`` and ``decode_s`` add up the seconds of every
    thread (so they can exceed the wall time); ``total_s`` is wall time."""

    windows: int = 0
    points_decoded: int = 0
    voxels: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    skipped_refinement: int = 0  # sparse mode: windows whose broad mesh had no boundary
    windows_reused: int = 0  # constant windows whose result was reused rather than recomputed
    features_reused: int = 0  # adaptive mode: constant windows decoded with an earlier one's features
    workers: int = 1  # windows in flight at once
    blended_voxels: int = 0  # adaptive mode: voxels decoded in every window and blended (:mod:`.blending`)
    windows_reencoded: int = 0  # adaptive mode: windows encoded again for the blend (features not kept)
    evidence: LabelEvidence | None = field(default=None, repr=False, compare=False)  # for the quality estimate
    evidence_s: float = 0.0  # summing it (part of total_s)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, encode_s: float = 0.0, decode_s: float = 0.0, points: int = 0, skipped: int = 0) -> None:
        """Add one call's cost (thread-safe)."""
        with self._lock:
            self.encode_s += encode_s
            self.decode_s += decode_s
            self.points_decoded += points
            self.skipped_refinement += skipped

    @property
    def points_per_voxel(self) -> float:
        return self.points_decoded / max(self.voxels, 1)

    def as_dict(self) -> dict:
        return {
            "windows": self.windows,
            "points_decoded": self.points_decoded,
            "voxels": self.voxels,
            "points_per_voxel": round(self.points_per_voxel, 4),
            "encode_s": round(self.encode_s, 4),
            "decode_s": round(self.decode_s, 4),
            "loop_s": round(self.total_s, 4),
            "windows_without_boundary": self.skipped_refinement,
            "windows_reused": self.windows_reused,
            "features_reused": self.features_reused,
            "workers": self.workers,
            "blended_voxels": self.blended_voxels,
            "windows_reencoded": self.windows_reencoded,
            "evidence_s": round(self.evidence_s, 4),
        }


class PointDecoder:
    """Decodes points in chunks of the backend's size into probabilities; keeps count and time."""

    def __init__(self, backend: Backend, stats: InferenceStats) -> None:
        self.backend, self.stats = backend, stats

    def __call__(self, features: object, points: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, C)`` of ``(N, 3)`` window-local voxel indices."""
        t = time.perf_counter()
        step = max(1, int(self.backend.max_points))
        pts = points.astype(np.int32, copy=False)
        out = [self.backend.decode(features, pts[i : i + step]) for i in range(0, len(pts), step)]
        self.stats.add(decode_s=time.perf_counter() - t, points=len(points))
        return softmax(np.concatenate(out, axis=0))

    def encode(self, patch: np.ndarray) -> object:
        t = time.perf_counter()
        features = self.backend.encode(np.ascontiguousarray(patch))
        self.stats.add(encode_s=time.perf_counter() - t)
        return features


def window_probabilities(
    decode: PointDecoder, patch: np.ndarray, settings: InferenceSettings, stats: InferenceStats
) -> np.ndarray:
    """Probabilities ``(C, Z, Y, X)`` of one window of an implicit model, sparse or dense."""
    features = decode.encode(patch)
    shape = patch.shape
    if settings.mode == "dense":
        return decode(features, grid_points([np.arange(s) for s in shape])).T.reshape(-1, *shape)
    axes = mesh_axes(shape, settings.stride)
    coarse = decode(features, grid_points(axes))  # (M, C)
    probs = nearest_fill(coarse.T.reshape(-1, *(len(a) for a in axes)), axes, shape)
    band = boundary_band(probs.argmax(0), settings.band)
    band[np.ix_(*axes)] = False  # mesh points are exact already
    pts = np.argwhere(band)
    if len(pts) == 0:
        stats.add(skipped=1)
        return probs
    probs[:, pts[:, 0], pts[:, 1], pts[:, 2]] = decode(features, pts).T
    return probs


def accumulate_blended(padded: np.ndarray, decode: PointDecoder, loop: Loop) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted sums of window probabilities ``(C, *padded.shape)`` and the weight sums."""
    stats, patch_size, settings = decode.stats, loop.patch_size, loop.settings
    slices = window_slices(padded.shape, patch_size, settings.overlap)
    weight = gaussian_importance(patch_size, settings.sigma_scale)
    wsum = np.zeros(padded.shape, dtype=np.float32)
    acc: np.ndarray | None = None
    cache = ConstantWindows(limit=4)

    def jobs() -> Iterator[tuple[np.ndarray, int | None]]:
        for i, win in enumerate(slices):
            patch = np.ascontiguousarray(padded[win])
            yield patch, cache.lookup(i, constant_value(patch), lambda value: value)

    def window(job: tuple[np.ndarray, int | None]) -> tuple[np.ndarray | None, int | None]:
        patch, same_as = job
        if same_as is not None:
            return None, same_as  # the earlier window's result, taken in order below
        if not loop.kind.decodes_points:
            t = time.perf_counter()
            probs = softmax(decode.backend.predict_dense(patch), axis=0)
            stats.add(encode_s=time.perf_counter() - t)
            return probs, None
        return window_probabilities(decode, patch, settings, stats), None

    for i, (win, (probs, same_as)) in enumerate(zip(slices, ordered_map(window, jobs(), loop.workers))):
        probs = cache.resolve(i, probs, same_as, stats)
        if acc is None:
            acc = np.zeros((probs.shape[0], *padded.shape), dtype=np.float32)
        acc[(slice(None), *win)] += probs * weight
        wsum[win] += weight
        stats.windows += 1
        if loop.progress is not None:
            loop.progress(i + 1, len(slices))
    assert acc is not None  # a padded volume always has a window
    return acc, wsum


def accumulate_owner_boxes(padded: np.ndarray, decode: PointDecoder, loop: Loop) -> np.ndarray:
    """Class probabilities ``(C, *padded.shape)`` of a padded, normalised volume: each owner box
    decoded coarse to fine in its window (``loop.workers`` boxes computed at once, written in
    order: the result does not depend on it), then the voxels where no label is certain blended over
    every window that covers them (:mod:`.blending`)."""
    stats, patch_size, settings = decode.stats, loop.patch_size, loop.settings
    boxes = owner_boxes(padded.shape, patch_size, settings.overlap, settings.stride)
    limits = tuple(s - 1 for s in padded.shape)
    cache = ConstantWindows(limit=8)
    reusable = decode.backend.features_reusable
    shared = SharedFeatures(decode.encode) if reusable else None
    probs: np.ndarray | None = None
    blend: WindowBlend | None = None

    def window_of(box: OwnerBox) -> tuple[slice, ...]:
        return tuple(slice(o, o + p) for o, p in zip(box.window, patch_size))

    def encode_box(box: OwnerBox, value: float | None) -> object:
        window = padded[window_of(box)]
        return shared.encode(window, value) if shared is not None else decode.encode(window)

    def jobs() -> Iterator[tuple[OwnerBox, float | None, int | None]]:
        for i, box in enumerate(boxes):
            rel = tuple(np.subtract(box.start, box.window).tolist())
            lim = tuple(np.minimum(np.subtract(limits, box.window), np.subtract(patch_size, 1)).tolist())
            value = constant_value(padded[window_of(box)])  # once per window, for both caches
            yield box, value, cache.lookup(i, value, lambda v, k=(rel, box.size, lim): (v, *k))

    def compute(job: tuple[OwnerBox, float | None, int | None]) -> tuple[tuple | None, int | None, object]:
        box, value, same_as = job
        if same_as is not None:
            return None, same_as, None
        inside = tuple(min(v, o + p - 1) for v, o, p in zip(limits, box.window, patch_size))
        features = encode_box(box, value)
        decoded = refine_box(lambda pts: decode(features, pts), box, inside, settings.stride, settings.refine_below)
        return decoded, None, features if reusable else None

    for i, (box, (decoded, same_as, features)) in enumerate(zip(boxes, ordered_map(compute, jobs(), loop.workers))):
        out, exact = cache.resolve(i, decoded, same_as, stats)
        if probs is None:
            probs = np.zeros((out.shape[0], *padded.shape), dtype=np.float32)
            blend = WindowBlend(probs, boxes, patch_size, settings, decode, lambda j: encode_box(boxes[j], None))
        (z, y, x), (dz, dy, dx) = box.start, box.size
        probs[:, z : z + dz, y : y + dy, x : x + dx] = out
        blend.box_done(i, box, out, exact, features)  # type: ignore[union-attr]
        del features
        stats.windows += 1
        if loop.progress is not None:
            loop.progress(i + 1, len(boxes))
    assert probs is not None and blend is not None  # a padded volume always has a box
    stats.blended_voxels = blend.finish()
    stats.windows_reencoded = blend.reencoded
    stats.features_reused = shared.shared if shared is not None else 0
    return probs


def _accumulate(
    volume: np.ndarray, loop: Loop, stats: InferenceStats
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, ...]]:
    """Class-probability sums over the padded volume, their weights (None in adaptive mode, which
    decodes each voxel once) and the crop back to ``volume``."""
    stats.workers = loop.workers
    padded, crop = pad_to_patch(np.asarray(volume, dtype=np.float32), loop.patch_size)
    decode = PointDecoder(loop.backend, stats)
    if loop.settings.mode == "adaptive" and loop.kind.decodes_points:
        return accumulate_owner_boxes(padded, decode, loop), None, crop
    acc, wsum = accumulate_blended(padded, decode, loop)
    return acc, wsum, crop


def predict_probabilities(volume: np.ndarray, loop: Loop) -> tuple[np.ndarray, InferenceStats]:
    """Smoothed class probabilities ``(C, Z, Y, X)`` of a normalised ``(Z, Y, X)`` volume.

    A dense model runs the backend's ``predict_dense`` per window; a point decoder runs the loop in
    ``loop.settings.mode``.
    """
    t0 = time.perf_counter()
    stats = InferenceStats(voxels=int(volume.size))
    acc, wsum, crop = _accumulate(volume, loop, stats)
    if wsum is not None:
        acc /= wsum
        del wsum
    probs = box_smooth(acc[(slice(None), *crop)], loop.settings.smoothing)
    t1 = time.perf_counter()
    stats.evidence = label_evidence(acc, None, crop, choose_labels(probs, loop.settings.logit_offsets))
    stats.evidence_s = time.perf_counter() - t1
    stats.total_s = time.perf_counter() - t0
    return probs, stats


@dataclass(frozen=True)
class ClassMaps:
    """The loop's class-probability sums ``acc`` ``(C, Z, Y, X)`` over the padded volume, their
    weights (None: already probabilities) and the ``crop`` back to the volume: the smoothed
    probabilities of :func:`predict_probabilities`, computed only over the boxes asked for."""

    acc: np.ndarray
    weights: np.ndarray | None
    crop: tuple[slice, ...]
    kernel: int

    def smoothed(self, box: tuple[slice, ...]) -> np.ndarray:
        """A new ``(C, *box)`` float32 array: :func:`predict_probabilities`'s probabilities over
        ``box`` (volume coordinates), equal to them bit for bit (the box average over the box a
        ``kernel // 2`` wider, clipped at the volume's border as the whole volume's is)."""
        r = self.kernel // 2
        size = [c.stop - c.start for c in self.crop]
        outer = [slice(max(b.start - r, 0), min(b.stop + r, n)) for b, n in zip(box, size)]
        src = tuple(slice(c.start + o.start, c.start + o.stop) for c, o in zip(self.crop, outer))
        maps = self.acc[(slice(None), *src)]
        maps = maps / self.weights[src] if self.weights is not None else maps
        inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
        return np.array(box_smooth(maps, self.kernel)[(slice(None), *inner)], dtype=np.float32)


def predict_labels_and_maps(volume: np.ndarray, loop: Loop) -> tuple[np.ndarray, ClassMaps, InferenceStats]:
    """Label map ``(Z, Y, X)`` uint8: the argmax of :func:`predict_probabilities`, with the smoothing
    computed only where it can change a label (:func:`.labels.smoothed_argmax`: same labels, no
    smoothed copy of the class maps); and the class maps, for the probabilities where they are
    needed (the way back to a scan stored at another spacing)."""
    t0 = time.perf_counter()
    stats = InferenceStats(voxels=int(volume.size))
    acc, wsum, crop = _accumulate(volume, loop, stats)
    labels = smoothed_argmax(acc, wsum, crop, loop.settings.smoothing, loop.settings.logit_offsets)
    t1 = time.perf_counter()
    stats.evidence = label_evidence(acc, wsum, crop, labels)
    stats.evidence_s = time.perf_counter() - t1
    stats.total_s = time.perf_counter() - t0
    return labels, ClassMaps(acc, wsum, crop, loop.settings.smoothing), stats


def predict_labels(volume: np.ndarray, loop: Loop) -> tuple[np.ndarray, InferenceStats]:
    """:func:`predict_labels_and_maps`'s labels and statistics."""
    labels, _, stats = predict_labels_and_maps(volume, loop)
    return labels, stats
