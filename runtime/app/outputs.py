"""What ``imunet-run`` writes per scan: the label map (an image or a DICOM SEG), per-label masks,
class probabilities, and the label map restricted to some labels. The writers write to the path they
are given; :mod:`.scan_job` gives them temporary names and commits a scan's files together."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..contract.label_names import label_indices
from ..errors import InputError
from ..imaging.io import write_image


def roi_labels(names: list[str], labels: dict[int, str]) -> set[int]:
    """Label indices named by ``names`` (label names or indices, commas allowed); :class:`InputError`
    for unknown ones."""
    try:
        return set(label_indices(names, labels, "--roi"))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def keep_labels(label: sitk.Image, keep: set[int] | None) -> sitk.Image:
    """``label`` with every label outside ``keep`` set to background (``None``: all kept)."""
    if keep is None:
        return label
    arr = sitk.GetArrayFromImage(label)
    arr[~np.isin(arr, list(keep))] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    return out


def mask_paths(dest: Path, suffix: str, labels: dict[int, str], keep: set[int] | None) -> dict[int, Path]:
    """``{label: path}`` of the per-label masks beside ``dest``: ``CASE_<name>`` plus the format's suffix."""
    stem = dest.name[: -len(suffix)]
    slug = {k: re.sub(r"[^A-Za-z0-9_.-]+", "-", v) for k, v in labels.items() if k}
    return {k: dest.with_name(f"{stem}_{slug[k]}{suffix}") for k in slug if keep is None or k in keep}


def write_mask(label: sitk.Image, k: int, path: Path) -> None:
    """The binary (0/1) mask of label ``k``."""
    write_image(sitk.Cast(label == k, sitk.sitkUInt8), path)


def write_probabilities(probs: np.ndarray, image: sitk.Image, labels: dict[int, str], path: Path) -> None:
    """Class probabilities ``(C, Z, Y, X)`` on ``image``'s grid as float16 in an ``.npz``, with the label
    names and the grid (SimpleITK's ``(x, y, z)`` spacing, origin and direction)."""
    with path.open("wb") as fh:
        np.savez_compressed(
            fh,
            probabilities=probs.astype(np.float16),
            labels=np.array([labels[k] for k in sorted(labels)]),
            spacing=np.array(image.GetSpacing()),
            origin=np.array(image.GetOrigin()),
            direction=np.array(image.GetDirection()),
        )


def dicom_object(label: sitk.Image, sources: list[Path], bundle, dicom_format: str):
    """The DICOM dataset of ``label`` on the series read from ``sources``: a SEG or an RT Structure Set."""
    if dicom_format == "rtstruct":
        from ..dicom.rtstruct import structure_set

        return structure_set(label, sources, bundle)
    from ..dicom.dicom_seg import segmentation

    return segmentation(label, sources, bundle)


def write_label(label: sitk.Image, dest: Path, scan: Path, series: str | None, bundle, dicom_format: str) -> None:
    """The label map as an image file, or as a DICOM object (``dicom_format``) referencing the DICOM
    series ``scan``."""
    if not dest.name.lower().endswith(".dcm"):
        write_image(label, dest)
        return
    from ..imaging.io import series_files

    dicom_object(label, series_files(scan, series), bundle, dicom_format).save_as(str(dest), enforce_file_format=True)
