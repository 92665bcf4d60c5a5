"""Synthetic CT-like phantoms in the nnU-Net v2 layout, for tests and scale benchmarks.

Each case: air (-1000 HU) around a body ellipsoid (soft tissue ~40 HU, fat rim ~-100 HU), an
"organ" (label 1, ~70 HU) and a "lesion" inside it (label 2, ~120 HU), all noisy ellipsoids
deformed by low-frequency sinusoids; Gaussian noise; anisotropic spacing; int16 HU.

    python tools/make_phantoms.py OUT --cases 8 --shape 48 64 64 --spacing 1.5 1.5 3.0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _ellipsoid(
    grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator, wobble: float
) -> np.ndarray:
    z, y, x = grid
    d = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(1.0, 3.0, size=3)
    deform = wobble * (
        np.sin(freq[0] * z / radii[0] + phase[0]) * np.sin(freq[1] * y / radii[1] + phase[1])
        + np.sin(freq[2] * x / radii[2] + phase[2])
    )
    return d * (1 + deform) <= 1.0


def make_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU image (int16) and label map (uint8, 0/1/2), both ``(Z, Y, X)``."""
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    s = np.asarray(shape, dtype=np.float32)
    body_c = s / 2 + rng.uniform(-0.05, 0.05, 3) * s
    body = _ellipsoid(grid, body_c, s * rng.uniform(0.38, 0.46, 3), rng, 0.05)
    inner = _ellipsoid(grid, body_c, s * rng.uniform(0.32, 0.36, 3), rng, 0.05)
    organ_c = body_c + rng.uniform(-0.1, 0.1, 3) * s
    organ = _ellipsoid(grid, organ_c, s * rng.uniform(0.14, 0.22, 3), rng, 0.15) & inner
    lesion_c = organ_c + rng.uniform(-0.05, 0.05, 3) * s
    lesion = _ellipsoid(grid, lesion_c, s * rng.uniform(0.07, 0.11, 3), rng, 0.1) & organ
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -100.0
    img[inner] = 40.0
    img[organ] = 70.0 + rng.normal(0, 5)
    img[lesion] = 120.0 + rng.normal(0, 8)
    img += rng.normal(0, 12.0, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return np.clip(img, -1024, 3071).astype(np.int16), label


def write_dataset(
    root: Path,
    cases: int = 8,
    shape: tuple[int, int, int] = (48, 64, 64),
    spacing_xyz: tuple[float, float, float] = (1.5, 1.5, 3.0),
    seed: int = 0,
) -> Path:
    """Write ``cases`` phantoms to ``root`` in the nnU-Net v2 layout; returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        img, lbl = make_phantom(shape, rng)
        for arr, path in (
            (img, root / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz"),
            (lbl, root / "labelsTr" / f"phantom_{i:03d}.nii.gz"),
        ):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing_xyz)
            im.SetOrigin((-10.0 * i, 5.0, 20.0))
            sitk.WriteImage(im, str(path), useCompression=True)
    meta = {
        "name": "Phantoms",
        "description": "synthetic CT-like phantoms (imunet tools/make_phantoms.py)",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 64, 64), metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 3.0), metavar=("X", "Y", "Z"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_dataset(a.out, a.cases, tuple(a.shape), tuple(a.spacing), a.seed)
    print(f"wrote {a.cases} phantoms to {a.out}")


if __name__ == "__main__":
    main()
