"""Build TensorRT engines for a bundle's graphs (needs ``tensorrt`` 10 or 11 and an NVIDIA GPU).

Engines go to ``engines/<gpu>-trt<version>-<precision>/`` with ``encoder.plan``, ``decoder.plan``
(or ``model.plan``) and the reused ``timing.cache``; the manifest records what they were built
for and hashes them, and the runtime refuses an engine whose record does not match its GPU, its
TensorRT or the bundle's graphs.

Precision is a property of the graph: every network is built strongly typed (the only mode in
TensorRT 11; opted into on 10.x), so an fp32 graph gives an fp32 engine and the bundle's fp16
variants, which carry their own casts, give fp16 engines with the gather, the coordinate arithmetic
and the positional encoding in float32. No weak-typing API (``BuilderFlag.FP16``, layer
precisions, ``OBEY_PRECISION_CONSTRAINTS``) is used.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from imunet.runtime.backends.precision import ENGINE_PRECISIONS
from imunet.runtime.backends.trt import engine_dir_name, gpu_info, import_tensorrt
from imunet.runtime.contract.bundle import Bundle
from imunet.runtime.contract.manifest import EngineRecord, Manifest
from imunet.runtime.errors import BackendError

from .variants import sample_points


def check_points_profile(profile: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(min, opt, max)`` points per decoder call, validated: ``1 <= min <= opt <= max``."""
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"points profile needs 1 <= min <= opt <= max, got min {lo}, opt {opt}, max {hi}")
    return lo, opt, hi


def strongly_typed_network(builder: Any, trt: Any) -> Any:
    """A network definition with strong typing: the ``STRONGLY_TYPED`` flag where the enum still
    has it (10.x; deprecated and always on in 11)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(0 if flag is None else 1 << int(flag))


def build_engine(
    onnx: bytes,
    plan_path: Path,
    cache_path: Path,
    points_profile: tuple[int, int, int] | None = None,
    workspace_gb: float = 4.0,
) -> dict[str, Any]:
    """Parse an ONNX graph, build a strongly typed engine, write it; returns build facts."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = strongly_typed_network(builder, trt)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {plan_path.stem}.onnx: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 graphs stay fp32 (the reference the fp16 ones are held to)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if points_profile is not None:
        lo, opt, hi = check_points_profile(points_profile)
        profile = builder.create_optimization_profile()
        profile.set_shape("points", (lo, 3), (opt, 3), (hi, 3))
        config.add_optimization_profile(profile)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {plan_path.stem}")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"build_s": round(time.perf_counter() - t, 2), "layers": int(network.num_layers)}


def build_engines(bundle: Bundle, precision: str, points_profile: tuple[int, int, int]) -> EngineRecord:
    """Build every graph of ``bundle`` at ``precision`` (the fp16 variants for ``fp16``) into
    ``engines/<gpu>-trt<version>-<precision>/``; returns the record for the manifest."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"--trt must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    profile = check_points_profile(points_profile)
    trt = import_tensorrt()
    if precision == "fp16" and not bundle.has_precision("fp16"):
        raise BackendError("the bundle has no fp16 graphs to build fp16 engines from; re-export it")
    gpu = gpu_info()
    sub = f"engines/{engine_dir_name(gpu, trt.__version__, precision)}"
    out = bundle.path / sub
    out.mkdir(parents=True, exist_ok=True)
    facts, used = {}, {}
    for graph in bundle.manifest.graphs:
        name = bundle.graph_file(graph, precision)
        used[graph] = bundle.manifest.files[name]
        facts[graph] = build_engine(
            bundle.read(name), out / f"{graph}.plan", out / "timing.cache", profile if graph == "decoder" else None
        )
    points = profile if bundle.manifest.kind.decodes_points else None
    return EngineRecord(sub, gpu.name, gpu.compute_capability, trt.__version__, precision, used, points, facts)


def with_engine(manifest: Manifest, record: EngineRecord) -> Manifest:
    """``manifest`` with ``record`` added; a rebuild into the same folder replaces the old record."""
    return replace(manifest, engines=(*(e for e in manifest.engines if e.dir != record.dir), record))


def engine_parity(bundle: Bundle, precision: str, points: int = 8192, seed: int = 0) -> dict[str, Any]:
    """Engines against onnxruntime (CPU, fp32) on a random patch: max |probability| difference and
    argmax agreement of the decoder (at points that include the patch corners), or of the dense
    model's voxels."""
    from imunet.runtime.backends.ort import OrtBackend
    from imunet.runtime.backends.trt import TensorRTBackend
    from imunet.runtime.kernels.labels import softmax

    m = bundle.manifest
    trt_b, ort_b = TensorRTBackend(bundle, precision), OrtBackend(bundle, "ort-cpu", precision="fp32")
    rng = np.random.default_rng(seed)
    patch = rng.normal(size=m.patch_size).astype(np.float32)
    try:
        if m.kind.decodes_points:
            pts = sample_points(m.patch_size, min(points, trt_b.max_points), rng)
            a = softmax(trt_b.decode(trt_b.encode(patch), pts))
            b = softmax(ort_b.decode(ort_b.encode(patch), pts))
        else:
            a = softmax(trt_b.predict_dense(patch), axis=0).reshape(m.num_classes, -1).T
            b = softmax(ort_b.predict_dense(patch), axis=0).reshape(m.num_classes, -1).T
    finally:
        trt_b.close()
        ort_b.close()
    return {
        "reference": "onnxruntime-cpu fp32",
        "max_abs_prob_diff": float(np.abs(a - b).max()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "points": int(len(a)),
    }
