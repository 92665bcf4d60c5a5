"""The sliding-window inference loop on a preprocessed volume, for implicit and dense models.

Per window: encode; decode a broad mesh (every ``stride``-th voxel); fill the rest by nearest
neighbour; decode the voxels of the band around the broad prediction's boundary; blend the
window's probabilities with a Gaussian importance map. Then average-pool (kernel 3) and argmax.
The geometry lives in :mod:`.windows` and :mod:`.mesh`; this module only orchestrates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .adaptive import BOX_LAYOUTS, REFINE_RULES, SEAM_RULES, accumulate_adaptive
from .labels import smoothed_argmax
from .mesh import boundary_band, box_smooth, grid_points, mesh_axes, nearest_fill
from .parallel import ordered_map
from .windows import gaussian_importance, pad_to_patch, window_slices

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend

MODES = ("sparse", "dense", "adaptive")


@dataclass(frozen=True)
class InferenceSettings:
    """Knobs of the loop; defaults come from the bundle manifest."""

    mode: str = "adaptive"  # see .adaptive; "sparse": the paper's mesh + band, blended; "dense": every voxel
    overlap: float = 0.3  # blended modes: window overlap; adaptive: sets the owner boxes (see .adaptive)
    stride: int = 4  # broad-mesh spacing, voxels
    band: int = 2  # half-width (voxels) of the refined band around the broad boundary
    sigma_scale: float = 0.125  # Gaussian importance sigma, fraction of the patch
    smoothing: int = 3  # average-pool kernel on the blended probabilities; 1 = none
    halo: int = 0  # adaptive: also refine cells within this many cells of a refined one
    confidence: float = 0.0  # adaptive: also refine cells with a corner whose top probability is below this
    min_stride: int = 1  # adaptive: finest decoded lattice; finer points are interpolated
    refine: str = "elements"  # adaptive: "cells" refines whole cells at every level; see .adaptive.refine_box
    seam: int = 0  # adaptive: width of the blended seams between owner boxes, voxels (0: none)
    seam_rule: str = "both"  # adaptive: "both" sides of a face decoded by both boxes; "decoded": see .adaptive
    boxes: str = "balanced"  # adaptive: owner-box layout, "balanced" or "even" (.adaptive.box_faces)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.band < 0:
            raise ValueError(f"band must be >= 0, got {self.band}")
        if self.mode == "adaptive" and self.stride & (self.stride - 1):
            raise ValueError(f"adaptive mode needs a power-of-two stride, got {self.stride}")
        if self.min_stride < 1 or self.min_stride & (self.min_stride - 1):
            raise ValueError(f"min_stride must be a power of two, got {self.min_stride}")
        if self.refine not in REFINE_RULES:
            raise ValueError(f"refine must be one of {REFINE_RULES}, got {self.refine!r}")
        if self.seam < 0:
            raise ValueError(f"seam must be >= 0, got {self.seam}")
        if self.seam_rule not in SEAM_RULES:
            raise ValueError(f"seam_rule must be one of {SEAM_RULES}, got {self.seam_rule!r}")
        if self.boxes not in BOX_LAYOUTS:
            raise ValueError(f"boxes must be one of {BOX_LAYOUTS}, got {self.boxes!r}")
        if self.halo < 0 or not 0 <= self.confidence < 1:
            raise ValueError(f"need halo >= 0 and confidence in [0, 1), got {self.halo}, {self.confidence}")


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
    skipped_refinement: int = 0  # windows whose broad mesh had no boundary
    windows_reused: int = 0  # constant windows whose result was reused rather than recomputed
    workers: int = 1  # windows in flight at once
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
            "workers": self.workers,
        }


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


class _Decoder:
    """Decodes points in chunks of the backend's size and keeps count and time."""

    def __init__(self, backend: Backend, stats: InferenceStats) -> None:
        self.backend, self.stats = backend, stats

    def __call__(self, features: object, points: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        step = max(1, int(self.backend.max_points))
        pts = points.astype(np.int32, copy=False)
        out = [self.backend.decode(features, pts[i : i + step]) for i in range(0, len(pts), step)]
        self.stats.add(decode_s=time.perf_counter() - t, points=len(points))
        return softmax(np.concatenate(out, axis=0))  # (N, C)


def _implicit_window(
    backend: Backend, decode: _Decoder, patch: np.ndarray, settings: InferenceSettings, stats: InferenceStats
) -> np.ndarray:
    """Probabilities ``(C, Z, Y, X)`` of one window from an implicit model."""
    t = time.perf_counter()
    features = backend.encode(patch)
    stats.add(encode_s=time.perf_counter() - t)
    shape = patch.shape
    if settings.mode == "dense":
        pts = grid_points([np.arange(s) for s in shape])
        return decode(features, pts).T.reshape(-1, *shape)
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


def _accumulate(
    volume: np.ndarray,
    backend: Backend,
    patch_size: tuple[int, int, int],
    settings: InferenceSettings,
    dense_model: bool,
    progress: Callable[[int, int], None] | None,
    stats: InferenceStats,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, ...]]:
    """Gaussian-weighted sums of window probabilities ``(C, Z', Y', X')``, the weight sums and the
    crop from the padded grid back to the volume. Adaptive mode decodes each voxel once, so it
    returns probabilities and no weights. ``workers`` windows are computed at once
    (:func:`.parallel.ordered_map`); they are added up in order, so the result does not depend on it."""
    stats.workers = workers
    padded, crop = pad_to_patch(np.asarray(volume, dtype=np.float32), patch_size)
    if settings.mode == "adaptive" and not dense_model:
        probs = accumulate_adaptive(
            padded, backend, patch_size, settings, stats, _Decoder(backend, stats), progress, workers
        )
        return probs, None, crop
    slices = window_slices(padded.shape, patch_size, settings.overlap)
    weight = gaussian_importance(patch_size, settings.sigma_scale)
    acc: np.ndarray | None = None
    wsum = np.zeros(padded.shape, dtype=np.float32)
    decode = _Decoder(backend, stats)
    first: dict[float, int] = {}  # constant windows (padding, masked air): value -> first window with it
    reuse: dict[int, np.ndarray] = {}

    def jobs() -> Iterator[tuple[np.ndarray, int | None]]:
        for i, win in enumerate(slices):
            patch = np.ascontiguousarray(padded[win])
            constant = float(patch.flat[0]) if patch.min() == patch.max() else None
            if constant is not None and constant in first:
                yield patch, first[constant]
                continue
            if constant is not None and len(first) < 4:
                first[constant] = i
            yield patch, None

    def window(job: tuple[np.ndarray, int | None]) -> tuple[np.ndarray | None, int | None]:
        patch, same_as = job
        if same_as is not None:
            return None, same_as  # the earlier window's result, taken in order below
        if dense_model:
            t = time.perf_counter()
            probs = softmax(backend.predict_dense(patch), axis=0)
            stats.add(encode_s=time.perf_counter() - t)
            return probs, None
        return _implicit_window(backend, decode, patch, settings, stats), None

    for i, (win, (probs, same_as)) in enumerate(zip(slices, ordered_map(window, jobs(), workers))):
        if probs is None:
            probs = reuse[same_as]
            stats.windows_reused += 1
        elif i in first.values():
            reuse[i] = probs
        if acc is None:
            acc = np.zeros((probs.shape[0], *padded.shape), dtype=np.float32)
        acc[(slice(None), *win)] += probs * weight
        wsum[win] += weight
        stats.windows += 1
        if progress is not None:
            progress(i + 1, len(slices))
    assert acc is not None  # at least one window always exists
    return acc, wsum, crop


def predict_probabilities(
    volume: np.ndarray,
    backend: Backend,
    patch_size: tuple[int, int, int],
    settings: InferenceSettings,
    dense_model: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, InferenceStats]:
    """Smoothed class probabilities ``(C, Z, Y, X)`` of a normalised ``(Z, Y, X)`` volume (blended across
    windows, or decoded once per voxel in adaptive mode).

    ``dense_model`` selects the backend's ``predict_dense`` (U-Net bundles); otherwise the implicit
    loop runs in ``settings.mode``. ``progress(done, total)`` is called after every window;
    ``workers`` windows are computed at once (same result for any number).
    """
    t0 = time.perf_counter()
    stats = InferenceStats(voxels=int(volume.size))
    acc, wsum, crop = _accumulate(volume, backend, patch_size, settings, dense_model, progress, stats, workers)
    if wsum is not None:
        acc /= wsum
        del wsum
    probs = box_smooth(acc[(slice(None), *crop)], settings.smoothing)
    stats.total_s = time.perf_counter() - t0
    return probs, stats


def predict_labels(
    volume: np.ndarray,
    backend: Backend,
    patch_size: tuple[int, int, int],
    settings: InferenceSettings,
    dense_model: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, InferenceStats]:
    """Label map ``(Z, Y, X)`` uint8: the argmax of :func:`predict_probabilities`, with the smoothing
    computed only where it can change a label (:func:`.labels.smoothed_argmax`: same labels, no
    smoothed copy of the class maps)."""
    t0 = time.perf_counter()
    stats = InferenceStats(voxels=int(volume.size))
    acc, wsum, crop = _accumulate(volume, backend, patch_size, settings, dense_model, progress, stats, workers)
    labels = smoothed_argmax(acc, wsum, crop, settings.smoothing)
    stats.total_s = time.perf_counter() - t0
    return labels, stats
