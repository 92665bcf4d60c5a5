"""onnxruntime's thread spinning on and off, same bundle, same volume, alternated.

The encoder and decoder sessions of an implicit bundle alternate many times per window; with
spin-waiting on, each idle session's threads keep the cores busy. This measures what that costs.

    python tools/bench_spinning.py --bundle runtime/default/hippocampus.imunet --size 64 256 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--size", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ct_phantom import DATA, build, case_names, load_crops

    from imunet.runtime.backends.ort import OrtBackend
    from imunet.runtime.inference import predict_labels
    from imunet.runtime.manifest import load_bundle
    from imunet.runtime.preprocess import normalize

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    split = Path(__file__).resolve().parents[1] / "docs" / "results" / "hippocampus_split.json"
    image, _ = build(tuple(args.size), load_crops(DATA, case_names(f"@{split}:val")))
    volume = normalize(image, m.normalization)
    backends = {"spin on": OrtBackend(bundle, spin=True), "spin off": OrtBackend(bundle, spin=False)}
    for b in backends.values():
        predict_labels(volume[: m.patch_size[0]], b, m.patch_size, m.inference, m.kind == "unet")  # warm-up
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in backends}
    outputs = {}
    for _ in range(args.repeats):
        for name, b in backends.items():
            t = time.perf_counter()
            outputs[name], stats = predict_labels(volume, b, m.patch_size, m.inference, m.kind == "unet")
            runs[name].append((time.perf_counter() - t, stats.encode_s, stats.decode_s))
    report = {
        name: {
            "median_s": round(statistics.median(r[0] for r in rs), 3),
            "median_encode_s": round(statistics.median(r[1] for r in rs), 3),
            "median_decode_s": round(statistics.median(r[2] for r in rs), 3),
        }
        for name, rs in runs.items()
    }
    report["off_over_on"] = round(report["spin off"]["median_s"] / report["spin on"]["median_s"], 3)
    report["same_labels"] = bool(np.array_equal(outputs["spin on"], outputs["spin off"]))
    report["setup"] = {
        "bundle": str(args.bundle),
        "size_zyx": args.size,
        "mode": m.inference.mode,
        "repeats": args.repeats,
        "decoder": backends["spin on"].precision,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
