"""Inference backends behind one small protocol; each imports its own library lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BackendError, ImunetError
from .base import Backend

if TYPE_CHECKING:  # pragma: no cover
    from ..contract.bundle import Bundle

KINDS = ("auto", "ort-cpu", "openvino", "ort-cuda", "ort-trt", "tensorrt")

__all__ = ["Backend", "KINDS", "open_backend"]


def _open(
    bundle: Bundle,
    kind: str,
    precision: str,
    cpu_threads: int,
    feature_slots: int = 1,
    callers: int = 1,
    pin_threads: bool = True,
) -> Backend:
    if kind == "tensorrt":
        from .trt import TensorRTBackend

        return TensorRTBackend(bundle, precision, feature_slots)
    if kind == "openvino":
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(bundle, precision, threads=cpu_threads, streams=callers, pin_threads=pin_threads)
    from .ort import OrtBackend

    return OrtBackend(bundle, kind, threads=cpu_threads if kind == "ort-cpu" else 0, precision=precision)


def open_backend(
    bundle: Bundle,
    kind: str = "auto",
    precision: str = "auto",
    cpu_threads: int = 0,
    feature_slots: int = 1,
    callers: int = 1,
    pin_threads: bool = True,
) -> Backend:
    """The backend ``kind`` for ``bundle``.

    ``auto`` tries native TensorRT (when the bundle has engines), then onnxruntime's CUDA provider
    (when installed), then OpenVINO (when installed: faster than onnxruntime's CPU kernels for the
    convolutions), then onnxruntime on the CPU; the reason each backend was passed over is kept in the
    returned backend's ``skipped`` list, so callers can say why. A named backend
    that cannot be opened is an error. ``precision``: see :mod:`.precision`. ``cpu_threads``:
    onnxruntime intra-op threads of a CPU backend (0: one per core). ``feature_slots``: windows whose
    feature maps must stay alive at once (test-time mirroring encodes each window once per flip).
    ``callers``: threads that call the backend at once (the CPU pool's workers), each with
    ``cpu_threads`` threads of its own. ``pin_threads``: let OpenVINO pin its threads to cores, right
    only for a process whose threads may take every core it runs on (not for one given a share)."""
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}; choose from {', '.join(KINDS)}")
    if kind != "auto":
        return _open(bundle, kind, precision, cpu_threads, feature_slots, callers, pin_threads)
    from .ort import available_providers

    skipped: list[str] = []
    candidates = []
    if bundle.manifest.engines:
        candidates.append("tensorrt")
    if "CUDAExecutionProvider" in available_providers():
        candidates.append("ort-cuda")
    if _installed("openvino"):
        candidates.append("openvino")
    for name in candidates:
        try:
            backend = _open(bundle, name, precision, cpu_threads, feature_slots, callers, pin_threads)
        except ImunetError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        backend.skipped.extend(skipped)
        return backend
    backend = _open(bundle, "ort-cpu", precision, cpu_threads)
    backend.skipped.extend(skipped)
    return backend


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None
