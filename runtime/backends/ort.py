"""onnxruntime backends: CPU (the embedded default), CUDA and TensorRT execution providers.

On the GPU providers the encoder's outputs are bound to device memory with I/O binding and
handed to the decoder as ``OrtValue`` objects, so feature maps never cross to the host; only
point indices go in and logits come out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Bundle

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


PRECISIONS = ("auto", "fp32", "int8")


class OrtBackend:
    """Runs a bundle's graphs with onnxruntime on the execution provider ``kind`` names."""

    def __init__(
        self, bundle: Bundle, kind: str = "ort-cpu", threads: int = 0, precision: str = "auto", spin: bool | None = None
    ) -> None:
        import onnxruntime as ort

        if kind not in PROVIDERS:
            raise BackendError(f"unknown onnxruntime backend {kind!r}; choose from {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[kind][0]
        if wanted not in ort.get_available_providers():
            raise BackendError(
                f"--backend {kind}: onnxruntime here has no {wanted} "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        self.name = kind
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.max_points = self.manifest.max_points
        self.on_device = kind != "ort-cpu"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if spin is None:
            # Encoder and decoder sessions alternate many times per window; each session's idle threads
            # would spin-wait and take the cores from the other (tools/bench_spinning.py, BENCHMARKS.md).
            spin = self.manifest.kind != "implicit"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers: list[Any] = list(PROVIDERS[kind])
        if kind == "ort-trt":
            # outside the bundle: it may be read-only, and its manifest covers its own files only
            digest = bundle.manifest.raw["files"].get(
                bundle.manifest.raw["graphs"]["decoder" if "decoder" in bundle.manifest.raw["graphs"] else "model"][
                    "file"
                ],
                "x",
            )
            cache = str(
                Path(os.environ.get("IMUNET_CACHE", Path.home() / ".cache" / "imunet")) / "ort-trt" / digest[:16]
            )
            Path(cache).mkdir(parents=True, exist_ok=True)
            providers[0] = (
                "TensorrtExecutionProvider",
                {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True,
                },
            )
        self.precision = self._decoder_precision(precision)
        self.sessions = {}
        for graph in bundle.manifest.raw["graphs"]:
            path = bundle.graph(graph)
            if graph == "decoder" and self.precision == "int8":
                path = bundle.variant("decoder_int8")  # type: ignore[assignment]
            try:
                self.sessions[graph] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendError(f"{bundle.path}: onnxruntime cannot load {graph} graph: {exc}") from None
        self._check_classes()
        self._ort = ort

    def _decoder_precision(self, precision: str) -> str:
        """``auto``: the int8 decoder on the CPU where the bundle has one, fp32 otherwise."""
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        has_int8 = self.bundle.variant("decoder_int8") is not None
        if precision == "auto":
            return "int8" if has_int8 and self.name == "ort-cpu" else "fp32"
        if precision == "int8" and not has_int8:
            raise BackendError(f"{self.bundle.path}: bundle has no int8 decoder (re-export it with imunet-export)")
        if precision == "int8" and self.name != "ort-cpu":
            raise BackendError("the int8 decoder is for --backend ort-cpu; GPUs run fp32 or TensorRT fp16")
        return precision

    def _check_classes(self) -> None:
        graph = "decoder" if "decoder" in self.sessions else "model"
        out = self.sessions[graph].get_outputs()[0]
        width = out.shape[-1] if graph == "decoder" else out.shape[1]
        if isinstance(width, int) and width != self.manifest.num_classes:
            raise BackendError(
                f"{self.bundle.path}: manifest lists {self.manifest.num_classes} labels but the "
                f"{graph} graph outputs {width} classes"
            )

    def encode(self, patch: np.ndarray) -> Any:
        image = np.ascontiguousarray(patch, dtype=np.float32)[None, None]
        sess = self.sessions["encoder"]
        names = [o.name for o in sess.get_outputs()]
        if not self.on_device:
            return dict(zip(names, sess.run(names, {"image": image})))
        binding = sess.io_binding()
        binding.bind_cpu_input("image", image)
        for n in names:
            binding.bind_output(n, "cuda")
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs()))  # OrtValues resident on the GPU

    def decode(self, features: Any, points: np.ndarray) -> np.ndarray:
        sess = self.sessions["decoder"]
        pts = np.ascontiguousarray(points, dtype=np.int32)
        if not self.on_device:
            return sess.run(["logits"], {**features, "points": pts})[0]
        binding = sess.io_binding()
        for n, value in features.items():
            binding.bind_ortvalue_input(n, value)
        binding.bind_cpu_input("points", pts)
        binding.bind_output("logits", "cpu")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(patch, dtype=np.float32)[None, None]
        return self.sessions["model"].run(["logits"], {"image": image})[0][0]

    def close(self) -> None:
        self.sessions.clear()
