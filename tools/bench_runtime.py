"""Runtime cost: adaptive, sparse and dense mode, the implicit bundle against the U-Net bundle, same scans.

Configurations are run in turn within each repetition (so drift hits all alike); the report gives
the median whole-scan seconds, points decoded per voxel, the share of wall time spent outside the
two graphs (resampling, normalisation, mesh and band geometry, blending, smoothing), ratios, and
Dice of each configuration against the dense-mode labels.

    python tools/bench_runtime.py --implicit h.imunet --unet hu.imunet --scans a.nii.gz b.nii.gz \
        --mosaic 2 --repeats 3 --json docs/results/bench_runtime.json

``--mosaic K`` tiles K x K x K scans into one volume (real content, many windows).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from report import emit  # tools/report.py: tools run as scripts, tools/ is on sys.path

from imunet.runtime import Segmenter
from imunet.runtime.io import read_image
from imunet.runtime.metrics import dice


def mosaic(paths: list[Path], k: int) -> sitk.Image:
    """Tile ``k**3`` scans (cycled, each z-scored, padded to a common size) into one volume."""
    arrays = []
    for p in paths:
        a = sitk.GetArrayFromImage(read_image(p)).astype(np.float32)
        arrays.append((a - a.mean()) / max(a.std(), 1e-6))
    shape = np.max([a.shape for a in arrays], axis=0)
    tiles = [np.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)]) for a in arrays]
    out = np.zeros(tuple(shape * k), np.float32)
    for i, (z, y, x) in enumerate(np.ndindex(k, k, k)):
        out[z * shape[0] : (z + 1) * shape[0], y * shape[1] : (y + 1) * shape[1], x * shape[2] : (x + 1) * shape[2]] = (
            tiles[i % len(tiles)]
        )
    img = sitk.GetImageFromArray(out)
    img.SetSpacing(read_image(paths[0]).GetSpacing())
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--implicit", type=Path, required=True)
    ap.add_argument("--unet", type=Path, default=None)
    ap.add_argument("--scans", type=Path, nargs="+", required=True)
    ap.add_argument("--mosaic", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    images = [mosaic(args.scans, args.mosaic)] if args.mosaic else [read_image(p) for p in args.scans]
    configs = {
        "implicit-adaptive": Segmenter(args.implicit, args.backend, mode="adaptive"),
        "implicit-adaptive-fp32": Segmenter(args.implicit, args.backend, mode="adaptive", precision="fp32"),
        "implicit-sparse": Segmenter(args.implicit, args.backend, mode="sparse", precision="fp32"),
        "implicit-dense": Segmenter(args.implicit, args.backend, mode="dense", precision="fp32"),
    }
    if args.unet:
        configs["unet"] = Segmenter(args.unet, args.backend)
    walls: dict[str, list[float]] = {k: [] for k in configs}
    inside: dict[str, list[float]] = {k: [] for k in configs}
    ppv: dict[str, list[float]] = {k: [] for k in configs}
    labels: dict[str, list[np.ndarray]] = {k: [] for k in configs}
    for seg in configs.values():
        seg.predict(images[0])  # warm-up, not timed
    for rep in range(args.repeats):
        for name, seg in configs.items():
            for img in images:
                t = time.perf_counter()
                out = seg.predict(img)
                wall = time.perf_counter() - t
                s = seg.last_stats
                walls[name].append(wall)
                inside[name].append((s["encode_s"] + s["decode_s"]) / wall)
                ppv[name].append(s["points_per_voxel"])
                if rep == 0:
                    labels[name].append(sitk.GetArrayFromImage(out))
    ref = labels["implicit-dense"]
    n_classes = configs["implicit-sparse"].bundle.manifest.num_classes
    report = {}
    for name in configs:
        per_label = {
            str(c): round(float(np.mean([dice(a, b, c) for a, b in zip(labels[name], ref)])), 4)
            for c in range(1, n_classes)
        }
        report[name] = {
            "median_wall_s": round(statistics.median(walls[name]), 4),
            "outside_graphs_fraction": round(1 - statistics.median(inside[name]), 3),
            "points_per_voxel": round(statistics.median(ppv[name]), 4),
            "dice_vs_implicit_dense": per_label,
            "agreement_vs_implicit_dense": round(
                float(np.mean([(a == b).mean() for a, b in zip(labels[name], ref)])), 5
            ),
        }
    med = {k: v["median_wall_s"] for k, v in report.items()}
    report["ratios"] = {
        f"{k}_over_dense": round(v / med["implicit-dense"], 3) for k, v in med.items() if k.startswith("implicit")
    }
    if args.unet:
        report["ratios"].update({f"{k}_over_unet": round(v / med["unet"], 3) for k, v in med.items() if k != "unet"})
    report["setup"] = {
        "volumes": [list(i.GetSize()) for i in images],
        "repeats": args.repeats,
        "backend": args.backend,
        "windows": configs["implicit-sparse"].last_stats["windows"],
        "machine": platform.machine(),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
