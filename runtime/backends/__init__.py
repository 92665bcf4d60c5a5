"""Inference backends behind one small protocol; each imports its own library lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BackendError, ImunetError
from .base import Backend

if TYPE_CHECKING:  # pragma: no cover
    from ..manifest import Bundle

KINDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")

__all__ = ["Backend", "KINDS", "open_backend"]


def open_backend(bundle: Bundle, kind: str = "auto", precision: str = "auto", cpu_threads: int = 0) -> Backend:
    """The backend ``kind`` for ``bundle``; ``auto`` tries TensorRT, then CUDA, then the CPU.

    ``precision`` (onnxruntime only): ``auto`` runs the bundle's int8 decoder on the CPU where it has
    one; ``fp32`` never does; ``int8`` insists (CPU only). ``cpu_threads``: onnxruntime intra-op
    threads of a CPU backend (0: onnxruntime's default, one per core)."""
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "tensorrt":
        from .trt import TensorRTBackend

        return TensorRTBackend(bundle)
    if kind != "auto":
        from .ort import OrtBackend

        return OrtBackend(bundle, kind, threads=cpu_threads if kind == "ort-cpu" else 0, precision=precision)
    from .ort import OrtBackend, available_providers

    providers = available_providers()
    if bundle.manifest.raw.get("engines"):
        try:
            from .trt import TensorRTBackend

            return TensorRTBackend(bundle)
        except ImunetError:
            pass  # no usable engine here: fall through to onnxruntime
    if "CUDAExecutionProvider" in providers:
        try:
            return OrtBackend(bundle, "ort-cuda", precision="fp32" if precision == "auto" else precision)
        except ImunetError:
            pass
    return OrtBackend(bundle, "ort-cpu", threads=cpu_threads, precision=precision)
