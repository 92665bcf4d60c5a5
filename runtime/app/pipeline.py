"""``Segmenter``: the Python API. A scan in, a label map with the scan's exact geometry out.

    from imunet.runtime import Segmenter
    seg = Segmenter("hippocampus.imunet", backend="auto")
    labels = seg.predict("scan.nii.gz")          # or a SimpleITK image
    result = seg.segment("scan.nii.gz")          # labels and this call's statistics together

Steps: check the scan against the model's domain -> reorient to the training orientation ->
resample to the bundle's spacing -> normalise -> inference -> back onto the reoriented scan's grid
-> reorient back -> the input's exact size, origin, spacing and direction.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import permutations
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..backends import Backend, open_backend
from ..contract.bundle import Bundle, load_bundle, resolve_model
from ..contract.kinds import ModelKind
from ..contract.laterality import lateral_axis, swap_permutation
from ..contract.settings import InferenceSettings
from ..errors import BundleError, InputError
from ..imaging.domain import dicom_modality, domain_warnings, summarise
from ..imaging.io import MODALITY_TAG, Geometry, as_3d_scalar, from_array, read_header, read_image
from ..imaging.label_resampling import SmoothedProbabilities
from ..imaging.orientation import orientation_code, reorient
from ..imaging.prepare import Prepared, orient, prepare, restore
from ..kernels.blending import RETAIN_BYTES
from ..kernels.inference import Loop, predict_labels, predict_labels_and_maps, predict_probabilities
from ..kernels.labels import choose_labels, class_weights
from ..kernels.mirroring import MirroredBackend, flips
from ..kernels.parallel import CPU_BACKENDS, default_workers, threads_per_worker
from ..kernels.windows import window_slices
from .memory import default_cap_gib
from .quality import QualityEstimate, estimate

BYTES_PER_VOXEL_BASE = 4 + 4 + 4 + 1  # image, blend weights, smoothed copy share, labels
BYTES_PER_VOXEL_SECOND_PASS = 1 + 4  # adaptive mode's second pass: uncertain voxels, their weight sums


def resolve_settings(defaults: InferenceSettings, kind: ModelKind, **overrides: object) -> InferenceSettings:
    """The bundle's ``defaults`` with the options given (``None`` keeps the bundle's); ``mode`` only
    applies to point-decoding kinds. Unknown names raise ``ValueError``."""
    known = {f.name for f in fields(InferenceSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown inference settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None and (k != "mode" or kind.decodes_points)}
    return replace(defaults, **given)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Checks:
    """What a :class:`Segmenter` checks before it segments a scan.

    ``max_memory_gb``: refuse scans whose estimated working memory exceeds it. ``allow_modality``:
    run a DICOM scan whose modality is not the model's (refused otherwise). ``refuse_out_of_domain``:
    refuse a scan the domain check flags (field of view or intensities far outside the training
    data) instead of segmenting it with warnings. ``verify``: hash every bundle file on load (graphs
    are hashed as they are read either way)."""

    max_memory_gb: float | None = None
    allow_modality: bool = False
    refuse_out_of_domain: bool = False
    verify: bool = True


CHECKS = {f.name for f in fields(Checks)}


@dataclass(frozen=True)
class Segmentation:
    """One call's result: the label map on the scan's grid, that call's statistics (seconds per
    stage, backend, precision, mode, label volumes in ml, warnings, the quality estimate), the
    per-label Dice estimate (:class:`.quality.QualityEstimate`) and, when asked for, the class
    probabilities ``(C, Z, Y, X)`` float32 on the scan's grid."""

    labels: sitk.Image
    stats: dict = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    quality: QualityEstimate | None = None


class Segmenter:
    """Segments scans with one bundle on one backend; reuse it for many scans.

    ``bundle``: a bundle folder, or the name of a model shipped with the package (an existing path
    wins; None: the default shipped model, ``hippocampus``). ``precision``:
    ``auto``, ``fp32``, ``fp16``, ``int8`` or ``bf16`` (:func:`.backends.precision.graph_precisions`).
    ``workers``: windows computed at once, each on its own thread (None: two on a CPU backend with two
    or more cores; GPUs run one); the labels do not depend on it. ``cpus``: the cores a CPU backend
    may use in all (None: every core this process may run on; a Ray worker passes what Ray granted
    it). ``trusted_keys``: a folder of
    public keys; the bundle must be signed by one. Keyword ``options``: any
    :class:`InferenceSettings` field (``mode``, ``overlap``, ``stride``, ``tta``, ...; overriding
    the bundle's defaults, None keeping them) and any :class:`Checks` field (``max_memory_gb``,
    ``allow_modality``, ``refuse_out_of_domain``, ``verify``).

    :meth:`segment` returns the labels with that call's statistics; ``last_stats`` is a
    convenience for one thread at a time: the statistics of the calling thread's last call.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle | None = None,
        backend: str = "auto",
        precision: str = "auto",
        workers: int | None = None,
        trusted_keys: str | Path | None = None,
        cpus: int | None = None,
        **options: object,
    ) -> None:
        checks = Checks(**{k: v for k, v in options.items() if k in CHECKS})  # type: ignore[arg-type]
        if isinstance(bundle, Bundle):
            if trusted_keys is not None:
                raise BundleError("pass the bundle's folder, not a loaded Bundle, to check it against trusted keys")
            self.bundle = bundle
        else:
            self.bundle = load_bundle(resolve_model(bundle), verify=checks.verify, trusted_keys=trusted_keys)
        m = self.bundle.manifest
        settings = {k: v for k, v in options.items() if k not in CHECKS}
        self.settings = resolve_settings(m.inference, m.kind, **settings)
        self._class_scale = class_weights(self.settings.logit_offsets, m.num_classes)  # checks their count
        self.checks = checks
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if cpus is not None and cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {cpus}")
        self.cpus = cpus
        cpu_workers = workers if workers is not None else default_workers("ort-cpu", cpus)
        self._precision = precision
        # One window at a time on every core: what a scan of one window needs, and all a GPU runs. The
        # CPU pool (one thread per window in flight) opens with the first scan of several windows, so a
        # one-scan command opens one backend, not two (docs/BENCHMARKS.md, start-up).
        self.backend = self._open(backend, cpus or 0)
        self.workers = cpu_workers if self.backend.name in CPU_BACKENDS else 1
        self._pool_backend: Backend | None = None
        self._local = threading.local()
        self.every_quality_feature = False  # compute every feature of the Dice estimate (to calibrate one)

    @property
    def last_stats(self) -> dict:
        """The statistics of this thread's last call (empty before one); :meth:`segment` returns them."""
        return getattr(self._local, "stats", {})

    def _open(self, kind: str, threads: int = 0, callers: int = 1) -> Backend:
        m = self.bundle.manifest
        slots = len(flips(m.mirror_axes)) if self.settings.tta else 1
        # a share of the cores (cpus given, e.g. a Ray actor's) must not pin threads to the first ones
        backend = open_backend(self.bundle, kind, self._precision, threads, slots, callers, self.cpus is None)
        if self.settings.tta:
            swap = swap_permutation(m.num_classes, m.lateral_pairs)
            return MirroredBackend(backend, m.mirror_axes, m.patch_size, lateral_axis(m.orientation), swap)
        return backend

    def _backend_for(self, shape: tuple[int, ...]) -> tuple[Backend, int]:
        """The backend and worker count for a volume of ``shape``: a volume of one window runs it on one
        session with every core (one single-threaded window took 94.8 ms against 55.5 ms on 2 cores)."""
        if self.workers == 1:
            return self.backend, 1
        patch = self.bundle.manifest.patch_size
        padded = tuple(max(n, p) for n, p in zip(shape, patch))
        if len(window_slices(padded, patch, self.settings.overlap)) == 1:
            return self.backend, 1
        if self._pool_backend is None:
            threads = threads_per_worker(self.workers, self.cpus)
            self._pool_backend = self._open(self.backend.name, threads, self.workers)
        return self._pool_backend, self.workers

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def estimate_memory_gb(self, size: tuple[int, ...], spacing: tuple[float, ...]) -> float:
        """Working memory of one scan of ``size`` voxels at ``spacing`` mm (a header's ``(x, y, z)``),
        in GiB: the scan as read, and the resampled volume with its per-class accumulators. The
        resampled grid is taken at its largest over the ways the scan's axes can map to the model's
        (reorientation may permute them), each axis at least one voxel."""
        m = self.bundle.manifest
        dims = [float(n) * float(s) for n, s in zip(size[:3], spacing[:3])]
        grids = [math.prod(max(1.0, round(d / t)) for d, t in zip(order, m.spacing)) for order in permutations(dims)]
        voxels = max(max(grids), float(math.prod(m.patch_size)))
        per_voxel = BYTES_PER_VOXEL_BASE + 3 * 4 * m.num_classes  # accumulators, normalised and smoothed maps
        kept = 0.0
        if self.settings.mode == "adaptive" and self.settings.blend_above < 1 and m.kind.decodes_points:
            per_voxel += BYTES_PER_VOXEL_SECOND_PASS
            kept = float(RETAIN_BYTES)  # encoder features kept for it, at most
        return (voxels * per_voxel + kept + float(math.prod(int(n) for n in size)) * 8) / 2**30

    def check_memory(self, size: tuple[int, ...], spacing: tuple[float, ...]) -> None:
        """Refuse, before its voxels are read, a scan whose working memory would exceed ``max_memory_gb``
        or, where none was set, the share of this process's available memory (:mod:`.memory`)."""
        limit, why = self.checks.max_memory_gb, "--max-memory"
        if limit is None:
            limit, why = default_cap_gib(), "the memory this process may use; --max-memory sets another limit"
        if any(not (math.isfinite(s) and s > 0) for s in spacing[:3]):
            raise InputError(f"spacing {tuple(spacing[:3])} mm: not positive and finite")
        need = self.estimate_memory_gb(size, spacing)
        if limit is not None and need > limit:
            raise InputError(f"needs about {need:.2g} GiB of working memory, over {limit:.2g} GiB ({why})")

    def check_modality(self, image: sitk.Image) -> None:
        """Refuse a DICOM scan whose modality is not the model's (unless ``allow_modality``)."""
        m = self.bundle.manifest
        have = image.GetMetaData(MODALITY_TAG).strip().upper() if image.HasMetaDataKey(MODALITY_TAG) else None
        want = dicom_modality(m.fingerprint.modality if m.fingerprint else m.modality)
        if have and want and have != want and not self.checks.allow_modality:
            raise InputError(
                f"the scan is {have} but the model is for {want} ({m.describe()}); "
                "pass --allow-modality to run it anyway"
            )

    def segment(
        self,
        image: sitk.Image | str | os.PathLike,
        progress: Callable[[int, int], None] | None = None,
        probabilities: bool = False,
    ) -> Segmentation:
        """Segment a 3D scan (a SimpleITK image, or a path that :func:`.io.read_image` reads): the
        label map (uint8) on exactly its grid (size, origin, spacing, direction), this call's
        statistics, and with ``probabilities`` the class probabilities on that grid (resampled
        linearly where the spacing differs; holds every class map in memory)."""
        result = self._run(image, progress, probabilities)
        self._local.stats = result.stats
        return result

    def predict(
        self, image: sitk.Image | str | os.PathLike, progress: Callable[[int, int], None] | None = None
    ) -> sitk.Image:
        """The label map of :meth:`segment`."""
        return self.segment(image, progress).labels

    def predict_with_probabilities(
        self, image: sitk.Image | str | os.PathLike, progress: Callable[[int, int], None] | None = None
    ) -> tuple[sitk.Image, np.ndarray]:
        """The label map and the class probabilities ``(C, Z, Y, X)`` float32 of :meth:`segment`."""
        result = self.segment(image, progress, probabilities=True)
        return result.labels, result.probabilities  # type: ignore[return-value]

    def _run(
        self, image: sitk.Image | str | os.PathLike, progress: Callable[[int, int], None] | None, with_probs: bool
    ) -> Segmentation:
        t_read = time.perf_counter()
        if isinstance(image, str | os.PathLike):
            self.check_memory(*read_header(image))  # before any voxel is read or decompressed
            image = read_image(image)
        else:
            image = as_3d_scalar(image, "image")
        self.check_memory(image.GetSize(), image.GetSpacing())
        self.check_modality(image)
        m, p = self.bundle.manifest, self.bundle.manifest.preprocessing
        t0 = time.perf_counter()
        oriented = orient(image, p)
        warnings = domain_warnings(m.fingerprint, summarise(oriented, m.normalization)) if m.fingerprint else []
        if warnings and self.checks.refuse_out_of_domain:
            raise InputError("outside the model's domain: " + "; ".join(warnings) + " (--refuse-out-of-domain)")
        prepared = prepare(image, p, oriented)
        t1 = time.perf_counter()
        labels, stats, probs, quality, smoothed = self._infer(prepared, progress, with_probs)
        t2 = time.perf_counter()
        labels = restore(labels, prepared, image, m.keep_largest, smoothed, self._class_scale)
        del smoothed
        if probs is not None and oriented is not image:
            code = orientation_code(image)
            probs = [reorient(c, code) for c in probs]
        arrays = np.stack([sitk.GetArrayViewFromImage(c) for c in probs]) if probs is not None else None
        t3 = time.perf_counter()
        stats = self._stats(image, labels, stats, warnings, (t_read, t0, t1, t2, t3))
        stats["quality"] = quality.as_dict()
        return Segmentation(labels, stats, arrays, quality)

    def _infer(
        self, prepared: Prepared, progress: Callable[[int, int], None] | None, with_probs: bool
    ) -> tuple[sitk.Image, dict, list[sitk.Image] | None, QualityEstimate, np.ndarray | SmoothedProbabilities | None]:
        """Labels on the network's grid from the prepared scan, the loop's statistics, with
        ``with_probs`` each class's probabilities on the reoriented scan's grid (linear), the quality
        estimate (network grid), and the smoothed class probabilities on the network's grid (every
        map, or where the scan's spacing is not the network's a function giving them over a box;
        None otherwise), which :func:`.prepare.restore` interpolates where the spacings differ (the
        thin organs of CTs stored at other spacings lost voxels by nearest neighbour:
        docs/DESIGN-NOTES.md, "Back to the input grid")."""
        m = self.bundle.manifest
        volume, resampled, grid = prepared.volume, prepared.resampled, prepared.oriented
        backend, workers = self._backend_for(volume.shape)
        loop = Loop(backend, m.patch_size, self.settings, m.kind, workers, progress)
        probs, smoothed = None, None
        if with_probs:
            maps, stats = predict_probabilities(volume, loop)
            labels = choose_labels(maps, self.settings.logit_offsets)  # the labels predict_labels gives
            probs = [class_map_on(maps[c], resampled, grid) for c in range(maps.shape[0])]
            smoothed = maps
        elif resampled is not grid:
            labels, class_maps, stats = predict_labels_and_maps(volume, loop)
            smoothed = class_maps.smoothed
        else:
            labels, stats = predict_labels(volume, loop)
        assert stats.evidence is not None  # both loops sum it
        t = time.perf_counter()
        voxel_ml = float(np.prod(resampled.GetSpacing())) / 1000.0
        quality = estimate(stats.evidence, labels, voxel_ml, m.labels, m.quality, self.every_quality_feature)
        report = {**stats.as_dict(), "quality_s": round(stats.evidence_s + time.perf_counter() - t, 4)}
        return from_array(labels, Geometry.of(resampled)), report, probs, quality, smoothed

    def _stats(self, image: sitk.Image, labels: sitk.Image, stats: dict, warnings: list[str], t: tuple) -> dict:
        m = self.bundle.manifest
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        array = sitk.GetArrayViewFromImage(labels)
        counts = np.bincount(array[array != 0], minlength=m.num_classes)  # foreground only: 10x faster
        if not counts[1:].any():  # an untrained model, or a scan without the anatomy: never silent
            warnings = [*warnings, "nothing found for any label: the label map is empty"]
        return {
            **stats,
            "read_s": round(t[1] - t[0], 4),
            "preprocess_s": round(t[2] - t[1], 4),
            "inference_s": round(t[3] - t[2], 4),
            "resample_back_s": round(t[4] - t[3], 4),
            "total_s": round(t[4] - t[0], 4),
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "mode": m.kind.mode_of(self.settings.mode),
            "tta": self.settings.tta,
            "volumes_ml": {m.labels[k]: round(float(counts[k]) * voxel_ml, 3) for k in range(1, m.num_classes)},
            "warnings": warnings,
        }

    def predict_array(
        self,
        array: np.ndarray,
        spacing_zyx: Sequence[float] | None = None,
        *,
        direction: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        reference: sitk.Image | None = None,
    ) -> np.ndarray:
        """Label map ``(Z, Y, X)`` uint8 of a ``(Z, Y, X)`` intensity array. The array's grid is
        required, because the model works in the patient's anatomy and a guessed grid gives wrong
        labels silently: either ``reference``, the image the array's voxels come from (its spacing,
        origin and direction are used), or ``spacing_zyx`` in mm with ``direction`` (SimpleITK's nine
        numbers, ``image.GetDirection()``) and optionally ``origin`` (labels do not depend on it)."""
        arr = np.asarray(array)
        if arr.ndim != 3:
            raise InputError(f"array must be 3D (Z, Y, X), got shape {arr.shape}")
        image = sitk.GetImageFromArray(arr.astype(np.float32, copy=False))
        if reference is not None:
            if spacing_zyx is not None or direction is not None or origin is not None:
                raise InputError("pass reference, or spacing_zyx with direction, not both")
            if tuple(reference.GetSize()[::-1]) != arr.shape:
                raise InputError(f"array shape {arr.shape} is not the reference's {tuple(reference.GetSize()[::-1])}")
            image.CopyInformation(reference)
            return sitk.GetArrayFromImage(self.predict(image))
        if spacing_zyx is None or direction is None:
            raise InputError(
                "predict_array needs the array's grid: reference=IMAGE, or spacing_zyx=... with "
                "direction=IMAGE.GetDirection() (for an array already in LPS order, the identity "
                "(1, 0, 0, 0, 1, 0, 0, 0, 1))"
            )
        spacing = tuple(float(s) for s in spacing_zyx)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise InputError(f"spacing_zyx must be three positive numbers in mm, got {spacing_zyx!r}")
        matrix = np.asarray(direction, dtype=np.float64)
        if matrix.shape != (9,) or not np.allclose(matrix.reshape(3, 3) @ matrix.reshape(3, 3).T, np.eye(3), atol=1e-4):
            raise InputError(f"direction must be nine numbers forming a rotation (SimpleITK order), got {direction!r}")
        image.SetSpacing(spacing[::-1])
        image.SetDirection(tuple(matrix))
        if origin is not None:
            image.SetOrigin(tuple(float(o) for o in origin))
        return sitk.GetArrayFromImage(self.predict(image))

    def close(self) -> None:
        self.backend.close()
        if self._pool_backend is not None:
            self._pool_backend.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def class_map_on(values: np.ndarray, source: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """One class's probabilities ``(Z, Y, X)`` on ``source``'s grid, resampled linearly onto ``grid``."""
    img = from_array(np.ascontiguousarray(values, dtype=np.float32), Geometry.of(source))
    if source is grid:
        return img
    return sitk.Resample(img, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
