"""How well the per-scan Dice estimate ranks and predicts true Dice, on labelled cases a bundle did not
train on: Spearman and mean absolute error of the per-scan mean estimate (over the labels each case
annotated), the uncalibrated soft Dice beside it, and a scatter plot.

    python tools/quality_check.py --model B.imunet --dataset DIR --cases @split.json:val \
        --json docs/results/quality_X.json --plot docs/results/quality_X.png [--observations obs.json]

Two figures per bundle:

- ``leave_one_scan_out``: each case estimated by a calibration fitted (feature choice included) on
  every other case: what calibration on these cases predicts for a case it has not seen;
- ``bundle``: the estimate the bundle's own calibration gives (in-sample when it was fitted on these
  very cases, as ``imunet-export`` does on a run's validation split; out-of-sample when it was
  borrowed from a split twin).

``--observations FILE`` keeps the segmented cases' features and true Dice (written when missing,
read when present), so the plot can be redrawn without segmenting again. Also reports the cost of
the estimate against inference on ``--cost-scans`` scans, with the bundle's own features (as
``imunet-run`` computes them). ``--calibration OTHER.imunet`` (repeatable) also scores another
bundle's calibration on these cases: the shipped model's on its split twin's held-out scans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from harness import emit, machine

from imunet.export.calibration import (
    Observation,
    Spec,
    annotated_labels,
    dataset_pairs,
    fit,
    leave_one_scan_out,
    observe,
    parse_cases,
    per_scan,
    scores,
    training_volumes,
    with_volume_z,
)
from imunet.runtime import Segmenter
from imunet.runtime.app.quality import absent_estimate, label_estimate
from imunet.runtime.contract.bundle import load_bundle
from imunet.runtime.contract.quality_model import QualityModel


def bundle_estimates(obs: list[Observation], model: QualityModel) -> np.ndarray:
    """What the bundle's own calibration estimates for each observation."""
    return np.array(
        [
            label_estimate(o.label, o.features, model) if o.features else absent_estimate(o.label, o.mass, model)
            for o in obs
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--cases", required=True, help="a,b | @split.json:val | @cases.txt")
    ap.add_argument("--training", default=None, help="training cases for label volumes (default: the bundle's)")
    ap.add_argument("--observations", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--title", default=None)
    ap.add_argument("--cost-scans", type=int, default=5, help="scans timed for the estimate's cost")
    ap.add_argument(
        "--calibration",
        action="append",
        default=[],
        metavar="OTHER.imunet",
        help="also score this bundle's calibration on these scans (e.g. the shipped model's, on a twin's)",
    )
    a = ap.parse_args()

    seg = Segmenter(a.model, backend="auto")
    m = seg.bundle.manifest
    names = [m.labels[k] for k in sorted(m.labels) if k]
    cases = parse_cases(a.cases)
    annotated = annotated_labels(a.dataset)
    if a.observations is not None and a.observations.is_file():
        obs = [Observation(**o) for o in json.loads(a.observations.read_text())]
    else:
        obs = observe(seg, a.dataset, cases, annotated, progress=lambda c: print(c, flush=True))
        if a.observations is not None:
            a.observations.write_text(json.dumps([asdict(o) for o in obs], indent=1) + "\n")
    seg.every_quality_feature = False  # the cost as imunet-run pays it: the bundle's own features
    cost = []
    for _, image, _ in dataset_pairs(a.dataset, cases[: a.cost_scans]):
        stats = seg.segment(image).stats
        cost.append((stats["quality_s"], stats["inference_s"]))
    training = parse_cases(a.training) if a.training else list(m.provenance.training_cases)
    volumes = training_volumes(a.dataset, training, m.labels, annotated)
    obs = [with_volume_z(o, volumes) for o in obs]
    held = QualityModel(label_volumes=volumes)
    fitted = fit(obs, volumes, "this check", names)
    chosen = fitted.calibration["chosen"]
    best = Spec(tuple(chosen["features"]), chosen["label_offsets"], chosen["identity"])
    loo = leave_one_scan_out(obs, best, names, held)
    raw = np.array([o.features["soft_dice"] if o.features else absent_estimate(o.label, o.mass, held) for o in obs])
    report = {
        "model": str(a.model),
        "cases": len({o.case for o in obs}),
        "labels_scored": len(obs),
        "chosen": chosen,
        "leave_one_scan_out": scores(obs, loo),
        "uncalibrated_soft_dice": scores(obs, raw),
    }
    if m.quality is not None and m.quality.calibrated:
        report["bundle"] = {**scores(obs, bundle_estimates(obs, m.quality)), "note": m.quality.calibration.get("note")}
    for other in a.calibration:
        q = load_bundle(other).manifest.quality
        if q is None or not q.calibrated:
            sys.exit(f"{other}: has no calibrated Dice estimate")
        report.setdefault("other_calibrations", {})[str(other)] = scores(obs, bundle_estimates(obs, q))
    if cost:
        share = [q / i for q, i in cost if i > 0]
        report["cost"] = {
            "median_quality_s": statistics.median(q for q, _ in cost),
            "median_inference_s": statistics.median(i for _, i in cost),
            "median_share_of_inference": round(statistics.median(share), 4),
            "max_share_of_inference": round(max(share), 4),
        }
    cases_, true, est = per_scan(obs, loo)
    report["per_scan"] = {
        c: {"dice": round(float(t), 4), "estimate_loo": round(float(e), 4)} for c, t, e in zip(cases_, true, est)
    }
    if a.plot is not None:
        plot(true, est, per_scan(obs, raw)[2], report, a.plot, a.title or Path(a.model).name)
    emit(report | {"machine": machine()}, a.json)


def plot(true: np.ndarray, est: np.ndarray, raw: np.ndarray, report: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loo, unc = report["leave_one_scan_out"], report["uncalibrated_soft_dice"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo = float(min(true.min(), est.min(), raw.min())) - 0.02
    hi = float(max(true.max(), est.max(), raw.max())) + 0.02
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    raw_label = f"soft Dice, uncalibrated (Spearman {unc['spearman']:.2f}, MAE {unc['mae']:.3f})"
    loo_label = f"calibrated, leave-one-scan-out (Spearman {loo['spearman']:.2f}, MAE {loo['mae']:.3f})"
    ax.scatter(true, raw, s=14, color="tab:grey", alpha=0.6, label=raw_label)
    ax.scatter(true, est, s=18, color="tab:blue", label=loo_label)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("true Dice, mean over the scan's annotated labels")
    ax.set_ylabel("estimated Dice, same labels")
    ax.set_title(f"{title}: {len(true)} held-out scans", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
