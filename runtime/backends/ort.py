"""onnxruntime backends: CPU (the embedded default), CUDA and TensorRT execution providers.

Graphs are loaded from the bytes the bundle hashed (:meth:`Bundle.read`), so what runs is what was
verified, and a graph whose weights live in an external file cannot be loaded. On the GPU providers
the encoder's outputs are bound to device memory with I/O binding and handed to the decoder as
``OrtValue`` objects, so feature maps never cross to the host. A session that did not get the
provider it asked for is an error, never a silent fallback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.bundle import Bundle
from ..errors import BackendError
from .precision import PRECISIONS, graph_precisions

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
OPT_POINTS = 16384  # the decoder call size TensorRT optimises for (adaptive mode's calls are smaller)


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def check_provider(got: list[str], wanted: str, graph: str) -> None:
    """:class:`BackendError` unless a session's first provider is ``wanted`` (onnxruntime-gpu falls back
    to the CPU silently when the CUDA or TensorRT libraries cannot be loaded)."""
    if not got or got[0] != wanted:
        raise BackendError(
            f"onnxruntime gave the {graph} graph {', '.join(got) or 'no provider'} instead of {wanted}; "
            "the CUDA, cuDNN or TensorRT libraries it needs were not found (see its log with ORT_LOG=1)"
        )


def trt_cache_dir(bundle: Bundle, ort_version: str, trt_version: str) -> Path:
    """Engine-cache folder for ``ort-trt``, outside the bundle (it may be read-only): keyed by the
    graphs' sha256, onnxruntime's and TensorRT's versions, so a changed graph or library never reuses
    an engine."""
    graphs = "".join(bundle.manifest.files.get(g.file, "") for g in bundle.manifest.graphs.values())
    key = f"{ort_version}-trt{trt_version}-{graphs}"
    import hashlib

    root = Path(os.environ.get("IMUNET_CACHE", Path.home() / ".cache" / "imunet"))
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"ort{ort_version}-trt{trt_version}")
    return root / "ort-trt" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def trt_provider_options(graph: str, cache: Path, max_points: int) -> dict[str, Any]:
    """TensorRT execution-provider options for one graph. Precision is the graph's own (fp16 graphs
    carry their casts), so no ``trt_fp16_enable``; the decoder's point count gets a profile."""
    opts: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    if graph == "decoder":
        opt = min(OPT_POINTS, max_points)
        opts["trt_profile_min_shapes"] = "points:1x3"
        opts["trt_profile_opt_shapes"] = f"points:{opt}x3"
        opts["trt_profile_max_shapes"] = f"points:{max_points}x3"
    return opts


def tensorrt_version() -> str:
    """The installed TensorRT's version (the Python package), or ``unknown``."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return "unknown"


class OrtBackend:
    """Runs a bundle's graphs with onnxruntime on the execution provider ``kind`` names.

    ``precision``: see :func:`.precision.graph_precisions`. ``threads``: intra-op threads per
    session (0: onnxruntime's default, one per core). ``graphs``: load only these (another backend
    runs the rest)."""

    features_reusable = True  # every encoder call returns new arrays (or new device OrtValues)

    def __init__(
        self,
        bundle: Bundle,
        kind: str = "ort-cpu",
        threads: int = 0,
        precision: str = "auto",
        graphs: tuple[str, ...] | None = None,
    ) -> None:
        import onnxruntime as ort

        if kind not in PROVIDERS:
            raise BackendError(f"unknown onnxruntime backend {kind!r}; choose from {', '.join(PROVIDERS)}")
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        wanted = PROVIDERS[kind][0]
        if wanted not in ort.get_available_providers():
            raise BackendError(
                f"--backend {kind}: onnxruntime here has no {wanted} "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        self.name, self.bundle, self.manifest = kind, bundle, bundle.manifest
        self.skipped: list[str] = []
        self.max_points = self.manifest.max_points
        self.on_device = kind != "ort-cpu"
        self.precisions = {
            g: p for g, p in graph_precisions(bundle, kind, precision).items() if graphs is None or g in graphs
        }
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # Encoder and decoder alternate many times per window; idle threads of one session spin-waiting
        # would take the cores from the other (docs/DESIGN-NOTES.md, "onnxruntime thread spinning").
        spin = not self.manifest.kind.decodes_points
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        cache = trt_cache_dir(bundle, ort.__version__, tensorrt_version()) if kind == "ort-trt" else None
        self.sessions = {}
        for graph, prec in self.precisions.items():
            name = bundle.graph_file(graph, prec)
            providers: list[Any] = list(PROVIDERS[kind])
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                providers[0] = (providers[0], trt_provider_options(graph, cache, self.max_points))
            graph_bytes = bundle.read(name)  # hashed as read: what runs is what the manifest vouches for
            try:
                sess = ort.InferenceSession(graph_bytes, opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendError(f"{bundle.path}: onnxruntime cannot load {name}: {exc}") from None
            check_provider(sess.get_providers(), wanted, graph)
            self.sessions[graph] = sess
        self._check_classes()

    @property
    def precision(self) -> str:
        """What runs at which precision, e.g. ``fp32`` or ``decoder int8``."""
        lowered = {g: p for g, p in self.precisions.items() if p != "fp32"}
        if not lowered:
            return "fp32"
        if len(set(lowered.values())) == 1 and len(lowered) == len(self.precisions):
            return next(iter(lowered.values()))
        return ", ".join(f"{g} {p}" for g, p in lowered.items())

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
