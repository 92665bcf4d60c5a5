"""RT Structure Set output: what radiotherapy planning systems import. One ROI per label found, named
exactly as the bundle's label, with its display colour, interpreted type ORGAN and its SNOMED CT
code; closed planar contours on the source slices in patient coordinates (on the frames of a
multi-frame source, each referenced by its frame number).

Contours are traced with scikit-image's marching squares at level 0.5 on the label's mask of each
slice (padded by one pixel so that every contour closes): they run half way between the pixels
inside and outside, so filling them again at the pixel centres gives the mask back, including its
holes and separate islands. Every contour of a slice is written as its own CLOSED_PLANAR contour;
a hole is a contour inside another, read with the even-odd rule, as planning systems read them.
Written with pydicom; scikit-image was chosen over OpenCV's ``findContours`` because OpenCV's
contours run through the boundary pixels' centres, which loses half a pixel all round (a large
part of a 2-4 voxel wide spinal cord or esophagus), and over writing marching squares ourselves.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..contract.bundle import Bundle
from ..contract.label_names import label_colour
from ..errors import InputError
from .headers import (
    RTSTRUCT_REFERENCES,
    check_references,
    derived_uid,
    frame_headers,
    pydicom_module,
    read_headers,
    software_version,
    volume_sources,
    with_type2,
)

RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"  # the SOP class a structure set names its study with
SERIES_NUMBER = 9102
COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)  # fmt: skip


def _contour_module() -> Any:
    try:
        from skimage import measure
    except ImportError:
        raise InputError("RT Structure Set output needs the dicom extra: pip install 'imunet[dicom]'") from None
    return measure


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` in (row, column) pixel coordinates around the mask's regions and
    holes (the last point not repeating the first)."""
    measure = _contour_module()
    padded = np.pad(mask.astype(np.float32), 1)
    out = []
    for c in measure.find_contours(padded, 0.5):
        c = c[:-1] if np.allclose(c[0], c[-1]) else c
        if len(c) >= 3:
            out.append(c - 1.0)
    return out


def _to_patient(points_rc: np.ndarray, header: Any) -> np.ndarray:
    """(row, column) pixel coordinates on ``header``'s slice to patient coordinates in mm ``(N, 3)``."""
    origin = np.array([float(v) for v in header.ImagePositionPatient])
    iop = np.array([float(v) for v in header.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)
    along_row, along_col = iop[:3], iop[3:]  # direction of increasing column, of increasing row
    return origin + np.outer(points_rc[:, 1] * col_spacing, along_row) + np.outer(points_rc[:, 0] * row_spacing,
                                                                                    along_col)  # fmt: skip


def structure_set(label: sitk.Image, sources: list[Path], bundle: Bundle) -> Any:
    """The RT Structure Set dataset of ``label`` (on the grid of the series read from ``sources``, in
    that order): one ROI per label present (every label's, without contours, when none is)."""
    pydicom = pydicom_module()
    check_references(sources, RTSTRUCT_REFERENCES, "an RT Structure Set")
    sources = volume_sources(sources)  # the files the volume was read from (localizers left out)
    datasets = [with_type2(ds) for ds in read_headers(sources)]
    headers = frame_headers(datasets)  # a multi-frame source: a header per frame
    arr = sitk.GetArrayFromImage(label)
    if arr.shape[0] != len(headers) or arr.shape[1:] != (headers[0].Rows, headers[0].Columns):
        raise InputError(f"the label map {arr.shape} does not lie on the source series' {len(headers)} slices")
    m, first = bundle.manifest, datasets[0]
    ds = _base(pydicom, first, bundle)
    frame = first.FrameOfReferenceUID
    ds.FrameOfReferenceUID = frame  # Frame of Reference module: the series' own
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.ReferencedFrameOfReferenceSequence = [_frame_reference(pydicom, first, frame, headers)]
    # one ROI per label found; with none found, every label's ROI without contours (the structure set's
    # ROI sequences are Type 1: an empty structure set is not a valid one, and says less)
    present = [k for k in sorted(m.labels) if k and (arr == k).any()] or [k for k in sorted(m.labels) if k]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, k in enumerate(present, start=1):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame, m.labels[k][:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(_roi_contours(pydicom, arr == k, headers, number, label_colour(k)))
        ds.RTROIObservationsSequence.append(_observation(pydicom, number, m.label_codes.get(k, {})))
    return ds


def _base(pydicom: Any, first: Any, bundle: Bundle) -> Any:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    m = bundle.manifest
    source = str(first.SeriesInstanceUID)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET
    ds.SOPInstanceUID = derived_uid(source, m.files, "rtstruct", "instance")  # a resend is the same object
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RT_STRUCTURE_SET
    for keyword in COPIED:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    now = _dt.datetime.now()
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = derived_uid(source, m.files, "rtstruct", "series")
    ds.SeriesNumber, ds.InstanceNumber = SERIES_NUMBER, 1
    ds.SeriesDescription = f"imunet {m.describe()}"[:64]
    ds.Manufacturer, ds.ManufacturerModelName = "imunet", bundle.path.name[:64]
    ds.SoftwareVersions = software_version()
    ds.OperatorsName = ""
    ds.StructureSetLabel = "IMUNET"
    ds.StructureSetName = bundle.path.name[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.StructureSetDate, ds.StructureSetTime
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StructureSetDate, ds.StructureSetTime
    ds.ApprovalStatus = "UNAPPROVED"  # automatic contours are reviewed before use
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192")
    return ds


def _image_reference(pydicom: Any, header: Any) -> Any:
    """A reference to one slice: its image, and its frame where the image is multi-frame."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    if "ReferencedFrameNumber" in header:
        item.ReferencedFrameNumber = header.ReferencedFrameNumber
    return item


def _frame_reference(pydicom: Any, first: Any, frame: str, headers: list[Any]) -> Any:
    contour_images = [_image_reference(pydicom, h) for h in headers]
    series = pydicom.Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, contour_images
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = DETACHED_STUDY, first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    ref = pydicom.Dataset()
    ref.FrameOfReferenceUID, ref.RTReferencedStudySequence = frame, [study]
    return ref


def _roi_contours(pydicom: Any, mask: np.ndarray, headers: list[Any], number: int, colour: tuple) -> Any:
    item = pydicom.Dataset()
    item.ROIDisplayColor = list(colour)
    item.ReferencedROINumber = number
    item.ContourSequence = []
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1)):
        header = headers[z]
        image = _image_reference(pydicom, header)
        for points in slice_contours(mask[z]):
            contour = pydicom.Dataset()
            contour.ContourImageSequence = [image]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.3f}" for v in _to_patient(points, header).ravel()]
            item.ContourSequence.append(contour)
    if not item.ContourSequence:
        del item.ContourSequence  # Type 3: an ROI the model found nothing of has no contours
    return item


def _observation(pydicom: Any, number: int, coded: dict) -> Any:
    obs = pydicom.Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber = number, number
    obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
    if coded.get("type"):
        code = pydicom.Dataset()
        code.CodeValue, code.CodingSchemeDesignator = coded["type"]["value"], coded["type"]["scheme"]
        code.CodeMeaning = coded["type"]["meaning"]
        obs.RTROIIdentificationCodeSequence = [code]
    return obs


def save_structure_set(dataset: Any, path: Path) -> Path:
    """Save an RT Structure Set dataset to ``path`` (not atomic by itself)."""
    dataset.save_as(str(path), enforce_file_format=True)
    return path
