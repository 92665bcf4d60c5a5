"""Build TensorRT engines for a bundle's graphs (needs ``tensorrt`` and an NVIDIA GPU).

Engines go to ``engines/<gpu>-trt<version>-<precision>/`` with ``encoder.plan``,
``decoder.plan`` (or ``model.plan``), the reused ``timing.cache`` and ``engine.json`` recording
what they were built for; the runtime refuses an engine whose record does not match its GPU,
its TensorRT or the bundle's graphs. In fp16 engines the gather, coordinate normalisation and
positional encoding (everything before the decoder's first matrix multiply) are pinned to fp32:
the encoding's highest frequency reaches arguments of ~1,600, where float16 steps by 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from imunet.runtime.backends.trt import engine_dir_name, gpu_info, import_tensorrt
from imunet.runtime.errors import BackendError


def _pin_preamble_fp32(network, trt) -> int:
    """Force fp32 on every layer before the first matrix multiply; returns how many were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.FULLY_CONNECTED):
            break
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            continue
        if any(layer.get_output(j).dtype in (trt.float32, trt.float16) for j in range(layer.num_outputs)):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    cache_path: Path,
    precision: str,
    points_profile: tuple[int, int, int] | None = None,
    workspace_gb: float = 4.0,
) -> dict:
    """Parse ``onnx_path`` and write a serialized engine; returns build facts for the record."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    pinned = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_preamble_fp32(network, trt)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if points_profile is not None:
        profile = builder.create_optimization_profile()
        lo, opt, hi = points_profile
        profile.set_shape("points", (lo, 3), (opt, 3), (hi, 3))
        config.add_optimization_profile(profile)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {onnx_path.name}")
    build_s = time.perf_counter() - t
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"build_s": round(build_s, 2), "fp32_pinned_layers": pinned}


def build_engines(
    bundle_dir: Path,
    graphs: dict[str, Path],
    precision: str,
    points_profile: tuple[int, int, int],
    graph_sha256: dict[str, str],
) -> dict:
    """Build every graph of a bundle into ``engines/<gpu>-trt<ver>-<precision>/``; returns its record."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"--trt must be fp16 or fp32, got {precision!r}")
    trt = import_tensorrt()
    gpu = gpu_info()
    sub = Path("engines") / engine_dir_name(gpu, trt.__version__, precision)
    out = bundle_dir / sub
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "timing.cache"
    facts = {}
    for name, onnx_path in graphs.items():
        facts[name] = build_engine(
            onnx_path, out / f"{name}.plan", cache, precision, points_profile if name == "decoder" else None
        )
    record = {
        "dir": str(sub),
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt": trt.__version__,
        "precision": precision,
        "points_profile": list(points_profile),
        "graphs_sha256": graph_sha256,
        "build": facts,
    }
    (out / "engine.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def engine_parity(bundle_dir: Path, precision: str, points: int = 8192, seed: int = 0) -> dict:
    """Engines against onnxruntime (CPU, fp32) on a random patch: max |probability| difference and
    the argmax agreement rate of the decoder, or of the dense model's voxels."""
    import numpy as np

    from imunet.runtime.backends.ort import OrtBackend
    from imunet.runtime.backends.trt import TensorRTBackend
    from imunet.runtime.inference import softmax
    from imunet.runtime.manifest import load_bundle

    bundle = load_bundle(bundle_dir)
    trt_b, ort_b = TensorRTBackend(bundle, precision), OrtBackend(bundle, "ort-cpu")
    rng = np.random.default_rng(seed)
    patch = rng.normal(size=bundle.manifest.patch_size).astype(np.float32)
    try:
        if bundle.manifest.kind == "implicit":
            pts = np.stack([rng.integers(0, s, points) for s in bundle.manifest.patch_size], 1).astype(np.int32)
            pts = pts[: trt_b.max_points]
            a = softmax(trt_b.decode(trt_b.encode(patch), pts))
            b = softmax(ort_b.decode(ort_b.encode(patch), pts))
        else:
            a = softmax(trt_b.predict_dense(patch), axis=0).reshape(bundle.manifest.num_classes, -1).T
            b = softmax(ort_b.predict_dense(patch), axis=0).reshape(bundle.manifest.num_classes, -1).T
    finally:
        trt_b.close()
        ort_b.close()
    return {
        "reference": "onnxruntime-cpu fp32",
        "max_abs_prob_diff": float(np.abs(a - b).max()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "points": int(len(a)),
    }
