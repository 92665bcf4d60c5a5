"""The implicit decoder's int8 quantisations side by side, each against the fp32 graph.

- ``dynamic``: onnxruntime's ``quantize_dynamic``, which scales each call's activations by that
  call's range, so a voxel's probabilities depend on the other points decoded with it;
- ``fixed``: what the exporter writes (``export/decoder_quantization.py``): the dynamic graph with
  fixed activation ranges calibrated on training patches (each leaving out the extreme 1e-5 of its
  values at either end), fused into ``MatMulIntegerToFloat``; ``fixed_minmax`` the same with
  min-max ranges;
- ``static_minmax`` / ``static_percentile``: onnxruntime's ``quantize_static`` (QDQ) with min-max or
  99.999th-percentile ranges.

For each: argmax agreement with fp32 on real patches, largest logit difference, the batch
dependence (the same points decoded alone and within a larger call), and the median time per call
at several point counts, the variants called in turn so that their timings share the machine's
state.

Patches come from the dataset's cases on the network's grid (the bundle's own preprocessing), half
centred on a labelled voxel; points follow training (half on label boundaries, class-balanced). The
static variants are calibrated on ``--calibration-cases`` and checked on ``--cases``:

    python tools/bench_decoder_quantization.py --model runtime/default/headneck-ct.imunet \\
        --dataset ../shared/data/headneck-ct --cases @docs/results/headneck_split.json:val \\
        --calibration-cases @docs/results/headneck_split.json:train \\
        --json docs/results/decoder_quantization.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import case_names, emit, machine, median

from imunet.export.decoder_quantization import quantize_decoder, quantize_dynamic_decoder
from imunet.runtime.contract.bundle import load_bundle
from imunet.runtime.imaging.io import read_image
from imunet.runtime.imaging.prepare import prepare, prepare_label
from imunet.sampling import class_locations, sample_patch, sample_points

POINTS_PER_PATCH = 8000
BATCH_PROBE = 500  # points decoded alone and as the head of a full call


def session(graph: str | bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def patches(bundle, dataset: Path, cases: list[str], encoder, rng: np.random.Generator) -> list[tuple]:
    """``(features, points, labels at the points)`` for one patch per case."""
    pre = bundle.manifest.preprocessing
    patch = tuple(bundle.manifest.patch_size)
    classes = [k for k in bundle.manifest.labels if k]
    names = [o.name for o in encoder.get_outputs()]
    out = []
    for i, case in enumerate(cases):
        image = next((dataset / "imagesTr").glob(f"{case}_0000.*"))
        label = next((dataset / "labelsTr").glob(f"{case}.*"))
        volume = prepare(read_image(image), pre).volume
        truth = prepare_label(read_image(label), pre)
        img, lab = sample_patch(volume, truth, patch, i % 2 == 0, rng, class_locations(truth, classes, rng))
        features = dict(zip(names, encoder.run(names, {"image": img[None, None]})))
        pts, _ = sample_points(lab, POINTS_PER_PATCH, 0.5, 5.0, rng, balanced=True)
        pts = pts.astype(np.int32)
        out.append((features, pts, lab[pts[:, 0], pts[:, 1], pts[:, 2]]))
    return out


def float32_weights(graph: bytes, out: Path) -> Path:
    """Write ``graph`` with weights stored as float16 and cast at the start (``--fp16-weights``
    bundles) as plain float32 initializers, which quantisation needs to find the weights."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load_from_string(graph)
    stored = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and len(n.input) == 1 and n.input[0] in stored]
    for node in casts:
        array = numpy_helper.to_array(stored.pop(node.input[0])).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        model.graph.node.remove(node)
    kept = [t for t in model.graph.initializer if t.data_type != TensorProto.FLOAT16 or t.name in stored]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(out))
    return out


def quantize_static_decoder(decoder: Path, out: Path, calibration: list[tuple], method: str) -> Path:
    """``decoder`` with static int8 MatMul/Gemm (QDQ; int8 weights per output channel, uint8
    activations with ranges from ``calibration``): ``method`` ``minmax`` or ``percentile``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {**item[0], "points": item[1]}

    calib = CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax
    extra = {"CalibPercentile": 99.999} if method == "percentile" else {}
    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # the percentile calibrator prints its progress
        quantize_static(
            str(decoder), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
            calibrate_method=calib, extra_options=extra,
        )  # fmt: skip
    return out


def compare(sessions: dict, checks: list[tuple]) -> dict:
    """Each variant against ``fp32`` on the check patches."""
    ref = [sessions["fp32"].run(["logits"], {**f, "points": p})[0] for f, p, _ in checks]
    report = {}
    for name, sess in sessions.items():
        agree, worst, batch, truth = [], 0.0, 0.0, []
        for (f, p, lab), r in zip(checks, ref):
            y = sess.run(["logits"], {**f, "points": p})[0]
            agree.append(float((y.argmax(1) == r.argmax(1)).mean()))
            truth.append(float((y.argmax(1) == lab).mean()))
            worst = max(worst, float(np.abs(y - r).max()))
            head = sess.run(["logits"], {**f, "points": p[:BATCH_PROBE]})[0]
            batch = max(batch, float(np.abs(head - y[:BATCH_PROBE]).max()))
        report[name] = {
            "argmax_agreement_min": round(min(agree), 5),
            "argmax_agreement_mean": round(float(np.mean(agree)), 5),
            "max_abs_logit_diff": round(worst, 4),
            "batch_dependence_max_abs_logit": round(batch, 4),
            "point_accuracy": round(float(np.mean(truth)), 5),
        }
    return report


def timings(sessions: dict, feature: dict, points: np.ndarray, counts: list[int], repeats: int) -> dict:
    """Median ms per call, the variants called in turn ``repeats`` times at each point count."""
    out: dict = {name: {} for name in sessions}
    for n in counts:
        pts = np.resize(points, (n, 3)).astype(np.int32)
        times: dict = {name: [] for name in sessions}
        for sess in sessions.values():
            sess.run(["logits"], {**feature, "points": pts})
        for _ in range(repeats):
            for name, sess in sessions.items():
                t = time.perf_counter()
                sess.run(["logits"], {**feature, "points": pts})
                times[name].append((time.perf_counter() - t) * 1e3)
        for name in sessions:
            out[name][str(n)] = median(times[name], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--cases", required=True, help="check cases: comma-separated or @split.json:val")
    ap.add_argument("--calibration-cases", required=True, help="static calibration cases: @split.json:train")
    ap.add_argument("--check", type=int, default=10, help="check patches (one per case)")
    ap.add_argument("--calibrate", type=int, default=24, help="calibration patches (one per case)")
    ap.add_argument("--points", type=int, nargs="+", default=[900, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    bundle = load_bundle(a.model)
    if not bundle.manifest.kind.decodes_points:
        sys.exit(f"{a.model}: not an implicit bundle; it has no decoder")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        graphs = {}
        graphs["fp32"] = float32_weights(bundle.read(bundle.graph_file("decoder")), folder / "fp32.onnx")
        encoder = session(bundle.read(bundle.graph_file("encoder")), a.threads)
        pool = case_names(a.calibration_cases)
        picked = [pool[i] for i in sorted(rng.choice(len(pool), min(a.calibrate, len(pool)), replace=False))]
        calibration = patches(bundle, a.dataset, picked, encoder, rng)
        checks = patches(bundle, a.dataset, case_names(a.cases)[: a.check], encoder, rng)
        feeds = [{**f, "points": p} for f, p, _ in calibration]
        graphs["dynamic"] = quantize_dynamic_decoder(graphs["fp32"], folder / "dynamic.onnx")
        graphs["fixed"] = quantize_decoder(graphs["fp32"], folder / "fixed.onnx", feeds)[0]
        graphs["fixed_minmax"] = quantize_decoder(graphs["fp32"], folder / "fixed_minmax.onnx", feeds, tail=0.0)[0]
        for method in ("minmax", "percentile"):
            graphs[f"static_{method}"] = quantize_static_decoder(
                graphs["fp32"], folder / f"static_{method}.onnx", calibration, method
            )
        sessions = {name: session(str(path), a.threads) for name, path in graphs.items()}
        quality = compare(sessions, checks)
        speed = timings(sessions, checks[0][0], np.concatenate([c[1] for c in checks]), a.points, a.repeats)
    for name in sessions:
        q = quality[name]
        print(
            f"{name:18s} argmax {q['argmax_agreement_min']:.4f} (min) max|dlogit| {q['max_abs_logit_diff']:.3f} "
            f"batch {q['batch_dependence_max_abs_logit']:.3f}  "
            + ", ".join(f"{n}: {ms} ms" for n, ms in speed[name].items()),
            file=sys.stderr,
        )
    emit(
        {
            "model": str(a.model),
            "variants": {name: {**quality[name], "ms_per_call": speed[name]} for name in sessions},
            "check_patches": len(checks),
            "calibration_patches": len(calibration),
            "points_per_patch": POINTS_PER_PATCH,
            "reference": "fp32 decoder, onnxruntime CPU",
            "threads": a.threads,
            "machine": machine(),
            "command": " ".join(sys.argv),
        },
        a.json,
    )


if __name__ == "__main__":
    main()
