"""Scan reading and writing with SimpleITK, geometry kept exactly.

Arrays handed to the rest of the code are ``(Z, Y, X)``; spacing, origin and direction stay in
SimpleITK's ``(x, y, z)`` order and only at this boundary.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from .atomic import atomic_output
from .dicom_slices import check_frames, frames_of, one_volume, slice_header
from .formats import WRITABLE_SUFFIXES, image_suffix
from .multiframe import check_multiframe

sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's and GDCM's warnings never reach the user raw

MODALITY_TAG = "0008|0060"


@dataclass(frozen=True)
class Geometry:
    """The physical grid of a 3D scan, in SimpleITK's ``(x, y, z)`` order."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
        )

    def apply(self, image: sitk.Image) -> None:
        """Stamp this geometry (not the size) onto ``image``."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


MAX_LISTED = 5  # series named in a message; a folder of thousands of series gives one short line


def series_files(directory: Path, series: str | None) -> list[Path]:
    """The files of ``directory``'s DICOM series (the only one, or ``series``), in slice order: the
    order of the volume's z axis when read. The folder is scanned twice whatever its number of
    series (once for the series, once for the chosen one's files)."""
    reader = sitk.ImageSeriesReader
    uids = list(reader.GetGDCMSeriesIDs(str(directory)) or ())
    if not uids:
        raise InputError(f"{directory}: directory holds no DICOM series and no image file")
    if series is None:
        if len(uids) > 1:
            raise InputError(
                f"{directory}: holds {len(uids)} DICOM series; pick one with --series: {_listing(directory, uids)}"
            )
        series = uids[0]
    if series not in uids:
        shown = series if len(series) <= 80 else series[:80] + "..."
        raise InputError(f"{directory}: no DICOM series {shown!r}; present: {_listing(directory, uids)}")
    return [Path(f) for f in reader.GetGDCMSeriesFileNames(str(directory), series)]


def _listing(directory: Path, uids: list[str]) -> str:
    """The series for a message: with their file counts when few, else the first few and a count."""
    if len(uids) <= MAX_LISTED:
        counts = {uid: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)) for uid in uids}
        return ", ".join(f"{uid} ({n} files)" for uid, n in counts.items())
    return ", ".join(uids[:MAX_LISTED]) + f" and {len(uids) - MAX_LISTED} more"


def _read_dicom(directory: Path, series: str | None) -> sitk.Image:
    """One series as a 3D image, checked to be one (:mod:`.dicom_slices`): localizers left out; tilted,
    unevenly spaced and multi-volume series refused."""
    files = series_files(directory, series)
    check_frames(directory, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    image = reader.Execute()
    slices = [
        slice_header(f, lambda key, i=i: reader.GetMetaData(i, key) if reader.HasMetaDataKey(i, key) else "")
        for i, f in enumerate(files)
    ]
    if len(files) == 1 and slices[0].frames > 1:
        check_multiframe(str(directory), files[0], as_3d_scalar(image, str(directory)))
    kept = one_volume(directory, slices)
    if kept != files:  # localizers left out, or another slice order: read the volume's own files
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in kept])
        image = reader.Execute()
    modality = dicom_tag(str(files[0]), MODALITY_TAG)
    if modality:
        image.SetMetaData(MODALITY_TAG, modality)  # the domain check compares it with the model's
    return image


def dicom_tag(path: str, tag: str) -> str | None:
    """One tag (``gggg|eeee``) of a DICOM file's header, stripped, or None."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (header offset + voxel data), or None if not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n = 1
    for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]:
        n *= max(int(d), 1)
    return max(offset, 348) + n * max(int(bitpix), 8) // 8


def check_nifti_complete(path: Path) -> None:
    """Refuse a truncated or corrupt NIfTI file, which SimpleITK reads silently as zero-filled voxels."""
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            size, header = 0, b""
            with gzip.open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    if len(header) < 540:
                        header += block[:540]
                    size += len(block)
        elif name.endswith(".nii"):
            size = path.stat().st_size
            with path.open("rb") as fh:
                header = fh.read(540)
        else:
            return
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt compressed file ({exc})") from None
    expected = _nifti_expected_bytes(header)
    if expected is None:
        raise InputError(f"{path}: not a NIfTI file (no valid NIfTI header)")
    if size < expected:
        raise InputError(f"{path}: truncated: holds {size} bytes of the {expected} its header describes")


def read_image(path: str | os.PathLike, series: str | None = None, channel: int | None = None) -> sitk.Image:
    """Read a 3D scan from a NIfTI/NRRD/MHA file or a DICOM series directory.

    Raises :class:`InputError` with the file name and the problem for anything that is not a
    readable 3D scalar volume. ``channel`` picks one volume of a 4D file.
    """
    path = check_scan_path(path)
    try:
        if path.is_dir():
            image = _read_dicom(path, series)
        else:
            check_nifti_complete(path)
            image = sitk.ReadImage(str(path))
            if not image_suffix(path) and frames_of(path) > 1:
                check_multiframe(str(path), path, as_3d_scalar(image, str(path), channel))
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports every read failure as RuntimeError
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "sitk::ERROR" in ln), "")
        detail = first.split("sitk::ERROR:")[-1].strip() if first else "not a readable image"
        raise InputError(f"{path}: cannot read as an image ({detail})") from None
    return as_3d_scalar(image, str(path), channel)


def as_3d_scalar(image: sitk.Image, name: str, channel: int | None = None) -> sitk.Image:
    """Check that ``image`` is a 3D single-channel volume (picking ``channel`` of a 4D one)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; need a scalar image"
        )
    dim = image.GetDimension()
    if dim == 4:
        n = image.GetSize()[3]
        if channel is None:
            if n == 1:
                channel = 0
            else:
                raise InputError(f"{name}: is 4D with {n} volumes; pick one with --channel 0..{n - 1}")
        if not 0 <= channel < n:
            raise InputError(f"{name}: --channel {channel} out of range; the file has volumes 0..{n - 1}")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, channel])
    elif dim != 3:
        raise InputError(f"{name}: is {dim}D ({'x'.join(map(str, image.GetSize()))}); need a 3D volume")
    if min(image.GetSize()) < 1:
        raise InputError(f"{name}: has an empty dimension {image.GetSize()}")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise InputError(f"{name}: direction matrix is not orthonormal ({np.round(direction, 4).tolist()})")
    if min(image.GetSpacing()) <= 0 or not np.all(np.isfinite(image.GetSpacing())):
        raise InputError(f"{name}: invalid voxel spacing {image.GetSpacing()}")
    return image


def to_array(image: sitk.Image, dtype: type = np.float32) -> np.ndarray:
    """The voxels of ``image`` as a ``(Z, Y, X)`` array of ``dtype``."""
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False)


def from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a ``(Z, Y, X)`` array carrying ``geometry``."""
    image = sitk.GetImageFromArray(array)
    geometry.apply(image)
    return image


def check_writable_format(path: str | os.PathLike, what: str = "") -> str:
    """The image format suffix of ``path``; :class:`OutputError` (naming ``what``, e.g. ``--out``) for
    a name without a known image suffix or with a detached header, which cannot be written atomically."""
    path = Path(path)
    suffix = image_suffix(path)
    lead = f"{what} {path}" if what else str(path)
    if not suffix:
        raise OutputError(f"{lead}: unknown output format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    if suffix not in WRITABLE_SUFFIXES:
        raise OutputError(f"{lead}: detached-header formats are not written atomically; use .mha or .nrrd")
    return suffix


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` (compressed where the format allows); not atomic by itself: write
    to a temporary name from :func:`.atomic.atomic_output` or use :func:`write_image_atomic`."""
    check_writable_format(path)
    sitk.WriteImage(image, str(path), useCompression=True)
    return Path(path)


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`.atomic.atomic_output`): a reader never sees a
    half-written file, and an existing file is kept unless ``overwrite``."""
    check_writable_format(path)
    with atomic_output(path, overwrite) as tmp:
        write_image(image, tmp)
    return Path(path)


def check_scan_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a regular file or a folder; :class:`InputError` otherwise (missing,
    a FIFO, a socket or a device, whose reading could block; a name the system refuses)."""
    path = Path(path)
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if not path.is_dir() and not path.is_file():
            raise InputError(f"{path}: not a regular file or a DICOM folder")
    except OSError as exc:
        raise InputError(f"{str(path)[:200]}: cannot be read ({exc.strerror})") from None
    return path


def read_header(path: str | os.PathLike, series: str | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size and spacing ``(x, y, z, ...)`` of a scan from its header alone: no voxel is read or
    decompressed (a DICOM folder: the first file's header and the number of files). GDCM gives a
    multi-frame file whose frames descend along the slice normal a negative slice spacing here (its
    full read flips the direction instead), so a DICOM spacing is taken by magnitude."""
    path = check_scan_path(path)
    reader = sitk.ImageFileReader()
    try:
        if path.is_dir():
            files = series_files(path, series)
            reader.SetFileName(str(files[0]))
            reader.ReadImageInformation()
            size = (*reader.GetSize()[:2], len(files) * reader.GetSize()[2])  # multi-frame: frames per file
            return size, tuple(abs(v) for v in reader.GetSpacing())
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError:
        if not path.is_dir():
            check_nifti_complete(path)  # a truncated or corrupt NIfTI says so, in its own words
        raise InputError(f"{path}: cannot read as an image (unreadable header)") from None
    spacing = tuple(reader.GetSpacing())
    return tuple(reader.GetSize()), spacing if image_suffix(path) else tuple(abs(v) for v in spacing)
