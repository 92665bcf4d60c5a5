"""Which graph runs at which precision: a pure decision from the bundle's variants and the backend.

A precision is a property of a graph: the bundle's ``variants`` hold int8 and fp16 graphs with the
same inputs and outputs as the fp32 ones they replace, each with its parity figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from ..contract.bundle import Bundle
    from ..contract.manifest import Variant

PRECISIONS = ("auto", "fp32", "fp16", "int8")  # onnxruntime and TensorRT backends
OPENVINO_PRECISIONS = ("auto", "fp32", "bf16", "int8")
EXPORTED_PRECISIONS = ("fp32", "fp16")  # graphs the exporter writes from PyTorch (int8 ones are quantised)
ENGINE_PRECISIONS = ("fp16", "fp32")  # TensorRT engines imunet-export builds
GPU_KINDS = ("ort-cuda", "ort-trt", "tensorrt")


def graph_precisions(bundle: Bundle, kind: str, precision: str) -> dict[str, str]:
    """``{graph: precision}`` for every graph of ``bundle`` on backend ``kind``.

    ``auto``: on the CPU the int8 graphs the bundle ships (its int8 decoder: half the decoder's time
    at the same Dice), fp32 elsewhere; on a GPU the fp16 graphs where the bundle has them.
    ``fp32``: every graph in fp32. ``fp16`` / ``int8``: every graph that has a variant of that
    precision uses it; a bundle without any is refused. int8 graphs are CPU graphs.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    graphs = list(bundle.manifest.graphs)
    gpu = kind in GPU_KINDS
    if precision == "auto":
        precision = "fp16" if gpu else "int8"
        if not any(runs_on(bundle.variant_for(g, precision), kind) for g in graphs):
            return {g: "fp32" for g in graphs}
    if precision == "fp32":
        return {g: "fp32" for g in graphs}
    if precision == "int8" and gpu:
        raise BackendError("int8 graphs are for the CPU backends; GPUs run fp16 or fp32")
    if not any(runs_on(bundle.variant_for(g, precision), kind) for g in graphs):
        raise BackendError(
            f"{bundle.path}: bundle has no {precision} graphs for {kind} (re-export it with imunet-export)"
        )
    return {g: precision if runs_on(bundle.variant_for(g, precision), kind) else "fp32" for g in graphs}


def runs_on(variant: Variant | None, kind: str) -> bool:
    """Whether a variant is meant for backend ``kind`` (its ``backend`` lists backends, comma-separated)."""
    return variant is not None and kind in (b.strip() for b in variant.backend.split(","))
