"""Which scans ``imunet-run`` segments and where each one's outputs go.

Inputs are files, folders of image files, and DICOM series folders. Outputs in a folder follow
nnU-Net's naming: ``CASE_0000.nii.gz`` -> ``CASE.nii.gz``; any other ``NAME.nii.gz`` ->
``NAME_seg.nii.gz``; a DICOM series folder ``DIR`` -> ``DIR_seg.nii.gz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError
from ..imaging.formats import SEG_STEM_SUFFIX, case_name, image_suffix

SEG_SUFFIX = ".dcm"  # a DICOM Segmentation object, for DICOM series inputs


def output_suffix(path: Path) -> str:
    """``.dcm`` (DICOM SEG), an image format's suffix, or ``""`` (a folder)."""
    return SEG_SUFFIX if path.name.lower().endswith(SEG_SUFFIX) else image_suffix(path)


def collect_inputs(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Scans in the order given (folders expanded into their image files; a folder without image
    files is a DICOM series), each once, and a note per scan given more than once."""
    found: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and image_suffix(f) and not f.name.startswith("."))
            found.extend(files if files else [p])
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
    ``--out`` (default: the current folder); several previews get the case name as a prefix."""
    many = len(scans) > 1
    jobs = []
    for scan in scans:
        if out is not None and not many and output_suffix(out):
            dest = out
        else:
            dest = (out if out is not None else Path.cwd()) / output_name(scan, fmt)
        pv = preview
        if preview is not None and many:
            pv = preview.with_name(f"{dest.name[: -len(image_suffix(dest))]}_{preview.name}")
        jobs.append(Job(scan, dest, pv))
    return jobs


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
