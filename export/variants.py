"""Graph variants a bundle may carry beside its fp32 graphs, each checked against them.

- **int8 decoder** for CPUs (:mod:`.decoder_quantization`): the decoder is an MLP and nearly all of
  its time is matrix products; with int8 weights and uint8 activations of calibrated ranges
  onnxruntime runs integer products (VNNI on recent x86), about 2x faster per point than fp32.
- **int8 convolutions** (static, calibrated on training patches) of the encoder or U-Net for
  OpenVINO, which runs them about 1.8x faster than its f32 (onnxruntime's CPU kernels gain nothing).
- **fp16 graphs** of every graph, for GPUs (TensorRT builds them as strongly typed networks; the
  CUDA and TensorRT providers of onnxruntime run them as they are) and for the CPU where it has
  fp16 arithmetic. They are exported from PyTorch in half precision with explicit casts
  (:mod:`.wrappers`), with float32 inputs and outputs.

Each variant's parity against the fp32 graphs (both run by onnxruntime on the CPU, on random
patches and on points that include the patch corners) goes into the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np


def quantize_convolutions(graph: Path, out: Path, patches: list[np.ndarray]) -> Path:
    """Write ``out``: ``graph`` (the encoder or the U-Net) with static int8 convolutions (QDQ format,
    int8 weights per output channel, uint8 activations) calibrated on ``patches`` ``(Z, Y, X)``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Patches(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(patches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            p = next(self.items, None)
            return None if p is None else {"image": np.ascontiguousarray(p, dtype=np.float32)[None, None]}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(graph), str(out), Patches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
        )  # fmt: skip
    finally:
        root.setLevel(level)
    return out


def cpu_session(graph: Path | bytes) -> Any:
    """An onnxruntime CPU session of ``graph`` (a file, or a serialised model), warnings silenced."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def sample_points(patch: tuple[int, int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` int32 points: the patch's 8 corners (where the encoding's highest frequency
    matters most), then uniform random ones."""
    corners = np.array([[z, y, x] for z in (0, patch[0] - 1) for y in (0, patch[1] - 1) for x in (0, patch[2] - 1)])
    rest = np.stack([rng.integers(0, s, max(count - 8, 0)) for s in patch], 1)
    return np.concatenate([corners, rest]).astype(np.int32)[:count]


def variant_parity(
    reference: dict[str, Path],
    variant: dict[str, Path],
    patch_size: tuple[int, int, int],
    trials: int = 2,
    points: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """The variant's graphs (``{graph: path}``; graphs it lacks are the reference's) against the fp32
    ``reference`` graphs: largest |logit difference|, argmax agreement, largest |feature difference|."""
    graphs = {g: cpu_session(p) for g, p in reference.items()}
    other = {g: cpu_session(variant.get(g, p)) for g, p in reference.items()}
    rng = np.random.default_rng(seed)
    worst, worst_feat, agree = 0.0, 0.0, []
    for _ in range(trials):
        image = rng.normal(size=(1, 1, *patch_size)).astype(np.float32)
        if "model" in graphs:
            a, b = (s["model"].run(["logits"], {"image": image})[0][0] for s in (graphs, other))  # (C, Z, Y, X)
            a, b = a.reshape(a.shape[0], -1).T, b.reshape(b.shape[0], -1).T
        else:
            names = [o.name for o in graphs["encoder"].get_outputs()]
            fa = dict(zip(names, graphs["encoder"].run(names, {"image": image})))
            fb = dict(zip(names, other["encoder"].run(names, {"image": image})))
            worst_feat = max(worst_feat, *(float(np.abs(fa[n] - fb[n]).max()) for n in names))
            pts = sample_points(patch_size, points, rng)
            a = graphs["decoder"].run(["logits"], {**fa, "points": pts})[0]
            b = other["decoder"].run(["logits"], {**fb, "points": pts})[0]
        worst = max(worst, float(np.abs(a - b).max()))
        agree.append(float((a.argmax(1) == b.argmax(1)).mean()))
    out = {
        "max_abs_logit_diff": worst,
        "argmax_agreement": min(agree),
        "trials": trials,
        "inputs": "random normal patches; the patch corners and uniform random points",
        "reference": "the fp32 graphs, onnxruntime CPU",
    }
    if "model" not in graphs:
        out.update(points=points, max_abs_feature_diff=worst_feat)
    return out


def store_weights_fp16(graph: Path, out: Path, min_elements: int = 1024) -> Path:
    """``graph`` with each float32 initializer of at least ``min_elements`` stored as float16 and cast
    back to float32 where the graph starts: the arithmetic stays float32, the file is about half
    the size (onnxruntime and OpenVINO fold the casts when they load the graph; OpenVINO's own
    files store weights this way by default)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph))
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < min_elements:
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT, name=f"{name}__cast"))
    nodes = [*casts, *model.graph.node]  # before every consumer: the graph stays topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out
