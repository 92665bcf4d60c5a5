"""Accuracy of a bundle on a folder of labelled scans, through the runtime exactly as a user runs it.

    python tools/evaluate.py --model h.imunet --images DIR --labels DIR [--cases a,b] [--json out.json]

Images are matched to labels by the nnU-Net naming (``CASE_0000.nii.gz`` <-> ``CASE.nii.gz``) or
by identical names. Prints per-label Dice and HD95 (mm), mean and standard deviation, and the
median seconds per scan. HD95 is undefined when a label is missing from prediction or reference
and such cases are left out of its mean (counted in ``hd95_undefined``).

``--annotated annotated.json`` (partially annotated data: per case, the label names contoured)
scores each label only on the cases that annotated it. ``--agreement MODE`` also runs the bundle in
``MODE`` (e.g. ``dense``) on the first ``--agreement-cases`` cases and reports the fraction of the
voxels that either run labels as foreground on which both agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import case_names, machine

from imunet.runtime import Segmenter
from imunet.runtime.imaging.formats import case_name
from imunet.runtime.imaging.io import image_suffix, read_image
from imunet.runtime.imaging.metrics import dice, hd95
from imunet.runtime.imaging.preprocess import resample_to_spacing


def pair_cases(images: Path, labels: Path, only: set[str] | None = None) -> list[tuple[str, Path, Path]]:
    """``(case, image, label)`` for every image with a label."""
    pairs = []
    for img in sorted(p for p in images.iterdir() if image_suffix(p)):
        case = case_name(img)
        label = labels / f"{case}{image_suffix(img)}"
        if label.exists() and (only is None or case in only):
            pairs.append((case, img, label))
    return pairs


def evaluate(
    model: Path,
    images: Path,
    labels: Path,
    backend: str = "ort-cpu",
    mode: str | None = None,
    only: set[str] | None = None,
    precision: str = "auto",
    settings: dict | None = None,
    orientation: str | None = None,
    spacing: tuple[float, float, float] | None = None,
    annotated: dict[str, list[str]] | None = None,
    agreement: tuple[str, int] | None = None,
) -> dict:
    """Dice and HD95 per label and case. ``orientation`` stores every scan (and its labels) in that
    axis order first (SimpleITK's ``DICOMOrient``: the same voxels, permuted and flipped, with a
    direction matrix that keeps them in place); ``spacing`` (x, y, z mm) resamples both first."""
    seg = Segmenter(model, backend=backend, mode=mode, precision=precision, **(settings or {}))
    names = seg.bundle.manifest.labels
    other = Segmenter(model, backend=backend, mode=agreement[0], precision=precision) if agreement else None
    per_case, seconds, agree = {}, [], {}
    for i, (case, img_path, lbl_path) in enumerate(pair_cases(images, labels, only)):
        image, label = stored_as(read_image(img_path), read_image(lbl_path), orientation, spacing)
        t = time.perf_counter()
        pred = sitk.GetArrayFromImage(seg.predict(image))
        seconds.append(time.perf_counter() - t)
        ref = sitk.GetArrayFromImage(label).astype(np.int64)
        spacing_zyx = image.GetSpacing()[::-1]
        contoured = set(annotated.get(case, names.values())) if annotated else set(names.values())
        scored = [k for k in range(1, len(names)) if names[k] in contoured]
        per_case[case] = {
            names[k]: {"dice": dice(pred, ref, k), "hd95": hd95(pred, ref, k, spacing_zyx)} for k in scored
        }
        if other is not None and i < agreement[1]:  # type: ignore[index]
            second = sitk.GetArrayFromImage(other.predict(image))
            either = (pred > 0) | (second > 0)
            agree[case] = float((pred[either] == second[either]).mean()) if either.any() else 1.0
    if not per_case:
        raise SystemExit(f"no image in {images} has a label in {labels}")
    summary = {}
    for k in range(1, len(names)):
        d = [c[names[k]]["dice"] for c in per_case.values() if names[k] in c]
        h = [c[names[k]]["hd95"] for c in per_case.values() if names[k] in c and np.isfinite(c[names[k]]["hd95"])]
        summary[names[k]] = {
            "cases": len(d),
            "dice_mean": float(np.mean(d)) if d else float("nan"),
            "dice_std": float(np.std(d)) if d else float("nan"),
            "hd95_mean": float(np.mean(h)) if h else float("nan"),
            "hd95_std": float(np.std(h)) if h else float("nan"),
            "hd95_undefined": len(d) - len(h),
        }
    mode_used = seg.bundle.manifest.kind.mode_of(seg.settings.mode)
    return {
        "model": str(model),
        "stored_as": {"orientation": orientation, "spacing": spacing},
        "backend": seg.backend_name,
        "mode": mode_used,
        "precision": getattr(seg.backend, "precision", "fp32"),
        "settings": settings or {},
        "cases": len(per_case),
        "median_s_per_scan": statistics.median(seconds),
        "mean_dice": float(np.nanmean([s["dice_mean"] for s in summary.values()])),
        "labels": summary,
        "agreement": {"mode": agreement[0], "foreground_agreement": agree} if agreement else None,
        "per_case": per_case,
    }


def stored_as(
    image: sitk.Image, label: sitk.Image, orientation: str | None, spacing: tuple[float, float, float] | None
) -> tuple[sitk.Image, sitk.Image]:
    """The scan and its labels as another acquisition would store them: reoriented, resampled."""
    if orientation:
        image, label = sitk.DICOMOrient(image, orientation), sitk.DICOMOrient(label, orientation)
    if spacing:
        resampled = resample_to_spacing(image, spacing)
        label = partial_volume_labels(label, resampled)
        image = resampled
    return image, label


def partial_volume_labels(label: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``label`` on ``grid`` as the argmax of each class's mask resampled linearly: the class that
    covers most of each new voxel (a nearest-neighbour copy would favour nearest-neighbour outputs)."""
    arr = sitk.GetArrayFromImage(label)
    maps = []
    for c in range(int(arr.max()) + 1):
        mask = sitk.GetImageFromArray((arr == c).astype(np.float32))
        mask.CopyInformation(label)
        maps.append(sitk.GetArrayFromImage(sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkLinear, float(c == 0))))
    out = sitk.GetImageFromArray(np.argmax(np.stack(maps), 0).astype(np.uint8))
    out.CopyInformation(grid)
    return out


def _setting(text: str) -> object:
    """``--set`` value: JSON (``8``, ``0.3``, ``true``), else the plain string (``mode=sparse``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--cases", type=str, default=None, help="comma-separated case names, or @split.json:val")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--mode", default=None)
    ap.add_argument("--precision", default="auto", help="auto | fp32 | fp16 | int8")
    ap.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="inference settings, e.g. stride=8 smoothing=1"
    )
    ap.add_argument("--orientation", default=None, help="store every scan in this axis order first, e.g. PIL")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="resample first")
    ap.add_argument("--annotated", type=Path, default=None, help="annotated.json: score labels where annotated")
    ap.add_argument("--agreement", default=None, help="also run this mode and compare foreground labels")
    ap.add_argument("--agreement-cases", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    settings = {k: _setting(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    only = set(case_names(a.cases)) if a.cases else None
    annotated = json.loads(a.annotated.read_text()) if a.annotated else None
    agreement = (a.agreement, a.agreement_cases) if a.agreement else None
    res = evaluate(
        a.model, a.images, a.labels, a.backend, a.mode, only, a.precision, settings, a.orientation, a.spacing,
        annotated, agreement,
    )
    print(
        f"{res['model']}: {res['cases']} cases, backend {res['backend']}, mode {res['mode']} ({res['precision']}) "
        f"{' '.join(a.set)}, "
        f"median {res['median_s_per_scan']:.3f} s per scan"
    )
    print(f"  mean Dice over labels {res['mean_dice']:.4f}")
    if res["agreement"]:
        values = list(res["agreement"]["foreground_agreement"].values())
        print(f"  foreground agreement with {res['agreement']['mode']}: min {min(values):.4f} over {len(values)} cases")
    for name, s in res["labels"].items():
        print(
            f"  {name:12s} ({s['cases']} cases) Dice {s['dice_mean']:.4f} +- {s['dice_std']:.4f}   "
            f"HD95 {s['hd95_mean']:.2f} +- {s['hd95_std']:.2f} mm ({s['hd95_undefined']} undefined)"
        )
    if a.json:
        res["setup"] = {"machine": machine(), "command": " ".join(["python", *sys.argv])}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
