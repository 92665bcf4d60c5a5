"""DICOM Segmentation output: the label map as a DICOM SEG that references its source series, built
with highdicom (the ``dicom`` extra: highdicom, pydicom, dicomweb-client).

One binary segment per foreground label, named as in the manifest and coded with the manifest's
concepts (category, type and a modifier such as laterality; a generic SNOMED CT "Anatomical
Structure" where it has none), with the label's display colour; the algorithm's name, version and
provenance from the bundle; patient and study attributes copied from the source images, which are
all referenced; frames on the source slices, empty frames left out. A multi-frame source (enhanced
CT or MR, one volume) is referenced frame by frame.

Anonymised exports routinely drop Type 2 attributes (patient's birth date and sex, referring
physician, accession number, study ID); they are given the empty value the standard allows, on the
in-memory copies the SEG is built from, never in the user's files. The Type 1 UIDs a SEG must
reference are checked from the headers before any inference (:func:`.headers.check_references`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..contract.bundle import Bundle
from ..contract.label_names import label_colour
from ..errors import InputError
from ..imaging.atomic import atomic_output
from .headers import (
    check_references,
    derived_uid,
    read_headers,
    slice_count,
    software_version,
    volume_sources,
    with_shared_geometry,
    with_type2,
)

SERIES_NUMBER = 9101  # where viewers list the SEG among the study's series


def _dicom() -> tuple[Any, Any, Any]:
    try:
        import highdicom
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise InputError("DICOM SEG output needs the dicom extra: pip install 'imunet[dicom]'") from None
    return highdicom, pydicom, codes


def _concept(hd: Any, entry: dict | None, default: Any) -> Any:
    if not entry:
        return default
    return hd.sr.CodedConcept(value=entry["value"], scheme_designator=entry["scheme"], meaning=entry["meaning"])


def segmentation(label: sitk.Image, sources: list[Path], bundle: Bundle) -> Any:
    """The SEG dataset of ``label`` (on the grid of the series read from ``sources``, in that order)."""
    hd, pydicom, codes = _dicom()
    check_references(sources)
    sources = volume_sources(sources)  # the files the volume was read from (localizers left out)
    datasets = [with_shared_geometry(with_type2(ds)) for ds in read_headers(sources)]
    frames = sitk.GetArrayFromImage(label).astype(np.uint8)  # (slices, rows, columns), slices in sources' order
    slices = slice_count(datasets)  # a multi-frame source: its frames, checked to be the slices when read
    if frames.shape[0] != slices or frames.shape[1:] != (datasets[0].Rows, datasets[0].Columns):
        raise InputError(f"the label map {frames.shape} does not lie on the source series' {slices} slices")
    m = bundle.manifest
    version = software_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"imunet {bundle.path.name}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=f"{version}; {m.provenance.dataset} {m.provenance.date}"[:64],
        source=f"run {m.provenance.run}, commit {m.provenance.commit or 'unknown'}"[:64],
    )
    segments = [_segment(hd, codes, k, name, m.label_codes.get(k, {}), algorithm) for k, name in
                sorted(m.labels.items()) if k]  # fmt: skip
    with warnings.catch_warnings():
        # the source's patient name is copied as it is; highdicom's opinion of its form is no news to the user
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=derived_uid(str(datasets[0].SeriesInstanceUID), m.files, "seg", "series"),
            series_number=SERIES_NUMBER,
            sop_instance_uid=derived_uid(str(datasets[0].SeriesInstanceUID), m.files, "seg", "instance"),
            instance_number=1,
            manufacturer="imunet",
            manufacturer_model_name=bundle.path.name[:64],
            software_versions=version,
            device_serial_number=bundle.manifest.files.get(m.graphs[next(iter(m.graphs))].file, "unknown")[:16],
            series_description=f"imunet {m.describe()}"[:64],
            content_label="IMUNET",
            omit_empty_frames=True,
        )


def save_segmentation(dataset: Any, path: Path) -> Path:
    """Save a SEG dataset to ``path`` (not atomic by itself)."""
    dataset.save_as(str(path), enforce_file_format=True)
    return path


def write_segmentation(dataset: Any, path: Path, overwrite: bool = False) -> Path:
    """Save a SEG dataset atomically."""
    with atomic_output(path, overwrite) as tmp:
        save_segmentation(dataset, tmp)
    return path


def _segment(hd: Any, codes: Any, k: int, name: str, coded: dict, algorithm: Any) -> Any:
    """Segment ``k``: its name, coded category, type and modifier, and its display colour."""
    generic = codes.SCT.AnatomicalStructure
    description = hd.seg.SegmentDescription(
        segment_number=k,
        segment_label=name[:64],
        segmented_property_category=_concept(hd, coded.get("category"), generic),
        segmented_property_type=_concept(hd, coded.get("type"), generic),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*label_colour(k)),
    )
    if coded.get("modifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(hd, coded["modifier"], None)
        ]
    return description
