"""Plot whole-scan time and peak memory against volume size from ``tools/bench_scale.py`` results.

python tools/plot_scale.py docs/results/scale_*.json --out docs/results/scale_time.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {
    "unet": ("U-Net bundle", "black", "s"),
    "implicit-adaptive": ("implicit, adaptive + int8 decoder (default)", "tab:red", "o"),
    "implicit-adaptive-fp32": ("implicit, adaptive, fp32", "tab:orange", "o"),
    "implicit-sparse": ("implicit, paper's sparse loop", "tab:blue", "^"),
    "implicit-dense": ("implicit, dense", "tab:gray", "v"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(p.read_text()) for p in args.results), key=lambda r: r["setup"]["voxels"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, (label, colour, marker) in STYLE.items():
        pts = [(r["setup"]["voxels"] / 1e6, r[key]) for r in runs if key in r]
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax_t.plot(x, [p[1]["median_wall_s"] for p in pts], marker=marker, color=colour, label=label)
        ax_m.plot(x, [p[1]["peak_rss_gib"] for p in pts], marker=marker, color=colour, label=label)
    sizes = ", ".join("x".join(map(str, r["setup"]["size_zyx"])) for r in runs)
    for ax, ylabel in ((ax_t, "whole-scan time, s (median)"), (ax_m, "peak resident memory, GiB")):
        ax.set_xlabel(f"volume, million voxels ({sizes})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ticks = [r["setup"]["voxels"] / 1e6 for r in runs]
    ax_t.set_xticks(ticks, [f"{t:.1f}" for t in ticks])
    ax_t.minorticks_off()
    ax_t.legend(fontsize=8)
    fig.suptitle("imunet-run on the CPU (onnxruntime, 2 cores), hippocampus-crop phantoms")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
