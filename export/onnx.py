"""Export to ONNX and verify: checker, shape inference, TensorRT operator support, parity.

Graph contract (names are fixed; the manifest records shapes):
- ``encoder.onnx``: ``image`` (1, 1, Z, Y, X) float32 -> ``f0 .. f{L-1}``, each (Z_b, Y_b, X_b, C_b)
  (``channels_last``) or (1, C_b, Z_b, Y_b, X_b) (``channels_first``); the manifest's
  ``decoder.feature_layout`` lists one per level (absent: all channels-first, as older bundles were).
- ``decoder.onnx``: ``f0 .. f{L-1}`` + ``points`` (N, 3) int32 -> ``logits`` (N, C); N dynamic.
- ``model.onnx`` (U-Net baseline): ``image`` -> ``logits`` (1, C, Z, Y, X).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from imunet.config import ModelConfig
from imunet.runtime.contract.manifest import OPSET

from .variants import cpu_session
from .wrappers import DecoderExport, DenseExport, EncoderExport, feature_layouts, feature_names

DEFAULT_OPSET = OPSET

# ONNX operators TensorRT's ONNX parser supports ("Y" in onnx-tensorrt docs/operators.md, the
# matrix shipped with TensorRT 8.4; TensorRT 10 supports a superset). Only the ones a conv net and
# an MLP could plausibly produce are listed: a graph using anything else fails the check.
TENSORRT_OPS = frozenset(
    """
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
ConstantOfShape Conv ConvTranspose Cos Div Dropout Equal Erf Exp Expand Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool Greater GreaterOrEqual Identity
InstanceNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mul
Neg Not Or Pad Pow PRelu Range ReduceL2 ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape
Resize Round Shape Sigmoid Sign Sin Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile Transpose
Unsqueeze Where
""".split()
)


def graph_ops(path: Path) -> set[str]:
    """The set of operator types in an ONNX file."""
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def unsupported_by_tensorrt(path: Path) -> list[str]:
    """Operators of ``path`` missing from :data:`TENSORRT_OPS` (empty when all are supported)."""
    return sorted(graph_ops(path) - TENSORRT_OPS)


@dataclass(frozen=True)
class GraphIO:
    """A graph's input and output names and its dynamic axes (``{name: {axis: label}}``)."""

    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)


def _export(module: torch.nn.Module, args: tuple, path: Path, io: GraphIO, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=io.inputs,
            output_names=io.outputs,
            dynamic_axes=io.dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
            external_data=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(path))


def fp16_decoder_problems(path: Path) -> list[str]:
    """What is wrong with an fp16 decoder graph's precision boundary (empty when nothing): every
    ``Sin`` and ``Cos`` must take float32, and every ``Gather`` must come before the first cast to
    float16 (graph nodes are in topological order)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    problems = []
    for node in model.graph.node:
        if node.op_type in ("Sin", "Cos") and types.get(node.input[0]) != onnx.TensorProto.FLOAT:
            problems.append(
                f"{node.op_type} {node.name} takes {onnx.TensorProto.DataType.Name(types.get(node.input[0], 0))}"
            )
    order = list(model.graph.node)
    half = [
        i
        for i, n in enumerate(order)
        if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
    ]
    gathers = [i for i, n in enumerate(order) if n.op_type == "Gather"]
    if not half:
        problems.append("no cast to float16: not an fp16 graph")
    elif gathers and max(gathers) > min(half):
        problems.append(f"a Gather (node {max(gathers)}) comes after the first cast to float16 (node {min(half)})")
    return problems


def graph_file(name: str, precision: str) -> str:
    """``encoder.onnx`` for fp32, ``encoder_fp16.onnx`` for a variant."""
    return f"{name}.onnx" if precision == "fp32" else f"{name}_{precision}.onnx"


def export_implicit(
    model: torch.nn.Module,
    cfg: ModelConfig,
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    feature_layout: str | Sequence[str] | None = None,
    precision: str = "fp32",
) -> dict[str, Path]:
    """Write the encoder and decoder graphs of an Implicit U-Net at ``precision``; returns their paths."""
    model = model.eval().cpu()
    names = feature_names(cfg.levels)
    image = torch.zeros(1, 1, *cfg.patch_size)
    enc_path, dec_path = out_dir / graph_file("encoder", precision), out_dir / graph_file("decoder", precision)
    enc = EncoderExport(model, feature_layout, precision)
    _export(enc, (image,), enc_path, GraphIO(["image"], names), opset)
    with torch.no_grad():
        feats = enc(image)
    points = torch.zeros(7, 3, dtype=torch.int32)
    _export(
        DecoderExport(model, feature_layout, precision),
        (*feats, points),
        dec_path,
        GraphIO([*names, "points"], ["logits"], {"points": {0: "N"}, "logits": {0: "N"}}),
        opset,
    )
    return {"encoder": enc_path, "decoder": dec_path}


def export_dense(
    model: torch.nn.Module, cfg: ModelConfig, out_dir: Path, opset: int = DEFAULT_OPSET, precision: str = "fp32"
) -> dict[str, Path]:
    """Write the dense U-Net baseline's graph at ``precision``."""
    path = out_dir / graph_file("model", precision)
    module = DenseExport(model.eval().cpu(), precision)
    _export(module, (torch.zeros(1, 1, *cfg.patch_size),), path, GraphIO(["image"], ["logits"]), opset)
    return {"model": path}


PARITY_TRIALS, PARITY_POINTS = 2, 4096  # random patches, and decoder points per patch


def verify_parity(
    model: torch.nn.Module, cfg: ModelConfig, graphs: dict[str, Path], feature_layout: str | Sequence[str] | None = None
) -> dict[str, Any]:
    """Max |torch - onnxruntime| and max |torch| on random patches and points, per graph (float32,
    CPU). A longer-trained model has larger logits, so the check is relative (see :func:`parity_ok`)."""
    model = model.eval().cpu()
    rng = np.random.default_rng(0)
    trials, points = PARITY_TRIALS, PARITY_POINTS
    diff: dict[str, float] = {}
    scale: dict[str, float] = {}

    def record(name: str, ref: np.ndarray, got: np.ndarray) -> None:
        diff[name] = max(diff.get(name, 0.0), float(np.abs(ref - got).max()))
        scale[name] = max(scale.get(name, 0.0), float(np.abs(ref).max()))

    for _ in range(trials):
        image = rng.normal(size=(1, 1, *cfg.patch_size)).astype(np.float32)
        with torch.no_grad():
            if not cfg.model_kind.decodes_points:
                record(
                    "model",
                    model(torch.from_numpy(image)).numpy(),
                    cpu_session(graphs["model"]).run(["logits"], {"image": image})[0],
                )
                continue
            feats_t = model.encode(torch.from_numpy(image))
            pts = np.stack([rng.integers(0, s, size=points) for s in cfg.patch_size], axis=1).astype(np.int32)
            ref_logits = model.decode(feats_t, torch.from_numpy(pts.astype(np.int64))[None])[0].numpy()
        names = feature_names(cfg.levels)
        feats = cpu_session(graphs["encoder"]).run(names, {"image": image})
        layouts = feature_layouts(feature_layout, cfg.levels)
        feats_t = [f[0].permute(1, 2, 3, 0) if lay == "channels_last" else f for f, lay in zip(feats_t, layouts)]
        for f, g in zip(feats_t, feats):
            record("encoder", f.numpy(), g)
        record(
            "decoder",
            ref_logits,
            cpu_session(graphs["decoder"]).run(["logits"], {**dict(zip(names, feats)), "points": pts})[0],
        )
    return {
        "max_abs_diff": diff,
        "max_abs_reference": scale,
        "trials": trials,
        "points": points,
        "runtime": "onnxruntime-cpu",
        "dtype": "float32",
    }


def parity_ok(parity: dict[str, Any], tolerance: float) -> bool:
    """Every graph within ``tolerance`` relative to its output's magnitude (at least 1)."""
    scale = parity.get("max_abs_reference", {})
    return all(d <= tolerance * max(1.0, scale.get(k, 1.0)) for k, d in parity["max_abs_diff"].items())
