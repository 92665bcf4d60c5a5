"""What the DICOM parts add per series: reading a DICOM series against a NIfTI file, writing a DICOM
SEG against a NIfTI label map, and the DICOMweb round trip (retrieve, store) against a local Orthanc
with its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb), when it is installed.

    python tools/bench_dicom.py --repeats 5 --json docs/results/dicom_timings.json

The series are the shipped sample scan written as an MR series (40 slices of 39 x 50) and a
512 x 512 x 300 series with a structure over 60 slices (SEG writing only).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from dicom_series import write_series
from harness import REPO, emit, machine, median

SAMPLE = REPO / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"


def timed(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def local(work: Path, repeats: int) -> dict:
    from imunet.runtime import Segmenter
    from imunet.runtime.dicom.dicom_seg import segmentation, write_segmentation
    from imunet.runtime.imaging.io import read_image, series_files, write_image_atomic

    _, _, files = write_series(sitk.ReadImage(str(SAMPLE)), work / "mr", "MR")
    seg = Segmenter()
    read_nifti, image = timed(lambda: read_image(SAMPLE), repeats)
    read_dicom, _ = timed(lambda: read_image(work / "mr"), repeats)
    labels = seg.predict(image)
    nifti, _ = timed(lambda: write_image_atomic(labels, work / "l.nii.gz", overwrite=True), repeats)
    seg_write, _ = timed(lambda: write_segmentation(segmentation(labels, series_files(work / "mr", None), seg.bundle),
                                                    work / "l.dcm", overwrite=True), repeats)  # fmt: skip
    big = sitk.Image((512, 512, 300), sitk.sitkInt16)
    _, _, big_files = write_series(big, work / "big", "MR")
    arr = np.zeros((300, 512, 512), np.uint8)
    arr[100:160, 200:300, 150:260] = 1
    big_seg, _ = timed(lambda: write_segmentation(segmentation(sitk.GetImageFromArray(arr), big_files, seg.bundle),
                                                  work / "big.dcm", overwrite=True), 1)  # fmt: skip
    return {
        "read_nifti_s": read_nifti, "read_dicom_series_s": read_dicom, "write_nifti_labels_s": nifti,
        "write_dicom_seg_s": seg_write, "seg_bytes": (work / "l.dcm").stat().st_size,
        "series_slices": len(files), "write_dicom_seg_512x512x300_s": big_seg,
        "seg_512x512x300_bytes": (work / "big.dcm").stat().st_size,
    }  # fmt: skip


def round_trip(work: Path, repeats: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from test_dicom import Orthanc
    from typer.testing import CliRunner

    from imunet.runtime.app.cli import app

    study, _, files = write_series(sitk.ReadImage(str(SAMPLE)), work / "pacs", "MR")
    server = Orthanc(work / "orthanc")
    try:
        server.upload(files)
        walls, fetch, seg = [], [], []
        for i in range(repeats):
            t = time.perf_counter()
            res = CliRunner().invoke(app, ["--dicomweb", server.dicomweb, "--study", study, "--store", "-q",
                                           "--stats", str(work / f"s{i}.json")])  # fmt: skip
            walls.append(time.perf_counter() - t)
            if res.exit_code != 0:
                raise SystemExit(res.stderr)
            import json

            entry = json.loads((work / f"s{i}.json").read_text())["scans"][0]
            fetch.append(entry["fetch_s"])
            seg.append(entry["seg_s"])
    finally:
        server.stop()
    return {"command_s": median(walls), "retrieve_s": median(fetch), "build_seg_s": median(seg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imunet-dicom-") as tmp:
        report = {"local": local(Path(tmp), args.repeats)}
        if shutil.which("Orthanc"):
            report["dicomweb_orthanc"] = round_trip(Path(tmp), args.repeats)
    report["setup"] = {"machine": machine(), "command": " ".join(["python", *sys.argv])}
    emit(report, args.json)


if __name__ == "__main__":
    main()
