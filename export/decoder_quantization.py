"""The int8 decoder for CPUs: int8 weights, and activations quantised with fixed, calibrated ranges.

onnxruntime's dynamic quantisation (``quantize_dynamic``) gives int8 weights per output channel and
quantises each layer's input activations per call, scaled by that call's own range. A voxel's
probabilities then depend on the other points decoded with it (up to 0.47 logit on the
head-and-neck decoder), so the same scan decoded in other chunks, or in adaptive and dense mode, is
labelled differently at the margins. Here each per-call quantisation (``DynamicQuantizeLinear``)
becomes a ``QuantizeLinear`` with a fixed scale and zero point, taken from the range of that
activation over training patches (as training samples them: half the points on label boundaries),
less the extreme 1e-5 of its values at either end, and each integer product with its rescaling
(``MatMulInteger``, ``Cast``, ``Mul`` and a bias ``Add``) becomes onnxruntime's fused
``MatMulIntegerToFloat``. The arithmetic is the dynamic
graph's; only the activation scales stop depending on the call. Measured on the head-and-neck
decoder (docs/DESIGN-NOTES.md, "The int8 decoder"): the same argmax agreement with fp32 as the
dynamic graph, no batch dependence, and faster per call.

An activation beyond its calibrated range saturates at the range's end; the ranges are stored in
the manifest with the variant.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .variants import cpu_session

MS_DOMAIN = "com.microsoft"
# Share of an activation's calibration values left beyond its range at each end. Min-max ranges let
# a handful of outliers set the step of every value: on a hippocampus decoder one input value of
# 15.9 (99.99% of them under 5) made the int8 decoder lose 0.012 mean Dice on 42 held-out scans;
# clipping the top and bottom 1e-5 kept fp32's Dice (docs/DESIGN-NOTES.md, "The int8 decoder").
TAIL = 1e-5


def quantize_dynamic_decoder(decoder: Path, out: Path) -> Path:
    """Write ``out``: onnxruntime's dynamic quantisation of every MatMul/Gemm of ``decoder`` (int8
    weights per output channel, activations scaled per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing on the root logger; our graph is already optimised
    try:
        quantize_dynamic(
            str(decoder),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    finally:
        root.setLevel(level)
    return out


def activation_ranges(
    model: Any, feeds: Sequence[dict[str, np.ndarray]], tail: float = TAIL
) -> dict[str, tuple[float, float]]:
    """``(low, high)`` of each ``DynamicQuantizeLinear`` input of ``model`` over ``feeds``: the
    values with the share ``tail`` of all values above ``high`` and below ``low`` (0: the minimum
    and maximum), widened to include 0 (as the per-call quantisation does).

    The extremes are kept exactly, as the ``k`` largest and smallest values seen so far
    (``k = tail`` x every value the feeds produce), so memory stays small."""
    from onnx import TensorProto, helper

    names = [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    probe = type(model)()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    sess = cpu_session(probe.SerializeToString())
    points = [int(np.asarray(f["points"]).reshape(-1, 3).shape[0]) for f in feeds]
    top: dict[str, np.ndarray] = {}
    bottom: dict[str, np.ndarray] = {}
    keep: dict[str, int] = {}
    for feed, count in zip(feeds, points):
        for name, value in zip(names, sess.run(names, feed)):
            v = np.asarray(value, np.float32).ravel()
            if name not in keep:  # values per point are fixed by the graph: the total is known now
                keep[name] = int(np.ceil(tail * v.size / max(count, 1) * sum(points))) + 1
            k = keep[name]
            top[name] = _largest(np.concatenate([top.get(name, v[:0]), _largest(v, k)]), k)
            bottom[name] = -_largest(-np.concatenate([bottom.get(name, v[:0]), -_largest(-v, k)]), k)
    return {n: (min(0.0, float(bottom[n].max())), max(0.0, float(top[n].min()))) for n in names}


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest of ``values`` (all of them if fewer), in no order."""
    if values.size <= k:
        return values
    return np.partition(values, values.size - k)[values.size - k :]


def _uint8_params(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of asymmetric uint8 quantisation of ``[low, high]`` (``low <= 0 <= high``)."""
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def fix_activation_scales(model: Any, ranges: dict[str, tuple[float, float]]) -> Any:
    """``model`` (a dynamically quantised graph) with each ``DynamicQuantizeLinear`` replaced by a
    ``QuantizeLinear`` of fixed scale and zero point, and each ``MatMulInteger`` -> ``Cast`` ->
    ``Mul`` (-> bias ``Add``) chain fused into ``MatMulIntegerToFloat``."""
    from onnx import checker, helper, numpy_helper

    out = type(model)()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)
    consumers: dict[str, list] = {}
    producer = {o: n for n in nodes for o in n.output}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {t.name for t in graph.initializer}
    dropped: set[int] = set()
    added = []
    scale_of: dict[str, tuple[str, str]] = {}  # quantised tensor -> (its scale, its zero point)
    for n in nodes:
        if n.op_type != "DynamicQuantizeLinear":
            continue
        scale, zero = _uint8_params(*ranges[n.input[0]])
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, np.float32), n.output[1]),
                numpy_helper.from_array(np.array(zero, np.uint8), n.output[2]),
            ]
        )
        added.append(
            helper.make_node("QuantizeLinear", [n.input[0], n.output[1], n.output[2]], [n.output[0]], name=n.name)
        )
        scale_of[n.output[0]] = (n.output[1], n.output[2])
        dropped.add(id(n))
    for n in nodes:
        if n.op_type != "MatMulInteger" or n.input[0] not in scale_of:
            continue
        cast = consumers.get(n.output[0], [])
        mul = consumers.get(cast[0].output[0], []) if len(cast) == 1 and cast[0].op_type == "Cast" else []
        if len(mul) != 1 or mul[0].op_type != "Mul":
            continue  # not the pattern quantize_dynamic writes: left as it is (correct, unfused)
        cast, mul = cast[0], mul[0]
        combined = producer.get(next(i for i in mul.input if i != cast.output[0]))
        a_scale, a_zero = scale_of[n.input[0]]
        if combined is None or combined.op_type != "Mul" or a_scale not in combined.input:
            continue
        b_scale = next(i for i in combined.input if i != a_scale)
        inputs = [n.input[0], n.input[1], a_scale, b_scale, a_zero, n.input[3] if len(n.input) > 3 else ""]
        last = mul
        after = consumers.get(mul.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            bias = [i for i in after[0].input if i != mul.output[0]]
            if len(bias) == 1 and bias[0] in constants:
                inputs.append(bias[0])
                last = after[0]
                dropped.add(id(last))
        added.append(helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]], name=n.name, domain=MS_DOMAIN))
        dropped.update({id(n), id(cast), id(mul)})
        if len(consumers.get(combined.output[0], [])) == 1:
            dropped.add(id(combined))
    pending = [n for n in nodes if id(n) not in dropped] + added
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered = []
    while pending:  # topological order
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("the rewritten decoder graph has a cycle or a missing input")
        for n in ready:
            known.update(n.output)
        ordered.extend(ready)
        placed = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in placed]
    del graph.node[:]
    graph.node.extend(ordered)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    checker.check_model(out)
    return out


def quantize_decoder(
    decoder: Path, out: Path, feeds: Sequence[dict[str, np.ndarray]], tail: float = TAIL
) -> tuple[Path, dict[str, tuple[float, float]]]:
    """Write ``out``: ``decoder`` with int8 weights per output channel and uint8 activations whose
    ranges come from running ``feeds`` (the decoder's inputs: feature maps and points), leaving out
    ``tail`` of each activation's values at either end. Returns the path and the ranges."""
    import onnx

    if not feeds:
        raise ValueError("the int8 decoder needs calibration inputs")
    with tempfile.TemporaryDirectory() as tmp:
        dynamic = onnx.load(str(quantize_dynamic_decoder(decoder, Path(tmp) / "dynamic.onnx")))
    ranges = activation_ranges(dynamic, feeds, tail)
    onnx.save(fix_activation_scales(dynamic, ranges), str(out))
    return out, ranges
