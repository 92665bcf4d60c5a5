"""RT Structure Sets and SEGs on real CT series, read back independently: each case as a DICOM CT
series at planning resolution (512 x 512, 0.98 mm in plane by default) without PatientBirthDate
and PatientSex (as anonymising exports leave them), segmented by ``imunet-run`` into an RT
Structure Set and a SEG; the structure set's contours filled again at the series' pixel centres
(even-odd per slice, :func:`read_back`) and compared with the label map ``imunet-run`` writes for
the same series: Dice per ROI of at least ``--min-voxels``; dciodvfy's errors for both objects.

    python tools/rtstruct_check.py --model headneck-ct --data ../shared/data/headneck-ct \\
        --cases @docs/results/headneck_split.json:val --count 3 --json docs/results/rtstruct_ct.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from harness import case_names, emit, machine


def read_back(ds, sources: list[Path]) -> dict[str, np.ndarray]:
    """``{ROI name: mask (slices, rows, cols)}`` of an RT Structure Set, on the grid of ``sources``
    (in slice order): each contour's polygon filled at the pixel centres of its slice, contours of
    one slice combined by the even-odd rule (a contour inside another is a hole)."""
    import pydicom
    from skimage.draw import polygon2mask

    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sources]
    index = {h.SOPInstanceUID: i for i, h in enumerate(headers)}
    shape = (len(headers), headers[0].Rows, headers[0].Columns)
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.ContourSequence:
            z = index[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            h = headers[z]
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            iop = np.array([float(v) for v in h.ImageOrientationPatient])
            d = points - np.array([float(v) for v in h.ImagePositionPatient])
            rows, cols = d @ iop[3:] / float(h.PixelSpacing[0]), d @ iop[:3] / float(h.PixelSpacing[1])
            mask[z] ^= polygon2mask(shape[1:], np.stack([rows, cols], 1))
        masks[names[roi.ReferencedROINumber]] = mask
    return masks


def dciodvfy_errors(path: Path) -> list[str] | None:
    if shutil.which("dciodvfy") is None:
        return None
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=300)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def main() -> None:
    import pydicom
    from dicom_series import write_series

    from imunet.runtime.imaging.io import series_files
    from imunet.runtime.imaging.metrics import dice
    from imunet.runtime.imaging.preprocess import resample_to_spacing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="headneck-ct")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.977, 0.977, 2.5])
    ap.add_argument("--min-voxels", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    report: dict = {"setup": {"machine": machine(), "command": " ".join(sys.argv)}, "cases": {}}
    run = [sys.executable, "-m", "imunet.runtime.app.cli", "--model", args.model, "-q"]
    with tempfile.TemporaryDirectory(prefix="imunet-rtstruct-") as tmp:
        for case in case_names(args.cases)[: args.count]:
            work = Path(tmp) / case
            image = sitk.ReadImage(str(args.data / "imagesTr" / f"{case}_0000.nii.gz"))
            image = resample_to_spacing(image, tuple(args.spacing))
            image = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
            _, _, files = write_series(image, work / "ct", "CT")
            for f in files:  # as anonymising exports leave them
                ds = pydicom.dcmread(str(f))
                for keyword in ("PatientBirthDate", "PatientSex"):
                    if keyword in ds:
                        delattr(ds, keyword)
                ds.save_as(str(f), enforce_file_format=True)
            outputs = {"rt": work / "rt.dcm", "seg": work / "seg.dcm", "labels": work / "labels.nii.gz"}
            for key, fmt in (("rt", "rtstruct"), ("seg", "seg"), ("labels", "seg")):
                res = subprocess.run([*run, str(work / "ct"), "--out", str(outputs[key]), "--dicom-format", fmt],
                                     capture_output=True, text=True)  # fmt: skip
                if res.returncode != 0:
                    raise SystemExit(f"{case} {key}: {res.stderr[-1500:]}")
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["labels"])))
            masks = read_back(pydicom.dcmread(str(outputs["rt"])), series_files(work / "ct", None))
            names = {r.ROIName: r.ROINumber for r in pydicom.dcmread(str(outputs["rt"])).StructureSetROISequence}
            from imunet.runtime.contract.bundle import load_bundle, resolve_model

            label_of = {v: k for k, v in load_bundle(resolve_model(args.model)).manifest.labels.items()}
            per_roi = {}
            for name in names:
                truth = labels == label_of[name]
                score = dice(masks[name].astype(np.uint8), truth.astype(np.uint8), 1)
                per_roi[name] = {"voxels": int(truth.sum()), "dice": round(float(score), 4)}
            report["cases"][case] = {
                "shape": list(labels.shape),
                "rois": per_roi,
                "min_dice_over_min_voxels": min(
                    (r["dice"] for r in per_roi.values() if r["voxels"] >= args.min_voxels), default=None
                ),
                "dciodvfy_errors": {k: dciodvfy_errors(outputs[k]) for k in ("rt", "seg")},
            }
    emit(report, args.json)


if __name__ == "__main__":
    main()
