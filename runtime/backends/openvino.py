"""OpenVINO backend for CPUs: the convolutional graphs (the implicit encoder, the U-Net) run on
OpenVINO's own runtime (the ``openvino`` extra), which reads the bundle's ONNX graphs directly; the
implicit decoder runs on onnxruntime, whose int8 decoder is the fastest measured for it.

Measured per call on a 2-core AMD EPYC (AVX-512 with BF16; docs/BENCHMARKS.md): encoder 74-81 ms
on onnxruntime, 56 ms on OpenVINO f32, 38 ms bf16, 31 ms int8 (static); decoder, 900 points, 9.2 ms
on onnxruntime int8 against 24 ms on OpenVINO f32 and 35 ms running the same int8 graph. bf16
never touches the decoder, so its gather and positional encoding stay in float32 whatever the
precision (OpenVINO's bf16 hint put the gather and the encoding's arithmetic in bf16 when tried).
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np

from ..contract.bundle import Bundle
from ..errors import BackendError
from .ort import OrtBackend
from .precision import OPENVINO_PRECISIONS

PRECISIONS = OPENVINO_PRECISIONS
HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the graph's own quantisation, f32 elsewhere


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendError("the openvino backend needs OpenVINO: pip install 'imunet[openvino]'") from None
    return openvino


def cpu_has_bf16(core: Any) -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AMX or AVX-512 BF16)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(precision: str, has_bf16: bool, has_int8_encoder: bool) -> str:
    """``auto``: bf16 where the CPU has it, else fp32 (int8 only when asked: it changes the encoder's
    features most); an int8 request needs the bundle's static int8 convolutional graph."""
    if precision not in PRECISIONS:
        raise BackendError(f"--backend openvino runs {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if has_bf16 else "fp32"
    if precision == "bf16" and not has_bf16:
        raise BackendError("this CPU has no bf16 arithmetic (AMX or AVX-512 BF16); use --precision fp32")
    if precision == "int8" and not has_int8_encoder:
        raise BackendError("the bundle has no int8 encoder graph for OpenVINO; re-export it with --int8-encoder")
    return precision


class OpenVinoBackend:
    """The :class:`~imunet.runtime.backends.base.Backend` protocol with OpenVINO convolutions."""

    name = "openvino"
    features_reusable = True  # encode copies the outputs out of the infer request

    def __init__(
        self, bundle: Bundle, precision: str = "auto", threads: int = 0, streams: int = 1, pin_threads: bool = True
    ) -> None:
        ov = import_openvino()
        core = ov.Core()
        m = bundle.manifest
        self.skipped: list[str] = []
        graph = m.kind.entry_graph
        self.conv_precision = resolve_precision(
            precision, cpu_has_bf16(core), bundle.variant_for(graph, "int8") is not None
        )
        self.bundle, self.manifest, self.max_points = bundle, m, m.max_points
        # One stream per calling thread: a stream runs one request at a time, so workers sharing one
        # stream wait for each other (22.4 against 12.5 ms per encoder window with two workers on 2
        # cores, docs/DESIGN-NOTES.md). ``threads`` is per stream, as onnxruntime's is per session.
        config = {
            "INFERENCE_PRECISION_HINT": HINT[self.conv_precision],
            "NUM_STREAMS": streams,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads * streams
        # OpenVINO pins its threads to cores, counting from the first: right for a process that owns
        # every core it may run on, wrong for one given a share of them (a Ray actor of one CPU): two
        # such processes pinned both their threads to core 0 (8.7 s a CT each instead of 5.3 s,
        # docs/DESIGN-NOTES.md, "OpenVINO's thread pinning").
        config["ENABLE_CPU_PINNING"] = pin_threads
        source = bundle.graph_file(graph, "int8" if self.conv_precision == "int8" else None)
        try:
            self.compiled = core.compile_model(core.read_model(io.BytesIO(bundle.read(source))), "CPU", config)
        except RuntimeError as exc:
            raise BackendError(f"{bundle.path}: OpenVINO cannot load {source}: {str(exc).splitlines()[0]}") from None
        self.outputs = list(m.feature_names)  # OpenVINO keeps the ONNX names among each output's names
        self._local = threading.local()  # one infer request per thread: requests are not shared
        self.decoder: OrtBackend | None = None
        if m.kind.decodes_points:
            dec = "fp32" if self.conv_precision == "fp32" and precision != "auto" else "auto"
            self.decoder = OrtBackend(bundle, "ort-cpu", threads=threads, precision=dec, graphs=("decoder",))
        self._first_call()

    def _first_call(self) -> None:
        """One inference in the opening thread, before any worker thread calls.

        OpenVINO's Python bindings set up their numpy interface on first use behind a function-local
        static guard. Two threads arriving there together can deadlock: one holds the guard and waits
        for the GIL, the other holds the GIL and waits on the guard (seen as a CT-sized volume hanging
        for good; 3 of 20 fresh processes with 8 threads starting together hung, none of 30 after one
        call in the opening thread)."""
        zeros = np.zeros(self.manifest.patch_size, np.float32)
        if self.manifest.kind.decodes_points:
            self.encode(zeros)
        else:
            self.predict_dense(zeros)

    @property
    def precision(self) -> str:
        decoder = f", decoder {self.decoder.precision}" if self.decoder else ""
        return f"openvino {self.conv_precision}{decoder}"

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def encode(self, patch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._request().infer({"image": np.ascontiguousarray(patch, dtype=np.float32)[None, None]})
        return {n: np.array(result[self.compiled.output(n)]) for n in self.outputs}

    def decode(self, features: dict[str, np.ndarray], points: np.ndarray) -> np.ndarray:
        return self.decoder.decode(features, points)  # type: ignore[union-attr]

    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        result = self._request().infer({"image": np.ascontiguousarray(patch, dtype=np.float32)[None, None]})
        return np.array(result[self.compiled.output("logits")])[0]

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
