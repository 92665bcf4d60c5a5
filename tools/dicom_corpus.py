"""Real-world DICOM through ``imunet-run``: each series of public test corpora segmented into a DICOM
SEG and an RT Structure Set (both checked with dciodvfy), or refused with one line. A table of
what each series exercises and what happened.

    python tools/dicom_corpus.py --root dcm_qa=PATH --root pydicom=PATH:each-file \\
        --json docs/results/dicom_corpus.json --markdown docs/results/dicom_corpus.md

``--root NAME=PATH`` takes every folder under PATH that holds DICOM image files, one case per
series in it; ``NAME=PATH:each-file`` makes each image file a case of its own (pydicom's test files
are variants of a few series). Non-image objects (structured reports, RT plans and doses,
segmentations, waveforms, DICOMDIRs) are counted and left out. ``--synthetic`` adds series that
the public corpora here lack: localizers mixed into a series, gantry tilt, uneven slice spacing and
a grayscale JPEG-lossless series (made with tools/dicom_series.py and GDCM from the shipped sample).
MR and other modalities run the hippocampus model, CT the head-and-neck model. A series far outside
the model's domain is segmented with imunet-run's WARNING (what is checked here is the DICOM in and
out; ``--refuse-out-of-domain`` refuses them instead).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from harness import emit, machine
from rtstruct_check import dciodvfy_errors

NOT_IMAGES = ("SR", "RTPLAN", "RTDOSE", "RTSTRUCT", "SEG", "ECG", "KO", "PR")
TYPE2 = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID")


def headers(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - anything pydicom cannot read is not a case
        return None


def is_image(ds) -> bool:
    return (
        ds is not None
        and "SOPClassUID" in ds
        and "Rows" in ds
        and str(ds.get("Modality", "")) not in NOT_IMAGES
        and "DirectoryRecordSequence" not in ds
    )


def collect(root: Path, each_file: bool) -> tuple[list[list[Path]], Counter]:
    """Cases (lists of files) under ``root`` and the non-image objects left out, by kind."""
    left_out: Counter = Counter()
    cases: list[list[Path]] = []
    folders: dict[Path, dict[str, list[Path]]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        ds = headers(p)
        if ds is None:
            continue
        if not is_image(ds):
            left_out[str(ds.get("Modality", "")) or ds.get("SOPClassUID", "no SOP class").__str__()[:30]] += 1
            continue
        if each_file:
            cases.append([p])
        else:
            folders.setdefault(p.parent, {}).setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(p)
    for series in folders.values():
        cases.extend(series.values())
    return cases, left_out


def describe(files: list[Path]) -> dict:
    """What a case exercises, from its headers."""
    ds = headers(files[0])
    try:
        name = str(ds.PatientName) if "PatientName" in ds else ""
    except Exception:  # noqa: BLE001
        name = "?"
    ts = ds.file_meta.TransferSyntaxUID.name if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else "?"
    return {
        "files": len(files),
        "modality": str(ds.get("Modality", "")),
        "sop_class": ds.SOPClassUID.name,
        "transfer_syntax": ts,
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "size": f"{ds.get('Rows')}x{ds.get('Columns')}",
        "non_ascii_name": any(ord(c) > 127 for c in name),
        "missing_type2": [k for k in TYPE2 if k not in ds],
        "missing_uids": [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k not in ds],
    }


def run_case(files: list[Path], work: Path, model: str, in_domain_only: bool) -> dict:
    """``imunet-run`` on the case as a series folder, once for a SEG and once for an RT Structure Set."""
    folder = work / "series"
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"{i:05d}.dcm")
    out = {}
    for fmt in ("seg", "rtstruct"):
        dest = work / f"{fmt}.dcm"
        cmd = [sys.executable, "-m", "imunet.runtime.app.cli", str(folder), "--model", model, "--out", str(dest),
               "--dicom-format", fmt, "-q", *(["--refuse-out-of-domain"] if in_domain_only else [])]  # fmt: skip
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t
        err = res.stderr.strip()
        failed = [ln for ln in err.splitlines() if ln.startswith(("FAILED", "imunet-run: error"))]
        out[fmt] = {
            "exit": res.returncode,
            "seconds": round(seconds, 2),
            "traceback": "Traceback" in err,
            "refusal": failed[0][:300] if failed else None,
            "warnings": [ln[:200] for ln in err.splitlines() if ln.startswith("WARNING")],
            "written": dest.is_file(),
            "dciodvfy_errors": dciodvfy_errors(dest) if dest.is_file() else None,
        }
    if any(out[fmt]["dciodvfy_errors"] for fmt in out):  # the source's own errors, to tell them apart
        out["source_dciodvfy_errors"] = dciodvfy_errors(folder / "00000.dcm")
    return out


def synthetic(folder: Path) -> dict[str, list[Path]]:
    """Series the corpora here lack, from the shipped MR sample: localizers mixed in, gantry tilt,
    uneven slice spacing (a missing slice), JPEG lossless, an enhanced multi-frame MR of one volume and
    one of two volumes at the same positions, an enhanced CT of one volume."""
    import pydicom
    import SimpleITK as sitk
    from dicom_series import enhanced_copy, jpeg_lossless_copy, write_series

    sample = Path(__file__).resolve().parents[1] / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"
    image = sitk.ReadImage(str(sample))
    out = {}
    base = write_series(image, folder / "base", "MR")[2]
    # a localizer: one more image of the same series, another orientation and ImageType LOCALIZER
    loc_dir = folder / "localizer"
    loc_dir.mkdir()
    for f in base:
        shutil.copy(f, loc_dir / f.name)
    ds = pydicom.dcmread(str(base[len(base) // 2]))
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.InstanceNumber = 999
    ds.save_as(str(loc_dir / "localizer.dcm"))
    out["localizer mixed in"] = sorted(loc_dir.iterdir())
    # gantry tilt: each slice shifted along y in proportion to its position (15 degrees)
    tilt_dir = folder / "tilt"
    tilt_dir.mkdir()
    for f in base:
        ds = pydicom.dcmread(str(f))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.radians(15.0)) * z, z]
        ds.GantryDetectorTilt = 15.0
        ds.save_as(str(tilt_dir / f.name))
    out["gantry tilt 15 degrees"] = sorted(tilt_dir.iterdir())
    # uneven spacing: one slice missing in the middle
    gap_dir = folder / "gap"
    gap_dir.mkdir()
    for i, f in enumerate(base):
        if i != len(base) // 2:
            shutil.copy(f, gap_dir / f.name)
    out["uneven spacing (a slice missing)"] = sorted(gap_dir.iterdir())
    # JPEG lossless (process 14, SV1), encoded by GDCM: no public grayscale example is at hand here
    out["JPEG lossless, GDCM-encoded"] = sorted(jpeg_lossless_copy(base, folder / "jpeg-lossless"))
    # enhanced multi-frame MR (the corpora's enhanced files hold several volumes): one volume, then two
    out["enhanced MR, one volume (legacy converted)"] = [enhanced_copy(base, folder / "enhanced" / "image.dcm")]
    out["enhanced MR, two volumes at the same positions"] = [
        enhanced_copy(base, folder / "enhanced2" / "image.dcm", two_volumes=True)
    ]
    ct = write_series(image, folder / "ct", "CT")[2]  # the MR sample as CT: out of the CT model's domain
    out["enhanced CT, one volume (legacy converted)"] = [enhanced_copy(ct, folder / "enhanced-ct" / "image.dcm")]
    return out


def status(result: dict) -> str:
    seg, rt = result["seg"], result["rtstruct"]
    if seg["traceback"] or rt["traceback"]:
        return "TRACEBACK"
    if seg["written"] and rt["written"]:
        errors = len(seg["dciodvfy_errors"] or []) + len(rt["dciodvfy_errors"] or [])
        return "segmented" + (f", {errors} dciodvfy errors" if errors else "")
    return "refused"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", action="append", default=[], help="NAME=PATH or NAME=PATH:each-file")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument(
        "--refuse-out-of-domain",
        action="store_true",
        help="pass --refuse-out-of-domain: series far outside the model's domain are refused before inference",
    )
    ap.add_argument("--mr-model", default="hippocampus")
    ap.add_argument("--ct-model", default="headneck-ct")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args()
    rows, left_out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, str, list[Path]]] = []
        for spec in a.root:
            name, _, path = spec.partition("=")
            each = path.endswith(":each-file")
            root = Path(path.removesuffix(":each-file"))
            found, skipped = collect(root, each)
            left_out[name] = dict(skipped)
            cases += [
                (name, str(Path(f[0]).relative_to(root) if each else f[0].parent.relative_to(root)), f) for f in found
            ]
        if a.synthetic:
            cases += [("synthetic", what, files) for what, files in synthetic(Path(tmp) / "synthetic").items()]
        for i, (source, case, files) in enumerate(cases):
            facts = describe(files)
            model = a.ct_model if facts["modality"] == "CT" else a.mr_model
            result = run_case(files, Path(tmp) / f"case{i}", model, a.refuse_out_of_domain)
            row = {"source": source, "case": case, "model": model, **facts, **result, "status": status(result)}
            rows.append(row)
            print(f"{source}/{case}: {row['status']} {result['seg']['refusal'] or ''}", flush=True)
    report = {"cases": len(rows), "status": dict(Counter(r["status"] for r in rows)), "left_out": left_out,
              "rows": rows}  # fmt: skip
    if a.markdown is not None:
        a.markdown.write_text(markdown(rows, left_out))
    emit(report | {"machine": machine()}, a.json)


def error_notes(rows: list[dict]) -> list[str]:
    """A line per dciodvfy error message of the outputs: how many rows, and whether the source file
    has the same error (a defect the output must repeat, since it references the source's UIDs)."""
    seen: Counter = Counter()
    inherited: dict[str, bool] = {}
    for r in rows:
        source = set(r.get("source_dciodvfy_errors") or [])
        for fmt in ("seg", "rtstruct"):
            for line in set(r[fmt]["dciodvfy_errors"] or []):
                message = re.sub(r"\s*<[^>]*>\s*$", "", line.split(" - ", 1)[-1])  # without the value
                seen[message] += 1
                inherited[message] = inherited.get(message, True) and any(message in s for s in source)
    return (
        [
            "",
            *(
                f'dciodvfy error in {n} outputs: "{m}"'
                + (" (the source file has the same error)." if inherited[m] else ".")
                for m, n in seen.most_common()
            ),
        ]
        if seen
        else []
    )


def markdown(rows: list[dict], left_out: dict) -> str:
    counts = Counter(r["status"].split(",")[0] for r in rows)
    lines = [
        "# Real-world DICOM series through imunet-run",
        "",
        "Each image series of public DICOM test corpora, given to `imunet-run SERIES --out x.dcm` once for a DICOM",
        "SEG and once with `--dicom-format rtstruct` (MR and other modalities: the hippocampus model; CT: the",
        "head-and-neck model). What is checked is the DICOM in and out: a series outside the model's domain is",
        "segmented with a WARNING (its labels mean little). *segmented*: both objects written and free of",
        "dciodvfy errors; *refused*: exit 1 with the one line shown, no file written. Made by",
        f"`python {' '.join(['tools/dicom_corpus.py', *sys.argv[1:]])}`.",
        "",
        f"{len(rows)} series: "
        + ", ".join(f"{n} {k}" for k, n in counts.most_common())
        + (". " if counts.get("TRACEBACK") else ", no traceback."),
        *error_notes(rows),
        "",
        "| source | series | modality | transfer syntax | frames x files | exercises | result | seconds (SEG) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        traits = []
        if r["frames"] > 1:
            traits.append("multi-frame")
        if r["non_ascii_name"]:
            traits.append("non-ASCII name")
        if r["missing_type2"]:
            traits.append("no " + "/".join(r["missing_type2"]))
        if r["missing_uids"]:
            traits.append("no " + "/".join(r["missing_uids"]))
        result = r["status"]
        if result == "refused":
            result = f"refused: {(r['seg']['refusal'] or '').split(': ', 1)[-1][:160]}"
        lines.append(
            f"| {r['source']} | {r['case']} | {r['modality']} | {r['transfer_syntax']} | {r['frames']} x {r['files']} "
            f"| {', '.join(traits)} | {result} | {r['seg']['seconds']} |"
        )
    skipped = "; ".join(f"{k}: " + ", ".join(f"{n} {t}" for t, n in v.items()) for k, v in left_out.items() if v)
    return "\n".join(lines) + (f"\n\nNot images, left out: {skipped}.\n" if skipped else "\n")


if __name__ == "__main__":
    main()
