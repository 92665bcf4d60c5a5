"""The paper's Table 1 on our machines: implicit against U-Net, from measured results only.

Reads what ``tools/evaluate.py`` (Dice and seconds per scan through the runtime, one JSON per
bundle) and ``tools/bench_train.py`` (training step time and peak memory, both models measured side
by side in one run) wrote, and prints one markdown table with the implicit/U-Net ratios.

    python tools/table1.py --implicit docs/results/eval_hippocampus_implicit.json \\
        --unet docs/results/eval_hippocampus_unet1200.json --train docs/results/bench_train_cpu.json \\
        --json docs/results/table1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(implicit: dict, unet: dict, train: dict) -> list[tuple[str, float, float, int]]:
    """``(quantity, implicit, U-Net, decimals)`` for each line of the table."""

    def mean_dice(e: dict) -> float:
        return sum(v["dice_mean"] for v in e["labels"].values()) / len(e["labels"])

    out = [("mean validation Dice", mean_dice(implicit), mean_dice(unet), 4)]
    for label in implicit["labels"]:
        out.append((f"Dice {label}", implicit["labels"][label]["dice_mean"], unet["labels"][label]["dice_mean"], 4))
    out += [
        ("inference, s per scan (median)", implicit["median_s_per_scan"], unet["median_s_per_scan"], 3),
        (
            "training, s per 100 steps",
            100 * train["implicit"]["median_step_s"],
            100 * train["unet"]["median_step_s"],
            1,
        ),
        ("peak training memory, MB", train["implicit"]["peak_mb"], train["unet"]["peak_mb"], 0),
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--implicit", type=Path, required=True, help="evaluate.py JSON of the implicit bundle")
    ap.add_argument("--unet", type=Path, required=True, help="evaluate.py JSON of the U-Net bundle")
    ap.add_argument("--train", type=Path, required=True, help="bench_train.py JSON")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    implicit, unet, train = (json.loads(p.read_text()) for p in (args.implicit, args.unet, args.train))
    table = rows(implicit, unet, train)
    lines = ["| quantity | implicit | U-Net | implicit / U-Net |", "|---|---|---|---|"]
    for name, a, b, d in table:
        lines.append(f"| {name} | {a:.{d}f} | {b:.{d}f} | {a / b:.2f} |")
    lines.append(
        f"\nimplicit: {implicit['model']} ({implicit['mode']}, {implicit.get('precision', 'fp32')}); "
        f"U-Net: {unet['model']}; {implicit['cases']} held-out scans; training: {train['setup']}"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {name: {"implicit": a, "unet": b, "ratio": round(a / b, 3)} for name, a, b, _ in table}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
