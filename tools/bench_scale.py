"""Whole-scan cost at CT scale: the implicit bundle (each mode) against the U-Net bundle, same runtime.

For each volume size a phantom with ground truth is built from held-out hippocampus crops
(``tools/ct_phantom.py``). Every (configuration, repeat) runs in a fresh process, so the peak
resident memory is that configuration's alone; configurations run in turn within each repeat, so
drift hits all alike. Reported per configuration: median seconds of ``Segmenter.predict`` (after a
warm-up call), peak RSS of the process, points decoded per voxel, windows, Dice against the truth and
against the implicit bundle's dense mode.

    python tools/bench_scale.py --implicit runtime/default/hippocampus.imunet --unet runs/hu1200.imunet \\
        --size 64 256 256 --repeats 3 --json docs/results/scale_64x256x256.json

``--dense-max-voxels`` caps the size at which the (slow) dense mode runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from report import emit  # tools/report.py: tools run as scripts, tools/ is on sys.path

from imunet.runtime.metrics import dice

CONFIGS = {
    "unet": ("unet", {}),
    "implicit-adaptive": ("implicit", {}),  # the bundle's defaults: adaptive, int8 decoder on the CPU
    "implicit-adaptive-fp32": ("implicit", {"precision": "fp32"}),
    # decode once without the coarse-to-fine refinement: every voxel in its owner box (the ablation)
    "implicit-decode-once": ("implicit", {"mode": "adaptive", "stride": 1, "precision": "fp32"}),
    "implicit-sparse": ("implicit", {"mode": "sparse", "precision": "fp32"}),  # the paper's loop
    "implicit-dense": ("implicit", {"mode": "dense", "precision": "fp32"}),
    "implicit-adaptive-cells": ("implicit", {"refine": "cells"}),  # session 2's refinement rule
    # adaptive mode's overlap only sets the owner boxes' size: less overlap, bigger boxes, fewer encoder
    # windows and less context around each box's faces
    "implicit-adaptive-overlap0.3": ("implicit", {"overlap": 0.3}),
    "implicit-adaptive-overlap0.25": ("implicit", {"overlap": 0.25}),
    "implicit-adaptive-overlap0.15": ("implicit", {"overlap": 0.15}),
    "implicit-adaptive-overlap0": ("implicit", {"overlap": 0.0}),
    "unet-overlap0": ("unet", {"overlap": 0.0}),  # the U-Net's side of the same trade: no blending
    # one window at a time on a two-threaded session (the runtime before session 6) instead of the
    # default two windows in flight on the CPU, each single-threaded
    "unet-1worker": ("unet", {"workers": 1}),
    "implicit-adaptive-1worker": ("implicit", {"workers": 1}),
    "implicit-adaptive-overlap0.25-1worker": ("implicit", {"overlap": 0.25, "workers": 1}),
    # decode the voxels either side of each face between owner boxes in both boxes and blend them
    "implicit-adaptive-seam0": ("implicit", {"seam": 0}),
    "implicit-adaptive-seam1": ("implicit", {"seam": 1}),
    "implicit-adaptive-seam2": ("implicit", {"seam": 2}),
    "implicit-adaptive-seam3": ("implicit", {"seam": 3}),
    # a band before each face; the upper box decodes again only the points the lower box decoded there
    "implicit-adaptive-band2": ("implicit", {"seam": 2, "seam_rule": "decoded"}),
    "implicit-adaptive-band4": ("implicit", {"seam": 4, "seam_rule": "decoded"}),
    # owner-box layouts: as many boxes as blended windows (the default since session 5), or the
    # stride-rounded even boxes before it (fewer encoder windows, less context at their faces)
    "implicit-adaptive-balanced": ("implicit", {"boxes": "balanced"}),
    "implicit-adaptive-even": ("implicit", {"boxes": "even"}),
    "implicit-adaptive-balanced-seam2": ("implicit", {"boxes": "balanced", "seam": 2}),
    # fewer, larger owner boxes (fewer encoder windows) with seams at their faces
    "implicit-adaptive-overlap0.15-seam2": ("implicit", {"overlap": 0.15, "seam": 2}),
    "implicit-adaptive-overlap0.15-seam4": ("implicit", {"overlap": 0.15, "seam": 4}),
}
OPTIONAL = (  # run only when named in --configs
    "unet-1worker",
    "implicit-adaptive-1worker",
    "implicit-adaptive-overlap0.25-1worker",
    "implicit-decode-once",
    "implicit-adaptive-cells",
    "implicit-adaptive-overlap0.3",
    "implicit-adaptive-overlap0.25",
    "implicit-adaptive-overlap0.15",
    "implicit-adaptive-overlap0",
    "unet-overlap0",
    "implicit-adaptive-seam0",
    "implicit-adaptive-seam1",
    "implicit-adaptive-seam2",
    "implicit-adaptive-seam3",
    "implicit-adaptive-band2",
    "implicit-adaptive-band4",
    "implicit-adaptive-overlap0.15-seam2",
    "implicit-adaptive-overlap0.15-seam4",
    "implicit-adaptive-balanced",
    "implicit-adaptive-even",
    "implicit-adaptive-balanced-seam2",
)


def child(bundle: str, options: str, image: str, out: str) -> None:
    """One timed prediction in this process; prints a JSON line and saves the labels to ``out``."""
    from imunet.runtime import Segmenter
    from imunet.runtime.io import read_image

    seg = Segmenter(bundle, backend="ort-cpu", **json.loads(options))
    patch = seg.bundle.manifest.patch_size
    seg.predict_array(np.random.default_rng(0).normal(size=patch).astype(np.float32))  # warm-up
    img = read_image(Path(image))
    t = time.perf_counter()
    labels = seg.predict(img)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    np.save(out, sitk.GetArrayViewFromImage(labels))
    s = seg.last_stats
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_rss_gib": rss,
                "points_per_voxel": s["points_per_voxel"],
                "windows": s["windows"],
                "encode_s": s["encode_s"],
                "decode_s": s["decode_s"],
                "workers": s.get("workers", 1),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--implicit", type=Path, required=True)
    ap.add_argument("--unet", type=Path, required=True)
    ap.add_argument("--size", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c not in OPTIONAL], choices=list(CONFIGS))
    ap.add_argument("--dense-max-voxels", type=float, default=6e7)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--phantom-seed", type=int, default=0, help="seed of the crop packing (ct_phantom.build)")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ct_phantom import DATA, SPLIT, build, case_names, load_crops

    size = tuple(args.size)
    image, truth = build(size, load_crops(DATA, case_names(f"@{SPLIT}:val")), args.phantom_seed)
    work = Path(tempfile.mkdtemp(prefix="imunet-scale-"))
    path = work / "phantom.nii"
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
    del image
    configs = [c for c in args.configs if c != "implicit-dense" or np.prod(size) <= args.dense_max_voxels]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for name in configs:
            if name == "implicit-dense" and rep >= args.dense_repeats:
                continue
            kind, options = CONFIGS[name]
            bundle = args.implicit if kind == "implicit" else args.unet
            out = work / f"{name}.npy"
            cmd = [sys.executable, __file__, "--child", str(bundle), json.dumps(options), str(path), str(out)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{name:24s} rep {rep}: {runs[name][-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    labels = {c: np.load(work / f"{c}.npy") for c in configs}
    dense = labels.get("implicit-dense")
    report: dict = {}
    for name in configs:
        r = runs[name]
        gt = [dice(labels[name], truth, c) for c in (1, 2)]
        entry = {
            "median_wall_s": round(statistics.median(x["wall_s"] for x in r), 3),
            "walls_s": [round(x["wall_s"], 3) for x in r],
            "peak_rss_gib": round(max(x["peak_rss_gib"] for x in r), 3),
            "points_per_voxel": round(r[0]["points_per_voxel"], 4),
            "windows": r[0]["windows"],
            "encode_s": round(statistics.median(x["encode_s"] for x in r), 3),
            "decode_s": round(statistics.median(x["decode_s"] for x in r), 3),
            "dice_vs_truth": [round(d, 4) for d in gt],
            "mean_dice_vs_truth": round(float(np.mean(gt)), 4),
        }
        if dense is not None:
            vs_dense = [dice(labels[name], dense, c) for c in (1, 2)]
            entry["mean_dice_vs_implicit_dense"] = round(float(np.mean(vs_dense)), 4)
        report[name] = entry
    med = {k: v["median_wall_s"] for k, v in report.items()}
    if "unet" in med:  # a run of implicit configurations only (e.g. dense alone) has no ratio
        report["ratios"] = {f"{k}_over_unet": round(v / med["unet"], 3) for k, v in med.items() if k != "unet"}
    if "unet-1worker" in med:  # one window at a time on both sides
        report["ratios_1worker"] = {
            f"{k}_over_unet-1worker": round(v / med["unet-1worker"], 3) for k, v in med.items() if k.endswith("1worker")
        }
    report["setup"] = {
        "size_zyx": list(size),
        "voxels": int(np.prod(size)),
        "foreground_fraction": round(float((truth > 0).mean()), 4),
        "repeats": args.repeats,
        "phantom_seed": args.phantom_seed,
        "backend": "ort-cpu",
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
    }
    emit(report, args.json)
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
