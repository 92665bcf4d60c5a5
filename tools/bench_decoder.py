"""Per-call time of bundles' decoder graphs on onnxruntime CPU, at several point counts.

Feature maps come from each bundle's own encoder on one random-normal patch; points are drawn
within 8 voxels of the patch centre (as the refinement's points cluster), the same points for
every bundle. Sessions are built as the runtime builds them (spinning off). Reports the median
milliseconds per call over repeated calls:

    python tools/bench_decoder.py runs/hmosaic_cf.imunet runs/hmosaic.imunet runs/h128mosaic.imunet \\
        --json docs/results/bench_decoder.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from harness import emit, machine


def session(graph: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--points", type=int, nargs="+", default=[100, 900, 2700, 8100])
    ap.add_argument("--precision", default="int8", choices=["int8", "fp16", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes; each pass calls ~3,000 points' worth")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from imunet.runtime.contract.bundle import load_bundle

    report: dict = {}
    for path in args.bundles:
        bundle = load_bundle(path)
        patch = bundle.manifest.patch_size
        enc = session(bundle.read(bundle.graph_file("encoder")), args.threads)
        if args.precision != "fp32" and bundle.variant_for("decoder", args.precision) is None:
            sys.exit(f"{path}: no {args.precision} decoder")
        dec = session(bundle.read(bundle.graph_file("decoder", args.precision)), args.threads)
        names = [o.name for o in enc.get_outputs()]
        image = np.random.default_rng(1).normal(size=(1, 1, *patch)).astype(np.float32)
        feats = dict(zip(names, enc.run(names, {"image": image})))
        centre = np.asarray(patch) // 2
        row = {}
        for n in args.points:
            pts = (centre + np.random.default_rng(n).integers(-8, 8, size=(n, 3))).astype(np.int32)
            feed = {**feats, "points": pts}
            dec.run(None, feed)
            calls = max(5, 3000 // n)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                for _ in range(calls):
                    dec.run(None, feed)
                times.append((time.perf_counter() - t) / calls * 1e3)
            row[str(n)] = round(statistics.median(times), 3)
        report[str(path)] = {
            "ms_per_call": row,
            "feature_layout": bundle.manifest.feature_layout,
            "decoder_width": bundle.manifest.decoder.width if bundle.manifest.decoder else None,
        }
        print(f"{path}: " + ", ".join(f"{n} points {ms} ms" for n, ms in row.items()), file=sys.stderr)
    report["setup"] = {
        "precision": args.precision,
        "threads": args.threads,
        "machine": machine(),
        "command": " ".join(sys.argv),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
