"""Dice per case of several bundles, from ``tools/evaluate.py --json`` outputs, as one PNG.

    python tools/plot_dice.py docs/results/eval_hippocampus_implicit.json docs/results/eval_hippocampus_unet1200.json \
        --names implicit "U-Net" --out docs/results/dice_per_case.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--names", nargs="+", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in a.results]
    names = a.names or [p.stem for p in a.results]
    labels = list(runs[0]["labels"])
    cases = sorted(runs[0]["per_case"], key=lambda c: np.mean([runs[0]["per_case"][c][k]["dice"] for k in labels]))
    fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), sharey=True)
    for ax, lab in zip(np.atleast_1d(axes), labels):
        for name, run in zip(names, runs):
            d = [run["per_case"][c][lab]["dice"] for c in cases]
            ax.plot(range(len(cases)), d, "o", ms=4, label=f"{name} (mean {np.mean(d):.3f})")
        ax.set_title(f"{lab}: Dice per held-out case")
        ax.set_xlabel("case (sorted by the first model's mean Dice)")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    np.atleast_1d(axes)[0].set_ylabel("Dice")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
