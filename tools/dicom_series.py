"""Write a 3D image as a DICOM series (one file per slice) with the attributes a PACS expects:
patient, study, series, frame of reference, geometry, rescaled 16-bit pixels. For tests and
benchmarks of the DICOM paths (the shared CT example's UIDs were removed by its anonymisation).

    python tools/dicom_series.py runtime/default/sample/hippocampus_014_0000.nii.gz out_dir --modality MR
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}


def write_series(
    image: sitk.Image,
    folder: Path,
    modality: str = "MR",
    patient_id: str = "IMUNET-TEST-1",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> tuple[str, str, list[Path]]:
    """Write ``image`` as a series of ``modality`` into ``folder``; returns the study and series UIDs and
    the files in slice order."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), series_uid or generate_uid(), generate_uid()
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    slope = max((hi - lo) / 60000.0, 1e-6) if hi - lo > 60000 or not np.allclose(arr, np.round(arr)) else 1.0
    stored = np.round((arr - lo) / slope - 30000).astype(np.int16)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    now = _dt.datetime.now()
    files = []
    for k in range(arr.shape[0]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = (
            ds.file_meta.MediaStorageSOPClassUID,
            ds.file_meta.MediaStorageSOPInstanceUID,
        )
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.Modality, ds.Manufacturer = modality, "imunet test data"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Hippocampus", patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = 1, k + 1, ""
        ds.PatientPosition, ds.Laterality = "HFS", ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{image.GetSpacing()[1]:.6f}", f"{image.GetSpacing()[0]:.6f}"]
        ds.SliceThickness = f"{image.GetSpacing()[2]:.6f}"
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "3D"
            ds.ScanOptions, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "", "", "", ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = f"{lo + 30000 * slope:.6f}", f"{slope:.9g}"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, series_uid, files


def jpeg_lossless_copy(files: list[Path], folder: Path) -> list[Path]:
    """The series ``files`` re-encoded by GDCM as JPEG lossless (process 14, SV1) into ``folder``, UIDs
    kept; the copies in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.KeepOriginalImageUIDOn()
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.SetFileName(str(folder / f.name))
        writer.Execute(sitk.ReadImage(str(f)))
        out.append(folder / f.name)
    return out


def enhanced_copy(files: list[Path], path: Path, two_volumes: bool = False) -> Path:
    """The single-frame MR or CT series ``files`` as one Legacy Converted Enhanced MR or CT image at
    ``path`` (highdicom's converter, which stores the frames in descending slice position). ``two_volumes``:
    the second half of the frames moved onto the first half's positions, as a file holding two
    volumes at the same positions (echoes, a field map's magnitude and phase) has them."""
    import highdicom
    import pydicom

    datasets = [pydicom.dcmread(str(f)) for f in files]
    convert = {
        "MR": highdicom.legacy.LegacyConvertedEnhancedMRImage,
        "CT": highdicom.legacy.LegacyConvertedEnhancedCTImage,
    }
    image = convert[datasets[0].Modality](
        datasets,
        series_instance_uid=highdicom.UID(),
        series_number=2,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
    )
    if two_volumes:
        planes = [item.PlanePositionSequence[0] for item in image.PerFrameFunctionalGroupsSequence]
        half = len(planes) // 2
        for k in range(half):
            planes[half + k].ImagePositionPatient = planes[k].ImagePositionPatient
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--modality", default="MR", choices=sorted(SOP_CLASSES))
    args = ap.parse_args()
    study, series, files = write_series(sitk.ReadImage(str(args.image)), args.out, args.modality)
    print(f"{args.out}: {len(files)} slices, study {study}, series {series}")


if __name__ == "__main__":
    main()
