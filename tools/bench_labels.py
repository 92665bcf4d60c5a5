"""Time the label map step: ``smoothed_argmax`` against smoothing every class map, then argmax.

The class maps come from a CT-sized phantom's truth (``tools/ct_phantom.py``): one-hot labels, box
averaged once and perturbed with noise, so boundaries sit where a model's would. Both paths get the
same maps, crop and weights; the labels must be identical. Prints medians over ``--repeats``.

    python tools/bench_labels.py --size 200 512 512 --repeats 3 --json docs/results/bench_labels.json
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

from imunet.runtime.labels import smoothed_argmax
from imunet.runtime.mesh import box_smooth


def smooth_every_class(acc: np.ndarray, weights: np.ndarray | None, crop: tuple[slice, ...]) -> np.ndarray:
    """The previous ``predict_labels`` step: one smoothed class map at a time, running argmax."""
    best = None
    labels = np.zeros(tuple(s.stop - s.start for s in crop), dtype=np.uint8)
    w = weights[crop] if weights is not None else None
    for c in range(acc.shape[0]):
        p = acc[c][crop] / w if w is not None else acc[c][crop]
        p = box_smooth(p[None], 3)[0]
        if best is None:
            best = p
        else:
            better = p > best
            labels[better] = c
            np.maximum(best, p, out=best)
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=3, default=(200, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weighted", action="store_true", help="blended modes: divide by Gaussian weight sums")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ct_phantom import DATA, SPLIT, build, case_names, load_crops

    _, truth = build(tuple(args.size), load_crops(DATA, case_names(f"@{SPLIT}:val")), 0)
    rng = np.random.default_rng(0)
    onehot = np.stack([(truth == c).astype(np.float32) for c in range(3)])
    acc = box_smooth(onehot, 3) + rng.uniform(0, 0.2, onehot.shape).astype(np.float32)
    acc /= acc.sum(0, keepdims=True)
    del onehot
    weights = rng.uniform(0.5, 2.0, truth.shape).astype(np.float32) if args.weighted else None
    if weights is not None:
        acc *= weights
    crop = tuple(slice(0, s) for s in truth.shape)
    times: dict[str, list[float]] = {"smooth_every_class": [], "smoothed_argmax": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = smooth_every_class(acc, weights, crop)
        times["smooth_every_class"].append(time.perf_counter() - t)
        t = time.perf_counter()
        got = smoothed_argmax(acc, weights, crop, 3)
        times["smoothed_argmax"].append(time.perf_counter() - t)
        if not np.array_equal(ref, got):
            raise SystemExit(f"labels differ in {int((ref != got).sum())} voxels")
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "size_zyx": list(args.size),
        "weighted": args.weighted,
        "repeats": args.repeats,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio": round(med["smoothed_argmax"] / med["smooth_every_class"], 3),
        "identical_labels": True,
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
