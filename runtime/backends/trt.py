"""Native TensorRT backend: runs the bundle's serialized engines on one CUDA stream.

Needs ``tensorrt`` (10 or 11) and ``cuda-python`` (both in the ``gpu`` extra). The encoder writes
its feature maps into device buffers that are bound directly as the decoder's inputs; per decoder
call only the points go up and the logits come down, through pinned host buffers. An engine is
used only if its record matches this GPU, this TensorRT and the bundle's graph hashes, and it is
deserialised from bytes checked against the manifest's sha256.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contract.bundle import Bundle
from ..contract.manifest import EngineRecord
from ..errors import BackendError


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6
        except ImportError:
            raise BackendError("the tensorrt backend needs cuda-python (pip install 'imunet[gpu]')") from None
    return rt


def gpu_info() -> GpuInfo:
    """Name and compute capability of the first GPU this process sees (``CUDA_VISIBLE_DEVICES``
    respected): from the CUDA runtime through cuda-python, else from ``nvidia-smi``."""
    try:
        rt = _cudart()
        err, props = rt.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return GpuInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")
    except BackendError:
        pass
    return _nvidia_smi_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _nvidia_smi_gpu(visible: str | None) -> GpuInfo:
    """The first visible GPU as ``nvidia-smi`` names it (``visible``: ``CUDA_VISIBLE_DEVICES``)."""
    first = (visible or "").split(",")[0].strip()
    if visible is not None and not first:
        raise BackendError("no NVIDIA GPU is visible (CUDA_VISIBLE_DEVICES is empty)")
    cmd = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"] + (["-i", first] if first else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        raise BackendError("no NVIDIA GPU found (nvidia-smi is not available)") from None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if not line:
        raise BackendError(f"no NVIDIA GPU found (nvidia-smi lists none{' for ' + first if first else ''})")
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


def select_engine(bundle: Bundle, gpu: GpuInfo, trt_version: str, precision: str | None = None) -> EngineRecord:
    """The engine record of ``bundle`` usable on ``gpu`` with TensorRT ``trt_version``.

    Raises :class:`BackendError` listing why each engine was refused (other precision, GPU or
    TensorRT, or built from other graphs than the bundle holds now). Pure: no TensorRT needed."""
    m = bundle.manifest
    if not m.engines:
        raise BackendError("bundle has no TensorRT engines; export with --trt fp16 on this GPU")
    reasons = []
    for rec in m.engines:
        if precision and rec.precision != precision:
            reasons.append(f"{rec.dir} is {rec.precision}, not {precision}")
        elif rec.gpu != gpu.name or rec.compute_capability != gpu.compute_capability:
            reasons.append(f"{rec.dir} was built for {rec.gpu} (sm {rec.compute_capability})")
        elif rec.tensorrt != trt_version:
            reasons.append(f"{rec.dir} was built with TensorRT {rec.tensorrt}, this is {trt_version}")
        elif any(m.files.get(bundle.graph_file(g, rec.precision)) != h for g, h in rec.graphs_sha256.items()):
            reasons.append(f"{rec.dir} was built from other graphs than the bundle's")
        else:
            return rec
    raise BackendError(
        f"no engine usable on {gpu.name} with TensorRT {trt_version}: "
        + "; ".join(reasons)
        + ". Rebuild with imunet-export --trt, or use --backend ort-cuda"
    )


class Cuda:
    """The few CUDA runtime calls the backend needs, through cuda-python: one stream, device buffers
    and pinned host buffers, all released by :meth:`close`."""

    def __init__(self) -> None:
        self.rt = _cudart()
        self.stream = self._ok(self.rt.cudaStreamCreate())
        self._device: list[int] = []
        self._host: list[int] = []

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendError(f"CUDA error {int(err)} ({err})")
        return rest[0] if rest else None

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._ok(self.rt.cudaMalloc(max(nbytes, 1))))
        self._device.append(ptr)
        return ptr

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A page-locked host array (so asynchronous copies really are asynchronous)."""
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        ptr = int(self._ok(self.rt.cudaMallocHost(nbytes)))
        self._host.append(ptr)
        raw = (ctypes.c_ubyte * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=np.uint8, count=int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def close(self) -> None:
        for ptr in self._device:
            self.rt.cudaFree(ptr)
        for ptr in self._host:
            self.rt.cudaFreeHost(ptr)
        self._device.clear()
        self._host.clear()
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class TensorRTBackend:
    """The :class:`~imunet.runtime.backends.base.Backend` protocol over native TensorRT engines.

    ``precision``: ``auto`` takes the bundle's fp16 engines where this GPU has them, else fp32.
    ``feature_slots``: how many windows' feature maps can be alive at once (test-time mirroring
    encodes several before decoding)."""

    name = "tensorrt"
    features_reusable = False  # features live in a ring of device slots that later windows overwrite

    def __init__(self, bundle: Bundle, precision: str = "auto", feature_slots: int = 1) -> None:
        trt = import_tensorrt()
        self.trt, self.bundle, self.manifest = trt, bundle, bundle.manifest
        self.skipped: list[str] = []
        self.record = self._pick(bundle, precision)
        self.precision = self.record.precision
        profile_max = self.record.points_profile[2] if self.record.points_profile else 0
        self.max_points = min(profile_max, self.manifest.max_points) if self.manifest.kind.decodes_points else 0
        self.cuda = Cuda()
        try:
            self._load(trt)
            self._allocate(max(1, feature_slots))
        except BaseException:
            self.close()
            raise

    def _pick(self, bundle: Bundle, precision: str) -> EngineRecord:
        gpu, version = gpu_info(), self.trt.__version__
        if precision not in ("auto", "fp16", "fp32"):
            raise BackendError(f"--backend tensorrt runs fp16 or fp32 engines, not {precision}")
        if precision != "auto":
            return select_engine(bundle, gpu, version, precision)
        try:
            return select_engine(bundle, gpu, version, "fp16")
        except BackendError:
            return select_engine(bundle, gpu, version, "fp32")

    def _load(self, trt: Any) -> None:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for graph in self.manifest.graphs:
            plan = f"{self.record.dir}/{graph}.plan"
            engine = runtime.deserialize_cuda_engine(self.bundle.read(plan))  # sha256-checked bytes
            if engine is None:
                raise BackendError(f"{self.bundle.path}: TensorRT could not deserialize {plan}")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()

    def _device_tensor(self, graph: str, name: str) -> int:
        """A device buffer for I/O tensor ``name`` of ``graph`` at its static shape and type."""
        engine = self.engines[graph]
        dtype = np.dtype(self.trt.nptype(engine.get_tensor_dtype(name)))
        return self.cuda.malloc(int(np.prod(tuple(engine.get_tensor_shape(name)))) * dtype.itemsize)

    def _allocate(self, slots: int) -> None:
        c, patch = self.manifest.num_classes, self.manifest.patch_size
        graph = self.manifest.kind.entry_graph
        self.host_image = self.cuda.pinned(patch, np.float32)
        self.image = self.cuda.malloc(self.host_image.nbytes)
        self.contexts[graph].set_tensor_address("image", self.image)
        if not self.manifest.kind.decodes_points:
            self.host_logits = self.cuda.pinned((c, *patch), np.float32)
            self.logits = self.cuda.malloc(self.host_logits.nbytes)
            self.contexts["model"].set_tensor_address("logits", self.logits)
            return
        names = self.manifest.feature_names
        self.slots = [{n: self._device_tensor("encoder", n) for n in names} for _ in range(slots)]
        self._next = 0
        self.host_points = self.cuda.pinned((self.max_points, 3), np.int32)
        self.host_logits = self.cuda.pinned((self.max_points, c), np.float32)
        self.points, self.logits = self.cuda.malloc(self.host_points.nbytes), self.cuda.malloc(self.host_logits.nbytes)
        self.contexts["decoder"].set_tensor_address("points", self.points)
        self.contexts["decoder"].set_tensor_address("logits", self.logits)

    def _run(self, graph: str) -> None:
        if not self.contexts[graph].execute_async_v3(self.cuda.stream_handle):
            raise BackendError(f"TensorRT {graph} engine failed to execute")

    def encode(self, patch: np.ndarray) -> int:
        """Encode a window into the next feature slot; the slot's index is the handle."""
        slot = self._next
        self._next = (self._next + 1) % len(self.slots)
        for name, ptr in self.slots[slot].items():
            self.contexts["encoder"].set_tensor_address(name, ptr)
        self.host_image[...] = patch
        self.cuda.to_device(self.image, self.host_image)
        self._run("encoder")
        return slot

    def decode(self, features: int, points: np.ndarray) -> np.ndarray:
        n = len(points)
        if not 0 < n <= self.max_points:
            raise BackendError(f"decoder called with {n} points; this engine takes 1..{self.max_points}")
        ctx = self.contexts["decoder"]
        for name, ptr in self.slots[features].items():
            ctx.set_tensor_address(name, ptr)
        if not ctx.set_input_shape("points", (n, 3)):
            raise BackendError(f"TensorRT refused {n} points for the decoder's optimisation profile")
        self.host_points[:n] = points
        self.cuda.to_device(self.points, self.host_points[:n])
        self._run("decoder")
        out = self.host_logits[:n]
        self.cuda.to_host(out, self.logits)
        self.cuda.sync()
        return out.copy()

    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        self.host_image[...] = patch
        self.cuda.to_device(self.image, self.host_image)
        self._run("model")
        self.cuda.to_host(self.host_logits, self.logits)
        self.cuda.sync()
        return self.host_logits.copy()

    def close(self) -> None:
        if getattr(self, "cuda", None) is not None:
            if self.cuda.stream is not None:
                self.cuda.rt.cudaStreamSynchronize(self.cuda.stream)  # nothing in flight when buffers go
            self.cuda.close()
        self.contexts, self.engines = {}, {}
