"""File formats by name alone (no imaging library imported): what the CLI checks before any work."""

from __future__ import annotations

from pathlib import Path

#: File endings the runtime reads and writes as single files.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Those written as one file (a detached header and its data cannot be renamed into place together).
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_suffix(path: Path) -> str:
    """The known image suffix of ``path`` (``.nii.gz`` counts as one), or ``""``."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


CHANNEL_SUFFIX = "_0000"  # nnU-Net's name for the first (only) channel of a case's image
SEG_STEM_SUFFIX = "_seg"  # imunet's name for a label map that is not named after an nnU-Net case


def case_name(path: Path, strip: tuple[str, ...] = (CHANNEL_SUFFIX,)) -> str:
    """The case a file belongs to: its name without the image suffix and without one of ``strip``
    (``CASE_0000.nii.gz`` -> ``CASE``; pass ``(CHANNEL_SUFFIX, SEG_STEM_SUFFIX)`` for outputs too)."""
    suffix = image_suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.name
    for s in strip:
        if stem.endswith(s) and len(stem) > len(s):
            return stem[: -len(s)]
    return stem
