"""Markdown table of one or more ``tools/bench_scale.py`` reports: per configuration, median seconds
and the ratio to the U-Net of the same run, points per voxel, and mean Dice against the truth minus
the implicit dense mode's of the same run; with several reports (e.g. several phantom packings) one
column per report and their mean.

    python tools/scale_table.py docs/results/scale_64x256x256_s5_seed*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SKIP = ("ratios", "setup")


def rows(reports: list[dict]) -> list[str]:
    """Table lines; configurations in the order of the first report."""
    names = [k for k in reports[0] if k not in SKIP]
    multi = len(reports) > 1
    head = ["configuration", "s", "/ U-Net", "points / voxel", "mean Dice"]
    if multi:
        head += [f"- dense (#{i + 1})" for i in range(len(reports))] + ["- dense (mean)", "/ U-Net (mean)"]
    else:
        head += ["- dense"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        if not all(name in r for r in reports):
            continue
        first = reports[0][name]
        diffs, ratios = [], []
        for r in reports:
            if "implicit-dense" in r:
                diffs.append(r[name]["mean_dice_vs_truth"] - r["implicit-dense"]["mean_dice_vs_truth"])
            if "unet" in r:
                ratios.append(r[name]["median_wall_s"] / r["unet"]["median_wall_s"])
        cells = [
            name,
            f"{first['median_wall_s']:.2f}",
            f"{ratios[0]:.2f}" if ratios else "",
            f"{first['points_per_voxel']:.3f}",
            f"{first['mean_dice_vs_truth']:.4f}",
        ]
        if multi:
            cells += [f"{d:+.4f}" for d in diffs] if len(diffs) == len(reports) else [""] * len(reports)
            cells.append(f"{sum(diffs) / len(diffs):+.4f}" if diffs else "")
            cells.append(f"{sum(ratios) / len(ratios):.2f}" if ratios else "")
        else:
            cells.append(f"{diffs[0]:+.4f}" if diffs else "")
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    args = ap.parse_args()
    print("\n".join(rows([json.loads(p.read_text()) for p in args.reports])))


if __name__ == "__main__":
    main()
