"""The source series' headers as DICOM outputs (SEG, RT Structure Set) need them: read without pixel
data, checked for the UIDs an output must reference before any inference, and completed on
in-memory copies with the Type 2 patient and study attributes that anonymising exports drop (the
standard allows them empty; the user's files are never changed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import InputError

PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
SEG_REFERENCES = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
RTSTRUCT_REFERENCES = (*SEG_REFERENCES, "FrameOfReferenceUID")


def pydicom_module() -> Any:
    """pydicom, or :class:`InputError` saying which extra brings it."""
    try:
        import pydicom
    except ImportError:
        raise InputError("DICOM outputs need the dicom extra: pip install 'imunet[dicom]'") from None
    return pydicom


def read_headers(sources: list[Path]) -> list[Any]:
    """Each source file's header (no pixel data), in the order given."""
    pydicom = pydicom_module()
    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sources]


def _tag_text(ds: Any, key: str) -> str:
    """A header's value for a ``gggg|eeee`` key as SimpleITK writes it (multiple values joined by ``\\``)."""
    element = ds.get((int(key[:4], 16), int(key[5:], 16)))
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, str | bytes):
        return str(value)
    try:
        return "\\".join(str(v) for v in value)
    except TypeError:
        return str(value)


def volume_sources(sources: list[Path]) -> list[Path]:
    """The files of a series that its volume is read from, in slice order (localizers left out:
    :func:`..imaging.dicom_slices.one_volume`), from their headers: what a SEG or structure set
    references must be what the labels lie on."""
    from ..imaging.dicom_slices import one_volume, slice_header

    headers = read_headers(sources)
    slices = [slice_header(f, lambda key, ds=ds: _tag_text(ds, key)) for f, ds in zip(sources, headers)]
    return one_volume(sources[0].parent, slices)


def frame_count(ds: Any) -> int:
    """Frames in one DICOM image (1 where it does not say)."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def slice_count(datasets: list[Any]) -> int:
    """Slices of the volume a series' images hold: its files, or the frames of its one multi-frame image."""
    return sum(frame_count(ds) for ds in datasets)


def check_references(
    sources: list[Path], required: tuple[str, ...] = SEG_REFERENCES, what: str = "a DICOM SEG"
) -> list[str]:
    """:class:`InputError` naming the UIDs ``what`` must reference that the series lacks (headers only);
    else a note for each defect of the source that ``what`` must repeat by referencing it."""
    datasets = read_headers(sources)
    missing = [k for k in required if any(not ds.get(k) for ds in datasets)]
    if missing:
        raise InputError(f"the source series lacks {', '.join(missing)}; {what} cannot reference it")
    if len(datasets) > 1 and max(frame_count(ds) for ds in datasets) > 1:
        raise InputError(
            f"the source series holds {len(datasets)} multi-frame files (several volumes): put the one to "
            "segment in a folder of its own"
        )
    first = datasets[0]
    if first.get("FrameOfReferenceUID") and first.get("FrameOfReferenceUID") == first.get("StudyInstanceUID"):
        return [
            f"the source's FrameOfReferenceUID equals its StudyInstanceUID (a defect of the source, which "
            f"dciodvfy reports for it); {what} must reference both as they are, so it repeats the defect"
        ]
    return []


def frame_headers(datasets: list[Any]) -> list[Any]:
    """One header per slice of the volume, in slice order: the datasets of a single-frame series as they
    are; for one multi-frame image (enhanced CT or MR), a header per frame with its plane position,
    orientation and pixel spacing from the functional groups and ``ReferencedFrameNumber`` set (its
    frames were checked to be the volume's slices in stored order when it was read:
    :mod:`..imaging.multiframe`)."""
    if len(datasets) != 1 or frame_count(datasets[0]) == 1:
        return datasets
    from ..imaging.multiframe import group_value

    pydicom = pydicom_module()
    ds = datasets[0]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    out = []
    for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        frame = pydicom.Dataset()
        frame.SOPClassUID, frame.SOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        frame.ReferencedFrameNumber = number
        frame.Rows, frame.Columns = ds.Rows, ds.Columns
        frame.ImagePositionPatient = group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient")
        frame.ImageOrientationPatient = group_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        frame.PixelSpacing = group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        out.append(frame)
    return out


def with_shared_geometry(ds: Any) -> Any:
    """``ds`` (an in-memory copy of a multi-frame image) with its pixel measures and plane orientation
    in the shared functional group where its frames each carry equal ones (Philips writes them per
    frame; highdicom reads a multi-frame source's from the shared group). A single-frame image, or
    one whose frames differ, is returned as it is."""
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    if frame_count(ds) == 1 or not frames:
        return ds
    pydicom = pydicom_module()
    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
    shared = ds.SharedFunctionalGroupsSequence[0]
    for sequence in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if sequence in shared or not all(sequence in item for item in frames):
            continue
        values = {str(getattr(item, sequence)[0]) for item in frames}
        if len(values) == 1:
            setattr(shared, sequence, getattr(frames[0], sequence))
            for item in frames:
                delattr(item, sequence)
    return ds


def derived_uid(source_series: str, bundle_files: dict[str, str], output: str, part: str) -> str:
    """A UID that the same source series, bundle (its files' sha256) and output kind always give:
    an output sent again after a crash is the same object to a PACS, stored once."""
    from pydicom.uid import generate_uid

    bundle_id = hashlib.sha256(json.dumps(sorted(bundle_files.items())).encode()).hexdigest()
    return generate_uid(entropy_srcs=[source_series, bundle_id, output, part])


def with_type2(ds: Any) -> Any:
    """``ds`` (an in-memory copy) with every Type 2 patient and study attribute present, empty where absent."""
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def software_version() -> str:
    """imunet's version, for the Software Versions of the objects it writes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imunet")
    except PackageNotFoundError:
        return "unknown"
