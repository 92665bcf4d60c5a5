"""Which scans ``imunet-run`` segments and where each one's outputs go.

Inputs are files, folders of image files, and DICOM series folders; an empty folder holds no scans.
Outputs in a folder follow nnU-Net's naming: ``CASE_0000.nii.gz`` -> ``CASE.nii.gz``; any other
``NAME.nii.gz`` -> ``NAME_seg.nii.gz``; a DICOM series folder ``DIR`` -> ``DIR_seg.nii.gz``.
Previews: ``--preview FILE.png`` for one scan, ``--preview FOLDER`` for one ``CASE.png`` per scan
(``CASE`` as in the label map's name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, OutputError
from ..imaging.formats import SEG_STEM_SUFFIX, case_name, image_suffix

SEG_SUFFIX = ".dcm"  # a DICOM Segmentation object, for DICOM series inputs
PREVIEW_SUFFIX = ".png"
DICOM_FORMATS = ("seg", "rtstruct")  # what a .dcm output holds: a DICOM SEG or an RT Structure Set


def output_suffix(path: Path) -> str:
    """``.dcm`` (DICOM SEG), an image format's suffix, or ``""`` (a folder)."""
    return SEG_SUFFIX if path.name.lower().endswith(SEG_SUFFIX) else image_suffix(path)


def collect_inputs(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Scans in the order given (folders expanded into their image files; a folder with other files
    but no image files is a DICOM series; an empty folder, hidden files aside, holds none), each once,
    and a note per scan given more than once."""
    found: list[Path] = []
    for p in _expand_lists(inputs):
        if p.is_dir():
            entries = [f for f in p.iterdir() if not f.name.startswith(".")]
            files = sorted(f for f in entries if f.is_file() and image_suffix(f))
            found.extend(files if files else [p] if entries else [])
        else:
            found.append(p)
    seen: dict[Path, Path] = {}
    notes = []
    for p in found:
        key = p.resolve()
        if key in seen:
            notes.append(f"{p} was given more than once; it is segmented once")
        else:
            seen[key] = p
    return list(seen.values()), notes


LIST_SUFFIXES = (".txt", ".csv")


def _expand_lists(inputs: list[Path]) -> list[Path]:
    """``inputs`` with each list file replaced by the paths it lists: a ``.txt`` with one path per
    line (blank lines and ``#`` comments skipped), or a ``.csv`` with an ``input`` column; relative
    paths are taken from the list's folder."""
    import csv

    out: list[Path] = []
    for p in inputs:
        if p.suffix.lower() not in LIST_SUFFIXES or not p.is_file():
            out.append(p)
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: cannot be read as a list of scans ({exc})") from None
        if p.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            if rows and "input" not in rows[0]:
                raise InputError(f"{p}: a CSV list of scans needs an 'input' column")
            listed = [r["input"] for r in rows if r.get("input")]
        else:
            listed = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        out.extend(path if path.is_absolute() else p.parent / path for path in map(Path, listed))
    return out


def output_name(scan: Path, fmt: str) -> str:
    """The label map's file name for ``scan`` in an output folder (nnU-Net's convention)."""
    case = case_name(scan)
    named = case_name(scan, ()) != case  # an nnU-Net case image: CASE_0000
    return f"{case}{fmt}" if named else f"{case}{SEG_STEM_SUFFIX}{fmt}"


@dataclass
class Job:
    """One scan and the files it writes."""

    scan: Path
    dest: Path
    preview: Path | None = None
    masks: dict[int, Path] = field(default_factory=dict)  # per-label masks beside the label map, if asked for
    probabilities: Path | None = None  # the class probabilities beside the label map, if asked for

    @property
    def outputs(self) -> list[Path]:
        extra = [*self.masks.values(), *([self.probabilities] if self.probabilities else [])]
        return [self.dest, *([self.preview] if self.preview else []), *extra]


def plan(scans: list[Path], out: Path | None, fmt: str, preview: Path | None) -> list[Job]:
    """A :class:`Job` per scan: ``--out`` itself for one scan and a file name, else a file in the folder
    ``--out`` (default: the current folder); the preview ``--preview`` itself if it names a PNG, else
    ``CASE.png`` in that folder."""
    many = len(scans) > 1
    jobs = []
    for scan in scans:
        if out is not None and not many and output_suffix(out):
            dest = out
        else:
            dest = (out if out is not None else Path.cwd()) / output_name(scan, fmt)
        pv = preview
        if preview is not None and preview.suffix.lower() != PREVIEW_SUFFIX:
            pv = preview / f"{dest.name[: -len(output_suffix(dest))]}{PREVIEW_SUFFIX}"
        jobs.append(Job(scan, dest, pv))
    return jobs


def check_destinations(inputs: list[Path], scans: list[Path], out: Path | None, preview: Path | None) -> None:
    """Before any work: ``--out`` and ``--preview`` name things this run can write, and no output
    folder is an input folder (its label maps would be read as scans on the next run).
    :class:`OutputError` says what is wrong."""
    many = len(scans) > 1
    if preview is not None:
        if preview.suffix.lower() == PREVIEW_SUFFIX and many:
            raise OutputError(f"--preview {preview} names one file but {len(scans)} scans were given; "
                              "pass a folder for one CASE.png per scan")  # fmt: skip
        if preview.suffix and preview.suffix.lower() != PREVIEW_SUFFIX:
            raise OutputError(f"--preview {preview}: previews are PNG; name a .png file or a folder")
    folders = {p.resolve() for p in inputs if p.is_dir()}
    out_dir = out if out is not None and not (output_suffix(out) and not many) else None
    for path, what in ((out_dir, "--out"), (preview if preview is not None and not preview.suffix else None,
                                            "--preview")):  # fmt: skip
        if path is not None and path.resolve() in folders:
            raise OutputError(f"{what} {path} is an input folder; its outputs would be read as scans on the "
                              "next run: choose another folder")  # fmt: skip
    targets = [(out_dir or (out.parent if out is not None else Path.cwd()), "--out")]
    if preview is not None:
        targets.append((preview.parent if preview.suffix else preview, "--preview"))
    for folder, what in targets:
        writable_folder(folder, what)


def writable_folder(folder: Path, what: str) -> None:
    """``folder`` exists as a folder this process may create files in, or can be made where its
    nearest existing parent is one; :class:`OutputError` naming ``what`` otherwise. Nothing is created."""
    nearest = folder
    while not nearest.exists() and nearest.parent != nearest:
        if nearest.is_symlink():
            raise OutputError(f"{what} {folder}: {nearest} is a broken link")
        nearest = nearest.parent
    if not nearest.is_dir():
        raise OutputError(f"{what} {folder}: {nearest} exists and is not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder}: no permission to write in {nearest}")


def check_outputs(jobs: list[Job], others: list[tuple[Path, str]]) -> None:
    """Before any work: every path a run writes (each job's outputs, and ``others`` such as
    ``--stats``) is distinct from every other one and from every input, whatever ``--overwrite``
    says. A DICOM series folder's files are inputs too. :class:`OutputError` names the clash."""
    inputs: dict[Path, Path] = {}
    for job in jobs:
        inputs[job.scan.resolve()] = job.scan
        if job.scan.is_dir():
            for f in job.scan.iterdir():
                inputs[f.resolve()] = f
    written: dict[Path, str] = {}
    named = [(p, f"the output of {job.scan.name}") for job in jobs for p in job.outputs] + others
    for path, what in named:
        key = path.resolve()
        if key in inputs:
            raise OutputError(f"{what} {path} is the input {inputs[key]}; an input is never written over")
        if key in written:
            raise OutputError(f"{path} would be written twice: as {written[key]} and as {what}")
        written[key] = what
