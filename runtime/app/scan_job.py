"""One scan of an ``imunet-run`` batch: which of its outputs to make, segmenting it, and writing its
outputs together, the label map last, so that a failed scan leaves nothing behind and
``--skip-existing`` never takes a half-done scan for a done one."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..imaging.atomic import atomic_outputs
from ..imaging.formats import case_name
from .batch import SEG_SUFFIX, Job, output_suffix


@dataclass(frozen=True)
class RunOptions:
    """What the command line asked of every scan."""

    overwrite: bool = False
    skip: bool = False  # --skip-existing: make only the outputs that are missing
    keep: set[int] | None = None  # --roi: the labels written (None: all)
    masks: bool = False
    probs: bool = False
    series: str | None = None
    channel: int | None = None
    quiet: bool = False
    dicom_format: str = "seg"  # what a .dcm output holds: seg | rtstruct
    flag_below: float | None = None  # --flag-below: flag scans whose lowest Dice estimate is under it


def with_extras(job: Job, labels: dict[int, str], options: RunOptions) -> Job:
    """``job`` with the masks and probabilities it writes beside its label map, when asked for."""
    from .outputs import mask_paths

    suffix = output_suffix(job.dest)
    if not suffix:
        return job
    if options.masks:
        job.masks = mask_paths(job.dest, suffix, labels, options.keep)
    if options.probs:
        job.probabilities = job.dest.with_name(job.dest.name[: -len(suffix)] + "_probabilities.npz")
    return job


def outputs_to_make(job: Job, options: RunOptions) -> list[Path]:
    """The outputs of ``job`` this run writes: all of them, or with ``skip`` only the missing ones
    (none: the scan is done). :class:`InputError` if one exists and may not be replaced."""
    existing = [p for p in job.outputs if p.exists() or p.is_symlink()]
    if options.skip:
        return [p for p in job.outputs if p not in existing]
    if existing and not options.overwrite:
        raise InputError(f"{existing[0]}: exists; pass --overwrite to replace it (or --skip-existing)")
    return list(job.outputs)


def process(seg, job: Job, options: RunOptions) -> dict:
    """One scan, start to end: skipped when its outputs exist, else segmented with the outputs it
    lacks written (``written``, the label map first); a failure is the entry's one ``error`` line,
    never raised. The entry is what ``--stats`` and ``--table`` record, locally and on a cluster."""
    from .failures import failure_message

    head = {"input": str(job.scan), "output": str(job.dest)}
    try:
        todo = outputs_to_make(job, options)
        if not todo:
            return {**head, "ok": True, "skipped": True}
        caption = f"{case_name(job.scan)} | {seg.bundle.path.name} | {time.strftime('%Y-%m-%d %H:%M')}"
        stats = run_job(seg, job, todo, options, caption)
    except Exception as exc:  # one scan's failure must never stop the batch or print a traceback
        return {**head, "ok": False, "error": failure_message(str(job.scan), exc)}
    entry = {**head, "ok": True, **stats, "written": [str(p) for p in todo]}
    if job.preview is not None:
        entry["preview"] = str(job.preview)
    flagged = flag(entry.get("quality"), options.flag_below)
    if flagged is not None:
        entry["flagged"] = flagged
    return entry


def flag(quality: dict | None, below: float | None) -> dict | None:
    """The ``flagged`` entry of a scan whose lowest Dice estimate is under ``below``: the threshold and
    the labels under it, lowest first (None when no label is, or no threshold was set)."""
    if below is None or not quality:
        return None
    low = sorted((v, k) for k, v in quality["dice_estimate"].items() if v < below)
    if not low:
        return None
    return {"below": below, "labels": {k: v for v, k in low}}


def run_job(seg, job: Job, todo: list[Path], options: RunOptions, caption: str) -> dict:
    """Segment ``job``'s scan and write the outputs in ``todo``, all or none; the scan's report entry
    (timings, volumes of the written labels, warnings). Errors are raised for the caller to report."""
    from ..imaging.io import read_header, read_image
    from .outputs import keep_labels, write_label, write_mask, write_probabilities

    labels = seg.bundle.manifest.labels
    t = time.perf_counter()
    notes: list[str] = []  # what the headers say the DICOM output must repeat of the source's defects
    if job.dest.name.lower().endswith(SEG_SUFFIX) and job.dest in todo:  # knowable from the headers alone
        from ..dicom.headers import RTSTRUCT_REFERENCES, SEG_REFERENCES, check_references
        from ..imaging.io import series_files

        rt = options.dicom_format == "rtstruct"
        what = "an RT Structure Set" if rt else "a DICOM SEG"
        refs = RTSTRUCT_REFERENCES if rt else SEG_REFERENCES
        notes = check_references(series_files(job.scan, options.series), refs, what)
    seg.check_memory(*read_header(job.scan, options.series))  # before any voxel is read or decompressed
    image = read_image(job.scan, series=options.series, channel=options.channel)
    read_s = round(time.perf_counter() - t, 4)
    result = _segment(seg, image, job.scan, options.quiet, options.probs and job.probabilities in todo)
    t = time.perf_counter()
    label = keep_labels(result.labels, options.keep)
    writers: dict[Path, Callable[[Path], object]] = {job.dest: lambda p: write_label(
        label, p, job.scan, options.series, seg.bundle, options.dicom_format)}  # fmt: skip
    for k, path in job.masks.items():
        writers[path] = lambda p, k=k: write_mask(label, k, p)
    if job.probabilities is not None:
        writers[job.probabilities] = lambda p: write_probabilities(result.probabilities, image, labels, p)
    if job.preview is not None:
        from .preview import render, save_preview

        writers[job.preview] = lambda p: save_preview(render(image, label, labels, caption), p)
    paths = [p for p in writers if p in todo]  # the label map first: it is put in place last
    with atomic_outputs(paths, options.overwrite) as tmps:
        for path, tmp in zip(paths, tmps, strict=True):
            writers[path](tmp)
    stats = {**result.stats, "read_s": read_s, "write_s": round(time.perf_counter() - t, 4)}
    stats["warnings"] = [*stats.get("warnings", []), *notes]
    if options.keep is not None:  # the volumes and estimates of what the file holds
        stats["volumes_ml"] = {labels[k]: stats["volumes_ml"][labels[k]] for k in sorted(options.keep)}
        stats["quality"] = only_labels(stats["quality"], [labels[k] for k in sorted(options.keep)])
    return stats


def only_labels(quality: dict, names: list[str]) -> dict:
    """The ``quality`` entry of :meth:`.quality.QualityEstimate.as_dict` restricted to ``names``."""
    est = {k: v for k, v in quality["dice_estimate"].items() if k in names}
    low = min(est, key=est.__getitem__) if est else None
    return {
        **quality,
        "dice_estimate": est,
        "lowest": {"label": low, "dice_estimate": est[low]} if low else None,
        "predicted_empty": [k for k in quality["predicted_empty"] if k in names],
    }


def _segment(seg, image, scan: Path, quiet: bool, probs: bool):
    """The scan's :class:`Segmentation` (with probabilities if asked), a progress bar on a terminal."""

    def call(im, progress=None):
        return seg.segment(im, progress, probabilities=probs)

    if quiet or not sys.stderr.isatty():
        return call(image)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"{scan.name}", total=None)
        return call(image, progress=lambda done, total: bar.update(task, completed=done, total=total))
