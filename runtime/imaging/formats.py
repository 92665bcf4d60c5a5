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
