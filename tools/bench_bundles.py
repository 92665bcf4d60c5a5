"""Side-by-side whole-scan time of bundles (or worker counts) on one phantom, in one process.

Each entry is ``BUNDLE[:WORKERS]``; the entries run in turn within each repeat (so drift hits all
alike), after one warm-up call each. With ``--scans N`` the input is the first N hippocampus scans
instead of a phantom, and the seconds are per scan (the other figures are the last scan's).
Reported per entry: median wall seconds of
``Segmenter.predict_array``, the encoder and decoder seconds (summed over threads), points
decoded, and how many voxels' labels differ from the first entry's and from the first entry of the
same bundle. Use it for changes that must not change the labels (a graph layout, the number of
windows in flight):

    python tools/bench_bundles.py runs/hmosaic_cf.imunet:1 runs/hmosaic.imunet:1 --size 64 256 256 \\
        --repeats 3 --json docs/results/bench_layout_64x256x256.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from report import emit  # tools/report.py: tools run as scripts, tools/ is on sys.path


def parse_entry(text: str) -> tuple[Path, int | None]:
    """``path[:workers]`` -> (path, workers or None for the runtime's default)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(text), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entries", nargs="+", help="BUNDLE[:WORKERS]")
    ap.add_argument("--size", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument(
        "--scans", type=int, default=0, help="instead of a phantom, the first N hippocampus scans (seconds per scan)"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ct_phantom import DATA, SPLIT, build, case_names, load_crops

    from imunet.runtime import Segmenter

    if args.scans:
        import SimpleITK as sitk

        from imunet.runtime.io import read_image

        scans = [read_image(f) for f in sorted((DATA / "imagesTr").glob("*.nii.gz"))[: args.scans]]

        def run(seg) -> np.ndarray:
            return np.concatenate([sitk.GetArrayFromImage(seg.predict(im)).ravel() for im in scans])  # copies
    else:
        image, _truth = build(tuple(args.size), load_crops(DATA, case_names(f"@{SPLIT}:val")), args.phantom_seed)

        def run(seg) -> np.ndarray:
            return seg.predict_array(image)

    per = max(1, args.scans)  # wall seconds are per scan
    segs = []
    for text in args.entries:
        path, workers = parse_entry(text)
        seg = Segmenter(path, backend="ort-cpu", workers=workers)
        warm = np.random.default_rng(0).normal(size=seg.bundle.manifest.patch_size).astype(np.float32)
        seg.predict_array(warm)
        segs.append((text, seg))
    runs: dict[str, list[dict]] = {t: [] for t, _ in segs}
    labels: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):
        for text, seg in segs:
            t = time.perf_counter()
            labels[text] = run(seg)
            wall = (time.perf_counter() - t) / per
            runs[text].append({"wall_s": wall, **seg.last_stats})
            print(f"{text:40s} rep {rep}: {wall:.2f} s", file=sys.stderr, flush=True)
    first = args.entries[0]
    same: dict[str, str] = {}  # bundle path -> its first entry
    for text, seg in segs:
        same.setdefault(str(seg.bundle.path), text)
    report: dict = {}
    for text, seg in segs:
        r = runs[text]
        report[text] = {
            "median_wall_s": round(statistics.median(x["wall_s"] for x in r), 3),
            "walls_s": [round(x["wall_s"], 3) for x in r],
            "encode_s": round(statistics.median(x["encode_s"] for x in r), 3),
            "decode_s": round(statistics.median(x["decode_s"] for x in r), 3),
            "points_decoded": r[0]["points_decoded"],
            "windows": r[0]["windows"],
            "workers": seg.workers,
            "feature_layout": seg.bundle.manifest.feature_layout,
            "labels_differing_from_first": int((labels[text] != labels[first]).sum()),
            "labels_differing_from_same_bundle": int((labels[text] != labels[same[str(seg.bundle.path)]]).sum()),
        }
    report["setup"] = {
        "input": f"first {args.scans} hippocampus scans" if args.scans else f"phantom {list(args.size)}",
        "phantom_seed": args.phantom_seed,
        "repeats": args.repeats,
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
