"""Test volumes with ground truth, built from real labelled crops (hippocampus by default).

Crops (each z-scored on its own, picked at random) are packed shelf by shelf with 2-voxel gaps of 0
(their mean, as crops smaller than the patch are zero-padded in training). Their sizes differ, so
sliding windows do not line up with crops. Labels are the crops' labels. By default the crops are
the held-out cases of ``docs/results/hippocampus_split.json``.

    python tools/volumes.py --size 200 512 512 --out ct200

writes ``ct200_0000.nii.gz`` and ``ct200_label.nii.gz`` (size given as Z Y X).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import DATA, SPLIT, case_names


def load_crops(data: Path, cases: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image z-scored float32, label uint8)`` arrays of the named cases of an MSD-layout folder."""
    out = []
    for c in cases:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{c}_0000.nii.gz"))).astype(np.float32)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{c}.nii.gz"))).astype(np.uint8)
        out.append(((img - img.mean()) / max(float(img.std()), 1e-6), lab))
    return out


def pack(
    size: tuple[int, int, int], crops: list[tuple[np.ndarray, np.ndarray]], seed: int = 0, gap: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32) and label (uint8) arrays of ``size`` (Z, Y, X), packed shelf by shelf."""
    rng = np.random.default_rng(seed)
    image = np.zeros(size, np.float32)
    label = np.zeros(size, np.uint8)
    z = 0
    while z < size[0]:
        y, depth = 0, 0
        while y < size[1]:
            x, height = 0, 0
            while x < size[2]:
                img, lab = crops[int(rng.integers(len(crops)))]
                box = tuple(slice(a, min(a + d, s)) for a, d, s in zip((z, y, x), img.shape, size))
                inner = tuple(slice(0, b.stop - b.start) for b in box)
                image[box], label[box] = img[inner], lab[inner]
                x += img.shape[2] + gap
                height, depth = max(height, img.shape[1]), max(depth, img.shape[0])
            y += height + gap
        z += depth + gap
    return image, label


def held_out_volume(size: tuple[int, int, int], seed: int = 0, data: Path = DATA) -> tuple[sitk.Image, np.ndarray]:
    """A packed volume of the held-out cases: the image (1 mm, identity direction) and its labels."""
    image, label = pack(size, load_crops(data, case_names(f"@{SPLIT}:val")), seed)
    return sitk.GetImageFromArray(image), label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    ap.add_argument("--out", type=Path, required=True, help="prefix: writes PREFIX_0000.nii.gz and PREFIX_label.nii.gz")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--cases", default=f"@{SPLIT}:val", help="a,b,c or @split.json:key")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    image, label = pack(tuple(args.size), load_crops(args.data, case_names(args.cases)), args.seed)
    for arr, suffix in ((image, "_0000.nii.gz"), (label, "_label.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(args.out) + suffix)
    print(f"{args.out}: {image.shape}, foreground {float((label > 0).mean()):.4f}")


if __name__ == "__main__":
    main()
