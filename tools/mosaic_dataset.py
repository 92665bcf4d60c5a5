"""A training dataset (nnU-Net v2 layout) of mosaics packed from labelled crops, like ``volumes.py``'s.

A model trained on single small crops only ever sees them whole and centred in its patch; on a large
volume every window cuts through anatomy at arbitrary places, and its output then depends on where
the window falls. Training on mosaics of the *training* cases teaches the sliding-window situation,
so that held-out volumes (``volumes.py``, built from the held-out cases) measure a model that was
trained for large volumes, as a CT model would be.

    python tools/mosaic_dataset.py --out /tmp/mosaics --count 40 --size 64 160 160

writes ``/tmp/mosaics/{imagesTr,labelsTr}/mosaic_NNN*.nii.gz`` and ``dataset.json`` (labels and
modality copied from the source dataset). Mosaic ``i`` uses seed ``seed + i``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import SimpleITK as sitk
from harness import DATA, SPLIT, case_names
from volumes import load_crops, pack


def write_dataset(
    out: Path, source: Path, cases: list[str], count: int, size: tuple[int, int, int], seed: int = 0
) -> list[str]:
    """Write ``count`` mosaics of ``size`` (Z, Y, X) built from ``cases`` of ``source``; their names."""
    if (out / "dataset.json").exists():
        raise SystemExit(f"{out} already holds a dataset; choose another --out")
    meta = json.loads((source / "dataset.json").read_text())
    crops = load_crops(source, cases)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        image, label = pack(size, crops, seed + i)
        name = f"mosaic_{i:03d}"
        sitk.WriteImage(sitk.GetImageFromArray(image), str(out / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(out / "labelsTr" / f"{name}.nii.gz"))
        names.append(name)
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "unknown"}
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "name": f"{meta.get('name', source.name)}Mosaics",
                "description": f"{count} mosaics of {size[0]}x{size[1]}x{size[2]} voxels packed from "
                f"{len(cases)} cases of {source} by tools/mosaic_dataset.py (seed {seed})",
                "channel_names": channels,
                "labels": meta["labels"],
                "numTraining": count,
                "file_ending": ".nii.gz",
            },
            indent=1,
        )
        + "\n"
    )
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--size", type=int, nargs=3, default=(64, 160, 160), metavar=("Z", "Y", "X"))
    ap.add_argument("--data", type=Path, default=DATA, help="source dataset (MSD / nnU-Net layout)")
    ap.add_argument("--cases", default=f"@{SPLIT}:train", help="a,b,c or @split.json:key")
    ap.add_argument("--seed", type=int, default=1000, help="first mosaic's seed (volumes.py's test volumes use 0)")
    args = ap.parse_args()
    names = write_dataset(args.out, args.data, case_names(args.cases), args.count, tuple(args.size), args.seed)
    print(f"{args.out}: {len(names)} mosaics of {args.size}")


if __name__ == "__main__":
    main()
