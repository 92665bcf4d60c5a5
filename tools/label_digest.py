"""The sha256 of the labels a bundle writes for the held-out scans, per mode and backend.

Run it on two commits (before and after a refactor) and compare the JSON: equal digests mean
bit-identical labels. Held-out scans: the validation cases of the fixed hippocampus split
(``docs/results/hippocampus_split.json``) unless ``--scans`` names others.

    python tools/label_digest.py --json before.json
    python tools/label_digest.py --json after.json && cmp <(jq .digests before.json) <(jq .digests after.json)
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import DATA, SPLIT, emit, machine


def held_out_scans() -> list[Path]:
    names = json.loads(SPLIT.read_text())["val"]
    return [DATA / "imagesTr" / f"{n}_0000.nii.gz" for n in names]


def digests(bundle: str | None, scans: list[Path], mode: str, backend: str, precision: str) -> dict[str, str]:
    """sha256 of each scan's label array and geometry in ``mode`` on ``backend`` at ``precision``."""
    from imunet.runtime import Segmenter

    out = {}
    with Segmenter(bundle, backend=backend, precision=precision, mode=mode, workers=1) as seg:
        for scan in scans:
            labels = seg.predict(str(scan))
            h = hashlib.sha256(np.ascontiguousarray(sitk.GetArrayViewFromImage(labels)).tobytes())
            h.update(repr((labels.GetOrigin(), labels.GetSpacing(), labels.GetDirection())).encode())
            out[scan.name] = h.hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="bundle (default: the shipped one)")
    parser.add_argument("--scans", nargs="*", type=Path, help="scans (default: the split's held-out cases)")
    parser.add_argument("--modes", default="adaptive,sparse,dense")
    parser.add_argument("--backends", default="ort-cpu:fp32,ort-cpu:auto", help="backend:precision pairs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scans = args.scans or held_out_scans()
    report: dict = {"machine": machine(), "scans": len(scans), "digests": {}}
    for pair in args.backends.split(","):
        backend, precision = pair.split(":")
        for mode in args.modes.split(","):
            per_scan = digests(args.model, scans, mode, backend, precision)
            combined = hashlib.sha256("".join(per_scan[k] for k in sorted(per_scan)).encode()).hexdigest()
            report["digests"][f"{backend}:{precision}:{mode}"] = {"all": combined, "per_scan": per_scan}
            print(f"{backend} {precision} {mode}: {combined[:16]}", flush=True)
    emit(report, args.json)


if __name__ == "__main__":
    main()
