"""``imunet-run``: segment scans (files, folders, DICOM series directories) with a model bundle."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import ImunetError, InputError
from ..imaging.formats import WRITABLE_SUFFIXES
from .batch import SEG_SUFFIX, Job, check_outputs, collect_inputs, output_suffix, plan

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
BUNDLE_DEFAULT = "Default: the bundle's."


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"imunet-run {version('imunet')}")
        raise typer.Exit()


def _list_models() -> None:
    """One block per shipped bundle: name, what it is for, labels and measured accuracy."""
    from ..contract.bundle import DEFAULT_MODEL, load_bundle, shipped_bundles

    for name, path in shipped_bundles().items():
        try:
            m = load_bundle(path, verify=False).manifest
        except ImunetError as exc:
            typer.echo(f"{name}: cannot be loaded ({exc})")
            continue
        default = " (default)" if name == DEFAULT_MODEL else ""
        labels = ", ".join(m.labels[k] for k in sorted(m.labels) if k)
        typer.echo(f"{name}{default}: {m.describe()}; {m.kind.name}")
        typer.echo(f"  labels: {labels}")
        acc = m.accuracy
        if acc.get("dice"):
            per = ", ".join(f"{k} {v:.4f}" for k, v in acc["dice"].items() if v is not None)
            typer.echo(f"  validation Dice: mean {acc['mean']:.4f} ({per}); {acc.get('note', '')}".rstrip("; "))
        else:
            typer.echo("  validation Dice: not recorded in the bundle")


def _fail(msg: str) -> None:
    typer.echo(f"imunet-run: error: {msg}", err=True)
    raise typer.Exit(2)


@app.command(help="Segment INPUT scans (NIfTI, NRRD, MHA files, folders of them, or DICOM series directories).")
def run(
    inputs: Optional[list[Path]] = typer.Argument(
        None, help="Scans, folders or DICOM directories.", show_default=False
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Bundle folder, or a shipped model's name (--list-models). Default: hippocampus."
    ),
    list_models: bool = typer.Option(False, "--list-models", help="List the shipped models and exit."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output file (one scan) or folder, created if missing. Default: the current folder."
    ),
    backend: str = typer.Option("auto", help="auto | ort-cpu | openvino | ort-cuda | ort-trt | tensorrt."),
    precision: str = typer.Option(
        "auto",
        help="auto | fp32 | fp16 | int8 | bf16 (openvino). auto: the fastest the bundle and the machine allow.",
    ),
    mode: Optional[str] = typer.Option(None, help=f"adaptive | sparse | dense (implicit bundles). {BUNDLE_DEFAULT}"),
    overlap: Optional[float] = typer.Option(None, help=f"Sliding-window overlap in [0, 1). {BUNDLE_DEFAULT}"),
    stride: Optional[int] = typer.Option(None, help=f"Broad-mesh stride in voxels. {BUNDLE_DEFAULT}"),
    tta: bool = typer.Option(False, "--tta", help="Average over the scan's mirror images (8x the time)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Write per-scan timings, volumes, warnings as JSON."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="PNG of three slices through the largest label."),
    fmt: str = typer.Option(
        ".nii.gz", "--format", help="Output format in folders: .nii.gz | .nii | .nrrd | .mha | .dcm (DICOM SEG)."
    ),
    roi: Optional[list[str]] = typer.Option(None, "--roi", help="Write only these labels (names or numbers)."),
    masks: bool = typer.Option(False, "--masks", help="Also one binary mask file per label: CASE_<label>."),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also CASE_probabilities.npz: float16 class probabilities, scan's grid."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip scans whose output exists (nightly runs)."),
    series: Optional[str] = typer.Option(None, help="DICOM series instance UID (a folder's, or with --dicomweb)."),
    dicomweb: Optional[str] = typer.Option(None, "--dicomweb", help="DICOMweb server URL to read --study from."),
    study: Optional[str] = typer.Option(None, "--study", help="Study instance UID on the --dicomweb server."),
    store: bool = typer.Option(False, "--store", help="Store the DICOM SEG back on the --dicomweb server."),
    channel: Optional[int] = typer.Option(None, help="Volume index of a 4D input."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Refuse scans needing more GiB than this."),
    workers: Optional[int] = typer.Option(
        None, help="Windows computed at once on a CPU backend. Default: 2 with 2+ cores; GPUs run 1."
    ),
    trusted_keys: Optional[Path] = typer.Option(
        None, "--trusted-keys", help="Folder of public keys; the bundle must be signed by one of them."
    ),
    allow_modality: bool = typer.Option(
        False, "--allow-modality", help="Run DICOM scans of another modality than the model's (refused otherwise)."
    ),
    refuse_out_of_domain: bool = typer.Option(
        False,
        "--refuse-out-of-domain",
        help="Refuse (FAILED, exit 1, no output) a scan whose field of view or intensities lie far outside "
        "the training data, instead of segmenting it with a WARNING.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors, warnings and the summary line."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from .pipeline import Segmenter

    if list_models:
        _list_models()
        return
    if fmt not in (*WRITABLE_SUFFIXES, SEG_SUFFIX):
        _fail(f"--format must be one of {', '.join(WRITABLE_SUFFIXES)}, {SEG_SUFFIX}; got {fmt!r}")
    if overwrite and skip_existing:
        _fail("--overwrite and --skip-existing contradict each other; pass one")
    _check_dicom_options(inputs, out, fmt, dicomweb, study, store, masks or save_probabilities)
    scans, notes = collect_inputs(inputs or [])
    if len(scans) > 1 and out is not None and output_suffix(out):
        _fail(f"--out {out} names a file but {len(scans)} scans were given; pass a folder")
    for path, what in ((stats, "--stats"), (preview if len(scans) == 1 else None, "--preview")):
        if path is not None and path.exists() and not overwrite:
            _fail(f"{what} {path} exists; pass --overwrite to replace it")
    try:
        seg = Segmenter(
            model, backend=backend, mode=mode, overlap=overlap, stride=stride, max_memory_gb=max_memory,
            precision=precision, workers=workers, trusted_keys=trusted_keys, allow_modality=allow_modality,
            refuse_out_of_domain=refuse_out_of_domain, tta=tta or None,
        )  # fmt: skip
        from .outputs import roi_labels

        keep = roi_labels(roi, seg.bundle.manifest.labels) if roi else None
    except (ImunetError, ValueError) as exc:
        _fail(str(exc))
    if not quiet:
        _header(seg, notes)
    options = {"overwrite": overwrite, "skip": skip_existing, "keep": keep, "masks": masks, "probs": save_probabilities}
    if dicomweb:
        from .dicomweb_run import StudyRequest, run_dicomweb

        request = StudyRequest(dicomweb, study, series, store)  # type: ignore[arg-type]
        report = [run_dicomweb(seg, request, out, options, quiet)]
    else:
        jobs = [_with_extras(job, seg.bundle.manifest.labels, options) for job in plan(scans, out, fmt, preview)]
        try:
            check_outputs(jobs, [(stats, "--stats")] if stats is not None else [])
        except ImunetError as exc:
            seg.close()
            _fail(str(exc))
        report = [_one(seg, job, i, len(scans), quiet, options, series, channel) for i, job in enumerate(jobs)]
    seg.close()
    _finish(seg, report, stats, quiet)


def _check_dicom_options(inputs, out, fmt, dicomweb, study, store, extras: bool) -> None:
    """Refuse, before any work, what the DICOM outputs cannot do."""
    seg_out = (out is not None and output_suffix(out) == SEG_SUFFIX) or fmt == SEG_SUFFIX
    if dicomweb:
        if inputs:
            _fail("--dicomweb reads its scan from the server; give no input files with it")
        if not study:
            _fail("--dicomweb needs --study UID")
        if not store and out is None:
            _fail("--dicomweb needs --store, --out FILE, or both")
        if out is not None and not output_suffix(out):
            _fail(f"--out {out}: with --dicomweb, name a file (.dcm for a DICOM SEG, or an image format)")
        return
    if not inputs:
        _fail("give scans, folders or DICOM directories, or --dicomweb URL --study UID")
    if study or store:
        _fail("--study and --store go with --dicomweb")
    if seg_out:
        not_dicom = [p for p in inputs if not p.is_dir()]
        if not_dicom:
            _fail(f"{not_dicom[0]}: a DICOM SEG ({SEG_SUFFIX}) references a DICOM series; this input is not one")
        if extras:
            _fail("--masks and --save-probabilities write images beside an image output, not beside a DICOM SEG")


def _header(seg, notes: list[str]) -> None:
    m = seg.bundle.manifest
    sig = seg.bundle.signature
    labels = ", ".join(v for k, v in m.labels.items() if k)
    windows = f"up to {seg.workers} windows at a time" if seg.workers > 1 else "one window at a time"
    mode = m.kind.mode_of(seg.settings.mode)
    typer.echo(f"model {seg.bundle.path.name}: {m.describe()}; {m.kind.name}, labels {labels}")
    typer.echo(
        f"bundle {sig.describe() if sig else 'unsigned'}; backend {seg.backend_name} ({seg.backend.precision}), "
        f"mode {mode}{', mirrored' if seg.settings.tta else ''}, {windows}"
    )
    for note in [*m.notes, *(f"passed over {s}" for s in seg.backend.skipped), *notes]:
        typer.echo(f"note: {note}", err=True)


def _with_extras(job: Job, labels: dict[int, str], options: dict) -> Job:
    """``job`` with the masks and probabilities it writes beside its label map, when asked for."""
    from .outputs import mask_paths

    suffix = output_suffix(job.dest)
    if not suffix:
        return job
    if options["masks"]:
        job.masks = mask_paths(job.dest, suffix, labels, options["keep"])
    if options["probs"]:
        job.probabilities = job.dest.with_name(job.dest.name[: -len(suffix)] + "_probabilities.npz")
    return job


def _one(seg, job: Job, i: int, total: int, quiet: bool, options: dict, series, channel) -> dict:
    """Segment one scan and write its outputs; a failure is reported, never raised."""
    from ..imaging.io import read_header, read_image
    from .outputs import keep_labels, write_label, write_masks, write_probabilities

    labels = seg.bundle.manifest.labels
    timings: dict = {}
    try:
        if options["skip"] and job.dest.exists():
            if not quiet:
                typer.echo(f"[{i + 1}/{total}] {job.scan.name}: skipped, {job.dest} exists")
            return {"input": str(job.scan), "output": str(job.dest), "ok": True, "skipped": True}
        existing = [p for p in job.outputs if p.exists()]
        if existing and not options["overwrite"]:
            raise InputError(f"{existing[0]}: exists; pass --overwrite to replace it (or --skip-existing)")
        t = time.perf_counter()
        seg.check_memory(*read_header(job.scan, series))  # before any voxel is read or decompressed
        image = read_image(job.scan, series=series, channel=channel)
        timings["read_s"] = round(time.perf_counter() - t, 4)
        result = _segment(seg, image, job.scan, quiet, options["probs"])
        label, probs = result.labels, result.probabilities
        t = time.perf_counter()
        label = keep_labels(label, options["keep"])
        if not job.dest.parent.exists() and not quiet:
            typer.echo(f"creating the output folder {job.dest.parent}")
        write_label(label, job.dest, job.scan, series, seg.bundle, options["overwrite"])
        write_masks(label, job.masks, options["overwrite"])
        if probs is not None:
            write_probabilities(probs, image, labels, job.probabilities, options["overwrite"])
        if job.preview is not None:
            from .preview import write_preview

            write_preview(image, label, job.preview, labels, options["overwrite"])
        timings["write_s"] = round(time.perf_counter() - t, 4)
    except Exception as exc:  # one scan's failure must never stop the batch or print a traceback
        return _failure(job.scan, exc)
    stats = {**result.stats, **timings}
    for w in stats["warnings"]:
        typer.echo(f"WARNING {job.scan}: {w}", err=True)
    if not quiet:
        vols = ", ".join(f"{k} {v:.2f} ml" for k, v in stats["volumes_ml"].items())
        seconds = timings["read_s"] + stats["total_s"] + timings["write_s"]
        typer.echo(f"[{i + 1}/{total}] {job.scan.name} -> {job.dest}  {seconds:.2f} s  ({vols})")
    return {"input": str(job.scan), "output": str(job.dest), "ok": True, **stats}


def _failure(scan: Path, exc: Exception) -> dict:
    from .failures import failure_message

    msg = failure_message(str(scan), exc)
    typer.echo(f"FAILED {msg}", err=True)
    return {"input": str(scan), "ok": False, "error": msg}


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


def _finish(seg, report: list[dict], stats: Path | None, quiet: bool) -> None:
    failed = [r["input"] for r in report if not r["ok"]]
    skipped = sum(1 for r in report if r.get("skipped"))
    if stats is not None:
        from ..imaging.atomic import write_text_atomic

        sig = seg.bundle.signature
        payload = {
            "model": str(seg.bundle.path),
            "signature": ({"key": sig.fingerprint, "verified": True} if sig.verified else {"verified": False})
            if sig
            else None,
            "backend": seg.backend_name,
            "scans": report,
        }
        write_text_atomic(stats, json.dumps(payload, indent=2) + "\n", overwrite=True)  # refused up front if it existed
    done = len(report) - len(failed) - skipped
    line = f"{done} of {len(report)} scans segmented" + (f", {skipped} skipped (output exists)" if skipped else "")
    if failed:
        typer.echo(f"{line}; failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
    typer.echo(line)


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM (a scheduler stopping the job) ends the run as an interruption does: temporary files
    and fetched series are removed on the way out instead of being left behind."""
    raise SystemExit(128 + signum)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="imunet-run")


if __name__ == "__main__":
    main()
