"""What a user would pick instead: the same U-Net through MONAI's ``sliding_window_inference`` in
PyTorch on the CPU, against our runtime (onnxruntime CPU) running that U-Net's exported bundle.

Same volume, same patch, overlap 0.3, Gaussian blending with sigma 0.125 of the patch. Each side runs
in its own subprocess (so peak RSS is its own), alternating, ``--repeats`` times; median wall seconds
per volume, peak RSS, and the voxel agreement of the two label maps.

    python tools/bench_monai.py --run runs/hu1200 --bundle runs/hu1200.imunet --scans S1 S2 ... --mosaic 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from report import emit  # tools/report.py: tools run as scripts, tools/ is on sys.path


def volume(args: argparse.Namespace) -> sitk.Image:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_runtime import mosaic

    from imunet.runtime.io import read_image

    return mosaic(args.scans, args.mosaic) if args.mosaic else read_image(args.scans[0])


def one(args: argparse.Namespace) -> dict:
    image = volume(args)
    times = []
    if args.side == "monai":
        import torch
        from monai.inferers import sliding_window_inference

        from imunet.export.bundle import load_run
        from imunet.runtime.preprocess import Normalization, normalize

        cfg, stats, model = load_run(args.run)
        norm = Normalization.from_dict(stats["normalization"])
        for _ in range(args.repeats):
            t = time.perf_counter()
            x = torch.from_numpy(normalize(sitk.GetArrayViewFromImage(image), norm))[None, None]
            with torch.no_grad():
                logits = sliding_window_inference(
                    x, cfg.model.patch_size, 1, model, overlap=0.3, mode="gaussian", sigma_scale=0.125
                )
            labels = logits[0].argmax(0).to(torch.uint8).numpy()
            times.append(time.perf_counter() - t)
    else:
        from imunet.runtime import Segmenter

        seg = Segmenter(args.bundle, backend="ort-cpu")
        for _ in range(args.repeats):
            t = time.perf_counter()
            labels = sitk.GetArrayFromImage(seg.predict(image))
            times.append(time.perf_counter() - t)
    np.save(args.labels_out, labels)
    return {
        "side": args.side,
        "wall_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="U-Net training run (for PyTorch + MONAI)")
    ap.add_argument("--bundle", type=Path, required=True, help="the same run exported (for our runtime)")
    ap.add_argument("--scans", type=Path, nargs="+", required=True)
    ap.add_argument("--mosaic", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--side", choices=["monai", "imunet"], help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(one(args)))
        return
    base = [
        "--run",
        str(args.run),
        "--bundle",
        str(args.bundle),
        "--mosaic",
        str(args.mosaic),
        "--repeats",
        "1",
        "--scans",
        *map(str, args.scans),
    ]
    results: dict[str, list] = {"monai": [], "imunet": []}
    for _ in range(args.repeats):
        for side in ("monai", "imunet"):
            out = subprocess.run(
                [sys.executable, __file__, *base, "--side", side, "--labels-out", f"/tmp/bench_monai_{side}.npy"],
                capture_output=True,
                text=True,
                check=True,
            )
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    a, b = np.load("/tmp/bench_monai_monai.npy"), np.load("/tmp/bench_monai_imunet.npy")
    report = {
        side: {
            "median_wall_s": round(statistics.median([r["wall_s"][0] for r in runs]), 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        }
        for side, runs in results.items()
    }
    report["ratio_imunet_over_monai"] = {
        "time": round(report["imunet"]["median_wall_s"] / report["monai"]["median_wall_s"], 3),
        "peak_rss": round(report["imunet"]["peak_rss_mb"] / report["monai"]["peak_rss_mb"], 3),
    }
    report["label_agreement"] = round(float((a == b).mean()), 5)
    report["setup"] = {
        "volume_zyx": list(a.shape),
        "repeats": args.repeats,
        "overlap": 0.3,
        "note": "imunet adds average-pool smoothing (kernel 3) of probabilities; MONAI blends logits",
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
