"""Native TensorRT backend: runs the bundle's serialized engines on one CUDA stream.

Needs ``tensorrt`` and ``cuda-python`` (both in the ``gpu`` extra). The encoder writes its
feature maps into device buffers that are bound directly as the decoder's inputs; per decoder
call only the points go up and the logits come down. An engine is used only if its
``engine.json`` matches this GPU, this TensorRT and the bundle's graph hashes.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Bundle


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str


def gpu_info() -> GpuInfo:
    """Name and compute capability of GPU 0, from ``nvidia-smi``; :class:`BackendError` when none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        raise BackendError("no NVIDIA GPU found (nvidia-smi is not available)") from None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if not line:
        raise BackendError("no NVIDIA GPU found (nvidia-smi lists none)")
    name, cc = (s.strip() for s in line.split(",", 1))
    return GpuInfo(name, cc)


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed (pip install 'imunet[gpu]')") from None
    return trt


def engine_dir_name(gpu: GpuInfo, trt_version: str, precision: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-")
    return f"{slug}-trt{trt_version}-{precision}"


def select_engine(manifest: dict, gpu: GpuInfo, trt_version: str, precision: str | None = None) -> dict:
    """The engine record of a manifest usable on ``gpu`` with TensorRT ``trt_version``.

    Raises :class:`BackendError` listing why each engine was refused (other GPU, other TensorRT,
    built from other graphs than the bundle holds now). Pure: no TensorRT needed to decide.
    """
    records = manifest.get("engines", [])
    if not records:
        raise BackendError("bundle has no TensorRT engines; export with --trt fp16 on this GPU")
    files, graphs = manifest["files"], manifest["graphs"]
    reasons = []
    for rec in records:
        if precision and rec["precision"] != precision:
            reasons.append(f"{rec['dir']} is {rec['precision']}, not {precision}")
        elif rec["gpu"] != gpu.name or rec["compute_capability"] != gpu.compute_capability:
            reasons.append(f"{rec['dir']} was built for {rec['gpu']} (sm {rec['compute_capability']})")
        elif rec["tensorrt"] != trt_version:
            reasons.append(f"{rec['dir']} was built with TensorRT {rec['tensorrt']}, this is {trt_version}")
        elif any(files.get(graphs[g]["file"]) != h for g, h in rec["graphs_sha256"].items()):
            reasons.append(f"{rec['dir']} was built from other graphs than the bundle's")
        else:
            return rec
    raise BackendError(
        f"no engine usable on {gpu.name} with TensorRT {trt_version}: "
        + "; ".join(reasons)
        + ". Rebuild with imunet-export --trt, or use --backend ort-cuda"
    )


def find_engine(bundle: Bundle, precision: str | None = None) -> dict:
    """The engine record of ``bundle`` built for this machine's GPU and TensorRT, or a clear refusal."""
    trt = import_tensorrt()
    try:
        return select_engine(bundle.manifest.raw, gpu_info(), trt.__version__, precision)
    except BackendError as exc:
        raise BackendError(f"{bundle.path}: {exc}") from None


class _Cuda:
    """The few CUDA runtime calls we need, through cuda-python."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt  # cuda-python < 12.6
            except ImportError:
                raise BackendError("the tensorrt backend needs cuda-python (pip install cuda-python)") from None
        self.rt = rt
        self.stream = self._ok(rt.cudaStreamCreate())

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendError(f"CUDA error {err}")
        return rest[0] if rest else None

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(nbytes, 1))))

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        self._ok(
            self.rt.cudaMemcpyAsync(
                ptr, array.ctypes.data, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            )
        )

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        self._ok(
            self.rt.cudaMemcpyAsync(
                array.ctypes.data, ptr, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            )
        )

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)


class TensorRTBackend:
    """The :class:`~imunet.runtime.backends.base.Backend` protocol over native TensorRT engines."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str | None = None) -> None:
        trt = import_tensorrt()
        self.record = find_engine(bundle, precision)
        self.manifest = bundle.manifest
        self.max_points = int(self.record["points_profile"][2]) if self.manifest.kind == "implicit" else 0
        self.cuda = _Cuda()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for graph in self.manifest.raw["graphs"]:
            plan = Path(bundle.path) / self.record["dir"] / f"{graph}.plan"
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise BackendError(f"{plan}: TensorRT could not deserialize the engine")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
        self.buffers: dict[str, int] = {}
        self._trt = trt
        self._allocate()

    def _allocate(self) -> None:
        c = self.manifest.num_classes
        patch = self.manifest.patch_size
        self.buffers["image"] = self.cuda.malloc(4 * int(np.prod(patch)))
        if self.manifest.kind == "unet":
            self.buffers["logits"] = self.cuda.malloc(4 * c * int(np.prod(patch)))
            return
        for name in self.manifest.feature_names:
            shape = self.engines["encoder"].get_tensor_shape(name)
            self.buffers[name] = self.cuda.malloc(4 * int(np.prod(shape)))
            self.contexts["encoder"].set_tensor_address(name, self.buffers[name])
            self.contexts["decoder"].set_tensor_address(name, self.buffers[name])
        self.buffers["points"] = self.cuda.malloc(4 * 3 * self.max_points)
        self.buffers["logits"] = self.cuda.malloc(4 * c * self.max_points)
        self.contexts["encoder"].set_tensor_address("image", self.buffers["image"])
        self.contexts["decoder"].set_tensor_address("points", self.buffers["points"])
        self.contexts["decoder"].set_tensor_address("logits", self.buffers["logits"])

    def _run(self, graph: str) -> None:
        if not self.contexts[graph].execute_async_v3(self.cuda.stream):
            raise BackendError(f"TensorRT {graph} engine failed to execute")

    def encode(self, patch: np.ndarray) -> str:
        self.cuda.to_device(self.buffers["image"], np.ascontiguousarray(patch, dtype=np.float32))
        self._run("encoder")
        return "device"  # features live in self.buffers, bound to the decoder already

    def decode(self, features: Any, points: np.ndarray) -> np.ndarray:
        pts = np.ascontiguousarray(points, dtype=np.int32)
        ctx = self.contexts["decoder"]
        ctx.set_input_shape("points", pts.shape)
        self.cuda.to_device(self.buffers["points"], pts)
        self._run("decoder")
        out = np.empty((len(pts), self.manifest.num_classes), dtype=np.float32)
        self.cuda.to_host(out, self.buffers["logits"])
        self.cuda.sync()
        return out

    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        ctx = self.contexts["model"]
        ctx.set_tensor_address("image", self.buffers["image"])
        ctx.set_tensor_address("logits", self.buffers["logits"])
        self.cuda.to_device(self.buffers["image"], np.ascontiguousarray(patch, dtype=np.float32))
        self._run("model")
        out = np.empty((self.manifest.num_classes, *self.manifest.patch_size), dtype=np.float32)
        self.cuda.to_host(out, self.buffers["logits"])
        self.cuda.sync()
        return out

    def close(self) -> None:
        for ptr in self.buffers.values():
            self.cuda.free(ptr)
        self.buffers.clear()
