"""Encoder time against window size, and the encoder work one pass for several owner boxes would save.

Adaptive mode encodes one patch-sized window per owner box; neighbouring windows overlap, so a
volume's voxels are encoded about three times. One encoder window for ``k x k x k`` owner boxes
(with the context one box gets on each side) encodes fewer voxels, if a voxel costs the same in a
larger window. This tool measures both halves of that on one machine:

- the encoder voxels for a volume of ``--size`` at each grouping ``k`` (geometry only: the runtime's
  owner-box layout, windows rounded up to the encoder's total stride);
- the encoder's time per window and per voxel at each grouping's window shape, on OpenVINO and on
  onnxruntime, with the bundle's architecture (channels and convolutions per block) and random
  weights (the time of a convolution does not depend on its weights);

and projects the encoder seconds for the volume (voxels x seconds per voxel).

    python tools/bench_encoder_windows.py runtime/default/hippocampus.imunet --size 200 512 512 \\
        --group 1 2 4 --json docs/results/encoder_windows.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from harness import emit, machine


def grouped_extents(length: int, patch: int, overlap: float, stride: int, k: int, multiple: int) -> list[int]:
    """Encoder window extents along one axis when ``k`` consecutive owner boxes share a window."""
    from imunet.runtime.kernels.boxes import axis_layout

    layout = axis_layout(length, patch, overlap, stride)
    if k == 1:
        return [patch] * len(layout)
    context = patch - max(size for _, size, _ in layout)  # what a single box's window adds around it
    out = []
    for i in range(0, len(layout), k):
        group = layout[i : i + k]
        union = group[-1][0] + group[-1][1] - group[0][0]
        out.append(min(length, -(-(union + context) // multiple) * multiple))
    return out


def encoder_graph(channels: tuple[int, ...], convs: tuple[int, ...], shape: tuple[int, int, int]) -> bytes:
    """ONNX bytes of an encoder of this architecture (random weights, eval mode) for one input shape."""
    import torch

    from imunet.model.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(1, channels, convs).eval()

    class Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.enc(x))

    buf = io.BytesIO()
    torch.onnx.export(Outputs(), torch.zeros(1, 1, *shape), buf, opset_version=17, dynamo=False)
    return buf.getvalue()


def time_calls(call, image: np.ndarray, repeats: int) -> float:
    """Median seconds of ``call(image)`` after one warm-up call."""
    call(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(image)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def runners(graph: bytes, threads: int, openvino_precision: str) -> dict:
    """One callable per backend that is installed: onnxruntime fp32 and OpenVINO at the given hint."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    out = {"ort-fp32": lambda x: sess.run(None, {sess.get_inputs()[0].name: x})}
    try:
        import openvino as ov
    except ImportError:
        return out
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1"}
    config["INFERENCE_PRECISION_HINT"] = "bf16" if openvino_precision == "bf16" else "f32"
    request = core.compile_model(core.read_model(model=graph, weights=b""), "CPU", config).create_infer_request()
    out[f"openvino-{openvino_precision}"] = lambda x: request.infer({0: x})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="an implicit bundle: its patch, encoder and inference settings")
    ap.add_argument("--size", type=int, nargs=3, default=[200, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--group", type=int, nargs="+", default=[1, 2, 4], help="owner boxes per window along each axis")
    ap.add_argument("--openvino-precision", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from imunet.runtime.contract.bundle import load_bundle

    m = load_bundle(args.bundle).manifest
    patch, enc, inf = tuple(m.patch_size), m.encoder, m.inference
    multiple = int(np.prod(enc.strides))
    rows = []
    for k in args.group:
        axes = [grouped_extents(n, p, inf.overlap, inf.stride, k, multiple) for n, p in zip(args.size, patch)]
        shape = tuple(max(a) for a in axes)  # the interior windows' shape
        voxels = int(np.prod([sum(a) for a in axes]))
        image = np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32)
        graph = encoder_graph(tuple(enc.channels), tuple(enc.convs_per_block), shape)
        row = {
            "group": k,
            "windows": int(np.prod([len(a) for a in axes])),
            "window": list(shape),
            "encoder_voxels": voxels,
        }
        for name, call in runners(graph, args.threads, args.openvino_precision).items():
            s = time_calls(call, image, args.repeats)
            per_voxel = s / float(np.prod(shape))
            row[name] = {
                "ms_per_window": round(s * 1e3, 2),
                "ns_per_voxel": round(per_voxel * 1e9, 1),
                "projected_encoder_s": round(per_voxel * voxels, 2),
            }
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["encoder_voxels"]
    for row in rows:
        row["voxels_vs_first"] = round(row["encoder_voxels"] / base, 3)
    emit(
        {
            "bundle": str(args.bundle),
            "size": args.size,
            "patch": list(patch),
            "rows": rows,
            "command": " ".join(["python", *sys.argv]),
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
