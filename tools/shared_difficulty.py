"""Is a scan's Dice a property of the scan, shared by two models trained alike, and does either model's
own output (or their disagreement) see it? The question behind a per-scan Dice estimate: where the
two models' Dice agree scan by scan but neither their probabilities nor their disagreement rank it,
no estimate built from the models' output can.

    python tools/shared_difficulty.py --model A.imunet --second B.imunet --dataset DIR \
        --cases @split.json:val --json docs/results/shared_difficulty_X.json

Per scan (mean over the labels the case annotated): each model's true Dice, their agreement (Dice of
one model's labels against the other's) and each model's uncalibrated soft Dice. Reported:

- ``shared``: Spearman of the two models' true Dice (high: the scan decides how well models do);
- ``agreement_ranks_a`` / ``agreement_ranks_b``: Spearman of the agreement against each model's
  true Dice (a second opinion);
- ``soft_dice_ranks_a`` / ``soft_dice_ranks_b``: each model's own soft Dice against its true Dice;
- ``soft_dice_and_agreement_rank_b``: B's soft Dice and the agreement combined (sum of their ranks).

Give ``--cases`` (less ``--exclude``) scans that model B held out and model A trained on to ask whether A's fit on its
training cases tracks B's held-out Dice (a per-scan difficulty A's training could have learned).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import emit, machine

from imunet.export.calibration import annotated_labels, dataset_pairs, parse_cases, ranks, spearman
from imunet.runtime import Segmenter
from imunet.runtime.app.quality import absent_estimate
from imunet.runtime.imaging.io import read_image
from imunet.runtime.imaging.metrics import dice

ROUND = 4


def soft_dice(result: object, name: str) -> float:
    """The uncalibrated soft Dice of label ``name`` in a segmentation result (for a label the map does
    not hold, the model's own odds that it is truly absent)."""
    q = result.quality  # type: ignore[attr-defined]
    if name in q.features:
        return float(q.features[name]["soft_dice"])
    return absent_estimate(name, q.empty.get(name, 0.0), None)


def scan_row(a: np.ndarray, b: np.ndarray, ref: np.ndarray, scored: dict[int, str], soft_a: dict, soft_b: dict) -> dict:
    """One scan's means over its ``scored`` labels (value -> name): true Dice of the label maps ``a``
    and ``b`` against ``ref``, their agreement, and the soft Dice ``soft_a[name]`` / ``soft_b[name]``."""
    ks = list(scored)
    return {
        "dice_a": float(np.mean([dice(a, ref, k) for k in ks])),
        "dice_b": float(np.mean([dice(b, ref, k) for k in ks])),
        "agreement": float(np.mean([dice(a, b, k) for k in ks])),
        "soft_dice_a": float(np.mean([soft_a[scored[k]] for k in ks])),
        "soft_dice_b": float(np.mean([soft_b[scored[k]] for k in ks])),
    }


def summarise(rows: dict[str, dict]) -> dict:
    """The report over per-scan rows (see :func:`scan_row`)."""
    col = {k: np.array([r[k] for r in rows.values()]) for k in next(iter(rows.values()))}
    return {
        "scans": len(rows),
        "mean_dice_a": round(float(col["dice_a"].mean()), ROUND),
        "mean_dice_b": round(float(col["dice_b"].mean()), ROUND),
        "mean_agreement": round(float(col["agreement"].mean()), ROUND),
        "shared": round(spearman(col["dice_a"], col["dice_b"]), ROUND),
        "agreement_ranks_a": round(spearman(col["agreement"], col["dice_a"]), ROUND),
        "agreement_ranks_b": round(spearman(col["agreement"], col["dice_b"]), ROUND),
        "soft_dice_ranks_a": round(spearman(col["soft_dice_a"], col["dice_a"]), ROUND),
        "soft_dice_ranks_b": round(spearman(col["soft_dice_b"], col["dice_b"]), ROUND),
        "soft_dice_and_agreement_rank_b": round(
            spearman(ranks(col["soft_dice_b"]) + ranks(col["agreement"]), col["dice_b"]), ROUND
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model A")
    ap.add_argument("--second", required=True, help="model B, with the same labels")
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--cases", required=True, help="a,b | @split.json:val | @cases.txt")
    ap.add_argument("--exclude", default=None, help="cases to leave out of --cases, same forms")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    seg_a, seg_b = Segmenter(a.model, backend="auto"), Segmenter(a.second, backend="auto")
    names = seg_a.bundle.manifest.labels
    if seg_b.bundle.manifest.labels != names:
        sys.exit(f"{a.second}: its labels {seg_b.bundle.manifest.labels} are not {a.model}'s {names}")
    annotated = annotated_labels(a.dataset)
    rows = {}
    excluded = set(parse_cases(a.exclude)) if a.exclude else set()
    cases = [c for c in parse_cases(a.cases) if c not in excluded]
    for case, image, label in dataset_pairs(a.dataset, cases):
        ra, rb = seg_a.segment(image), seg_b.segment(image)
        ref = np.rint(sitk.GetArrayFromImage(read_image(label))).astype(np.int64)
        scored = {k: n for k, n in names.items() if k and (annotated is None or n in annotated.get(case, ()))}
        if not scored:
            continue
        row = scan_row(
            sitk.GetArrayFromImage(ra.labels),
            sitk.GetArrayFromImage(rb.labels),
            ref,
            scored,
            {n: soft_dice(ra, n) for n in scored.values()},
            {n: soft_dice(rb, n) for n in scored.values()},
        )
        rows[case] = {k: round(v, ROUND) for k, v in row.items()}
        print(case, rows[case], flush=True)
    if len(rows) < 3:
        sys.exit(f"{len(rows)} scans scored: too few to rank")
    report = {"model": str(a.model), "second": str(a.second), "cases": a.cases, "excluded": a.exclude}
    report |= {**summarise(rows), "per_scan": rows}
    emit(report | {"machine": machine()}, a.json)


if __name__ == "__main__":
    main()
