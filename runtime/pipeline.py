"""``Segmenter``: the Python API. A scan in, a label map with the scan's exact geometry out.

    from imunet.runtime import Segmenter
    seg = Segmenter("hippocampus.imunet", backend="auto")
    labels = seg.predict(SimpleITK.ReadImage("scan.nii.gz"))

Steps: resample to the bundle's spacing -> normalise -> sliding-window inference -> resample the
label map back (nearest) onto the input grid.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .backends import Backend, open_backend
from .bundle import Bundle, default_bundle_path, load_bundle
from .errors import BundleError, InputError
from .inference import predict_labels
from .io import Geometry, as_3d_scalar, from_array
from .parallel import CPU_BACKENDS, default_workers, threads_per_worker
from .preprocess import normalize, resample_label_like, resample_to_spacing
from .settings import InferenceSettings
from .windows import window_slices

BYTES_PER_VOXEL_BASE = 4 + 4 + 4 + 1  # image, blend weights, smoothed copy share, labels


def resolve_settings(defaults: InferenceSettings, kind: str, **overrides: object) -> InferenceSettings:
    """The bundle's ``defaults`` with the options given (``None`` keeps the bundle's); ``mode`` only
    applies to implicit bundles. Unknown names raise ``ValueError``."""
    known = {f.name for f in fields(InferenceSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown inference settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None and not (k == "mode" and kind != "implicit")}
    return replace(defaults, **given)  # type: ignore[arg-type]


class Segmenter:
    """Segments scans with one bundle on one backend; reuse it for many scans.

    ``bundle``: a bundle folder (None: the model shipped with the package). ``mode``, ``overlap``,
    ``stride`` and the other :class:`InferenceSettings` fields given by keyword override the
    bundle's inference defaults. ``precision``: ``auto``, ``fp32``, ``fp16`` or ``int8``
    (:func:`.backends.precision.graph_precisions`). ``max_memory_gb`` refuses scans whose
    estimated working memory exceeds it before any work. ``workers``: windows computed at once,
    each on its own thread (None: two on a CPU backend with two or more cores; GPUs run one); the
    labels do not depend on it.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle | None = None,
        backend: str = "auto",
        mode: str | None = None,
        overlap: float | None = None,
        stride: int | None = None,
        max_memory_gb: float | None = None,
        verify: bool = True,
        precision: str = "auto",
        workers: int | None = None,
        **inference: object,
    ) -> None:
        if bundle is None:
            bundle = default_bundle_path()
            if bundle is None:
                raise BundleError("no --model given and this installation ships no default bundle")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        m = self.bundle.manifest
        self.settings = resolve_settings(m.inference, m.kind, mode=mode, overlap=overlap, stride=stride, **inference)
        self.max_memory_gb = max_memory_gb
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        cpu_workers = workers if workers is not None else default_workers("ort-cpu")
        self.backend = open_backend(self.bundle, backend, precision, cpu_threads=threads_per_worker(cpu_workers))
        self.workers = cpu_workers if self.backend.name in CPU_BACKENDS else 1
        self._precision = precision
        self._one_window_backend: Backend | None = None  # all cores on one window; opened when first needed
        self.last_stats: dict = {}

    def _backend_for(self, shape: tuple[int, ...]) -> tuple[Backend, int]:
        """The backend and worker count for a volume of ``shape``: a volume of one window runs it on one
        session with every core (one single-threaded window took 94.8 ms against 55.5 ms on 2 cores)."""
        if self.workers == 1:
            return self.backend, 1
        patch = self.bundle.manifest.patch_size
        padded = tuple(max(n, p) for n, p in zip(shape, patch))
        if len(window_slices(padded, patch, self.settings.overlap)) > 1:
            return self.backend, self.workers
        if self._one_window_backend is None:
            self._one_window_backend = open_backend(self.bundle, self.backend.name, self._precision)
        return self._one_window_backend, 1

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def estimate_memory_gb(self, image: sitk.Image) -> float:
        """Working memory of one scan: resampled volume and per-class accumulators, in GiB."""
        m = self.bundle.manifest
        sizes = zip(image.GetSize(), image.GetSpacing(), m.spacing, m.patch_size[::-1])
        voxels = float(np.prod([max(n * s / t, p) for n, s, t, p in sizes]))
        per_voxel = BYTES_PER_VOXEL_BASE + 3 * 4 * m.num_classes  # accumulators, normalised and smoothed maps
        return (voxels * per_voxel + float(np.prod(image.GetSize())) * 8) / 2**30

    def predict(self, image: sitk.Image, progress: Callable[[int, int], None] | None = None) -> sitk.Image:
        """Label map (uint8) of a 3D ``image`` on exactly its grid: size, origin, spacing, direction."""
        image = as_3d_scalar(image, "image")
        if self.max_memory_gb is not None:
            need = self.estimate_memory_gb(image)
            if need > self.max_memory_gb:
                raise InputError(
                    f"needs about {need:.1f} GiB of working memory, over --max-memory {self.max_memory_gb:g} GiB"
                )
        m = self.bundle.manifest
        t0 = time.perf_counter()
        resampled = resample_to_spacing(image, m.spacing)
        volume = normalize(sitk.GetArrayViewFromImage(resampled), m.normalization)
        t1 = time.perf_counter()
        backend, workers = self._backend_for(volume.shape)
        labels, stats = predict_labels(
            volume, backend, m.patch_size, self.settings, m.kind == "unet", progress, workers
        )
        del volume
        t2 = time.perf_counter()
        out = from_array(labels, Geometry.of(resampled))
        if out.GetSize() != image.GetSize() or resampled is not image:
            out = resample_label_like(out, image)
        out = sitk.Cast(out, sitk.sitkUInt8)
        out.CopyInformation(image)
        t3 = time.perf_counter()
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        counts = np.bincount(sitk.GetArrayViewFromImage(out).ravel(), minlength=m.num_classes)
        self.last_stats = {
            **stats.as_dict(),
            "preprocess_s": round(t1 - t0, 4),
            "resample_back_s": round(t3 - t2, 4),
            "backend": self.backend.name,
            "precision": getattr(self.backend, "precision", "fp32"),
            "mode": self.settings.mode if m.kind == "implicit" else "dense-model",
            "volumes_ml": {m.labels[k]: round(float(counts[k]) * voxel_ml, 3) for k in range(1, m.num_classes)},
        }
        return out

    def predict_array(self, array: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        """Label map ``(Z, Y, X)`` uint8 of a ``(Z, Y, X)`` intensity array with ``spacing_zyx`` in mm."""
        arr = np.asarray(array)
        if arr.ndim != 3:
            raise InputError(f"array must be 3D (Z, Y, X), got shape {arr.shape}")
        image = sitk.GetImageFromArray(arr.astype(np.float32, copy=False))
        image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
        return sitk.GetArrayFromImage(self.predict(image))

    def close(self) -> None:
        self.backend.close()
        if self._one_window_backend is not None:
            self._one_window_backend.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
